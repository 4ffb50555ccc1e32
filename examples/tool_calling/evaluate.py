"""Exact-call accuracy of a model on tool-calling records, measured through the real server and the `openai` client.

    python evaluate.py TEST.jsonl [--model SOURCE] [--lora ADAPTER_DIR] [--limit N] [--no-grammar] [--json]

Each line of TEST.jsonl is a record in the OpenAI fine-tuning / TRL format, `{"messages": [...], "tools": [...]}`
(any tools, any domain). The answer under test is the record's first assistant message with `tool_calls`, or,
in a record without calls, its last assistant message (then the right answer is text and no call); the prompt is
every message before it. The record is right when the reply calls the same functions in the same order with
arguments equal as JSON values (3 == 3.0, key order ignored), or, for a no-call record, makes no call.

The model runs in `python -m gemma3 serve` (a subprocess on a free loopback port, stopped at the end, also on
Ctrl-C), asked with `tool_choice="auto"` at temperature 0, so the server's grammar keeps each call to a declared
function with arguments valid against its schema. `--no-grammar` asks the same question without the grammar:
the prompt text the chat request renders to (`POST /apply-template`) is completed by `/v1/completions`, and the
calls are read out of the raw text with gemma3.text.tools.parse_tool_calls, so a malformed call counts as a miss.

Prints a progress line every `--every` records, then the accuracy overall and per function (a record counts
for each function it expects, "(no call)" for the no-call ones) and a few misses; `--json` prints the figures as
one JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import APIError, OpenAI

from gemma3.text.tools import START_RESPONSE, parse_tool_calls

NO_CALL = "(no call)"
SHOWN_MISSES = 5


# --------------------------------------------------------------------------------------------- records

@dataclass
class Case:
    """One record as a question: the prompt messages, the tools, and the calls expected (empty: no call)."""

    line: int
    prompt: list[dict]
    tools: list[dict] | None
    expected: list[tuple[str, Any]]


@dataclass
class Outcome:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    content: str = ""
    error: str | None = None


def arguments(value: Any) -> Any:
    """A call's arguments as a JSON value: OpenAI sends a JSON string; some datasets keep the object itself.
    Text that is not JSON stays a string, which equals no object."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def read_cases(path: Path, limit: int | None) -> list[Case]:
    cases = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record["messages"]
            answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
            if not answers:
                raise SystemExit(f"{path}:{line_no}: the record has no assistant message to compare with")
            target = next((i for i in answers if messages[i].get("tool_calls")), answers[-1])
            expected = [(c["function"]["name"], arguments(c["function"].get("arguments")))
                        for c in messages[target].get("tool_calls") or ()]
            cases.append(Case(line_no, messages[:target], record.get("tools") or None, expected))
            if limit is not None and len(cases) == limit:
                break
    return cases


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (3 == 3.0) but never a boolean for a number, objects whatever
    their key order, lists item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def exact(expected: list[tuple[str, Any]], got: Outcome) -> bool:
    return (got.error is None and len(expected) == len(got.calls)
            and all(n == m and same(a, b) for (n, a), (m, b) in zip(expected, got.calls)))


# --------------------------------------------------------------------------------------------- the server

class Server:
    """`python -m gemma3 serve` on a free loopback port (--port 0: the server picks one and says which)."""

    def __init__(self, model: str | None, lora: str | None, port: int, parallel: int):
        command = [sys.executable, "-m", "gemma3", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--max-batch", str(parallel), "--quiet"]
        command += ["-m", model] if model else []
        command += ["--lora", lora] if lora else []
        # its own session: a Ctrl-C here stops it through `close`, not by killing it mid-answer
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.log: collections.deque[str] = collections.deque(maxlen=40)
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if self.url is None and line.startswith("serving ") and " on http://" in line:
                self.url = line.split(" on ", 1)[1].strip().removesuffix("/v1")
                self._ready.set()
        self._ready.set()  # the server exited

    def wait(self, timeout: float = 900.0) -> str:
        """The base URL once /health answers; loading the model (and folding a LoRA in) takes a while."""
        deadline = time.monotonic() + timeout
        self._ready.wait(timeout)
        while self.url is not None and self.process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.close()
        raise SystemExit("the server did not start:\n  " + "\n  ".join(self.log))

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: {e.code} {e.read().decode(errors='replace')[:300]}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful stop
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------- asking

def ask_chat(client: OpenAI, model: str, case: Case, max_tokens: int) -> Outcome:
    tools = {"tools": case.tools, "tool_choice": "auto"} if case.tools else {}
    reply = client.chat.completions.create(model=model, messages=case.prompt, temperature=0,
                                           max_tokens=max_tokens, **tools)
    message = reply.choices[0].message
    return Outcome([(c.function.name, arguments(c.function.arguments)) for c in message.tool_calls or ()],
                   message.content or "")


def ask_raw(client: OpenAI, server: Server, model: str, case: Case, max_tokens: int) -> Outcome:
    """The same prompt without the grammar: the rendered text, completed freely, its calls parsed."""
    body = {"model": model, "messages": case.prompt, **({"tools": case.tools} if case.tools else {})}
    prompt = server.post("/apply-template", body)["prompt"]
    # START_RESPONSE ends a model's calls (what comes next is the tools' results): the chat path stops there too
    reply = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=max_tokens,
                                      stop=[START_RESPONSE])
    content, calls = parse_tool_calls(reply.choices[0].text)
    return Outcome([(c.name, arguments(c.arguments)) for c in calls], content)


