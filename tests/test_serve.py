"""`gemma3 serve` on the real embedded 270M: a real server process on a free loopback port, talked to with the
real `openai` client (and httpx for the raw HTTP cases)."""

from __future__ import annotations

import collections
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
    """One slot and no queue: while a request holds the slot, the next is refused with 429. The first request is
    held by a gate on the scheduler's turn (no step runs until the test opens it), so it is still running when the
    second arrives on any machine, however slow; the old version hoped a 120-token request outlasted a poll."""
    s = InProcessServer("--max-batch", "1", "--max-queue", "0", "--context", "256")
    gate, turn = threading.Event(), s.scheduler._turn
    s.scheduler._turn = lambda: (gate.wait(), turn())[1]  # an instance attribute: the scheduler's loop calls it
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/completions", json={"prompt": "Tell me a story.", "max_tokens": 4})
            deadline = time.monotonic() + 60
            while health(c)["active"] == 0:
                assert time.monotonic() < deadline and not first.done(), "the first request never took the slot"
                time.sleep(0.05)
            try:
                r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
            finally:
                gate.set()
            assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error"
            assert first.result().status_code == 200
    finally:
        gate.set()
        s.stop()


# ------------------------------------------------------------------------------------------------ load

def test_bounded_load(server, http):
    """16 clients, two rounds of the same 100 requests: mixed lengths, streaming or not, some disconnecting mid-stream, some
    invalid (twice the server's 8 batch slots, so requests queue; 32 clients and 200 requests until 2026-12-03,
    two minutes of CI for the same checks). Every valid request is answered completely, every invalid one gets a 4xx, no 5xx, no slot
    leaked, and a second round of the same requests leaves the memory where the first did."""
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

    rss = [idle]
    for _ in range(2):
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(100)))
        assert not [r for r in results if r.startswith("bad") or r == "cut"], results
        assert results.count("4xx") == 20 and results.count("gone") == 20
        h = wait_idle(http)
        assert (h["active"], h["waiting"]) == (0, 0), h
        rss.append(server.rss_mb())
    # No leak: the second round of the same 100 requests (same prompts, seeds and lengths) adds nothing. Where the
    # first round leaves the RSS is the allocator's affair (its pools and arenas grow to the concurrency and may
    # never shrink: the old bound, idle + 100 MB, depended on it); a second identical round reuses them, while
    # anything kept per request grows again. Measured on a 2-core machine under load: idle 1047 MB, after each
    # of four rounds 1043.5, 1043.6, 1042.6, 1042.6 MB. One logits row kept per finished request adds ~80 MB a round.
    assert rss[2] - rss[1] < 25, rss


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


def test_a_port_in_use_is_said_before_loading(capsys, monkeypatch):
    """The promise is about order, not speed: the port is taken before any weights are read, so the model loader
    is never called (counted, instead of timing the command under 5 s)."""
    import socket

    import gemma3.cli.serve as cli_serve
    from gemma3.cli import main

    loads = []
    monkeypatch.setattr(cli_serve, "load_from_args", lambda *a, **k: loads.append(a) or pytest.fail("loaded first"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    assert loads == []
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ against the library
# The tests above compare the server with itself. These compare it with the library and with the model: an
# in-process `gemma3 serve` (gemma3.cli.main in a thread, so the test holds the very model the server loaded,
# built and accelerated by cli/serve.py's own code, and can patch the grammar matcher), and references computed
# here from that model.


class InProcessServer:
    """`gemma3 serve --port 0 ...` run by gemma3.cli.main in a daemon thread. The Generator, Scheduler, uvicorn
    server and listening socket that cli/serve.py creates are recorded as they are made (patched classes that
    only remember their instance), so nothing about how the model is loaded is repeated here."""

    def __init__(self, *args: str):
        import uvicorn

        import gemma3.cli.serve as cli_serve
        import gemma3.generation.generator as generator_module
        import gemma3.serve.scheduler as scheduler_module
        from gemma3.cli import main

        made: dict = {}

        def recording(cls, key):
            return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: (cls.__init__(self, *a, **k),
                                                                               made.__setitem__(key, self))[0]})

        listen = cli_serve._listen
        saved = (generator_module.Generator, scheduler_module.Scheduler, uvicorn.Server, cli_serve._listen)
        generator_module.Generator = recording(saved[0], "generator")
        scheduler_module.Scheduler = recording(saved[1], "scheduler")
        uvicorn.Server = recording(saved[2], "uvicorn")
        cli_serve._listen = lambda host, port: made.setdefault("socket", listen(host, port))
        try:
            self.thread = threading.Thread(target=main, args=(["serve", "--port", "0", "--quiet", *args],),
                                           daemon=True)
            self.thread.start()
            deadline = time.monotonic() + START_TIMEOUT
            while not ("uvicorn" in made and made["uvicorn"].started):
                if time.monotonic() > deadline or not self.thread.is_alive():
                    raise RuntimeError("the in-process server did not start")
                time.sleep(0.05)
        finally:
            generator_module.Generator, scheduler_module.Scheduler, uvicorn.Server, cli_serve._listen = saved
        self.generator, self.scheduler, self._uvicorn = made["generator"], made["scheduler"], made["uvicorn"]
        self.url = f"http://127.0.0.1:{made['socket'].getsockname()[1]}"

    def stop(self):
        self._uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def inproc():
    s = InProcessServer("--max-batch", "2", "--context", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def inproc_client(inproc):
    return openai.OpenAI(base_url=inproc.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library(inproc):
    """The Generator cli/serve.py built over the served model, set to the server's arithmetic: the scheduler
    runs every step through the model's modules over a KV cache in the compute dtype (float32), while the
    library's defaults for one sequence of the quantized embedded model are the fused native step over a
    float16 cache, another rounding (the same greedy text here, but not the same bits). Only the generator's
    own choices change; the model is the server's."""
    import torch

    gen = inproc.generator
    gen.fuse_steps, gen.kv_cache_dtype = False, torch.float32
    return gen


def greedy_config(n: int):
    from gemma3.generation.generator import GenerationConfig
    from gemma3.generation.sampling import SamplingParams

    return GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0))


