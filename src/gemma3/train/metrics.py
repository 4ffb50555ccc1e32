"""What a run reports: metrics.jsonl (always), TensorBoard (optional), a progress bar, a loss-curve PNG.

Only rank 0 creates a `Metrics`; other ranks get `None` and log nothing.
metrics.jsonl holds one JSON object per line: ``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}``
for training steps and ``{"step", "eval_loss", "eval_ppl"}`` for evaluations, plus one ``{"event": ...}``
line per start/resume. On resume, lines for steps after the checkpoint (written by the run that died) are
dropped, so the file and the curve read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
LOSS_PNG = "loss.png"


class Metrics:
    def __init__(self, out_dir: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ModuleNotFoundError:
                from gemma3.errors import Gemma3Error

                raise Gemma3Error("--tensorboard needs the `tensorboard` package (pip install 'gemma3[train]')") from None
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def sample(self, step: int, prompt: str, text: str) -> None:
        with open(self.out_dir / SAMPLES, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
        if self.tb is not None:
            self.tb.add_text("sample", f"**{prompt}**{text}", step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps; tqdm supplies the ETA, the loop sets loss and tokens/s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def plot_loss(metrics_path: Path, png_path: Path, baseline: float | None = None, title: str | None = None) -> Path | None:
    """Train loss (raw and smoothed) and eval loss against step, with the unigram baseline if known.
    Returns None (and says so) when matplotlib is not installed: the run itself must not fail over a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("loss curve not drawn: matplotlib is not installed (pip install 'gemma3[train]')", file=sys.stderr)
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        k = max(1, len(losses) // 30)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"train (mean of {k})")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, markersize=3.5, label="held-out")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "gemma3 train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
