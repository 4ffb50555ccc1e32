"""The OpenAI request bodies the server accepts, as pydantic models: every field typed and bounded here, at
the edge, so that nothing out of range reaches the scheduler (servers were crashed through unbounded `n`,
`max_tokens`, `top_logprobs`, negative or extreme sampling values: ../docs/security notes).

Unknown fields are ignored, as OpenAI's own server and vLLM do (clients send fields of newer API versions);
fields we know but do not implement (`tools`, `echo`, ...) are refused with a 400 rather than ignored,
because a client relying on them would otherwise get a silently different answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gemma3.generation.sampling import MIN_PENALTY, MIN_TEMPERATURE

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
SEED_MAX = 2**64 - 1

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)


class TextPart(_Base):
    type: Literal["text"]
    text: str


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JsonSchemaFormat(_Base):
    name: str = Field(default="response", max_length=256)
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str | None = None
    # None = the model's own defaults (Gemma 3: temperature 1.0, top_k 64, top_p 0.95), as vLLM does
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1 << 18)] | None = None  # -1 or 0: off (vLLM, llama.cpp)
    min_p: Unit | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_PENALTY, le=10.0, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # known, not implemented: refused (see the module docstring)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:  # logits / T would overflow float32
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        return stops

    def unsupported(self) -> str | None:
        """The first field set that this server does not implement."""
        for name in ("tools", "functions", "logit_bias", "suffix"):
            if getattr(self, name):
                return name
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    chat_template: Any = None  # never taken from a request (refused below)
    tool_choice: Any = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class TokenizeRequest(_Base):
    content: str
    add_special: bool = True  # llama.cpp's name: a <bos> in front
    with_pieces: bool = False


class DetokenizeRequest(_Base):
    tokens: list[int]