def stepwise_logits(model, prompt_ids: list[int], continuation: list[int]):
    """(len(continuation), V) float32: the model's logits for each continuation token, fed as the server feeds
    them (the prompt in one forward, then one token a step over a float32 KVCache)."""
    import torch

    from gemma3.kv_cache import KVCache

    cache = KVCache(model.config, 1, len(prompt_ids) + len(continuation), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        rows = [model(torch.tensor([prompt_ids]), cache=cache, logits_to_keep=1).logits[0, -1].float()]
        for t in continuation[:-1]:
            rows.append(model(torch.tensor([[t]]), cache=cache, logits_to_keep=1).logits[0, -1].float())
    return torch.stack(rows)


def plain_logits(model, prompt_ids: list[int], continuation: list[int]):
    """The same logits from one plain forward over prompt + continuation, no cache."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + continuation])).logits[0].float()
    return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(continuation)]


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token releases, as the server streams it (no stop strings)."""
    from gemma3.text.streaming import TextStreamer

    streamer = TextStreamer(tokenizer, ())
    return [streamer.push(t) for t in ids]


COMPLETION_PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]


@pytest.mark.parametrize("prompt", COMPLETION_PROMPTS, ids=["france", "code"])
def test_greedy_completion_equals_the_generator(inproc_client, library, prompt):
    """Greedy /v1/completions: the text, the prompt's and the completion's token counts, the finish reason and
    every generated token equal Generator.generate on the served model. The API has no field for the generated
    ids; the exact handle is logprobs=1: under greedy the one alternative is the chosen token, named by its
    decoded piece, with its logprob, which is the chosen token's."""
    n = 20
    ref = library.generate(prompt, greedy_config(n))
    r = inproc_client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=1)
    choice = r.choices[0]
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    tok = library.tokenizer
    lp = choice.logprobs
    assert [list(top) for top in lp.top_logprobs] == [[tok.decode([t])] for t in ref.token_ids]
    assert lp.tokens == token_texts(tok, ref.token_ids)
    assert lp.token_logprobs == [next(iter(top.values())) for top in lp.top_logprobs]
    # the same prompt given as token ids
    ids = library.encode(prompt)
    assert inproc_client.completions.create(model=MODEL, prompt=ids, max_tokens=n, temperature=0).choices[0].text \
        == ref.text


