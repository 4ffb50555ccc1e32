"""Text generation: chunked prefill into a KV cache, then one token per step until a stop condition.

    prompt ids ──► prefill (chunks of `prefill_chunk` tokens; a chunk may be longer than the window)
               ──► decode loop: logits of the last position → sampling.next_token → feed it back
               ──► stop on an eos id (<eos> 1 or <end_of_turn> 106), a stop string, max_new_tokens,
                   or the context limit

Batches of prompts of different lengths are left-padded; padding carries position -1, which the cache
stores, so it stays masked on every later step and each row generates exactly what it would alone.
`ChatSession` keeps one cache across turns and prefills only what a new turn adds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gemma3.accel import accelerate
from gemma3.text.chat import render_chat
from gemma3.errors import Gemma3Error
from gemma3.kv_cache import KVCache
from gemma3.model import Gemma3Model
from gemma3.generation.finish import RowState, default_stop_ids
from gemma3.generation.sampling import SamplingParams, check_finite, mask_padding, next_token, tokenizer_vocab
from gemma3.text.streaming import TextStreamer
from gemma3.text.tools import (Tool, ToolCall, ToolCallParser, ToolChoice, finish_reason, parse_tool_choice,
                               parse_tools)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's eos ids plus 1 and 106
    seed: int | None = None
    prefill_chunk: int = 512
    # gemma3.generation.structured.JsonGrammar: constrain the output to JSON (any object, or one matching a schema)
    grammar: Any = None

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise Gemma3Error(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.prefill_chunk < 1:
            raise Gemma3Error(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        self.sampling.validate()


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_steps: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, the stop token included when one ended the generation
    prompt_tokens: int
    finish_reason: str  # "stop" (eos id or stop string), "length" (max_new_tokens) or "context"
    timings: Timings


@dataclass
class ChatReply:
    """A chat turn's answer: its text and the tool calls it made (OpenAI's shape: `call.as_openai()`)."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str  # "tool_calls" where the turn ended after complete calls; else as GenerationResult's
    result: GenerationResult

    def as_message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message, to append to the conversation: its complete calls (one that
        max_new_tokens cut off has no arguments to send back)."""
        calls = [call for call in self.tool_calls if call.complete]
        if not calls:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": self.content or None, "tool_calls": [c.as_openai() for c in calls]}


def _tools_and_choice(tools, tool_choice) -> tuple[list[Tool], ToolChoice]:
    parsed = [t if isinstance(t, Tool) else parse_tools([t])[0] for t in tools or ()]
    if len({t.name for t in parsed}) != len(parsed):
        parse_tools([t.as_openai() for t in parsed])  # names the duplicate
    choice = tool_choice if isinstance(tool_choice, ToolChoice) else parse_tool_choice(tool_choice, parsed)
    return parsed, choice


def _reply(text: str, result: GenerationResult) -> ChatReply:
    parser = ToolCallParser()
    parser.push(text)
    parser.finish()
    return ChatReply(parser.text, parser.calls, finish_reason(result.finish_reason, parser.calls), result)


class Generator:
    """Generation with one model and tokenizer. Stateless between calls except for `ChatSession`'s cache."""

    def __init__(self, model: Gemma3Model, tokenizer, dtype: torch.dtype | None = None,
                 pack_weights: bool | None = None, kv_cache_dtype: torch.dtype | None = None):
        """`pack_weights`: gemma3.accel.accelerate's `native` (None = decided from the RAM; False = the
        model's own matrix products and no fused step); `kv_cache_dtype`: None = chosen per batch."""
        self.model = model.eval()
        self.accel = accelerate(self.model, native=pack_weights, kv_cache_dtype=kv_cache_dtype)
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, dtype or param.dtype

    # what accelerate decided, adjustable afterwards
    fuse_steps = property(lambda self: self.accel.fuse_steps, lambda self, v: setattr(self.accel, "fuse_steps", v))
    kv_cache_dtype = property(lambda self: self.accel.kv_cache_dtype,
                              lambda self, v: setattr(self.accel, "kv_cache_dtype", v))

    def cache_dtype(self, batch_size: int) -> torch.dtype:
        """The KV cache's dtype for `batch_size` sequences (gemma3.accel.Acceleration.cache_dtype)."""
        return self.accel.cache_dtype(batch_size, self.dtype)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def stop_ids(self, config: GenerationConfig) -> tuple[int, ...]:
        if config.stop_token_ids is not None:
            return tuple(config.stop_token_ids)
        return default_stop_ids(self.model.config)

    def encode(self, prompt: str, add_bos: bool = True) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise Gemma3Error("the prompt is empty" if not prompt else "the prompt is only whitespace")
        return self.tokenizer.encode(prompt, add_bos=add_bos and not prompt.startswith("<bos>"))

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None) -> GenerationResult:
        """Generate a completion of one prompt (text, or token ids that already start with <bos>)."""
        return self.generate_batch([prompt], config)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig | None = None
                       ) -> list[GenerationResult]:
        config = config or GenerationConfig()
        prompt_ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        streamers = [TextStreamer(self.tokenizer, config.stop_strings) for _ in prompt_ids]
        texts = [[] for _ in prompt_ids]
        run = _Run(self, prompt_ids, config)
        for row, token, delta in run.steps(streamers):
            texts[row].append(delta)
        return [run.result(r, "".join(texts[r]) + run.rows[r].flush()) for r in range(len(prompt_ids))]

    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping | Tool] | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True, config: GenerationConfig | None = None,
             template: Any = None) -> ChatReply:
        """One chat turn: `messages` (OpenAI's shapes, tool calls and results included) rendered with `template`
        (a checkpoint's; None: the built-in formats), and the reply read back into text and tool calls. With
        `tools` (OpenAI's {"type": "function", "function": {...}} or `Tool`s), `tool_choice` ("auto" by
        default, "none", "required" or {"type": "function", "function": {"name": ...}}) is kept by a grammar
        and every call validates against its tool's schema (gemma3.generation.tool_grammar)."""
        from gemma3.generation.tool_grammar import with_tools

        tools, choice = _tools_and_choice(tools, tool_choice)
        config = with_tools(config or GenerationConfig(), tools, choice, parallel_tool_calls, self.tokenizer)
        text = render_chat(messages, add_generation_prompt=True, template=template, tools=tools)
        result = self.generate(self.tokenizer.encode(text, add_bos=not text.startswith("<bos>")), config)
        return _reply(result.text, result)

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None) -> Iterator[str]:
        """Yield text deltas as they become final (never half a UTF-8 character, never a stop string).
        After the iterator ends, `self.last_result` holds the full GenerationResult."""
        config = config or GenerationConfig()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        run = _Run(self, [ids], config)
        pieces: list[str] = []
        yield from run.stream_text(pieces)
        self.last_result = run.result(0, "".join(pieces))


