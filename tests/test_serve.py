"""`gemma3 serve` on the real embedded 270M: a real server process on a free loopback port, talked to with the
real `openai` client (and httpx for the raw HTTP cases)."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

KEY = "test-key-123"
START_TIMEOUT = 240


class Server:
    """`gemma3 serve --port 0 ...` in a child process; its stderr is drained so the pipe never fills."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "gemma3", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        self.url = None
        while self.url is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.log))
            ready, _, _ = select.select([self.proc.stderr], [], [], 1.0)
            if ready:
                line = self.proc.stderr.readline()
                self.log.append(line)
                match = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)/v1", line)
                if match:
                    self.url = match.group(1)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-batch", "8", "--context", "1024", "--quiet")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


MODEL = "gemma-3-270m"
GREEDY = dict(model=MODEL, temperature=0)


def health(http) -> dict:
    return http.get("/health").json()


def wait_idle(http, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(http)
        if (h["active"], h["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ basics

def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = health(http)
    assert h["status"] == "ok" and h["slots"] == 8


def test_completion_and_chat(client):
    r = client.completions.create(prompt="The capital of France is", max_tokens=12, **GREEDY)
    assert r.choices[0].text.strip() and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    c = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Name a colour."}],
                                       max_tokens=10, **GREEDY)
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content
    assert c.choices[0].finish_reason in ("stop", "length")


def test_usage_counts_are_the_tokenizers(client, http):
    prompt = "Tokens are counted by the tokenizer, not guessed."
    r = client.completions.create(prompt=prompt, max_tokens=8, logprobs=0, **GREEDY)
    assert r.usage.prompt_tokens == len(http.post("/tokenize", json={"content": prompt}).json()["tokens"])
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.tokens) == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the chat prompt is the rendered template: <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n
    c = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **GREEDY)
    rendered = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert c.usage.prompt_tokens == len(http.post("/tokenize", json={"content": rendered, "add_special": False})
                                        .json()["tokens"])


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_the_whole_response(client, chat):
    kwargs = dict(max_tokens=40, stop=["\n\n"], **GREEDY)
    if chat:
        messages = [{"role": "user", "content": "Write one sentence about the sea."}]
        whole = client.chat.completions.create(messages=messages, **kwargs)
        stream = client.chat.completions.create(messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs)
        parts, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        assert "".join(parts) == whole.choices[0].message.content
    else:
        prompt = "A list of fruits:\n1."
        whole = client.completions.create(prompt=prompt, **kwargs)
        stream = client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                           **kwargs)
        parts, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.text)
                finish = ch.finish_reason or finish
        assert "".join(parts) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=16, temperature=1.0, n=2)
    a = client.completions.create(seed=1234, **kwargs)
    b = client.completions.create(seed=1234, **kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the same seed, the same texts
    assert a.choices[0].text != a.choices[1].text  # the two choices are different draws
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) if c.logprobs else 16 for c in a.choices)
    c = client.completions.create(seed=4321, **kwargs)
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_strings(client):
    free = client.completions.create(prompt="1, 2, 3, 4,", max_tokens=20, **GREEDY).choices[0].text
    assert " 6," in free
    r = client.completions.create(prompt="1, 2, 3, 4,", max_tokens=20, stop=[" 6", "never"], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[:free.index(" 6")]


def test_logprobs_concatenate_to_the_text(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Count to five."}], max_tokens=24,
                                       logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5  # greedy: the chosen token is the top one
    c = client.completions.create(prompt="Once upon a time", max_tokens=10, logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                               "maxItems": 3}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "score": {"type": "integer", "minimum": 0, "maximum": 10},
                                      "inner": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["ok", "score", "inner"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum-array", "nested"])
def test_json_schema_output_validates(client, schema):
    """Complete JSON that validates. (Bounds on the numbers: an unbounded integer is valid at any length, and a
    sampling base model can spend its whole budget on digits; the JSON is then cut, finish_reason "length",
    as with OpenAI's own structured outputs.)"""
    for temperature in (0, 1.0):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=200,
            temperature=temperature, seed=7,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_output_parses(client):
    stream = client.completions.create(prompt='A cat as JSON: {"name": "Tom", "age": 3}\nA dog as JSON:',
                                       max_tokens=100, stream=True,
                                       extra_body={"response_format": {"type": "json_object"}}, **GREEDY)
    text = "".join(ch.text for chunk in stream for ch in chunk.choices)
    assert isinstance(json.loads(text), dict)


# ------------------------------------------------------------------------------------------------ batching

def test_batching_is_invisible(client):
    """8 concurrent greedy requests, different prompt lengths, joining at different times: each gives the
    text it gives when served alone."""
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
               "Once upon a time, in a land far away, there lived a " * 3, "The sea is",
               "Water boils at", "import numpy as np\n" * 5, "Shakespeare wrote"]
    lengths = [24, 30, 18, 36, 12, 28, 20, 32]

    def run(i):
        return client.completions.create(prompt=prompts[i], max_tokens=lengths[i], **GREEDY).choices[0].text

    alone = [run(i) for i in range(8)]

    def staggered(i):
        time.sleep(0.15 * i)
        return run(i)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(staggered, range(8)))
    assert together == alone


# ------------------------------------------------------------------------------------------------ errors

def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**9), ("temperature", -3), ("temperature", 1e9),
    ("top_p", 0), ("top_p", 1.5), ("n", 10**6), ("n", 0), ("top_k", -5), ("presence_penalty", 9),
    ("repetition_penalty", 0), ("logprobs", 10**6), ("seed", -1), ("stop", [""]), ("stop", ["x"] * 100),
    ("prompt", [10**9]), ("prompt", []), ("prompt", ""), ("tools", [{"type": "function"}]), ("echo", True),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
    ("response_format", {"type": "xml"}), ("temperature", "hot"),
])
def test_invalid_completion_fields_are_400(http, field, value):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, field: value}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, (field, value, r.text)
    error_of(r)


