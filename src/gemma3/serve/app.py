"""The HTTP side of `gemma3 serve`: OpenAI's chat and completions endpoints, and llama.cpp's tokenize /
detokenize, over Starlette. It validates each request (gemma3.serve.protocol), renders and tokenizes the
prompt, compiles a JSON schema, submits `Request`s to the scheduler and turns its events into OpenAI's
response bodies or server-sent events. It never touches a tensor.

    POST /v1/chat/completions   messages → the checkpoint's chat template → completion (stream or not)
    POST /v1/completions        a prompt (text or token ids) → completion
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", active/waiting requests, slots}
    POST /tokenize, /detokenize llama.cpp's: text ↔ token ids
    POST /apply-template        llama.cpp's: the prompt text a chat body renders to (messages and tools)
    GET  /openapi.json          the OpenAPI 3.1 description of these routes (gemma3.serve.openapi)
    GET  /, POST /v1/inside     the playground page and its look inside the model (gemma3.serve.playground)

Two extensions the playground uses, under the names other servers gave them: `"return_token_ids": true`
(vLLM's) adds `prompt_token_ids` to the response and `token_ids` to each choice (in a stream, to the chunks
that carry them); and every response says how fast it was in llama.cpp's `timings` (on the whole response,
and on the chunk that finishes choice 0): prompt = from taking a row to the first token, predicted = the
tokens after it.

Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`): the tools are declared in the prompt
(gemma3.text.tools), generation is kept to what `tool_choice` allows by a grammar
(gemma3.generation.tool_grammar), and the output is read back into OpenAI's `tool_calls`, streamed as
OpenAI streams them (a call's first delta carries its index, id, type and name; its arguments follow).

Errors are OpenAI's error object with a 4xx status: 400 for anything wrong in a request (the field named in
`param`; `context_length_exceeded` for a prompt beyond the context), 401 for a missing or wrong key, 404 for
another model name, 413 for a body over the cap, 429 when the queue is full. A stream that fails midway
ends with an error event and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemma3.text.chat import render_chat
from gemma3.text.tools import ToolCallParser, finish_reason, parse_tool_choice, parse_tools
from gemma3.errors import Gemma3Error
from gemma3.generation.sampling import SamplingParams
from gemma3.serve.openapi import openapi_document
from gemma3.serve.playground import InsideEndpoints, ui_routes
from gemma3.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest, _Sampling)
from gemma3.serve.scheduler import Failed, Finished, QueueFull, Request, Scheduler, TokenEvent

MAX_BODY_BYTES = 1 << 20
_request_numbers = itertools.count()
# Gemma 3's own sampling defaults (generation_config.json of the IT checkpoints), used where a request is silent
DEFAULTS = SamplingParams()


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    chat_template: Any = None  # gemma3.text.chat.ChatTemplate, None = the built-in Gemma 3 format
    ui: bool = False  # serve the playground page at / (`gemma3 serve` does, unless --no-ui)
    inside_tokens: int = 1024  # the most tokens a look inside the model reads (0: off)
    inside_seconds: float = 5.0  # and the longest it may hold the model


def request_id(prefix: str) -> str:
    """OpenAI-style ids ("chatcmpl-...", "cmpl-..."), unique within and across this server's runs."""
    return f"{prefix}-{os.getpid():x}{int(time.time() * 1000) % (1 << 32):08x}{next(_request_numbers):06d}"


def create_app(scheduler: Scheduler, config: ServerConfig) -> Starlette:
    server = _Server(scheduler, config)
    routes = [
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/apply-template", server.apply_template, methods=["POST"]),
        Route("/openapi.json", server.openapi, methods=["GET"]),
        *InsideEndpoints(server, config.inside_tokens, config.inside_seconds).routes(),
    ]
    if config.ui:
        routes += ui_routes()
    app = Starlette(routes=routes, exception_handlers={APIError: lambda r, e: e.response(),
                                                       404: _not_found, 405: _not_allowed})
    app.state.server = server
    return app


async def _not_found(request, exc):
    return APIError(404, f"no route {request.url.path}", code="not_found").response()


async def _not_allowed(request, exc):
    return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()