def test_chat_with_a_system_turn_equals_render_chat_and_the_generator(inproc_client, library):
    """A system and a user message: the server's prompt is render_chat's text (the system folded into the first
    user turn) and its reply Generator.generate's on that text, token for token (each generated token's bytes
    are the greedy top-1 alternative's)."""
    from gemma3.text.chat import render_chat

    messages = [{"role": "system", "content": "You answer in French, in one short sentence."},
                {"role": "user", "content": "What is the capital of Italy?"}]
    n = 24
    ref = library.generate(render_chat(messages, add_generation_prompt=True), greedy_config(n))
    r = inproc_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0,
                                              logprobs=True, top_logprobs=1)
    choice = r.choices[0]
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    tok = library.tokenizer
    text_ids = ref.token_ids[:-1] if ref.finish_reason == "stop" else ref.token_ids  # a stop token is not sent
    assert [bytes(t.top_logprobs[0].bytes) for t in choice.logprobs.content] == [tok.token_bytes(t) for t in text_ids]


# One plain forward over prompt + completion computes the logits the server computed step by step, in another
# summation order (one GEMM over every position and blocked attention, against a GEMV and a one-row attention
# per step). float32 rounds each operation by at most 2^-24 ≈ 6e-8 relative; through 18 layers of a residual
# stream Gemma keeps large (norms in the hundreds) that reaches the logits, |logit| <= ~30 here, as a relative
# deviation of order 1e-4 (measured on these prompts: at most 4e-3 absolute on a logit). log_softmax moves by at
# most twice the largest logit change (log_softmax(x)_i - log_softmax(y)_i = (x_i - y_i) - (lse x - lse y), and
# |lse x - lse y| <= max |x - y|), so 1e-2. A logprob of the wrong distribution is off by far more (a position
# over, or after a penalty: > 0.1). Fed step by step as the server feeds them, the arithmetic is the server's,
# bit for bit (the same kernels on the same shapes): 1e-6 there.
PLAIN_ATOL = 1e-2
STEPWISE_ATOL = 1e-6


