"""What the 5 : 1 hybrid's KV cache saves on the real 270M: the bytes of the cache and the speed of a decode step,
against a full cache that keeps every position for every layer (what a cache that ignores the window does).

    python experiments/kv_cache_ablation.py [--contexts 1024 4096 16384] [--out docs] [--overwrite]

Writes docs/ablation_kv_cache.md and docs/img/ablation_kv_cache.png. The model runs as `gemma3 generate` runs it
(the embedded Q4_K_M blocks, the native kernels, an fp32 cache). For each context length N the two caches are
filled by the same chunked prefill of N tokens of CPython's pydoc topics, then decode greedily, the two engines
alternating, best of --rounds: the tokens and logits must agree (the sliding layers mask the same keys either
way: a full cache only keeps more of them), so only memory and time differ.

The full cache is a KVCache whose every layer has a full-length buffer; its sliding layers get the window mask
over all the positions they hold. Attention then reads N keys on every layer, the hybrid's sliding layers at most
W = 512.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gemma3.config import GLOBAL, SLIDING
from gemma3.kv_cache import KVCache
from gemma3.model import attention_mask


class FullKVCache(KVCache):
    """Every layer keeps every position; sliding layers still see only their window (masked, not dropped)."""

    def __init__(self, config, batch_size: int, max_seq_len: int, dtype=torch.float32, device="cpu"):
        super().__init__(config.replace(layer_types=[GLOBAL] * config.num_hidden_layers), batch_size, max_seq_len,
                         dtype, device)
        self.window = config.sliding_window

    def begin(self, positions: torch.Tensor):
        step = super().begin(positions)
        step.masks[SLIDING] = attention_mask(positions.to(self.global_pos.device), self.global_pos[:, :self.seq_len],
                                             self.window)
        return step


@torch.inference_mode()
def prefill(model, ids: list[int], cache, chunk: int = 512) -> torch.Tensor:
    logits = None
    x = torch.tensor([ids])
    for s in range(0, len(ids), chunk):
        logits = model(x[:, s:s + chunk], cache=cache, logits_to_keep=1).logits[:, -1]
    return logits.float()


@torch.inference_mode()
def decode(model, cache, logits: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor, float]:
    tokens, t0 = [], time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = model(token[:, None], cache=cache, logits_to_keep=1).logits[:, -1].float()
    return tokens, logits, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs", help="directory for the table (and img/ for the plot)")
    parser.add_argument("--overwrite", action="store_true", help="replace the table and plot if they exist")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or min(args.contexts) < 2:
        parser.error("--steps and --rounds must be >= 1 and every context >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from gemma3.errors import Gemma3Error
    from gemma3.files import check_output_file

    out = Path(args.out)
    try:  # before the run: never replace a file without --overwrite
        table = check_output_file(out / "ablation_kv_cache.md", overwrite=args.overwrite, flag="--out")
        plot = check_output_file(out / "img" / "ablation_kv_cache.png", overwrite=args.overwrite, flag="--out")
    except Gemma3Error as e:
        print(f"kv_cache_ablation: error: {e}", file=sys.stderr)
        sys.exit(2)

    from gemma3.eval.perplexity import pydoc_ids
    from gemma3.generation.generator import Generator
    from gemma3.loading import load

    model, tokenizer, config = load(None, quantize=None, progress=False)  # as `gemma3 generate`: Q4_K_M blocks
    model = Generator(model, tokenizer).model  # the inference modules swapped in (fused decode attention)
    if max(args.contexts) + args.steps * args.rounds > config.max_position_embeddings:
        parser.error(f"contexts + decode steps must fit the model's {config.max_position_embeddings} positions")
    text = pydoc_ids(tokenizer, max(args.contexts))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for n in args.contexts:
        length = n + args.steps * args.rounds
        caches = {"hybrid": KVCache(config, 1, length), "full": FullKVCache(config, 1, length)}
        logits, prefill_s = {}, {}
        for name, cache in caches.items():
            t0 = time.perf_counter()
            logits[name] = prefill(model, text[:n], cache)
            prefill_s[name] = time.perf_counter() - t0
        first_gap = float((logits["hybrid"] - logits["full"]).abs().max())
        best = {name: float("inf") for name in caches}
        same = True
        for _ in range(args.rounds):  # alternate the two, keep each one's best round
            tokens = {}
            for name, cache in caches.items():
                tokens[name], logits[name], seconds = decode(model, cache, logits[name], args.steps)
                best[name] = min(best[name], seconds)
            same = same and tokens["hybrid"] == tokens["full"]
        row = {"context": n, "bytes": {k: c.nbytes() for k, c in caches.items()},
               "tok_s": {k: args.steps / best[k] for k in caches}, "prefill_s": prefill_s,
               "same_tokens": same, "logit_gap": first_gap}
        rows.append(row)
        log(f"N = {n:>6}: hybrid {row['bytes']['hybrid'] / 2**20:7.1f} MiB {row['tok_s']['hybrid']:5.1f} tok/s | "
            f"full {row['bytes']['full'] / 2**20:7.1f} MiB {row['tok_s']['full']:5.1f} tok/s | prefill "
            f"{prefill_s['hybrid']:.1f} vs {prefill_s['full']:.1f} s | same tokens {same}, logit gap {first_gap:.1e}")
        del caches

    command = ("python experiments/kv_cache_ablation.py " + " ".join(sys.argv[1:])).strip()
    lines = [
        "# The hybrid KV cache against a full cache, on the real 270M",
        "",
        f"Made by `{command}` ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads). The embedded Q4_K_M "
        f"model as `gemma3 generate` runs it, fp32 cache, batch 1; N tokens of CPython's pydoc topics prefilled in "
        f"chunks of 512, then {args.steps} greedy decode steps per round, the two caches alternating, best of "
        f"{args.rounds} rounds.",
        "",
        "| context N | hybrid cache | full cache | ratio | hybrid decode | full decode | speed-up | prefill hybrid / full "
        "| same tokens | max logit gap |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|",
    ]
    for r in rows:
        b, s, p = r["bytes"], r["tok_s"], r["prefill_s"]
        lines.append(f"| {r['context']:,} | {b['hybrid'] / 2**20:,.1f} MiB | {b['full'] / 2**20:,.1f} MiB | "
                     f"{b['full'] / b['hybrid']:.1f}x | {s['hybrid']:.1f} tok/s | {s['full']:.1f} tok/s | "
                     f"{s['hybrid'] / s['full']:.2f}x | {p['hybrid']:.1f} / {p['full']:.1f} s | "
                     f"{'yes' if r['same_tokens'] else 'no'} | {r['logit_gap']:.1e} |")
    lines += ["", "![hybrid vs full cache](img/ablation_kv_cache.png)", ""]
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines), encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    xs = [r["context"] for r in rows]
    for name, style in (("hybrid", "o-"), ("full", "s--")):
        left.plot(xs, [r["bytes"][name] / 2**20 for r in rows], style, label=f"{name} cache")
        right.plot(xs, [r["tok_s"][name] for r in rows], style, label=f"{name} cache")
    left.set(xscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB, fp32)", title="memory")
    right.set(xscale="log", xlabel="context (tokens)", ylabel="decode (tokens / s)", title="decode speed, batch 1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(table.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