class _Run:
    """One batched generation: owns the cache, the token history and each row's `RowState`."""

    def __init__(self, gen: Generator, prompt_ids: list[list[int]], config: GenerationConfig,
                 cache: KVCache | None = None, cached_tokens: int = 0, context_length: int | None = None):
        """`context_length`: the context to stay within (ChatSession's may be shorter than the model's)."""
        config.validate()
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise Gemma3Error("the prompt is empty")
        self.gen, self.config = gen, config
        self.prompt_ids = prompt_ids
        longest = max(len(p) for p in prompt_ids)
        limit = gen.context_length
        if longest >= limit:
            raise Gemma3Error(f"the prompt has {longest} tokens, but the model's context is {limit} tokens")
        self.budget = min(config.max_new_tokens, (context_length or limit) - longest)
        self.cache = cache or KVCache(gen.model.config, len(prompt_ids), longest + self.budget,
                                      gen.cache_dtype(len(prompt_ids)), gen.device)
        self.cached_tokens = cached_tokens  # tokens of prompt_ids[0] the cache already holds (chat reuse)
        self.timings = Timings()
        self.stop_ids = set(gen.stop_ids(config))
        self.matchers: list[Any] = [None] * len(prompt_ids)
        if config.grammar is not None:
            self.matchers = [config.grammar.matcher(gen.tokenizer, tuple(self.stop_ids)) for _ in prompt_ids]
        self.rows: list[RowState] = []  # made by `steps`, one per prompt

    @property
    def generated(self) -> list[list[int]]:
        return [row.generated for row in self.rows]

    @property
    def finish(self) -> list[str | None]:
        return [row.reason for row in self.rows]

    def result(self, r: int, text: str) -> GenerationResult:
        row = self.rows[r]
        return GenerationResult(text, row.generated, len(self.prompt_ids[r]), row.reason, self.timings)

    def stream_text(self, pieces: list[str]) -> Iterator[str]:
        """The text of a one-prompt run as it becomes final; every piece is also appended to `pieces`."""
        streamer = TextStreamer(self.gen.tokenizer, self.config.stop_strings)
        for _, _, delta in self.steps([streamer]):
            if delta:
                pieces.append(delta)
                yield delta
        tail = self.rows[0].flush()
        if tail:
            pieces.append(tail)
            yield tail

    def steps(self, streamers: list[TextStreamer]) -> Iterator[tuple[int, int, str]]:
        """Yield (row, token, text delta) for every generated token of every still-running row."""
        cfg = self.config
        # every row may take `budget` tokens: the longest prompt's room in the context, or max_new_tokens
        self.rows = [RowState(self.stop_ids, cfg.max_new_tokens, self.budget, streamer, matcher)
                     for streamer, matcher in zip(streamers, self.matchers)]
        ids, mask, history = self._padded_prompts()
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=self.gen.device).manual_seed(cfg.seed)
        with torch.inference_mode():
            logits = self._prefill(ids, mask)
            t1 = time.perf_counter()
            fused = self.gen.accel.fused_step(self.cache)
            vocab = tokenizer_vocab(self.gen.tokenizer)
            for step in range(self.budget):
                token = self._next_tokens(logits, history, generator, vocab)
                history = torch.cat([history, token[:, None]], dim=1)
                for r, row in enumerate(self.rows):
                    if not row.finished:
                        yield r, int(token[r]), row.push(int(token[r]))
                self.timings.decode_steps += 1
                if all(row.finished for row in self.rows):  # at the latest after `budget` steps
                    break
                logits = self._decode_step(token, fused, step + 1)
            self.timings.decode_s = time.perf_counter() - t1

    def _padded_prompts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, history), each (B, T): the prompts left-padded, which positions are real, and the
        token history for the repetition penalty (padded with a real id of the row)."""
        B, T = len(self.prompt_ids), max(len(p) for p in self.prompt_ids)
        ids = torch.full((B, T), self.gen.model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        history = torch.zeros(B, T, dtype=torch.long)
        for r, p in enumerate(self.prompt_ids):
            ids[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = True
            history[r] = ids[r]
            history[r, :T - len(p)] = p[0]
        return ids, mask, history

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the prompts (past what the cache holds) in chunks of `prefill_chunk`; the last position's logits."""
        model, device, chunk_size = self.gen.model, self.gen.device, self.config.prefill_chunk
        t0 = time.perf_counter()
        start, T = self.cached_tokens, ids.shape[1]
        logits = None
        for s in range(start, T, chunk_size):
            chunk = slice(s, min(T, s + chunk_size))
            logits = model(ids[:, chunk].to(device), padding_mask=mask[:, chunk].to(device),
                           cache=self.cache, logits_to_keep=1).logits[:, -1]
        check_finite(logits, 0, self.cache.keys[0].dtype)
        self.timings.prefill_tokens = int(mask[:, start:].sum())
        self.timings.prefill_s = time.perf_counter() - t0
        return logits

    def _next_tokens(self, logits: torch.Tensor, history: torch.Tensor, generator: torch.Generator | None,
                     vocab: int | None) -> torch.Tensor:
        """(B,) the next token of every row, on the CPU: padding rows masked, each running row's grammar applied."""
        logits = mask_padding(logits.float(), vocab)
        if self.config.grammar is not None:
            logits = torch.stack([row.matcher.constrain(l) if not row.finished else l
                                  for row, l in zip(self.rows, logits)])
        return next_token(logits, self.config.sampling, history.to(self.gen.device), generator).cpu()

    def _decode_step(self, token: torch.Tensor, fused, generated: int) -> torch.Tensor:
        """Feed `token` (B,) and return the next logits: through the fused native step where `accelerate`
        gave one (one sequence of a quantized model), else through the model's modules."""
        if fused is not None:
            logits = fused(int(token[0]))
        else:
            logits = self.gen.model(token[:, None].to(self.gen.device), cache=self.cache,
                                    logits_to_keep=1).logits[:, -1]
        check_finite(logits, generated, self.cache.keys[0].dtype)
        return logits


