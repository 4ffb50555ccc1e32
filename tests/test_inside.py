"""The look inside the model (gemma3.eval.inside) and the server's side of the playground: /v1/inside against
the plain model's own numbers, its bounds (tokens, layers, time, one waiting), the key, and the two response
extensions the page reads (vLLM's `return_token_ids`, llama.cpp's `timings`).

A small random Gemma 3 of 3 layers (sliding, global, sliding; window 4) with the real tokenizer, so that both
kinds of attention are looked at and the window is visible within a few tokens."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")

from reference import random_model  # noqa: E402

from gemma3.config import GLOBAL, SLIDING, Gemma3Config  # noqa: E402
from gemma3.eval.inside import DeadlinePassed, look_inside  # noqa: E402

KEY = "inside-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WINDOW = 4


@pytest.fixture(scope="module")
def tiny(official_tokenizer):
    from gemma3.text.tokenizer import Tokenizer

    config = Gemma3Config(num_hidden_layers=3, sliding_window=WINDOW, layer_types=(SLIDING, GLOBAL, SLIDING),
                          max_position_embeddings=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8)
    return random_model(config), Tokenizer.from_file(official_tokenizer / "tokenizer.json")


IDS = [2, 818, 5279, 529, 7001, 563, 506, 3207, 528, 1030, 236761, 107]


# ------------------------------------------------------------------ the function
def test_candidates_are_the_models_own_softmax(tiny):
    model, _ = tiny
    for position in (1, 5, len(IDS) - 1, len(IDS)):
        got = look_inside(model, IDS, position, top_k=7)
        with torch.no_grad():
            logits = model(torch.tensor([IDS[:position]])).logits[0, -1].float()
        p = logits.softmax(-1)
        values, index = p.topk(7)
        assert [c[0] for c in got.candidates] == index.tolist()
        torch.testing.assert_close(torch.tensor([c[1] for c in got.candidates]), values, rtol=1e-5, atol=1e-7)
        assert sum(c[1] for c in got.candidates) <= 1 + 1e-6
        if position < len(IDS):
            assert got.token_id == IDS[position]
            assert got.token_prob == pytest.approx(float(p[IDS[position]]), rel=1e-5)
        else:
            assert got.token_id is None and got.token_prob is None
        # the lens' last row is the final layer read through the same norm and head: the top candidate
        assert len(got.lens) == model.config.num_hidden_layers + 1
        assert got.lens[-1][0] == got.candidates[0][0]
        assert got.lens[-1][1] == pytest.approx(got.candidates[0][1], rel=1e-5)


def test_attention_is_the_last_querys_row_and_the_window_shows(tiny):
    model, _ = tiny
    position = 10
    got = look_inside(model, IDS, position)
    assert sorted(got.attention) == [0, 1]  # the first sliding and the first global layer
    for layer, weights in got.attention.items():
        assert len(weights) == position
        assert sum(weights) == pytest.approx(1, abs=1e-5)
    # the query at position - 1 of a sliding layer sees keys position - W ... position - 1 only
    sliding = got.attention[0]
    assert all(w == 0 for w in sliding[:position - WINDOW]) and all(w > 0 for w in sliding[position - WINDOW:])
    assert all(w > 0 for w in got.attention[1])
    # against the eager path's own weights, by hand: mean over heads of the last query's row
    chosen = look_inside(model, IDS, position, layers=[2])
    assert list(chosen.attention) == [2]


def test_a_deadline_stops_it_before_the_next_layer(tiny):
    model, _ = tiny
    with pytest.raises(DeadlinePassed):
        look_inside(model, IDS, 5, deadline=time.monotonic() - 1)
    # and leaves no hook behind: the model answers as before
    assert not any(layer._forward_pre_hooks for layer in model.layers)
    look_inside(model, IDS, 5, deadline=time.monotonic() + 60)


def test_bad_arguments_are_refused(tiny):
    from gemma3.errors import Gemma3Error

    model, _ = tiny
    with pytest.raises(Gemma3Error, match="position"):
        look_inside(model, IDS, 0)
    with pytest.raises(Gemma3Error, match="position"):
        look_inside(model, IDS, len(IDS) + 1)
    with pytest.raises(Gemma3Error, match="layer 3"):
        look_inside(model, IDS, 3, layers=[3])


# ------------------------------------------------------------------ the server
def make_app(tiny, **config):
    from gemma3.serve.app import ServerConfig, create_app
    from gemma3.serve.scheduler import Scheduler

    model, tokenizer = tiny
    scheduler = Scheduler(model, tokenizer, max_batch=2, context=64).start()
    return create_app(scheduler, ServerConfig(model_name="tiny", api_key=KEY, **config)), scheduler


@pytest.fixture(scope="module")
def client(tiny):
    from starlette.testclient import TestClient

    app, scheduler = make_app(tiny, inside_tokens=16)
    with TestClient(app, headers=AUTH) as c:
        yield c
    scheduler.close()


def test_inside_answers_with_the_functions_numbers(client, tiny):
    model, tokenizer = tiny
    r = client.post("/v1/inside", json={"tokens": IDS, "position": 6, "top_k": 5, "layers": [1]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = look_inside(model, IDS, 6, top_k=5, layers=[1])
    assert [c["id"] for c in body["candidates"]] == [c[0] for c in want.candidates]
    assert body["token"] == {"id": IDS[6], "piece": tokenizer.decode([IDS[6]]), "prob": pytest.approx(want.token_prob)}
    assert [e["layer"] for e in body["lens"]] == ["embedding", 0, 1, 2]
    assert body["attention"] == [{"layer": 1, "kind": "global", "window": None,
                                  "weights": pytest.approx(want.attention[1])}]
    assert body["pieces"] == [tokenizer.decode([i]) for i in IDS]
    info = client.get("/v1/inside/model").json()
    assert info["layer_types"] == ["sliding", "global", "sliding"] and info["sliding_window"] == WINDOW
    assert info["max_tokens"] == 16 and info["max_top_k"] == 20


@pytest.mark.parametrize("body, param", [
    ({"tokens": IDS, "position": 0}, "position"),
    ({"tokens": IDS, "position": len(IDS) + 1}, "position"),
    ({"tokens": IDS * 2, "position": 17}, "position"),  # past --inside-tokens (16)
    ({"tokens": IDS * 6, "position": 3}, "tokens"),  # 72 ids, more than the 64-token context
    ({"tokens": [2, 10**7], "position": 1}, "tokens"),
    ({"tokens": [2, -1], "position": 1}, "tokens"),
    ({"tokens": IDS, "position": 3, "layers": [3]}, "layers"),
    ({"tokens": IDS, "position": 3, "layers": [-1]}, "layers"),
    ({"tokens": IDS, "position": 3, "layers": []}, "layers"),
    ({"tokens": IDS, "position": 3, "layers": [0, 1, 2, 0, 1]}, "layers"),
    ({"tokens": IDS, "position": 3, "top_k": 21}, "top_k"),
    ({"tokens": IDS, "position": 3, "top_k": 0}, "top_k"),
    ({"tokens": [], "position": 1}, "tokens"),
    ({"position": 1}, "tokens"),
])
def test_inside_refuses_what_is_out_of_bounds(client, body, param):
    r = client.post("/v1/inside", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_inside_needs_the_key(client):
    for method, path in (("POST", "/v1/inside"), ("GET", "/v1/inside/model")):
        r = client.request(method, path, headers={"Authorization": "Bearer wrong"},
                           json={"tokens": IDS, "position": 2} if method == "POST" else None)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_inside_off(tiny):
    from starlette.testclient import TestClient

    app, scheduler = make_app(tiny, inside_tokens=0)
    try:
        with TestClient(app, headers=AUTH) as c:
            r = c.post("/v1/inside", json={"tokens": IDS, "position": 2})
            assert r.status_code == 400 and r.json()["error"]["code"] == "inside_disabled"
    finally:
        scheduler.close()


def test_inside_holds_the_model_no_longer_than_its_bound(tiny):
    """Each layer made to take 0.1 s: with a 0.25 s bound the look stops at the layer after the bound passed
    (503), having held the model for well under the time its 3 layers would take, and the model is left
    without hooks, serving completions."""
    from starlette.testclient import TestClient

    model, _ = tiny
    held = []

    def slow(module, args):
        time.sleep(0.1)

    handles = [layer.register_forward_pre_hook(slow) for layer in model.layers]
    app, scheduler = make_app(tiny, inside_seconds=0.25)
    try:
        with TestClient(app, headers=AUTH) as c:
            def job(m):
                start = time.monotonic()
                try:
                    return look_inside(m, IDS, 5, deadline=time.monotonic() + 0.25)
                finally:
                    held.append(time.monotonic() - start)

            with pytest.raises(DeadlinePassed):
                scheduler.run_exclusive(job).result(10)
            assert held[0] < 0.25 + 0.1 + 0.1  # the bound, the layer running when it passed, one check
            r = c.post("/v1/inside", json={"tokens": IDS, "position": 5})
            assert r.status_code == 503 and r.json()["error"]["code"] == "inside_timeout", r.text
            for h in handles:
                h.remove()
            handles = []
            r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
    finally:
        for h in handles:
            h.remove()
        scheduler.close()


def test_one_look_waits_and_the_next_gets_429(tiny):
    """The scheduler's thread is held by a job; one look waits for it, a second is refused at once."""
    from starlette.testclient import TestClient

    app, scheduler = make_app(tiny)
    release = threading.Event()
    try:
        with TestClient(app, headers=AUTH) as c:
            blocker = scheduler.run_exclusive(lambda m: release.wait(30))
            deadline = time.monotonic() + 10
            while not blocker.running() and time.monotonic() < deadline:  # taken by the scheduler's thread
                time.sleep(0.01)
            waiting = scheduler.run_exclusive(lambda m: 1)  # the one that may wait
            r = c.post("/v1/inside", json={"tokens": IDS, "position": 3})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
            release.set()
            assert blocker.result(10) and waiting.result(10) == 1
            r = c.post("/v1/inside", json={"tokens": IDS, "position": 3})
            assert r.status_code == 200, r.text
    finally:
        release.set()
        scheduler.close()