@pytest.mark.parametrize("messages", [
    [], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "first"}], [{"role": "user"}], "hello",
])
def test_invalid_chat_messages_are_400(http, messages):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 400, r.text
    error_of(r)


def test_chat_template_is_never_taken_from_a_request(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "chat_template": "{{ 7 * 7 }}"})
    assert r.status_code == 400 and error_of(r)["param"] == "chat_template"


def test_context_length_exceeded(http):
    r = http.post("/v1/completions", json={"prompt": "word " * 2000, "max_tokens": 4})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1023})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def test_auth_model_body_and_routes(server, http):
    raw = httpx.Client(base_url=server.url, timeout=30)
    assert raw.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
    r = raw.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert raw.get("/health").status_code == 200  # health needs no key
    r = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert http.post("/v1/completions", content=b"{not json").status_code == 400
    assert http.post("/v1/completions", content=b"[1, 2]").status_code == 400
    assert http.post("/v1/completions", content=b"[" * 100000 + b"]" * 100000).status_code in (400, 413)
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    assert http.post("/detokenize", json={"tokens": [-1]}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [2, 23391]}).json()["content"] == "<bos>hello"
    assert health(http)["status"] == "ok"  # and it goes on serving


def test_queue_full_is_429():
    s = Server("--max-batch", "1", "--max-queue", "0", "--context", "256", "--quiet")
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            def long():
                return c.post("/v1/completions", json={"prompt": "Tell me a story.", "max_tokens": 120,
                                                       "temperature": 0}).status_code

            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(long)
                deadline = time.monotonic() + 30
                while health(c)["active"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error"
                assert first.result() == 200
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ load

def test_bounded_load(server, http):
    """16 clients, 100 requests: mixed lengths, streaming or not, some disconnecting mid-stream, some
    invalid (twice the server's 8 batch slots, so requests queue; 32 clients and 200 requests until 2026-12-03,
    two minutes of CI for the same checks). Every valid request is answered completely, every invalid one gets a 4xx, no 5xx, no slot
    leaked, and memory returns to its idle level."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def warm(i: int) -> int:  # the idle level is the server's after it has served this concurrency once
        body = {"model": MODEL, "prompt": f"warm {i}", "max_tokens": 2}
        if i == 0:
            body["response_format"] = {"type": "json_object"}  # the grammar engine's vocabulary is built
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as c:
            return c.post("/v1/completions", json=body).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(warm, range(16))) == {200}
    wait_idle(http)
    idle = server.rss_mb()

    def one(i: int) -> str:
        kind = i % 5
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as c:
            body = {"model": MODEL, "prompt": f"Request {i}: " + "tell me more. " * (i % 7), "max_tokens": 3 + i % 7,
                    "temperature": 0 if i % 2 else 0.8, "seed": i}
            if kind == 0:  # invalid
                body["max_tokens"] = -i - 1
                r = c.post("/v1/completions", json=body)
                return "4xx" if 400 <= r.status_code < 500 else f"bad {r.status_code}"
            if kind in (1, 2):  # streaming; kind 2 disconnects after two events
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    if r.status_code != 200:
                        return f"bad {r.status_code}"
                    events = 0
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events += 1
                            if kind == 2 and events == 2:
                                return "gone"
                            if line == "data: [DONE]":
                                return "ok"
                    return "cut"
            r = c.post("/v1/completions", json=body)
            if r.status_code != 200:
                return f"bad {r.status_code}"
            choice = r.json()["choices"][0]
            return "ok" if choice["finish_reason"] in ("stop", "length") else "cut"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(100)))
    assert not [r for r in results if r.startswith("bad") or r == "cut"], results
    assert results.count("4xx") == 20 and results.count("gone") == 20
    h = wait_idle(http)
    assert (h["active"], h["waiting"]) == (0, 0), h
    assert server.rss_mb() < idle + 100, (idle, server.rss_mb())


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch"), (["--prefill-chunk", "-1"], "--prefill-chunk"),
    (["--max-queue", "-2"], "--max-queue"), (["--context", "3"], "--context"), (["--port", "70000"], "--port"),
    (["--host", "no.such.host.invalid"], "--host"), (["--api-key", " "], "--api-key"),
])
def test_bad_serve_flags_are_one_line_errors(flags, message, capsys):
    from gemma3.cli import main

    assert main(["serve", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_said_before_loading(capsys):
    import socket

    from gemma3.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        start = time.monotonic()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
        assert time.monotonic() - start < 5
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