class _Server:
    def __init__(self, scheduler: Scheduler, config: ServerConfig):
        self.scheduler, self.config = scheduler, config
        self.tokenizer = scheduler.tokenizer
        self.created = int(time.time())

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: HTTPRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    async def _body(self, request: HTTPRequest, model: type):
        self._authorize(request)
        cap = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise APIError(413, f"the request body is over {cap} bytes", code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise APIError(413, f"the request body is over {cap} bytes", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client went away before the body was read") from None
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param) from None
        except RecursionError:
            raise APIError(400, "the body is nested too deeply") from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} is not served here; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found")

    # ------------------------------------------------------------------ simple endpoints
    async def models(self, request: HTTPRequest):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "gemma3",
             "max_model_len": self.scheduler.context}]})

    async def openapi(self, request: HTTPRequest):  # no key needed: it says what the code says; built once
        self._openapi = getattr(self, "_openapi", None) or JSONResponse(openapi_document(self.config.model_name)).body
        return Response(self._openapi, media_type="application/json")

    async def health(self, request: HTTPRequest):
        return JSONResponse({"status": "ok", **self.scheduler.stats()})

    async def tokenize(self, request: HTTPRequest):
        body = await self._body(request, TokenizeRequest)
        ids = await run_in_threadpool(self.tokenizer.encode, body.content, body.add_special)
        if not body.with_pieces:
            return JSONResponse({"tokens": ids})
        return JSONResponse({"tokens": [{"id": i, "piece": self.tokenizer.id_to_piece(i)} for i in ids]})

    async def detokenize(self, request: HTTPRequest):
        body = await self._body(request, DetokenizeRequest)
        self._check_ids(body.tokens, "tokens")
        return JSONResponse({"content": self.tokenizer.decode(body.tokens)})

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.scheduler.vocab
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    # ------------------------------------------------------------------ completions
    async def chat(self, request: HTTPRequest):
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools, choice = self._tools(body)
        render = self._renderer(body, tools)

        def tokens() -> list[int]:
            text = render()
            return self.tokenizer.encode(text, add_bos=not text.startswith("<bos>"))

        prompt = await self._prepare(body, tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self._run(request, body, prompt, max_tokens, logprobs, chat=True, tools=(tools, choice))

    async def apply_template(self, request: HTTPRequest):
        """llama.cpp's /apply-template: the prompt a chat body renders to, without generating."""
        body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        tools, _ = self._tools(body)
        render = self._renderer(body, tools)
        try:
            text = await run_in_threadpool(render)
        except Gemma3Error as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return JSONResponse({"prompt": text})

    def _tools(self, body: ChatCompletionRequest):
        """The request's tools and tool choice, checked (400s name the field)."""
        if body.chat_template is not None:
            raise APIError(400, "chat_template: a chat template is never taken from a request", param="chat_template")
        try:
            tools = parse_tools([t.model_dump(exclude_none=True) for t in body.tools or ()])
        except Gemma3Error as e:
            raise APIError(400, str(e), param="tools") from None
        try:
            choice = parse_tool_choice(body.tool_choice if isinstance(body.tool_choice, (str, type(None)))
                                       else body.tool_choice.model_dump(), tools)
        except Gemma3Error as e:
            raise APIError(400, str(e), param="tool_choice") from None
        if tools and body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format and tools cannot be combined: a reply is either kept to one "
                                "JSON schema or may call tools", param="response_format")
        return tools, choice

    def _renderer(self, body: ChatCompletionRequest, tools):
        messages = [m.as_dict() for m in body.messages]
        return lambda: render_chat(messages, add_generation_prompt=True, template=self.config.chat_template,
                                   tools=tools)

    async def completions(self, request: HTTPRequest):
        body: CompletionRequest = await self._body(request, CompletionRequest)
        if body.tools:
            raise APIError(400, "tools: only /v1/chat/completions takes tools", param="tools")
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt

        def tokens() -> list[int]:
            if isinstance(prompt, list):
                self._check_ids(prompt, "prompt")
                return list(prompt)
            if not prompt:
                raise Gemma3Error("the prompt is empty")
            return self.tokenizer.encode(prompt, add_bos=not prompt.startswith("<bos>"))

        ids = await self._prepare(body, tokens, "prompt")
        return await self._run(request, body, ids, body.max_tokens, body.logprobs, chat=False)

    async def _prepare(self, body: _Sampling, tokens, param: str) -> list[int]:
        self._check_model(body.model)
        unsupported = body.unsupported()
        if unsupported in ("functions", "function_call"):
            raise APIError(400, f"{unsupported}: the legacy functions API is not supported; send tools and "
                                "tool_choice instead", param=unsupported)
        if unsupported:
            raise APIError(400, f"{unsupported}: not supported by this server", param=unsupported)
        try:
            ids = await run_in_threadpool(tokens)
        except APIError:
            raise
        except Gemma3Error as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        self._check_ids(ids, param)  # text can encode to a token past the model's rows (<image_soft_token>)
        context = self.scheduler.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens, but this server's context is {context} tokens "
                                "(the prompt and the completion must fit)", param=param,
                           code="context_length_exceeded")
        return ids

    def _sampling(self, body: _Sampling) -> SamplingParams:
        top_k = DEFAULTS.top_k if body.top_k is None else max(0, body.top_k)
        return SamplingParams(
            temperature=DEFAULTS.temperature if body.temperature is None else body.temperature,
            top_k=top_k, top_p=DEFAULTS.top_p if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0)

    async def _constraint(self, body: _Sampling, tools=None) -> tuple[Any, tuple[str, ...]]:
        """The request's grammar (None: free text) and its stop strings."""
        fmt = body.response_format
        tools, choice = tools or ([], None)
        stops = tuple(body.stop or ())
        if (fmt is None or fmt.type == "text") and not tools:
            return None, stops
        from gemma3.generation.structured import JsonGrammar, engine_tokenizer
        from gemma3.generation.tool_grammar import tool_constraint

        def compile_():
            stop_strings = stops
            if tools:
                grammar, stop_strings = tool_constraint(tools, choice, getattr(body, "parallel_tool_calls", True),
                                                        self.tokenizer, stops)
                for i, tool in enumerate(tools):  # each schema must be one llguidance compiles as JSON schema too
                    if tool.parameters is not None:
                        try:
                            JsonGrammar.from_schema(tool.parameters)
                        except Gemma3Error as e:
                            raise Gemma3Error(f"tools[{i}] ({tool.name}): {e}") from None
            elif fmt.type == "json_object":
                grammar = JsonGrammar.any_object()
            else:
                if fmt.json_schema is None:
                    raise Gemma3Error("json_schema is required when type is json_schema")
                grammar = JsonGrammar.from_schema(fmt.json_schema.schema_)
            engine_tokenizer(self.tokenizer, self.scheduler.stop_ids)  # built here, not on the scheduler thread
            return grammar, stop_strings

        param = "tools" if tools else "response_format"
        try:
            return await run_in_threadpool(compile_)
        except Gemma3Error as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    async def _run(self, http: HTTPRequest, body: _Sampling, prompt: list[int], max_tokens: int | None,
                   logprobs: int | None, chat: bool, tools=None):
        context = self.scheduler.context
        room = context - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but only {room} tokens fit after the "
                                f"{len(prompt)}-token prompt in the {context}-token context", param="max_tokens",
                           code="context_length_exceeded")
        sampling = self._sampling(body)
        grammar, stops = await self._constraint(body, tools)
        with_tools = bool(tools and tools[0])
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        kind = "chatcmpl" if chat else "cmpl"
        rid = request_id(kind)
        requests = []
        for index in range(body.n):
            def sink(event, index=index):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop is closed: the server is stopping
                    pass

            seed = None if body.seed is None else (body.seed + index) % (1 << 64)
            requests.append(Request(prompt_ids=prompt, max_tokens=max_tokens or room, sink=sink, sampling=sampling,
                                    seed=seed, stop_strings=stops, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, logprobs=logprobs, grammar=grammar,
                                    id=f"{rid}-{index}"))
        try:
            for r in requests:
                self.scheduler.submit(r)
        except QueueFull as e:
            for r in requests:
                r.cancel()
            raise APIError(429, str(e), code="server_busy", kind="rate_limit_error") from None
        except Gemma3Error as e:
            for r in requests:
                r.cancel()
            raise APIError(400, str(e)) from None
        reply = _Reply(self, rid, chat, body, prompt, logprobs, with_tools)
        if body.stream:
            return StreamingResponse(reply.stream(queue, requests), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(http, queue, requests)


class _Reply:
    """Turns one request's scheduler events into OpenAI's response body or its stream of chunks."""

    def __init__(self, server: _Server, rid: str, chat: bool, body: _Sampling, prompt: list[int],
                 logprobs: int | None, with_tools: bool = False):
        self.server, self.rid, self.chat, self.body, self.prompt, self.logprobs = server, rid, chat, body, prompt, logprobs
        # with tools, each choice's text goes through a parser that splits it into content and tool calls
        self.parsers = [ToolCallParser() for _ in range(body.n)] if with_tools else None
        self.created = int(time.time())
        self.model = server.config.model_name
        n = body.n
        self.texts = [[] for _ in range(n)]
        self.entries: list[list[dict]] = [[] for _ in range(n)]
        self.offsets = [0] * n
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = [0] * n
        # return_token_ids: every generated id (stop tokens left out), and those not yet sent in a chunk
        self.ids = [[] for _ in range(n)] if body.return_token_ids else None
        self.unsent_ids = [[] for _ in range(n)]
        self.timings: dict | None = None

    # ------------------------------------------------------------------ logprobs in OpenAI's two shapes
    def _token_entry(self, event: TokenEvent) -> dict:
        tok = self.server.tokenizer

        def piece(i: int) -> str:
            return tok.decode([i])

        if self.chat:
            return {"token": event.text, "logprob": event.logprob, "bytes": list(event.text.encode()),
                    "top_logprobs": [{"token": piece(i), "logprob": lp, "bytes": list(tok.token_bytes(i))}
                                     for i, lp in (event.top_logprobs or [])]}
        return {"token": event.text, "logprob": event.logprob,
                "top": {piece(i): lp for i, lp in (event.top_logprobs or [])}}

    def _completion_logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries] if self.logprobs else None, "text_offset": offsets}

    def _usage(self) -> dict:
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    def _apply(self, index: int, event) -> tuple[str, list, dict | None]:
        """Record an event; returns the content it adds, its tool-call pieces (index, id, name, arguments) and
        its logprob entry (None without logprobs). A Finished event releases what a parser held back."""
        parser = self.parsers[index] if self.parsers is not None else None
        if isinstance(event, TokenEvent):
            self.texts[index].append(event.text)
            if self.ids is not None and not event.is_stop_token:
                self.ids[index].append(event.token_id)
                self.unsent_ids[index].append(event.token_id)
            entry = self._token_entry(event) if self.logprobs is not None else None
            if entry is not None:
                self.entries[index].append(entry)
            if parser is None:
                return event.text, [], entry
            delta = parser.push(event.text)
            return delta.content, delta.calls, entry
        if isinstance(event, Finished):
            self.finish[index] = event.reason
            self.completion_tokens[index] = event.completion_tokens
            if index == 0:
                self.timings = _timings(event)
            if parser is not None:
                delta = parser.finish()
                return delta.content, delta.calls, None
        return "", [], None

    def _finish_reason(self, index: int) -> str | None:
        """OpenAI's "tool_calls" where a choice stopped after complete calls."""
        calls = self.parsers[index].calls if self.parsers is not None else []
        return finish_reason(self.finish[index], calls)

    def _message(self, index: int) -> dict:
        if self.parsers is None:
            return {"role": "assistant", "content": "".join(self.texts[index])}
        parser = self.parsers[index]
        if not parser.calls:
            return {"role": "assistant", "content": parser.text}
        return {"role": "assistant", "content": parser.text or None,
                "tool_calls": [call.as_openai() for call in parser.calls]}

    # ------------------------------------------------------------------ whole response
    async def whole(self, http: HTTPRequest, queue: asyncio.Queue, requests: list[Request]) -> JSONResponse:
        pending = len(requests)
        try:
            while pending:
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, kind="server_error")
                self._apply(index, event)
                if isinstance(event, Finished):
                    pending -= 1
        finally:
            for r in requests:
                r.cancel()
        choices = []
        for i in range(len(requests)):
            text = "".join(self.texts[i])
            if self.chat:
                lp = {"content": self.entries[i]} if self.logprobs is not None else None
                choices.append({"index": i, "message": self._message(i), "logprobs": lp,
                                "finish_reason": self._finish_reason(i)})
            else:
                lp = self._completion_logprobs(self.entries[i]) if self.logprobs is not None else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
            if self.ids is not None:
                choices[-1]["token_ids"] = self.ids[i]
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(),
                "timings": self.timings}
        if self.ids is not None:
            body["prompt_token_ids"] = self.prompt
        return JSONResponse(body)

    # ------------------------------------------------------------------ server-sent events
    def _chunk(self, choices: list[dict], usage: dict | None = None, **extra) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or (self.body.stream_options and self.body.stream_options.include_usage):
            body["usage"] = usage
        if self.ids is not None:  # the ids a choice's text came from ride on its next chunk
            for choice in choices:
                unsent = self.unsent_ids[choice["index"]]
                choice["token_ids"] = list(unsent)
                unsent.clear()
        body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _chat_deltas(self, index: int, text: str, calls: list, entry: dict | None):
        """The chunks one token adds: its content, then its tool-call pieces, the logprobs on the first chunk
        (a token that shows nothing yet still sends its logprobs, with an empty delta)."""
        deltas = [{"content": text}] if text or (entry is not None and not calls) else []
        for call, call_id, name, arguments in calls:
            piece: dict[str, Any] = {"index": call}
            if call_id is not None:
                piece.update(id=call_id, type="function", function={"name": name, "arguments": arguments})
            else:
                piece["function"] = {"arguments": arguments}
            deltas.append({"tool_calls": [piece]})
        for i, delta in enumerate(deltas):
            lp = {"content": [entry]} if entry is not None and i == 0 else None
            yield self._chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}])

    async def stream(self, queue: asyncio.Queue, requests: list[Request]):
        pending = len(requests)
        try:
            first = {"prompt_token_ids": self.prompt} if self.ids is not None else {}
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(requests))], **first)
                first = {}
            while pending:
                index, event = await queue.get()
                if isinstance(event, Failed):
                    error = {"error": {"message": event.message, "type": "server_error", "param": None,
                                       "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                text, calls, entry = self._apply(index, event)
                if isinstance(event, TokenEvent):
                    if not text and not calls and entry is None and not first:
                        continue  # nothing to show yet (its id, if asked for, rides on the next chunk)
                    if self.chat:
                        for chunk in self._chat_deltas(index, text, calls, entry):
                            yield chunk
                    else:
                        lp = self._completion_logprobs([entry], self.offsets[index]) if entry is not None else None
                        yield self._chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}],
                                          **first)
                        first = {}
                    self.offsets[index] += len(text)
                elif isinstance(event, Finished):
                    pending -= 1
                    if self.chat:
                        for chunk in self._chat_deltas(index, text, calls, None):
                            yield chunk
                    choice = ({"index": index, "delta": {}, "logprobs": None,
                               "finish_reason": self._finish_reason(index)}
                              if self.chat else
                              {"index": index, "text": "", "logprobs": None, "finish_reason": event.reason})
                    yield self._chunk([choice], **first, **({"timings": self.timings} if index == 0 else {}))
                    first = {}
            if not pending and self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended: free the rows
            for r in requests:
                r.cancel()


def _timings(event: Finished) -> dict:
    """llama.cpp's `timings` of a finished choice: prompt = from taking a row to the first token (the prefill),
    predicted = the tokens after the first (decode steps)."""
    decoded = max(event.completion_tokens - 1, 0)
    return {"prompt_n": event.prompt_tokens, "prompt_ms": event.prompt_s * 1000,
            "prompt_per_second": event.prompt_tokens / event.prompt_s if event.prompt_s > 0 else None,
            "predicted_n": decoded, "predicted_ms": event.decode_s * 1000,
            "predicted_per_second": decoded / event.decode_s if decoded and event.decode_s > 0 else None}