class ChatSession:
    """A multi-turn conversation that reuses its KV cache: each turn prefills only the tokens it adds.

    The conversation is rendered with the checkpoint's own chat template when it has one, the built-in
    Gemma 3 format otherwise. If the rendered history no longer starts with what the cache holds (a
    template that rewrites earlier turns, or dropped turns), the cache is rebuilt from scratch.
    A conversation that outgrows the context drops its oldest turns (the system message is kept).
    """

    def __init__(self, gen: Generator, system: str | None = None, template: str | None = None,
                 context_length: int | None = None, config: GenerationConfig | None = None,
                 tools: Sequence[Mapping | Tool] | None = None, tool_choice: Any = None,
                 parallel_tool_calls: bool = True):
        """`tools` / `tool_choice` / `parallel_tool_calls` as in `Generator.chat`: a reply may then call tools
        (`last_reply.tool_calls`); answer them with `send_tool_results`, which streams the model's next words."""
        self.gen, self.system, self.template = gen, system, template
        self.tools, self.tool_choice = _tools_and_choice(tools, tool_choice)
        self.parallel_tool_calls = parallel_tool_calls
        self.config = config or GenerationConfig()
        self.config.validate()
        self.context_length = min(context_length or gen.context_length, gen.context_length)
        if self.config.max_new_tokens >= self.context_length:  # each turn keeps room for max_new_tokens
            raise Gemma3Error(f"max_new_tokens {self.config.max_new_tokens} leaves no room for a message in the "
                              f"{self.context_length}-token context")
        self.messages: list[dict[str, Any]] = []
        self.cache: KVCache | None = None
        self.cache_ids: list[int] = []
        self.dropped_turns = 0
        self.last_reply: ChatReply | None = None

    def reset(self) -> None:
        self.messages, self.cache_ids, self.dropped_turns, self.last_reply = [], [], 0, None
        if self.cache is not None:
            self.cache.reset()

    def _render(self, messages: list[Mapping[str, Any]]) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = render_chat(full, add_generation_prompt=True, template=self.template, tools=self.tools)
        return self.gen.tokenizer.encode(text, add_bos=not text.startswith("<bos>"))

    def send(self, user_text: str) -> Iterator[str]:
        """Add a user turn and stream the model's reply (its text; calls are in `last_reply.tool_calls`).
        `self.last_result` holds the GenerationResult afterwards."""
        if not user_text.strip():
            raise Gemma3Error("the message is empty")
        yield from self._turn(self.messages + [{"role": "user", "content": user_text}], self.tool_choice)

    @property
    def pending_calls(self) -> list[ToolCall]:
        """The complete calls of the last reply that have no result yet."""
        answered = {m.get("tool_call_id") for m in self.messages if m.get("role") == "tool"}
        calls = self.last_reply.tool_calls if self.last_reply else []
        return [c for c in calls if c.complete and c.id not in answered]

    def send_tool_results(self, results: Mapping[str, Any], tool_choice: Any = "auto") -> Iterator[str]:
        """Answer the last reply's calls — {call id: result}, a result being text or JSON-able data — and
        stream what the model says next, under `tool_choice` ("auto": an answer or more calls; the session's
        own choice applies to each user message's first reply)."""
        choice = _tools_and_choice(self.tools, tool_choice)[1]
        pending = {c.id for c in self.pending_calls}
        if not results:
            raise Gemma3Error("no tool results given")
        unknown = [i for i in results if i not in pending]
        if unknown:
            raise Gemma3Error(f"no pending tool call has the id {unknown[0]!r} (pending: {sorted(pending) or 'none'})")
        tool_messages = [{"role": "tool", "tool_call_id": call_id,
                          "content": value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}
                         for call_id, value in results.items()]
        yield from self._turn(self.messages + tool_messages, choice)

    def _turn(self, messages: list[dict[str, Any]], choice: ToolChoice) -> Iterator[str]:
        config = self.config
        if self.tools:
            from gemma3.generation.tool_grammar import with_tools

            config = with_tools(config, self.tools, choice, self.parallel_tool_calls, self.gen.tokenizer)
        ids = self._render(messages)
        room = self.context_length - config.max_new_tokens
        while len(ids) > room and len(messages) > 1:
            messages = messages[1:]  # drop the oldest turn: up to the next user message
            while len(messages) > 1 and messages[0].get("role") != "user":
                messages = messages[1:]
            self.dropped_turns += 1
            ids = self._render(messages)
        if len(ids) > room:
            raise Gemma3Error(f"this message needs {len(ids)} tokens, but only {room} fit in the "
                              f"{self.context_length}-token context with {config.max_new_tokens} "
                              f"new tokens; shorten it, lower --max-new-tokens or raise --context")

        if self.cache is None:
            self.cache = KVCache(self.gen.model.config, 1, self.context_length, self.gen.cache_dtype(1),
                                 self.gen.device)
        reuse = len(self.cache_ids) if ids[:len(self.cache_ids)] == self.cache_ids and len(ids) > len(self.cache_ids) else 0
        if reuse == 0:
            self.cache.reset()
        run = _Run(self.gen, [ids], config, cache=self.cache, cached_tokens=reuse,
                   context_length=self.context_length)
        pieces: list[str] = []
        parser = ToolCallParser() if self.tools else None
        for delta in run.stream_text(pieces):
            if parser is None:
                yield delta
            elif (content := parser.push(delta).content):
                yield content
        if parser is not None and (content := parser.finish().content):
            yield content
        text = "".join(pieces)
        # the cache holds the prompt and every generated token but the last (sampled, never fed back)
        self.cache_ids = ids + run.rows[0].generated[:-1]
        self.last_result = run.result(0, text)
        self.last_reply = _reply(text, self.last_result)
        reply = self.last_reply.as_message() if self.tools else {"role": "model", "content": text}
        self.messages = messages + [reply]
        self.last_reused_tokens = reuse
