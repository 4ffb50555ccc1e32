"""Fine-tuning speed, memory and loss: `gemma3 train`'s step against transformers + PEFT, on the same tool-calling
chat data, the same weights (the embedded 270M dequantised to fp32) and the same token batches.

    python benchmarks/bench_finetune.py [--data TRAIN.jsonl] [--modes lora full] [--seq-len 1024] [--batch 2]
                                        [--steps 4] [--rounds 3] [--loss-steps 100] [--json]

What runs:
* the data: a tool-calling JSONL in the format `gemma3 train` takes (default: 300 conversations from
  examples/tool_calling/generate_data.py), tokenized and packed once by our data pipeline; the global batch of
  every step is saved, and both sides train on exactly those batches;
* ours: `gemma3.train.Trainer` as `gemma3 train` builds it (LoRA r 16 on every linear layer, alpha 32; or full
  fine-tuning), its `train_step` timed;
* theirs: `Gemma3ForCausalLM` (SDPA attention) loaded from the same weights converted to a transformers
  checkpoint, PEFT's `get_peft_model` with the same LoRA settings and the same initial A matrices, the same AdamW
  (betas, weight decay on matrices, gradient clipping, learning-rate schedule), packed rows given as
  `position_ids` (transformers then keeps attention inside each conversation, as ours does) and labels -100
  outside the model's tokens: the same loss.

Each (side, mode) runs in a fresh process, interleaved, `--rounds` times; reported: tokens/s of the median step
after one warm-up step (every token of the batch counted, padding included), best round; peak RSS (ru_maxrss:
weights, optimizer state, activations); the fp32 loss of the first batch before any update (both sides, the
same forward in fp32); and with `--loss-steps N`, the training loss after N steps on the same batches (one
extra run per side). Installs its peers (transformers, peft) if they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA = 16, 32.0
SEED = 0


def train_config(work: Path, mode: str, args, steps: int, tag: str, precision: str | None = None):
    from gemma3.train import LoraSettings, TrainConfig

    lora = LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, targets=LORA_TARGETS) if mode == "lora" else None
    return TrainConfig(data=[str(work / "data.jsonl")], out_dir=str(work / f"run-{tag}"), lora=lora,
                       seq_len=args.seq_len, batch_size=args.batch, steps=steps, lr=args.lr, warmup_steps=2,
                       val_fraction=0.0, eval_every=0, sample_every=0, save_every=0, progress=False,
                       data_cache=str(work / "cache"), seed=SEED, overwrite=True,
                       precision=precision or args.precision)


# ----------------------------------------------------------------------------------------------- preparation
def prepare(work: Path, args) -> None:
    """The data, the batches every step will see, the transformers checkpoint and the initial LoRA A matrices."""
    import torch
    from safetensors.torch import save_file

    from gemma3.convert import convert
    from gemma3.train import Trainer
    from gemma3.train.lora import lora_modules

    data = work / "data.jsonl"
    source = Path(args.data) if args.data else work / "generated/train.jsonl"
    if not args.data:
        subprocess.run([sys.executable, str(ROOT / "examples/tool_calling/generate_data.py"), "--train", "300",
                        "--test", "1", "--seed", "0", "--out", str(work / "generated")], check=True,
                       stdout=subprocess.DEVNULL)
    _fitting(source, data, args.seq_len)
    steps = max(args.steps + 1, args.loss_steps)
    trainer = Trainer(train_config(work, "lora", args, steps, "prepare", precision="fp32"))
    batches = [trainer._micro_batches(s) for s in range(steps)]
    b = batches[0][0]
    with torch.no_grad():  # our fp32 loss of the first batch (the workers may train in bf16)
        first = float(trainer.model(b.input_ids, positions=b.positions, labels=b.labels).loss)
    torch.save([[tuple(t for t in b) for b in step] for step in batches], work / "batches.pt")
    save_file({f"{name}.lora_A": m.lora_A.weight.detach().contiguous() for name, m in lora_modules(trainer.model).items()},
              str(work / "lora_init.safetensors"))
    tokens = sum(int(b.input_ids.numel()) for step in batches for b in step)
    targets = sum(int((b.labels != -100).sum()) for step in batches for b in step)
    trainer.close()
    del trainer
    convert(None, work / "hf", to="hf", dtype="float32")
    (work / "prepared.json").write_text(json.dumps({"steps": steps, "tokens": tokens, "targets": targets,
                                                    "first_loss_fp32": first}))


def _fitting(source: Path, out: Path, seq_len: int) -> None:
    """Copy the records of `source` that fit in one sequence (the trainer refuses a dataset with a longer one)."""
    from gemma3.text.tokenizer import Tokenizer
    from gemma3.train.data import read_documents, tokenize_document
    from gemma3.weights.sources import embedded_gguf_path

    tokenizer = Tokenizer.from_gguf(embedded_gguf_path())
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept, dropped = [], 0
    for line, doc in zip(lines, read_documents([str(source)])):  # one document per non-blank line
        if len(tokenize_document(doc, tokenizer)[0]) <= seq_len:
            kept.append(line)
        else:
            dropped += 1
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    if dropped:
        print(f"{dropped} of {dropped + len(kept)} records are longer than --seq-len {seq_len}: left out",
              file=sys.stderr)


# --------------------------------------------------------------------------------------------------- workers
def worker_ours(work: Path, mode: str, args, steps: int) -> dict:
    import torch

    from gemma3.train import Trainer

    batches = torch.load(work / "batches.pt")
    trainer = Trainer(train_config(work, mode, args, steps, f"ours-{mode}"))
    for s in (0, steps - 1):  # the same batches as the other side
        for mine, saved in zip(trainer._micro_batches(s), batches[s]):
            assert all(torch.equal(a, b) for a, b in zip(mine, saved)), "our batches differ from the saved ones"
    first = json.loads((work / "prepared.json").read_text())["first_loss_fp32"]
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = trainer.train_step()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    trainer.close()
    return _result("gemma3", mode, args, times, losses, first)


def worker_hf(work: Path, mode: str, args, steps: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import Gemma3ForCausalLM

    from gemma3.train.config import lr_at

    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS), bias="none"))
        init = load_file(str(work / "lora_init.safetensors"))
        named = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in init.items():  # ours "layers.0.self_attn.q_proj.lora_A" → PEFT's name
                named[f"base_model.model.model.{key}.default.weight"].copy_(value)
    model.train()
    cfg = train_config(work, mode, args, steps, "hf")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    batches = torch.load(work / "batches.pt")

    def loss_of(b):
        ids, labels, positions = b
        return model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss

    with torch.no_grad():
        first = float(loss_of(batches[0][0]))
    times, losses = [], []
    for step in range(steps):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        micro = batches[step]
        counts = [int((b[1][:, 1:] != -100).sum()) for b in micro]
        total = max(1, sum(counts))
        step_loss = 0.0
        for b, n in zip(micro, counts):
            loss = loss_of(b)
            (loss * n / total).backward()
            step_loss += float(loss) * n / total
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(step_loss)
    return _result("transformers+peft" if mode == "lora" else "transformers", mode, args, times, losses, first)


def _result(impl: str, mode: str, args, times: list[float], losses: list[float], first: float) -> dict:
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"impl": impl, "mode": mode, "tokens_per_s": args.batch * args.seq_len / step_s, "step_s": step_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "first_loss_fp32": first,
            "losses": losses}


# ------------------------------------------------------------------------------------------------------ main
def _ensure_peers() -> None:
    missing = [name for name in ("transformers", "peft") if _missing(name)]
    if missing:
        print(f"installing {' '.join(missing)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def _run_worker(work: Path, side: str, mode: str, args, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--work", str(work), "--mode", mode, "--worker-steps",
           str(steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--lr", str(args.lr),
           "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{side} {mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", help="tool-calling JSONL (default: 300 generated conversations)")
    p.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=0, help="also compare the loss after this many steps")
    p.add_argument("--loss-modes", nargs="+", choices=("lora", "full"), help="modes for --loss-steps (default: --modes)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="ours (theirs: fp32)")
    p.add_argument("--work", help="a new or empty working directory, kept (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--worker-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = worker_ours if args.worker == "ours" else worker_hf
        print(json.dumps(run(Path(args.work), args.mode, args, args.worker_steps)))
        return
    if args.work and Path(args.work).is_dir() and any(Path(args.work).iterdir()):
        raise SystemExit(f"--work {args.work}: not empty; give a new or empty directory (the benchmark writes its data, "
                         "runs and a converted checkpoint there)")
    _ensure_peers()
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("preparing data, batches and the transformers checkpoint ...", file=sys.stderr)
        prepare(work, args)
        info = json.loads((work / "prepared.json").read_text())
        print(f"data: {info['steps']} steps, {info['targets'] / info['tokens']:.1%} of the batch tokens are targets",
              file=sys.stderr)
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for mode in args.modes:
                for side in ("ours", "hf"):
                    res = _run_worker(work, side, mode, args, args.steps + 1)
                    results.setdefault((side, mode), []).append(res)
                    print(f"round {r + 1} {res['impl']:<18} {mode:<4} {res['tokens_per_s']:7.1f} tok/s  "
                          f"peak RSS {res['peak_rss_gib']:.2f} GiB  first loss {res['first_loss_fp32']:.5f}",
                          file=sys.stderr)
        long = {}
        if args.loss_steps:
            for mode in args.loss_modes or args.modes:
                for side in ("ours", "hf"):
                    print(f"{side} {mode}: {args.loss_steps} steps for the loss comparison ...", file=sys.stderr)
                    long[(side, mode)] = _run_worker(work, side, mode, args, args.loss_steps)
    summary = []
    for mode in args.modes:
        ours, hf = (max(results[(s, mode)], key=lambda x: x["tokens_per_s"]) for s in ("ours", "hf"))
        row = {"mode": mode, "ours_tok_s": round(ours["tokens_per_s"], 1), "theirs_tok_s": round(hf["tokens_per_s"], 1),
               "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
               "ours_rss_gib": round(min(x["peak_rss_gib"] for x in results[("ours", mode)]), 2),
               "theirs_rss_gib": round(min(x["peak_rss_gib"] for x in results[("hf", mode)]), 2),
               "first_loss_ours": ours["first_loss_fp32"], "first_loss_theirs": hf["first_loss_fp32"]}
        row["rss_ratio"] = round(row["ours_rss_gib"] / row["theirs_rss_gib"], 2)
        if (("ours", mode)) in long:
            lo, lh = long[("ours", mode)]["losses"], long[("hf", mode)]["losses"]
            row.update(loss_steps=args.loss_steps, last_loss_ours=round(lo[-1], 4), last_loss_theirs=round(lh[-1], 4),
                       last_loss_rel_diff=round(abs(lo[-1] - lh[-1]) / abs(lh[-1]), 4),
                       mean_last10_ours=round(statistics.mean(lo[-10:]), 4),
                       mean_last10_theirs=round(statistics.mean(lh[-10:]), 4))
        summary.append(row)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"\nseq_len {args.seq_len} x batch {args.batch}, best of {args.rounds} rounds, precision (ours) {args.precision}")
    print("| mode | gemma3 tok/s | transformers tok/s | speed-up | peak RSS gemma3 / theirs (GiB) | fp32 loss at step 0 |")
    print("|---|--:|--:|--:|--:|--:|")
    for row in summary:
        print(f"| {row['mode']} | {row['ours_tok_s']} | {row['theirs_tok_s']} | {row['speedup']}x | "
              f"{row['ours_rss_gib']} / {row['theirs_rss_gib']} = {row['rss_ratio']} | "
              f"{row['first_loss_ours']:.5f} / {row['first_loss_theirs']:.5f} |")
        if "loss_steps" in row:
            print(f"  loss after {row['loss_steps']} steps: {row['last_loss_ours']} / {row['last_loss_theirs']} "
                  f"(relative difference {row['last_loss_rel_diff']:.2%}); mean of the last 10 "
                  f"{row['mean_last10_ours']} / {row['mean_last10_theirs']}")


if __name__ == "__main__":
    main()
