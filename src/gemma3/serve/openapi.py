"""The OpenAPI 3.1 description of `gemma3 serve` (served at GET /openapi.json), built from the same pydantic
request models that validate the bodies (gemma3.serve.protocol), so the document cannot drift from what the
server accepts. Response bodies are described by small hand-written JSON schemas: enough for a client
generator and for the fuzzer (tests/test_openapi.py) to check every answer's shape, errors included.

ROUTES below is the one place to add a route: one line, and tests/test_openapi.py fails for a route that
app.py serves without one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel

from gemma3.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, InsideRequest,
                                   TokenizeRequest)

REF = "#/components/schemas/{model}"

# ------------------------------------------------------------------ response bodies (minimal, hand-written)
# OpenAI's error object, the body of every 4xx (and of a generation that failed)
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"enum": ["stop", "length", "tool_calls", None]}


def _completion_body(object_: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {"id": {"type": "string"}, "object": {"const": object_},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "items": choice},
                           "usage": {"anyOf": [_USAGE, {"type": "null"}]}}}


def _choice(required: list[str], **properties) -> dict:
    return {"type": "object", "required": ["index", *required, "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "finish_reason": _FINISH,
                           "logprobs": {"type": ["object", "null"]}, **properties}}


_TEXT = {"type": "string"}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": _TEXT, "type": {"const": "function"}, "function": {"type": "object", "required": ["name", "arguments"],
                                                             "properties": {"name": _TEXT, "arguments": _TEXT}}}}
# a streamed piece of a call: the first carries index, id, type and name; the next ones more arguments
_TOOL_CALL_DELTA = {"type": "object", "required": ["index"], "properties": {
    "index": {"type": "integer", "minimum": 0}, "id": _TEXT, "type": {"const": "function"},
    "function": {"type": "object", "properties": {"name": _TEXT, "arguments": _TEXT}}}}
CHAT_COMPLETION = _completion_body("chat.completion", _choice(
    ["message"], message={"type": "object", "required": ["role", "content"],
                          "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                         "tool_calls": {"type": "array", "items": _TOOL_CALL}}}))
COMPLETION = _completion_body("text_completion", _choice(["text"], text=_TEXT))
CHAT_CHUNK = _completion_body("chat.completion.chunk", _choice(
    ["delta"], delta={"type": "object", "properties": {"role": {"const": "assistant"}, "content": _TEXT,
                                                       "tool_calls": {"type": "array", "items": _TOOL_CALL_DELTA}}}))
PROMPT = {"type": "object", "required": ["prompt"], "properties": {"prompt": _TEXT}}
COMPLETION_CHUNK = _completion_body("text_completion", _choice(["text"], text=_TEXT))


MODELS = {"type": "object", "required": ["object", "data"],
          "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
              "type": "object", "required": ["id", "object", "created", "owned_by"],
              "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                             "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}}}}
HEALTH = {"type": "object", "required": ["status"],
          "properties": {"status": {"const": "ok"}, "active": {"type": "integer"}, "waiting": {"type": "integer"},
                         "slots": {"type": "integer"}}}
TOKENS = {"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array", "items": {
    "anyOf": [{"type": "integer"}, {"type": "object", "required": ["id", "piece"],
                                    "properties": {"id": {"type": "integer"}, "piece": {"type": "string"}}}]}}}}
TEXT = {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
_TOKEN = {"type": "object", "required": ["id", "piece", "prob"],
          "properties": {"id": {"type": "integer", "minimum": 0}, "piece": _TEXT, "prob": _PROB}}
INSIDE = {"type": "object",
          "required": ["position", "token", "candidates", "lens", "attention", "pieces", "elapsed_ms"],
          "properties": {
              "position": {"type": "integer", "minimum": 1},
              "token": {"anyOf": [_TOKEN, {"type": "null"}]},
              "candidates": {"type": "array", "items": {**_TOKEN, "properties": {
                  **_TOKEN["properties"], "logprob": {"type": "number", "maximum": 0}}}},
              "lens": {"type": "array", "items": {**_TOKEN, "properties": {
                  **_TOKEN["properties"], "layer": {"anyOf": [{"const": "embedding"}, {"type": "integer"}]},
                  "token_prob": {"anyOf": [_PROB, {"type": "null"}]}}}},
              "attention": {"type": "array", "items": {"type": "object", "required": ["layer", "kind", "weights"],
                                                       "properties": {"layer": {"type": "integer"},
                                                                      "kind": {"enum": ["sliding", "global"]},
                                                                      "window": {"type": ["integer", "null"]},
                                                                      "weights": {"type": "array",
                                                                                  "items": _PROB}}}},
              "pieces": {"type": "array", "items": _TEXT}, "elapsed_ms": {"type": "number", "minimum": 0}}}
INSIDE_MODEL = {"type": "object", "required": ["model", "layer_types", "sliding_window", "max_tokens", "max_top_k"],
                "properties": {"model": _TEXT,
                               "layer_types": {"type": "array", "items": {"enum": ["sliding", "global"]}},
                               "sliding_window": {"type": "integer"}, "max_tokens": {"type": "integer"},
                               "max_top_k": {"type": "integer"}, "context": {"type": "integer"}}}
DOCUMENT = {"type": "object", "required": ["openapi", "info", "paths"]}


class Route(NamedTuple):
    method: str
    path: str
    request: type[BaseModel] | None  # the body's model; None: no body
    summary: str
    response: dict  # the 200 body's JSON schema
    stream: dict | None = None  # a streamed chunk's JSON schema: the route runs the model (429, 500, streams)
    public: bool = False  # answered without the API key
    exclusive: bool = False  # runs on the model's own thread, one waiting at most (429), bounded in time (503)


# ------------------------------------------------------------------ every route app.py serves, one line each
ROUTES = (
    Route("POST", "/v1/chat/completions", ChatCompletionRequest, "messages → the chat template → a completion",
          CHAT_COMPLETION, stream=CHAT_CHUNK),
    Route("POST", "/v1/completions", CompletionRequest, "a prompt (text or token ids) → a completion", COMPLETION,
          stream=COMPLETION_CHUNK),
    Route("GET", "/v1/models", None, "the one model served", MODELS),
    Route("GET", "/health", None, "liveness and the scheduler's load", HEALTH, public=True),
    Route("POST", "/tokenize", TokenizeRequest, "text → token ids (llama.cpp's)", TOKENS),
    Route("POST", "/detokenize", DetokenizeRequest, "token ids → text (llama.cpp's)", TEXT),
    Route("POST", "/apply-template", ChatCompletionRequest, "the prompt text a chat body renders to, messages "
          "and tools (llama.cpp's)", PROMPT),
    Route("GET", "/openapi.json", None, "this document", DOCUMENT, public=True),
    Route("GET", "/v1/inside/model", None, "what a look inside the model can ask: layer kinds, the window, the "
          "bounds", INSIDE_MODEL),
    Route("POST", "/v1/inside", InsideRequest, "one token of a text looked at from inside the model: the candidates, "
          "the logit lens, the attention of a sliding and a global layer", INSIDE, exclusive=True),
)
# the playground's page and files (gemma3.serve.playground) are served too, but are not part of the API
UI_PATHS = ("/", "/ui/{name}")

_ERRORS = {400: "the request is invalid (the field in `param`; `context_length_exceeded` when it does not fit)",
           401: "a missing or wrong API key", 404: "another model than the one served",
           413: "a body over the size cap", 429: "the queue is full", 500: "the generation failed",
           503: "the server is shutting down (or a look inside ran past its time bound)"}


def _error_statuses(route: Route) -> list[int]:
    statuses = []
    if route.request is not None:
        statuses += [400, 413]
    if not route.public:
        statuses.append(401)
    if route.stream is not None:
        statuses += [404, 429, 500, 503]
    if route.exclusive:
        statuses += [429, 503]
    return sorted(statuses)


def _event(chunk: dict) -> dict:
    """One server-sent event (OpenAPI 3.1 describes a stream by its events): `data:` holds a chunk as JSON, the
    error object when the generation fails midway, or `[DONE]` at the end."""
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, ERROR]}}}}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _operation(route: Route, schemas: dict) -> dict:
    ok = _json(route.response)
    if route.stream is not None:  # "stream": true answers with server-sent events
        ok["text/event-stream"] = {"schema": _event(route.stream)}
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.method.lower() + route.path.replace("/", "_").replace(".", "_").replace("-", "_"),
        "responses": {"200": {"description": "OK", "content": ok},
                      **{str(s): {"description": _ERRORS[s], "content": _json({"$ref": REF.format(model="Error")})}
                         for s in _error_statuses(route)}}}
    if route.public:
        op["security"] = []
    if route.request is not None:
        name = _add(route.request, schemas)
        op["requestBody"] = {"required": True, "content": _json({"$ref": REF.format(model=name)})}
    return op


def _add(model: type[BaseModel], schemas: dict) -> str:
    """Put `model`'s JSON schema and its $defs into components/schemas; returns its name."""
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
        if schemas.setdefault(name, sub) != sub:  # two different models of one name would share one entry
            raise ValueError(f"two request schemas are named {name!r}")
    return model.__name__


def openapi_document(model_name: str) -> dict:
    """The OpenAPI 3.1 document of a server serving `model_name`."""
    schemas: dict[str, dict] = {"Error": ERROR}
    paths: dict[str, dict] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gemma3 serve", "version": "1",
                 "description": f"An OpenAI-compatible server for {model_name}, with llama.cpp's /tokenize "
                                "and /detokenize. Errors are OpenAI's error object."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "the key given to --api-key (none: no key)"}}},
        # the key is optional: a server started without --api-key takes requests without one
        "security": [{"bearer": []}, {}],
    }
