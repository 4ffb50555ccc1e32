"""The server's OpenAPI description (gemma3.serve.openapi) is valid, names every route the app serves, and
drives a fuzzer: schemathesis generates valid and invalid requests for each operation from the document and
sends them to the real app in-process (ASGI, no socket), on a tiny random Gemma 3 with the real tokenizer and a
64-token context, so that no generated request can keep the scheduler busy for long. Every answer must be
below 500 and match the document (status, content type, body: a 4xx body is OpenAI's error object, a stream's
events are chunks); afterwards the server must still answer, with no request left running.

    python -m pytest tests/test_openapi.py -q                             # derandomized: CI's examples
    GEMMA3_FUZZ_EXAMPLES=1000 HYPOTHESIS_PROFILE=explore python -m pytest tests/test_openapi.py -q   # explore
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("llguidance")
schemathesis = pytest.importorskip("schemathesis")
jsonschema = pytest.importorskip("jsonschema")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from gemma3.serve.openapi import ERROR, ROUTES, UI_PATHS, openapi_document  # noqa: E402

KEY = "fuzz-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
# per operation and mode (valid, invalid bodies); at 50 the whole file takes 15-30 s on 2 cores
EXAMPLES = int(os.environ.get("GEMMA3_FUZZ_EXAMPLES", 50))


@pytest.fixture(scope="module")
def app(tiny_hf_dir):
    from gemma3.loading import load
    from gemma3.serve.app import ServerConfig, create_app
    from gemma3.serve.scheduler import Scheduler

    model, tokenizer, _ = load(tiny_hf_dir, progress=False)
    scheduler = Scheduler(model, tokenizer, max_batch=2, context=64).start()
    yield create_app(scheduler, ServerConfig(model_name=MODEL, api_key=KEY))
    scheduler.close()


@pytest.fixture(scope="module")
def document():
    return openapi_document(MODEL)


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app, headers=AUTH) as c:
        yield c


def test_the_document_is_valid_openapi(document):
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # every $ref points into components/schemas
    refs, stack = [], [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs += [node["$ref"]] if "$ref" in node else []
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    names = {r.removeprefix("#/components/schemas/") for r in refs}
    assert names <= set(document["components"]["schemas"]), names - set(document["components"]["schemas"])


def test_the_document_lists_every_route_the_app_serves(app, document):
    served = {(method, route.path) for route in app.routes for method in route.methods - {"HEAD"}
              if route.path not in UI_PATHS}
    described = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert described == served


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path}" for r in ROUTES])
def test_the_key_is_asked_where_the_document_says(client, route):
    """The document says the key is optional (a server may run without one); this server has one, and the
    fuzzer always sends it, so here each route is asked without it."""
    r = client.request(route.method, route.path, headers={"Authorization": ""}, json={} if route.request else None)
    if route.public:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 401, r.text
        jsonschema.validate(r.json(), ERROR)


def test_the_app_serves_the_document(client, document):
    r = client.get("/openapi.json", headers={"Authorization": ""})  # no key needed
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == document


# ------------------------------------------------------------------ bugs the fuzzer found (now 400s)
@pytest.mark.parametrize("path, body, param", [
    # the tokenizer's <image_soft_token> (262144) is past the 262144 embedding rows: the step failed, a 500
    ("/v1/completions", {"prompt": "<image_soft_token>", "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "<image_soft_token>"}], "max_tokens": 1},
     "messages"),
    # in the request model's bounds but not in SamplingParams': a Gemma3Error escaped as a 500
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "repetition_penalty": 1e-5}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "temperature": 1e-6}, "temperature"),
])
def test_found_by_the_fuzzer(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    jsonschema.validate(r.json(), ERROR)
    assert r.json()["error"]["param"] == param


# ------------------------------------------------------------------ the fuzzer
# One test per operation and mode, each a Hypothesis loop over the operation's strategy
# (schemathesis.pytest.from_fixture, the usual way, reads a pytest attribute that pytest 9 no longer has).
# "negative" bodies break the schema on purpose; an operation without a body has nothing to break.
FUZZ = [(r.method, r.path, mode) for r in ROUTES for mode in ("positive", "negative")
        if mode == "positive" or r.request is not None]
# Schemathesis's checks, all but two. A request valid by the schema may still be refused with a 400 (a prompt
# longer than the context, a token id outside this model's vocabulary, `tools`, which the schema lists and the
# server refuses), and pydantic's lax mode, the request models' choice (as vLLM's), takes some values the
# schema calls invalid (`true` for 1, "8" for 8, 0.0 for false): neither "valid data is accepted" nor
# "invalid data is rejected" holds here. The rest do: no 5xx, documented statuses, content types and bodies.
CONFIG = {"checks": {"positive_data_acceptance": {"enabled": False}, "negative_data_rejection": {"enabled": False}}}


@pytest.fixture(scope="module")
def fuzz_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG))


MAX_NEW_TOKENS = 4
GENERATING = {r.path for r in ROUTES if r.stream is not None}


def cheap(case):
    """A valid completion request asks for at most MAX_NEW_TOKENS tokens a choice. Without a cap, one fuzzed
    request (n = 8, no max_tokens: 63 tokens each, top_k 0 with top_p < 1, which sorts all 262k logits for
    every token, ~0.1 s on 2 cores) took 90 s."""
    body = case.body
    if isinstance(body, dict):
        asked = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
        for key in asked or ["max_tokens"]:
            body[key] = min(body.get(key) or MAX_NEW_TOKENS, MAX_NEW_TOKENS)
    return case


@pytest.mark.parametrize("method, path, mode", FUZZ, ids=[" ".join(f) for f in FUZZ])
def test_fuzz(fuzz_schema, method, path, mode):
    operation = fuzz_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    if mode == "positive" and path in GENERATING:
        strategy = strategy.map(cheap)  # invalid bodies are refused before any generation
    error = jsonschema.Draft202012Validator(ERROR)

    # derandomized (conftest's default profile): the same examples on every run
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call_and_validate(headers=AUTH, timeout=30)  # a request that hangs fails here
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            error.validate(response.json())

    fuzz()


def test_the_server_still_answers_after_the_fuzzing(app, client):
    scheduler = app.state.server.scheduler
    deadline = time.monotonic() + 10  # a cancelled request frees its row at the next step
    while (scheduler.stats()["active"], scheduler.stats()["waiting"]) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    health = client.get("/health").json()
    assert (health["status"], health["active"], health["waiting"]) == ("ok", 0, 0), health
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
