"""Quantized CPU decoding, ours against llama.cpp: the same GGUF file, prompt and thread count, one run.

    python benchmarks/bench_quant.py [--threads 1 2] [--prompt-tokens 512] [--new-tokens 128] [--repeats 3]
                                     [--q8 PATH] [--skip-q8]

Files: the embedded Q4_K_M GGUF as it is, and a Q8_0 GGUF written from it by `gemma3 convert` (dequantized,
then quantized to Q8_0 by gguf-py; `--q8 PATH` reuses one). On each file, for each thread count, the engines run
interleaved (gemma3, llama.cpp, gemma3, llama.cpp, ... `--repeats` times), each in its own subprocess (its peak
RSS is its own); every figure is the best over the repeats (the machine may be shared: best-of-N is the least
noisy estimate of what the code can do). gemma3 runs the file in its own blocks (`--quantize` default);
llama.cpp is llama-cpp-python built from source with native CPU flags (`pip install llama-cpp-python`,
10-25 min to compile; not in CI).

    TTFT       prompt ids in → first generated token (the prefill forward + an argmax), after load
    decode     tokens after the first / time from the first token to the last (greedy)
    load→1st   gemma3 only: from calling gemma3.load (weights + tokenizer) to the first token of a 4-token
               prompt, in the same worker (imports not counted; the file in the page cache)
    peak RSS   the worker's ru_maxrss over its whole life (load included)
    BW share   bytes a decode step must read (the file's weights, plus the KV cache it attends over) / step
               time, against a read bandwidth measured here with the same thread count (a 1 GiB sum)

Run it with OpenMP's default wait policy, which both engines get by default. `OMP_WAIT_POLICY=PASSIVE` (see
bench_generate.py) keeps a spinning thread from losing its core to another process, but then every barrier
sleeps and wakes, and a decode step has many: on the 2-core Xeon, 2026-12-04, it cut 2-thread decode of the
embedded file from 84.3 to 52.7 tok/s for gemma3 (before step.c's five-barrier layers; 67.7 -> 54.1 after, in
another hour) and from 49.7 to 27.6 for llama.cpp, below its own 1-thread speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import RESULT_TAG, TEXT, best, peak_rss_mb, read_bandwidth, run_worker  # noqa: E402


def prompt_ids(args) -> list[int]:
    """The prompt, tokenized once by the driver (so llama.cpp's worker never loads our tokenizer)."""
    return json.loads(Path(args.prompt_file).read_text())


def run_ours(args) -> dict:
    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.loading import load
    from gemma3.generation.sampling import SamplingParams
    from gemma3.text.streaming import TextStreamer

    greedy = SamplingParams(temperature=0.0)
    start = time.perf_counter()
    model, tokenizer, config = load(args.file, quantize=None, progress=False)
    gen = Generator(model, tokenizer)
    gen.generate(tokenizer.encode("The capital of France", add_bos=True), GenerationConfig(max_new_tokens=1, sampling=greedy))
    load_to_first = time.perf_counter() - start
    ids = prompt_ids(args)
    gen.generate(ids[:16], GenerationConfig(max_new_tokens=4, sampling=greedy))  # warm-up
    stamps: list[float] = []
    push = TextStreamer.push

    def timed_push(self, token):
        stamps.append(time.perf_counter())
        return push(self, token)

    TextStreamer.push = timed_push
    begin = time.perf_counter()
    result = gen.generate(ids, GenerationConfig(max_new_tokens=args.new_tokens, sampling=greedy, stop_token_ids=()))
    TextStreamer.push = push
    per_slot = 2 * config.num_key_value_heads * config.head_dim * gen.cache_dtype(1).itemsize  # a key + a value
    mid = len(ids) + args.new_tokens // 2
    kv = sum(per_slot * (mid if t == "full_attention" else min(mid, config.sliding_window)) for t in config.layer_types)
    return {"ttft_s": stamps[0] - begin, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": result.token_ids, "load_to_first_s": load_to_first, "kv_bytes": kv}


def run_llama(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    plain = contextlib.nullcontext()
    if args.no_extra_bufts:  # llama.cpp without its extra CPU buffer types (AMX, repacked weights): see main
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from llama_peer import llama_cpp_plain_kernels

        plain = llama_cpp_plain_kernels()
    with plain:
        llm = Llama(args.file, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024, verbose=False)
    if args.probe:  # one short forward: does this build run on this CPU as configured?
        llm.eval([2, 818, 5279])
        return {}
    ids = prompt_ids(args)
    vocab = llm.n_vocab()

    def last_logits():  # the last evaluated position's logits, read from the context
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    llm.eval(ids[:16])  # warm-up
    llm.reset()
    begin = time.perf_counter()
    llm.eval(ids)
    token = int(np.argmax(last_logits()))
    stamps, tokens = [time.perf_counter()], [token]
    for _ in range(args.new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
        stamps.append(time.perf_counter())
        tokens.append(token)
    return {"ttft_s": stamps[0] - begin, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": tokens}


def worker(args) -> None:
    if args.worker == "gemma3":
        import torch

        torch.set_num_threads(args.threads)
        out = run_ours(args)
    else:
        out = run_llama(args)
    out["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(out), flush=True)


def spawn(args, side: str, file: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--file", file, "--threads", str(threads),
           "--prompt-file", args.prompt_file, "--new-tokens", str(args.new_tokens)]
    if side == "llama.cpp" and args.no_extra_bufts:
        cmd.append("--no-extra-bufts")
    return run_worker(cmd, threads, side)


def llama_needs_plain_buffers(file: str, threads: int) -> bool:
    """True when llama.cpp crashes on a short forward with its default extra CPU buffer types (AMX tiles and
    repacked weights). Seen on an AMX-capable Xeon with llama-cpp-python 0.3.36 built with native flags: a
    segmentation fault in its first decode, and none with use_extra_bufts off."""
    cmd = [sys.executable, __file__, "--worker", "llama.cpp", "--file", file, "--threads", str(threads), "--probe"]
    return subprocess.run(cmd, capture_output=True).returncode != 0


PICKS = (("ttft_s", min), ("decode_tok_s", max), ("peak_rss_mb", min), ("load_to_first_s", min))


def q8_file(args, directory: str) -> str:
    if args.q8:
        return args.q8
    path = Path(directory) / "gemma-3-270m-q8_0.gguf"
    from gemma3.weights.sources import embedded_gguf_path

    subprocess.run([sys.executable, "-m", "gemma3", "convert", str(embedded_gguf_path()), str(path), "--to", "gguf",
                    "--gguf-type", "Q8_0", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--q8", metavar="PATH", help="a Q8_0 GGUF of the 270M to use (default: write one)")
    parser.add_argument("--skip-q8", action="store_true", help="only the embedded Q4_K_M file")
    parser.add_argument("--worker", choices=("gemma3", "llama.cpp"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)

    import llama_cpp
    import torch

    from gemma3 import kernels
    from gemma3.weights.sources import embedded_gguf_path
    from gemma3.weights.gguf.reader import GGUFFile

    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.prompt_tokens}-token "
          f"prompt, {args.new_tokens} new tokens, best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"gemma3 kernels: {kernels.status()}")
    args.no_extra_bufts = llama_needs_plain_buffers(str(embedded_gguf_path()), args.threads[0])
    if args.no_extra_bufts:
        print("llama.cpp crashed on a probe forward with its extra CPU buffer types (AMX / repacked weights) on this "
              "machine: it runs with use_extra_bufts=False (its plain ggml CPU kernels)")
    from gemma3.text.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        ids = Tokenizer.from_gguf(embedded_gguf_path()).encode(TEXT * (1 + args.prompt_tokens // 100), add_bos=True)
        args.prompt_file = str(Path(tmp) / "prompt.json")
        Path(args.prompt_file).write_text(json.dumps(ids[:args.prompt_tokens]))
        files = [("Q4_K_M (embedded)", str(embedded_gguf_path()))]
        if not args.skip_q8:
            files.append(("Q8_0", q8_file(args, tmp)))
        rows, notes = [], []
        for threads in args.threads:
            bandwidth = read_bandwidth(threads)
            print(f"read bandwidth, {threads} thread(s): {bandwidth / 1e9:.1f} GB/s", flush=True)
            for label, file in files:
                weight_bytes = sum(t.nbytes for t in GGUFFile.open(file).tensors.values())
                runs = {"gemma3": [], "llama.cpp": []}
                for i in range(args.repeats):
                    for side in runs:
                        r = spawn(args, side, file, threads)
                        runs[side].append(r)
                        print(f"  {label} {threads}t {side:9} run {i + 1}: TTFT {r['ttft_s']:.3f} s  decode "
                              f"{r['decode_tok_s']:6.2f} tok/s  RSS {r['peak_rss_mb']:.0f} MB", flush=True)
                ours, ref = best(runs["gemma3"], PICKS), best(runs["llama.cpp"], PICKS)
                step_bytes = weight_bytes + ours["kv_bytes"]
                for name, r in (("gemma3", ours), ("llama.cpp", ref)):
                    share = r["decode_tok_s"] * step_bytes / bandwidth
                    load = f"{r['load_to_first_s']:.2f}" if "load_to_first_s" in r else "–"
                    rows.append(f"| {label} | {threads} | {name} | {r['decode_tok_s']:.1f} | {r['ttft_s']:.2f} | "
                                f"{load} | {r['peak_rss_mb']:.0f} | {share:.0%} |")
                agree = next((i for i, (a, b) in enumerate(zip(ours["tokens"], ref["tokens"])) if a != b),
                             min(len(ours["tokens"]), len(ref["tokens"])))
                notes.append(f"{label}, {threads} thread(s): decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}× "
                             f"llama.cpp, TTFT {ref['ttft_s'] / ours['ttft_s']:.2f}× (higher = ours faster), RSS "
                             f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× llama.cpp's; greedy tokens agree for "
                             f"the first {agree} of {len(ours['tokens'])}")
    print("\n| file | threads | engine | decode tok/s | TTFT s | load→1st s | peak RSS MB | BW share |")
    print("|---|--:|---|--:|--:|--:|--:|--:|")
    print("\n".join(rows) + "\n")
    print("\n".join(notes))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