def check_logprobs(tokenizer, logits, chosen: list[int], served: list[tuple[float, list[tuple[str, float]]]],
                   atol: float, exact_order: bool):
    """served: per position, (the chosen token's logprob, [(alternative's piece, logprob), ...] best first)."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    k = len(served[0][1])
    for i, (token, (lp, top)) in enumerate(zip(chosen, served)):
        assert abs(lp - float(logp[i, token])) <= atol, (i, lp, float(logp[i, token]))
        values, ids = torch.topk(logp[i], k)
        if exact_order:
            assert [p for p, _ in top] == [tokenizer.decode([t]) for t in ids.tolist()], i
        # every alternative is within atol of its own logprob, and nothing left out beats the last one by more
        by_piece = {tokenizer.decode([t]): float(logp[i, t]) for t in torch.topk(logp[i], 4 * k).indices.tolist()}
        for piece, v in top:
            assert abs(v - by_piece[piece]) <= atol, (i, piece, v, by_piece[piece])
        assert float(values[-1]) <= top[-1][1] + atol


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_logprobs_are_the_models_log_softmax(inproc_client, library, chat):
    """The returned logprobs (the chosen token's and the top-5 alternatives', ids and values) are log_softmax
    of the model's own logits at those positions: against one plain forward over prompt + completion (within
    PLAIN_ATOL), and against the same logits fed step by step (within STEPWISE_ATOL, and the same order)."""
    from gemma3.text.chat import render_chat

    n, k = 12, 5
    tok, model = library.tokenizer, library.model
    if chat:
        messages = [{"role": "user", "content": "Count to five."}]
        prompt = render_chat(messages, add_generation_prompt=True)
        r = inproc_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0,
                                                  logprobs=True, top_logprobs=k)
        served = [(t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in r.choices[0].logprobs.content]
    else:
        prompt = "Once upon a time"
        r = inproc_client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=k)
        lp = r.choices[0].logprobs
        served = [(v, list(top.items())) for v, top in zip(lp.token_logprobs, lp.top_logprobs)]
    ref = library.generate(prompt, greedy_config(n))
    chosen = ref.token_ids[:len(served)]
    assert len(served) == len(ref.token_ids) - (ref.finish_reason == "stop")
    prompt_ids = library.encode(prompt)
    check_logprobs(tok, plain_logits(model, prompt_ids, chosen), chosen, served, PLAIN_ATOL, exact_order=False)
    check_logprobs(tok, stepwise_logits(model, prompt_ids, chosen), chosen, served, STEPWISE_ATOL, exact_order=True)


def reference_penalized_sample(model, vocab: int, prompt_ids: list[int], n: int, temperature: float,
                               presence: float, frequency: float, seed: int) -> list[int]:
    """OpenAI's penalties, written out: before each draw, every token generated so far loses
    presence + frequency * (times generated) from its logit (the prompt's tokens are not counted); then the
    temperature, then a draw from the softmax over the whole vocabulary (top_k=0, top_p=1 ask for no filter)
    with a torch.Generator seeded with the request's seed, as the server seeds each request's. The subtraction
    rounds once here, twice in the server (two tensor operations): a logit may differ in its last bit, which
    moves a draw only if the uniform falls within ~1e-7 of a boundary between two tokens."""
    import torch

    from gemma3.kv_cache import KVCache

    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(model.config, 1, len(prompt_ids) + n, torch.float32, torch.device("cpu"))
    generated: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids]), cache=cache, logits_to_keep=1).logits[0, -1].float()
        for _ in range(n):
            logits = logits.clone()
            logits[vocab:] = -float("inf")  # embedding rows past the tokenizer's vocabulary are no tokens
            for token, count in collections.Counter(generated).items():
                logits[token] -= presence + frequency * count
            if temperature == 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs[None], 1, generator=generator)[0, 0])
            generated.append(token)
            logits = model(torch.tensor([[token]]), cache=cache, logits_to_keep=1).logits[0, -1].float()
    return generated


@pytest.mark.parametrize("temperature,seed", [(0.9, 1234), (0, 0)], ids=["seeded", "greedy"])
def test_penalties_equal_a_reference_sampler(inproc, inproc_client, library, temperature, seed):
    """presence_penalty and frequency_penalty, sampled with a seed (and greedily): the server's tokens are the
    reference's. The ids are pinned by the text each token releases and its logprob (the model's own, before
    the penalties: a different token would have another). The prompt repeats itself, so the penalties matter:
    without them the reference gives another completion (checked, so that the test cannot pass vacuously)."""
    prompt = "apple apple apple apple apple apple apple apple"
    n, presence, frequency = 20, 0.8, 0.6
    tok, model = library.tokenizer, library.model
    prompt_ids = library.encode(prompt)
    vocab = min(model.config.vocab_size, len(tok))
    ref = reference_penalized_sample(model, vocab, prompt_ids, n, temperature, presence, frequency, seed)
    assert ref != reference_penalized_sample(model, vocab, prompt_ids, n, temperature, 0.0, 0.0, seed)
    assert not set(ref) & set(inproc.scheduler.stop_ids)  # the whole budget is text
    r = inproc_client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=temperature,
                                         top_p=1.0, seed=seed, presence_penalty=presence,
                                         frequency_penalty=frequency, logprobs=0, extra_body={"top_k": 0})
    choice = r.choices[0]
    assert choice.text == tok.decode(ref)
    assert choice.logprobs.tokens == token_texts(tok, ref)
    import torch

    logp = torch.log_softmax(stepwise_logits(model, prompt_ids, ref), dim=-1)
    assert choice.logprobs.token_logprobs == pytest.approx([float(logp[i, t]) for i, t in enumerate(ref)],
                                                           abs=STEPWISE_ATOL)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_stream_whose_grammar_fails_midway_ends_with_an_error_and_done(inproc, monkeypatch, chat):
    """docs/serving.md (and serve/app.py's docstring): "A stream that fails midway ends with an error event and
    `data: [DONE]`". The grammar matcher is made to refuse the 4th token it is given (deterministically: a
    count per matcher), after three tokens have streamed; the stream then ends with the error object, then
    [DONE], and no finish_reason. The server goes on serving."""
    from gemma3.errors import Gemma3Error
    from gemma3.generation.structured import JsonMatcher

    advance = JsonMatcher.advance

    def failing(self, token):
        self._taken = getattr(self, "_taken", 0) + 1
        if self._taken == 4:
            raise Gemma3Error("structured output: the grammar failed (injected by the test)")
        advance(self, token)

    monkeypatch.setattr(JsonMatcher, "advance", failing)
    body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "stream": True,
            "response_format": {"type": "json_object"}}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "A cat as JSON."}]
    else:
        path, body["prompt"] = "/v1/completions", 'A cat as JSON: {"name": "Tom", "age": 3}\nA dog as JSON:'
    with httpx.Client(base_url=inproc.url, timeout=120) as c:
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        error = json.loads(events[-2])
        assert set(error) == {"error"} and "injected by the test" in error["error"]["message"]
        chunks = [json.loads(e) for e in events[:-2]]
        text = "".join(ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                       for chunk in chunks for ch in chunk["choices"])
        assert text  # it failed midway: the first tokens had streamed
        assert all(ch["finish_reason"] is None for chunk in chunks for ch in chunk["choices"])
        monkeypatch.undo()
        assert wait_idle(c)["active"] == 0
        r = c.post(path, json={**body, "stream": False, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------------------------------------ startup, on a tiny model
# `gemma3 serve` run by gemma3.cli.main in this process up to the point where it would serve: uvicorn's Server is
# replaced by one that hands the app cli/serve.py built to the test (through starlette's TestClient, no socket)
# and returns. Everything before it (flags, listening socket, load, template, warnings) is the command's own.

def serve_once(monkeypatch, capsys, *args: str, requests=None) -> tuple[int, str, object]:
    """(exit status, stderr, what `requests(client)` returned) of `gemma3 serve --port 0 ARGS`."""
    import uvicorn
    from starlette.testclient import TestClient

    import gemma3.cli.serve as cli_serve
    from gemma3.cli import main

    answers = []

    class Serving:
        def __init__(self, config):
            self.config = config

        def run(self, sockets):
            if requests is not None:
                with TestClient(self.config.app) as client:
                    answers.append(requests(client))

    monkeypatch.setattr(uvicorn, "Server", Serving)
    monkeypatch.setattr(cli_serve, "_warm_grammar_engine", lambda *a: None)  # seconds of CPU this never uses
    code = main(["serve", "--port", "0", "--max-batch", "1", "--context", "64", *args])
    return code, capsys.readouterr().err, answers[0] if answers else None


@pytest.mark.parametrize("marker", ["FROM-CONFIG", "FROM-JINJA", "FROM-GGUF"])
def test_serve_renders_chat_with_the_checkpoints_own_template(monkeypatch, capsys, template_sources, marker):
    """serving.md: chat messages are rendered with the checkpoint's chat template (tokenizer_config.json's,
    chat_template.jinja, which wins over it, or a GGUF's metadata): /apply-template shows that template's
    rendering, and a chat completion's prompt is its tokens."""
    from gemma3.text.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "Hello"}]

    def ask(client):
        shown = client.post("/apply-template", json={"messages": messages})
        chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0})
        return shown.json(), chat.json()

    code, err, (shown, chat) = serve_once(monkeypatch, capsys, "-m", str(template_sources[marker]), "--quiet",
                                          requests=ask)
    assert code == 0, err
    assert shown == {"prompt": f"<bos>{marker} <user> Hello"}
    tokenizer = Tokenizer.from_dir(template_sources["FROM-CONFIG"])
    assert chat["usage"]["prompt_tokens"] == len(tokenizer.encode(f"<bos>{marker} <user> Hello", add_bos=False))


