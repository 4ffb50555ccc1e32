"""Generation speed, ours against transformers: same GGUF weights, prompt, dtype and thread count, one run.

    python benchmarks/bench_generate.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128]
                                        [--dtype float32|bfloat16|both] [--repeats 3]

Each side runs in its own subprocess of this script (so its peak RSS is its own), interleaved
ours, transformers, ours, transformers, ... `--repeats` times per dtype; every figure is the best over
the repeats (the machine may be shared, and best-of-N is the least noisy estimate of what the code can do).
Inside a worker: load, one short warm-up generation, then one measured greedy generation of
`--new-tokens` tokens from a `--prompt-tokens`-token prompt given as token ids (tokenization not timed).

    TTFT        prompt ids in → first generated token out (the prefill forward + one argmax)
    prefill     prompt tokens / TTFT
    decode      tokens after the first / time from the first token to the last (one forward + argmax each)
    peak RSS    the worker's ru_maxrss: loading included (both dequantize the GGUF), so it is the peak of
                the whole load-and-generate lifetime
    BW share    (bytes one decode step must read: every weight once, the tied 262144×640 embedding as
                the output head, plus the KV cache it attends over) / step time, against a read bandwidth
                measured here with the same thread count (a sum over a 1 GiB tensor)

Both sides must produce the same greedy tokens; the table says whether they did.

On a machine shared with other work, run it as `OMP_WAIT_POLICY=PASSIVE python benchmarks/...`: with
OpenMP's default spin-waiting, a bf16 oneDNN matmul on 2 threads takes ~7 ms instead of ~0.08 ms
whenever another process holds one of the cores (measured), for both implementations alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Public domain: Jane Austen, Pride and Prejudice, chapter 1 (repeated until the prompt is long enough).
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him "
    "one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it "
    "is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no "
    "answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I "
    "have no objection to hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says "
    "that Netherfield is taken by a young man of large fortune from the north of England; that he came down on "
    "Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. "
    "Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in "
    "the house by the end of next week.\" \"What is his name?\" \"Bingley.\" \"Is he married or single?\" \"Oh! Single, "
    "my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our "
    "girls!\" \"How so? How can it affect them?\" \"My dear Mr. Bennet,\" replied his wife, \"how can you be so "
    "tiresome! You must know that I am thinking of his marrying one of them.\" \"Is that his design in settling "
    "here?\" \"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of "
    "them, and therefore you must visit him as soon as he comes.\" "
)
RESULT_TAG = "RESULT "


# ---------------------------------------------------------------------------------------------- workers
def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n ids of <bos> + TEXT repeated (ends mid-text, as a real long prompt would)."""
    ids = tokenizer.encode(TEXT * (1 + n // 100), add_bos=True)
    if len(ids) < n:
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def rates(prompt_len: int, start: float, stamps: list[float]) -> dict:
    """TTFT / prefill / decode figures from the wall-clock time at which each new token came out."""
    ttft = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_s": ttft, "prefill_tok_s": prompt_len / ttft,
            "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0}


def run_ours(args, dtype) -> dict:
    from gemma3.config import GLOBAL
    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.loading import load
    from gemma3.generation.sampling import SamplingParams

    model, tokenizer, config = load(None, dtype=dtype, progress=False)
    gen = Generator(model, tokenizer)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    greedy = SamplingParams(temperature=0.0)
    gen.generate(ids[:16], GenerationConfig(max_new_tokens=4, sampling=greedy))  # warm-up
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, sampling=greedy)

    # The generator hands each new token to a TextStreamer the moment it exists (that is when a user could
    # see it), so timestamp the pushes; the generation itself runs unmodified.
    from gemma3.text.streaming import TextStreamer

    stamps: list[float] = []
    push = TextStreamer.push

    def timed_push(self, token):
        stamps.append(time.perf_counter())
        return push(self, token)

    TextStreamer.push = timed_push
    start = time.perf_counter()
    result = gen.generate(ids, cfg)
    TextStreamer.push = push
    out = rates(len(ids), start, stamps)
    out["tokens"] = result.token_ids
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    # KV bytes one decode step reads, at the middle of the decode: every global slot up to the current
    # position, the full ring on sliding layers.
    mid = len(ids) + args.new_tokens // 2
    per_slot = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize  # a key and a value
    out["kv_bytes"] = sum(per_slot * (mid if t == GLOBAL else min(mid, config.sliding_window))
                          for t in config.layer_types)
    return out


def run_transformers(args, dtype) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from gemma3.weights.sources import embedded_gguf_path
    from gemma3.text.tokenizer import Tokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
    ids = prompt_ids(Tokenizer.from_gguf(gguf), args.prompt_tokens)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):  # first call: the prompt; then one call per new token
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(prompt, n, streamer=None):
        x = torch.tensor([prompt])
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              streamer=streamer, top_k=None, top_p=None, temperature=None)[0, len(prompt):]

    with torch.inference_mode():
        generate(ids[:16], 4)  # warm-up
        stamps = Stamps()
        start = time.perf_counter()
        tokens = generate(ids, args.new_tokens, stamps)
    out = rates(len(ids), start, stamps.times)
    out["tokens"] = tokens.tolist()
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    out = run_ours(args, dtype) if args.worker == "ours" else run_transformers(args, dtype)
    out["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s that `threads` threads can stream from memory: best of `repeats` sums over `gib` GiB."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def peak_rss_mb() -> float:
    """This process's resident high-water mark since its exec (VmHWM). Not ru_maxrss: Linux carries that over
    an exec from the parent, so a worker would report the driver's peak (its 1 GiB bandwidth-test tensor)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(cmd: list[str], threads: int, what: str, env: dict[str, str] | None = None) -> dict:
    """Run one worker subprocess with `threads` threads (and `env` added to the environment) and return the JSON
    it printed after RESULT_TAG."""
    env = dict(os.environ, **(env or {}), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        sys.exit(f"{what} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def best(runs: list[dict], picks=(("ttft_s", min), ("prefill_tok_s", max), ("decode_tok_s", max),
                                  ("peak_rss_mb", min))) -> dict:
    """The best of each figure over the runs (keys a run lacks are skipped)."""
    b = dict(runs[0])
    for key, pick in picks:
        if key in b:
            b[key] = pick(r[key] for r in runs)
    return b


def spawn(args, side: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    return run_worker(cmd, args.threads, f"{side} {dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3, help="worker pairs per dtype (best of N)")
    parser.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    import transformers

    from gemma3 import kernels

    bandwidth = read_bandwidth(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"read bandwidth ({args.threads} threads, 1 GiB sum): {bandwidth / 1e9:.1f} GB/s; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"gemma3 kernels: {kernels.status()}\n")
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    header = (f"| dtype | impl | prefill tok/s | decode tok/s | TTFT s | peak RSS MB | bandwidth limit tok/s "
              f"| BW share |\n|---|---|--:|--:|--:|--:|--:|--:|")
    rows, notes = [], []
    for dtype in dtypes:
        runs = {"ours": [], "transformers": []}
        for i in range(args.repeats):
            for side in runs:  # interleaved: ours, transformers, ours, transformers, ...
                r = spawn(args, side, dtype)
                runs[side].append(r)
                print(f"  {dtype} {side:12} run {i + 1}: prefill {r['prefill_tok_s']:7.1f} tok/s  "
                      f"decode {r['decode_tok_s']:6.2f} tok/s  TTFT {r['ttft_s']:.3f} s  "
                      f"RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        ours, hf = best(runs["ours"]), best(runs["transformers"])
        step_bytes = ours["weight_bytes"] + ours["kv_bytes"]
        limit = bandwidth / step_bytes  # tok/s if a decode step did nothing but read its bytes once
        for name, r in (("gemma3", ours), ("transformers", hf)):
            rows.append(f"| {dtype} | {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                        f"{r['ttft_s']:.2f} | {r['peak_rss_mb']:.0f} | {limit:.1f} | "
                        f"{r['decode_tok_s'] / limit:.0%} |")
        same = ours["tokens"] == hf["tokens"]
        n = len(ours["tokens"])
        agree = next((i for i, (a, b) in enumerate(zip(ours["tokens"], hf["tokens"])) if a != b), min(n, len(hf["tokens"])))
        notes.append(f"{dtype}: decode {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x transformers, "
                     f"prefill {ours['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x; "
                     f"{step_bytes / 1e9:.3f} GB read per decode step; greedy tokens "
                     + ("match" if same else f"DIFFER (first {agree} of {n} agree)"))
    print("\n" + header + "\n" + "\n".join(rows) + "\n")
    print("\n".join(notes))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