def ask(args, client, server, model, case) -> Outcome:
    try:
        if args.no_grammar:
            return ask_raw(client, server, model, case, args.max_tokens)
        return ask_chat(client, model, case, args.max_tokens)
    except (APIError, RuntimeError) as e:  # a refused request (a prompt past the context, ...) is a miss
        if server.process.poll() is not None:
            raise SystemExit("the server stopped:\n  " + "\n  ".join(server.log)) from None
        return Outcome(error=str(e)[:300])


# --------------------------------------------------------------------------------------------- report

def show(calls: list[tuple[str, Any]], content: str = "") -> str:
    if not calls:
        return f"{NO_CALL} {content.strip()[:100]!r}"
    return "; ".join(f"{name} {json.dumps(a, ensure_ascii=False)}" for name, a in calls)


def last_user_text(messages: list[dict]) -> Any:
    return next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)


def summarize(cases: list[Case], outcomes: list[Outcome], seconds: float, args) -> dict:
    pairs = list(zip(cases, outcomes))
    right = [exact(c.expected, o) for c, o in pairs]
    per_function: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for case, ok in zip(cases, right):
        for name in dict.fromkeys(n for n, _ in case.expected) or [NO_CALL]:
            per_function[name][0] += ok
            per_function[name][1] += 1
    n = len(cases)
    misses = [{"line": c.line, "user": last_user_text(c.prompt), "expected": show(c.expected),
               "got": o.error or show(o.calls, o.content)} for (c, o), ok in zip(pairs, right) if not ok]
    names = [([x for x, _ in c.expected], [x for x, _ in o.calls]) for c, o in pairs]
    return {
        "data": str(args.data), "model": args.model or "embedded", "lora": args.lora, "grammar": not args.no_grammar,
        "records": n, "exact": sum(right) / n, "correct": sum(right),
        # coarser figures, to tell a wrong decision from a wrong function from wrong arguments
        "right_decision": sum(bool(want) == bool(got) for want, got in names) / n,
        "right_functions": sum(want == got for want, got in names) / n,
        "errors": sum(o.error is not None for o in outcomes),
        "per_function": {name: {"exact": k / m, "correct": k, "records": m}
                         for name, (k, m) in sorted(per_function.items())},
        "seconds": round(seconds, 1), "seconds_per_record": round(seconds / n, 3), "parallel": args.parallel,
        "misses": misses,
    }


def print_report(s: dict) -> None:
    print(f"exact-call accuracy: {s['exact']:.3f} ({s['correct']}/{s['records']}), "
          f"grammar {'on' if s['grammar'] else 'off'}, model {s['model']}" + (f" + {s['lora']}" if s['lora'] else ""))
    print(f"  right call / no-call decision {s['right_decision']:.3f}, right functions {s['right_functions']:.3f}, "
          f"errors {s['errors']}")
    width = max(len(name) for name in s["per_function"])
    for name, f in s["per_function"].items():
        print(f"  {name:<{width}}  {f['exact']:.3f}  ({f['correct']}/{f['records']})")
    for miss in s["misses"][:SHOWN_MISSES]:
        print(f"miss (line {miss['line']}): {miss['user']!r}")
        print(f"  expected: {miss['expected']}\n  got:      {miss['got']}")
    print(f"{s['seconds']:.0f} s, {s['seconds_per_record']:.2f} s a record ({s['parallel']} at a time)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="JSONL of {messages, tools} records")
    parser.add_argument("-m", "--model", help="model source for gemma3 serve -m (default: the embedded 270M)")
    parser.add_argument("--lora", metavar="ADAPTER_DIR", help="a LoRA adapter (a training run's checkpoint)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N records")
    parser.add_argument("--no-grammar", action="store_true",
                        help="generate without the tool-call grammar and parse the raw text")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: 0, any free one)")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N", help="tokens per reply (default: 256)")
    parser.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="requests in flight, decoded together by the server (default: 4)")
    parser.add_argument("--every", type=int, default=10, metavar="N", help="a progress line every N records")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--parallel, --max-tokens and --limit must be >= 1")
    cases = read_cases(args.data, args.limit)
    if not cases:
        parser.error(f"{args.data} holds no records")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    server = Server(args.model, args.lora, args.port, args.parallel)
    try:
        url = server.wait()
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
        model = client.models.list().data[0].id
        print(f"server {url} ({model}); {len(cases)} records", file=sys.stderr)
        outcomes: list[Outcome | None] = [None] * len(cases)
        start = time.monotonic()
        pool = ThreadPoolExecutor(args.parallel)
        try:
            futures = {pool.submit(ask, args, client, server, model, case): i for i, case in enumerate(cases)}
            for done, future in enumerate(as_completed(futures), 1):
                outcomes[futures[future]] = future.result()
                if done % args.every == 0 or done == len(cases):
                    right = sum(exact(c.expected, o) for c, o in zip(cases, outcomes) if o is not None)
                    elapsed = time.monotonic() - start
                    print(f"[{done}/{len(cases)}] exact {right / done:.3f}  {elapsed:.0f} s "
                          f"({elapsed / done:.2f} s a record)", file=sys.stderr)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, the queued requests are never sent
        summary = summarize(cases, outcomes, time.monotonic() - start, args)
    finally:
        server.close()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print_report(summary)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server is stopped already (main's `finally`)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
