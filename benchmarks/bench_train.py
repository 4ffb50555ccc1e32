"""Training speed and memory: our Gemma3Model vs transformers' Gemma3ForCausalLM, same weights, same batch,
same loop (AdamW step included), on the embedded 270M.

Each implementation runs in its own fresh process so that peak memory (ru_maxrss, the process's resident
high-water mark, which includes the weights, the optimizer state and the activations) is its own.

    python benchmarks/bench_train.py --batch 2 --seq-len 256 --steps 3 [--precision bf16] [--json]

Reported: forward+backward+optimizer tokens/s (median step after one warm-up step) and peak RSS. Ours
computes the loss in chunks with the 262k-vocab logits recomputed per chunk in backward; transformers
materialises the full (B, T, V) logits and their fp32 copy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(impl: str, batch: int, seq_len: int, steps: int, precision: str, checkpointing: bool) -> dict:
    import torch

    from gemma3.loading import load

    torch.manual_seed(0)
    model, _, config = load(None, dtype=torch.float32, progress=False)
    if impl == "transformers":
        sys.path.insert(0, "tests")
        from reference import hf_model_like

        model = hf_model_like(model, attn="sdpa")
        if checkpointing:
            model.gradient_checkpointing_enable()

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    else:
        from gemma3.train.loss import use_fused_loss

        use_fused_loss(model)  # the loss head the trainer runs (never holds a chunk's logits for backward)
        model.gradient_checkpointing = checkpointing

        def loss_of(ids):
            return model(ids, labels=ids).loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with autocast:
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = statistics.median(times[1:])
    return {"impl": impl, "tokens_per_s": batch * seq_len / step_s, "step_s": step_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "first_loss": losses[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=("gemma3", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq_len, args.steps, args.precision,
                                args.gradient_checkpointing)))
        return
    results = []
    for impl in ("gemma3", "transformers"):
        cmd = [sys.executable, __file__, "--worker", impl, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--precision", args.precision]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results))
        return
    print(f"270M training step (fwd + bwd + AdamW), batch {args.batch} x {args.seq_len} tokens, {args.precision}"
          f"{', activation checkpointing' if args.gradient_checkpointing else ''}, CPU")
    print(f"{'implementation':<16}{'tokens/s':>10}{'step (s)':>10}{'peak RSS (GiB)':>16}{'first loss':>12}")
    for r in results:
        print(f"{r['impl']:<16}{r['tokens_per_s']:>10.1f}{r['step_s']:>10.2f}{r['peak_rss_gib']:>16.2f}{r['first_loss']:>12.4f}")


if __name__ == "__main__":
    main()
