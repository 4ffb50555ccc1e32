"""Before and after: the same benchmark from two source trees, interleaved in one run, so a change (a refactor
that should cost nothing, a kernel that should gain) is measured against its parent on the same machine in
the same hour.

    git worktree add /tmp/before HEAD~3        # or any other checkout
    python benchmarks/ab_trees.py --before /tmp/before [--threads 1 2] [--repeats 3] [--serve-rounds 2]

Quantized decode: bench_quant.py's gemma3 worker on the embedded Q4_K_M file (512-token prompt, 128 new
tokens, greedy), each tree's own worker with its own `src/` first on PYTHONPATH, alternating before, after,
before, after ... `--repeats` times per thread count; the best of each figure per tree. Serving:
bench_serve.py --skip-llama (1, 4 and 16 clients) from each tree in turn, `--serve-rounds` times; the best
aggregate tok/s per tree. Both benchmarks and their figures are described in their own docstrings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "benchmarks"))
from bench_generate import TEXT, best, run_worker  # noqa: E402

PICKS = (("ttft_s", min), ("decode_tok_s", max), ("peak_rss_mb", min), ("load_to_first_s", min))
SERVE_LINE = re.compile(r"^\s*(\d+) clients\s+gemma3\s+([\d.]+) tok/s")


def quant_run(tree: Path, gguf: str, prompt_file: str, threads: int, new_tokens: int) -> dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_quant.py"), "--worker", "gemma3", "--file", gguf,
           "--threads", str(threads), "--prompt-file", prompt_file, "--new-tokens", str(new_tokens)]
    return run_worker(cmd, threads, f"{tree} bench_quant", env={"PYTHONPATH": str(tree / "src")})


def serve_run(tree: Path, threads: int) -> dict[int, float]:
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_serve.py"), "--skip-llama", "--rounds", "1",
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(tree / "src")), capture_output=True, text=True, cwd=tree)
    if proc.returncode:
        sys.exit(f"{tree}: bench_serve failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {int(m[1]): float(m[2]) for m in map(SERVE_LINE.match, proc.stdout.splitlines()) if m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its src/ and benchmarks/)")
    parser.add_argument("--after", type=Path, default=HERE, help="default: this checkout")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--serve-rounds", type=int, default=2, help="0 = no serving runs")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "benchmarks" / "bench_quant.py").is_file():
            sys.exit(f"--{name} {tree}: not a gemma3 checkout (no benchmarks/bench_quant.py)")

    from gemma3.text.tokenizer import Tokenizer
    from gemma3.weights.sources import embedded_gguf_path

    gguf = str(embedded_gguf_path())
    print(f"before {trees['before']}  after {trees['after']}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        ids = Tokenizer.from_gguf(gguf).encode(TEXT * (1 + args.prompt_tokens // 100), add_bos=True)
        prompt_file = str(Path(tmp) / "prompt.json")
        Path(prompt_file).write_text(json.dumps(ids[:args.prompt_tokens]))
        for threads in args.threads:
            runs = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, tree in trees.items():
                    r = quant_run(tree, gguf, prompt_file, threads, args.new_tokens)
                    runs[name].append(r)
                    print(f"  Q4_K_M {threads}t {name:6} run {i + 1}: decode {r['decode_tok_s']:6.2f} tok/s  TTFT "
                          f"{r['ttft_s']:.3f} s  RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            b, a = (best(runs[n], PICKS) for n in ("before", "after"))
            same = "same" if a["tokens"] == b["tokens"] else "DIFFERENT"
            print(f"Q4_K_M decode, {threads} thread(s), best of {args.repeats}: before {b['decode_tok_s']:.1f}, "
                  f"after {a['decode_tok_s']:.1f} tok/s ({a['decode_tok_s'] / b['decode_tok_s']:.3f}×); TTFT "
                  f"{b['ttft_s']:.3f} → {a['ttft_s']:.3f} s; load→1st {b['load_to_first_s']:.2f} → "
                  f"{a['load_to_first_s']:.2f} s; peak RSS {b['peak_rss_mb']:.0f} → {a['peak_rss_mb']:.0f} MB; "
                  f"greedy tokens {same}", flush=True)
    if args.serve_rounds:
        serve = {name: {} for name in trees}
        for i in range(args.serve_rounds):
            for name, tree in trees.items():
                got = serve_run(tree, max(args.threads))
                print(f"  serve {name:6} round {i + 1}: " + ", ".join(f"{c} clients {t:.1f}" for c, t in got.items()),
                      flush=True)
                for c, t in got.items():
                    serve[name][c] = max(serve[name].get(c, 0.0), t)
        for c in sorted(serve["after"]):
            b, a = serve["before"].get(c), serve["after"][c]
            ratio = f" ({a / b:.3f}×)" if b else ""
            print(f"serve, {c} clients, best of {args.serve_rounds}: before {b} after {a:.1f} tok/s{ratio}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
