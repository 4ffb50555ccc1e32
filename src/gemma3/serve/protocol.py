"""The OpenAI request bodies the server accepts, as pydantic models, and OpenAI's error object (APIError):
every field typed and bounded here, at the edge, so that nothing out of range reaches the scheduler (servers
were crashed through unbounded `n`, `max_tokens`, `top_logprobs`, negative or extreme sampling values:
../docs/security notes).

Unknown fields are ignored, as OpenAI's own server and vLLM do (clients send fields of newer API versions);
fields we know but do not implement (`echo`, `logit_bias`, the legacy `functions`, ...) are refused with a 400
rather than ignored, because a client relying on them would otherwise get a silently different answer.
Tool declarations are checked further, with the rules of the call format, by gemma3.text.tools.parse_tools.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gemma3.generation.sampling import MIN_PENALTY, MIN_TEMPERATURE

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_TOOLS = 128
SEED_MAX = 2**64 - 1
MAX_INSIDE_TOP_K = 20
MAX_INSIDE_LAYERS = 4
MAX_INSIDE_IDS = 1 << 17  # ids in a look-inside body (the server reads at most --inside-tokens of them)

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class APIError(Exception):
    """A request the server refuses: answered with OpenAI's error object and a 4xx (or 5xx) status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)


class TextPart(_Base):
    type: Literal["text"]
    text: str


class FunctionCall(_Base):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI: a JSON string


class ToolCall(_Base):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant message that only calls tools
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # role assistant
    tool_call_id: str | None = None  # role tool: the call this result answers

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self

    def text(self) -> str | None:
        if self.content is None:
            return None
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as gemma3.text.chat takes it (OpenAI's shape; None fields left out)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if self.content is not None or not self.tool_calls:
            out["content"] = self.text() if self.content is not None else ""
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Base):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object
    strict: bool | None = None  # every call is kept to the schema here anyway


class ToolDefinition(_Base):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


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
    return_token_ids: bool = False  # vLLM's: the prompt's ids and each choice's generated ids in the response
    response_format: ResponseFormat | None = None
    user: str | None = None
    # known, not implemented: refused (see the module docstring)
    functions: list[Any] | None = None
    function_call: Any = None
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
        for name in ("functions", "function_call", "logit_bias", "suffix"):
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
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Sampling):
    tools: Any = None  # refused: tools are a chat feature
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class TokenizeRequest(_Base):
    content: str
    add_special: bool = True  # llama.cpp's name: a <bos> in front
    with_pieces: bool = False


class DetokenizeRequest(_Base):
    tokens: list[int]


class InsideRequest(_Base):
    """POST /v1/inside: the playground's look inside the model at one token of a text (gemma3.eval.inside).
    Bounds that depend on the server (the tokens read, the vocabulary, the layers) are checked by the handler."""

    tokens: Annotated[list[int], Field(min_length=1, max_length=MAX_INSIDE_IDS)]
    position: Annotated[int, Field(ge=1)]
    top_k: Annotated[int, Field(ge=1, le=MAX_INSIDE_TOP_K)] = 10
    layers: Annotated[list[int], Field(min_length=1, max_length=MAX_INSIDE_LAYERS)] | None = None
