"""Tool calling through `gemma3 serve` on the real embedded 270M, with the real `openai` client: for every
tool_choice, 50 requests sampled at temperature 1 return only calls that name a declared tool and validate
against its schema (`jsonschema`), required / named always call, none never, parallel_tool_calls=false at
most once (tested with the named choice); streaming reassembles to the whole message; a call → result →
answer loop; bad requests are 400s that name the problem, and the server goes on serving.

The embedded model is the pretrained base: it has never seen the call format, so what it writes inside a
call is often nonsense, but always well-formed and schema-valid, which is what these tests are about."""

from __future__ import annotations

import collections
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from test_serve import Server  # noqa: E402  (the same server harness)

from gemma3.text.tools import CONTROL_STRINGS, TRIGGER, render_call, render_response  # noqa: E402

MODEL = "gemma-3-270m"
SAMPLES = 50
MAX_TOKENS = 256

# every kind of parameter: nested object, array, enum, integer, number, boolean (strings bounded so that a
# call always fits in MAX_TOKENS: at most 3 calls a turn, gemma3.generation.tool_grammar.MAX_CALLS); two tools
# only, because each of the 250 requests prefills the declarations, and that is most of this file's time
TOOLS = [
    {"type": "function", "function": {
        "name": "book_table", "description": "Book a restaurant table.",
        "parameters": {"type": "object", "properties": {
            "place": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                       "stars": {"type": "number", "minimum": 0, "maximum": 5}},
                      "required": ["name"], "additionalProperties": False},
            "guests": {"type": "integer", "minimum": 1, "maximum": 12},
            "diets": {"type": "array", "items": {"type": "string", "enum": ["vegan", "halal", "none"]},
                      "maxItems": 2},
            "outdoor": {"type": "boolean"}},
            "required": ["place", "guests"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time."}},
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
           for t in TOOLS}
MESSAGES = [{"role": "system", "content": TRIGGER},
            {"role": "user", "content": "Book a table for 4 in Paris tonight."}]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--context", "1024", "--max-queue", "128", "--quiet")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sample(client, n=SAMPLES, max_tokens=MAX_TOKENS, **kwargs):
    def one(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=1.0,
                                              max_tokens=max_tokens, seed=seed, **kwargs).choices[0]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


def check_calls(choice) -> list:
    """Every call names a declared tool and its arguments parse and validate; returns the calls. (Where
    max_tokens ended the reply, its last call may be cut off: OpenAI's finish_reason "length" says so.)"""
    calls = choice.message.tool_calls or []
    checked = calls[:-1] if choice.finish_reason == "length" else calls
    for call in checked:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS, call.function.name
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    if calls and choice.finish_reason != "length":
        assert choice.finish_reason == "tool_calls"
    content = choice.message.content or ""
    assert not any(s in content for s in CONTROL_STRINGS), content
    return calls


@pytest.mark.parametrize("mode", ["required", "named", "auto", "none"])
def test_sampled_calls_keep_to_the_schemas_and_the_choice(client, mode):
    """Each tool_choice, 50 requests; the named one also with parallel_tool_calls=false (at most one call)."""
    choice = {"named": {"type": "function", "function": {"name": "book_table"}}}.get(mode, mode)
    extra = {"parallel_tool_calls": False} if mode == "named" else {}
    # a base model's text runs on to max_tokens (it rarely ends a turn), so text-only choices get less room
    choices = sample(client, tool_choice=choice, max_tokens={"none": 48, "auto": 96}.get(mode, MAX_TOKENS), **extra)
    reasons = collections.Counter(c.finish_reason for c in choices)
    if mode not in ("none", "auto"):  # calls only: the bounded tools always fit, no call is ever cut off
        assert reasons["length"] == 0, reasons
    counts = [len(check_calls(c)) for c in choices]
    if mode in ("required", "named"):
        assert min(counts) >= 1, counts
        assert all(not c.message.content for c in choices)
    if mode == "named":
        assert {call.function.name for c in choices for call in c.message.tool_calls} == {"book_table"}
        assert max(counts) == 1, counts  # parallel_tool_calls: false
    if mode == "none":
        assert max(counts) == 0 and all(c.finish_reason in ("stop", "length") for c in choices)


def test_streamed_calls_reassemble_to_the_whole_message(client):
    for seed in range(3):
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
                      max_tokens=MAX_TOKENS, seed=seed)
        whole = client.chat.completions.create(**kwargs).choices[0]
        calls: dict[int, dict] = {}
        content, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.index not in calls:  # a call's first delta: index, id, type and name
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == whole.finish_reason == "tool_calls"
        assert content == (whole.message.content or "")
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_call_result_answer_loop(client, http):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "book_table"}},
                                           parallel_tool_calls=False, max_tokens=MAX_TOKENS).choices[0]
    [call] = check_calls(first)
    history = MESSAGES + [first.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id,
                           "content": json.dumps({"temp_c": 18, "sky": "clear"})}]
    # the prompt the model sees: the call and its result inside the model's turn, in the format
    prompt = http.post("/apply-template", json={"messages": history, "tools": TOOLS}).json()["prompt"]
    expected = (render_call("book_table", json.loads(call.function.arguments))
                + render_response("book_table", {"temp_c": 18, "sky": "clear"}))
    assert prompt.endswith("<start_of_turn>model\n" + expected)
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=30).choices[0]
    assert second.message.tool_calls is None and second.message.content
    assert second.finish_reason in ("stop", "length")


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}]}, "tools", "compile"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}]}, "tools", "'not' cannot be enforced"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "declared twice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "not among the declared tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "128"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 300_000}}]}, "tools", "KiB"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools", "letters, digits"),
    ({"messages": MESSAGES + [{"role": "tool", "tool_call_id": "call_nope", "content": "{}"}]}, "messages",
     "matches no tool call"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_time", "arguments": "{oops"}}]}]}, "messages", "not JSON"),
    ({"functions": [{"name": "f"}]}, "functions", "legacy"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
]


@pytest.mark.parametrize("extra, param, message", BAD, ids=[b[2] for b in BAD])
def test_bad_requests_are_400s_naming_the_problem(http, extra, param, message):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 or (r.status_code == 413 and message == "KiB"), r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    if r.status_code == 400:
        assert error["param"] == param
    assert http.get("/health").json()["status"] == "ok"
    ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2,
                                                 "temperature": 0})
    assert ok.status_code == 200


def test_a_functiongemma_vocabulary_calls_with_its_control_tokens(tiny_functiongemma):
    """The server builds the grammar for its own tokenizer: where each control string is one token (a random
    model, in-process), a required or named call is written with those tokens and comes back as tool_calls."""
    from starlette.testclient import TestClient

    from gemma3.serve.app import ServerConfig, create_app
    from gemma3.serve.scheduler import Scheduler

    model, tokenizer = tiny_functiongemma
    scheduler = Scheduler(model, tokenizer, max_batch=2, context=512).start()
    try:
        with TestClient(create_app(scheduler, ServerConfig(model_name=MODEL))) as http:
            for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "book_table"}}]):
                r = http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "temperature": 1.0,
                    "max_tokens": 200, "seed": seed, "logprobs": True})
                assert r.status_code == 200, r.text
                [out] = r.json()["choices"]
                assert out["finish_reason"] == "tool_calls" and out["message"]["tool_calls"]
                for call in out["message"]["tool_calls"]:
                    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
                tokens = [t["token"] for t in out["logprobs"]["content"]]
                assert tokens[0] == "<start_function_call>"  # one token, not the text spelled out
    finally:
        scheduler.close()