# ------------------------------------------------------------------ token ids and timings
def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The capital of France is"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}]}),
])
def test_token_ids_and_timings(client, tiny, path, body):
    _, tokenizer = tiny
    body = {**body, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    whole = client.post(path, json=body).json()
    ids = whole["choices"][0]["token_ids"]
    text = whole["choices"][0]["text" if "prompt" in body else "message"]
    text = text if isinstance(text, str) else text["content"]
    assert len(ids) == whole["usage"]["completion_tokens"] or whole["choices"][0]["finish_reason"] == "stop"
    assert tokenizer.decode(ids) == text
    assert whole["prompt_token_ids"] and len(whole["prompt_token_ids"]) == whole["usage"]["prompt_tokens"]
    timings = whole["timings"]
    assert timings["prompt_n"] == whole["usage"]["prompt_tokens"]
    assert timings["predicted_n"] == whole["usage"]["completion_tokens"] - 1
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] >= 0
    # streamed: the chunks' ids add up to the same ids, the first chunk carries the prompt's
    events = _events(client.post(path, json={**body, "stream": True}))
    assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert [i for e in events for c in e["choices"] for i in c["token_ids"]] == ids
    finishing = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["timings"]["predicted_n"] == timings["predicted_n"]
    # without the flag, nothing new but the timings
    plain = client.post(path, json={**body, "return_token_ids": False}).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