NO_KEY_WARNING = ("warning: listening on {host} with no --api-key: anyone who can reach this port can use it\n")


@pytest.mark.parametrize("host, key, warned", [
    ("0.0.0.0", None, True), ("0.0.0.0", "--api-key", False), ("0.0.0.0", "GEMMA3_API_KEY", False),
    ("127.0.0.1", None, False), ("localhost", None, False),
])
def test_serving_beyond_loopback_without_a_key_warns(monkeypatch, capsys, tiny_hf_dir, host, key, warned):
    """serving.md: it binds to loopback unless --host says otherwise, and warns when that is done without a key
    (--api-key or $GEMMA3_API_KEY). The socket the command listens on is made on loopback here whatever --host
    says, so the test opens nothing beyond this machine; the warning is the command's own decision."""
    import gemma3.cli.serve as cli_serve

    listen = cli_serve._listen
    hosts = []
    monkeypatch.setattr(cli_serve, "_listen", lambda h, port: (hosts.append(h), listen("127.0.0.1", port))[1])
    monkeypatch.delenv("GEMMA3_API_KEY", raising=False)
    args = ["-m", str(tiny_hf_dir), "--host", host, "--quiet"]
    if key == "--api-key":
        args += ["--api-key", "k"]
    elif key is not None:
        monkeypatch.setenv(key, "k")
    code, err, _ = serve_once(monkeypatch, capsys, *args)
    assert code == 0 and hosts == [host]
    lines = err.splitlines(keepends=True)  # --quiet: the warning, if any, and the line saying where it serves
    assert lines[:-1] == ([NO_KEY_WARNING.format(host=host)] if warned else []), err
    assert lines[-1].startswith(f"serving {tiny_hf_dir.name} on http://127.0.0.1:")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "127.0.0.1",
                                  "127.0.0.2", "::1", "localhost"])
def test_which_hosts_count_as_loopback(host):
    from gemma3.cli.serve import _is_loopback

    assert _is_loopback(host) == (host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
