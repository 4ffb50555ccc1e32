"""What a training run is: its settings (`TrainConfig`, the `gemma3 train` flags one to one, validated) and its
learning-rate schedule (`lr_at`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gemma3.errors import Gemma3Error
from gemma3.weights.lora import LoraSettings

MAX_GLOBAL_BATCH = 2**20  # sequences per optimizer step per process; real recipes use hundreds
MAX_HYPERPARAMETER = {"lr": 1e3, "weight_decay": 1e3, "grad_clip": 1e6, "sample_temperature": 1e4, "min_lr_ratio": 1.0}


@dataclass
class TrainConfig:
    """Everything a run needs; `gemma3 train` flags map one to one onto these fields."""

    data: list[str]
    out_dir: str = "runs/gemma3"
    # where the weights come from: `init` (a preset name or a config file) trains from scratch; otherwise
    # `model` is a model source (None = the embedded 270M) to continue from
    model: str | None = None
    init: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields set by flags (from scratch)
    tokenizer: str | None = None  # default: the model source's, or the embedded 270M's for `init`
    lora: LoraSettings | None = None
    # data
    seq_len: int = 512
    val_fraction: float = 0.05
    text_field: str = "text"
    data_cache: str | None = None  # default OUT/data
    # optimisation
    steps: int = 1000
    epochs: float | None = None  # when set, `steps` is computed from it once the data is packed
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # "bf16" (autocast, fp32 master weights), "fp32", or "auto" (bf16 on CUDA)
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    distributed: str | None = None  # under torchrun: "ddp" (default) or "fsdp"
    # evaluation, samples, checkpoints, logging
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int | None = None  # default: with every eval
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    save_every: int = 500
    keep: int = 3
    resume: str | bool | None = None
    overwrite: bool = False  # start a new run in an out_dir that holds an old one (its run files are removed)
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise Gemma3Error(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size * self.grad_accum > MAX_GLOBAL_BATCH:
            raise Gemma3Error(f"a step of {self.batch_size} x {self.grad_accum} sequences per process is more than "
                              f"{MAX_GLOBAL_BATCH:,}; lower --batch-size or --grad-accum")
        for name in ("warmup_steps", "eval_every", "save_every", "keep"):
            if getattr(self, name) < 0:
                raise Gemma3Error(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "grad_clip", "sample_temperature", "min_lr_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise Gemma3Error(f"{name} must be a finite number >= 0, got {value!r}")
            if value > MAX_HYPERPARAMETER[name]:  # beyond these the update or the sampling overflows float32
                raise Gemma3Error(f"{name} must be at most {MAX_HYPERPARAMETER[name]:g}, got {value!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float))
                                        or not math.isfinite(self.epochs) or not 0 < self.epochs <= 1e4):
            raise Gemma3Error(f"epochs must be a number in (0, 10000], got {self.epochs!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise Gemma3Error(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.init is not None and self.model is not None:
            raise Gemma3Error("give either --init (train from scratch) or -m/--model (start from weights), not both")
        if self.model_overrides and self.init is None:
            raise Gemma3Error("architecture flags (--hidden-size, --num-layers ...) need --init: a loaded model's shape is fixed")
        if self.resume and self.overwrite:
            raise Gemma3Error("give --resume (continue the run in --out-dir) or --overwrite (start a new one there), "
                              "not both")
        if not self.data:
            raise Gemma3Error("no training data given (pass files, directories or hf:NAME datasets)")
        from gemma3.files import check_text
        from gemma3.loading import resolve_device

        resolve_device(self.device)
        for prompt in self.sample_prompts:
            check_text(prompt, "--sample-prompt")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise Gemma3Error(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


# --------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig, anchor: tuple[int, float] | None = None) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to lr · min_lr_ratio at the last step.

    `anchor` (step a, rate r) is set when a run is resumed with a changed schedule (--steps, --lr,
    --min-lr-ratio, --warmup-steps) after its warmup: from step a on, the rate follows a cosine from r (the
    old schedule's rate at a, scaled by new lr / old lr) to the new floor at the new last step, so raising
    --steps continues the curve instead of jumping back up it."""
    if anchor is not None and step >= anchor[0]:
        start, rate = anchor
        floor = cfg.lr * cfg.min_lr_ratio
        progress = min(1.0, (step - start) / max(1, cfg.steps - start))
        return floor + (rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULE_FIELDS = ("lr", "warmup_steps", "steps", "min_lr_ratio")


def schedule(cfg: TrainConfig) -> tuple:
    return tuple(getattr(cfg, name) for name in SCHEDULE_FIELDS)
