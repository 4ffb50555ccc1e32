"""The run directory: what a new run may write over, and what a resumed run reads back from its checkpoint.

A new run needs an empty (or new) ``--out-dir``; ``--overwrite`` replaces an old run's own files and nothing
else (gemma3.files has the rules every command follows). ``--resume`` takes the whole TrainConfig from the
checkpoint's train_state.json, with local paths stored absolute so it works from any directory, and lets
the flags given now change only what does not change the run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from gemma3.errors import CheckpointError
from gemma3.train import checkpoint as ckpt
from gemma3.train.config import TrainConfig
from gemma3.weights.lora import LoraSettings
from gemma3.train.metrics import LOSS_PNG, METRICS

# ------------------------------------------------------------------------------------ resuming a run
# TrainConfig field -> the flag that sets it: on --resume these must match the checkpoint when they are given
# (left out, the checkpoint's own values are used). Batch size and gradient accumulation may change as long
# as the global batch stays the same (checked against the checkpoint later).
FIXED_ON_RESUME = {
    "data": "DATA", "model": "-m/--model", "init": "--init", "model_overrides": "the architecture flags",
    "tokenizer": "--tokenizer", "lora": "--lora (and --lora-r/--lora-alpha/--lora-dropout/--lora-targets)",
    "seq_len": "--seq-len", "val_fraction": "--val-fraction", "text_field": "--text-field", "seed": "--seed",
}
_PATH_FIELDS = ("model", "init", "tokenizer", "data_cache")


def absolute(spec: str | None) -> str | None:
    """A local path made absolute (so a resumed run finds it from any directory); presets, hf: datasets and
    Hub ids stay as they are."""
    if spec is None or spec.startswith("hf:") or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def stored_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's TrainConfig as JSON for train_state.json, with local paths made absolute."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    data["data"] = [absolute(d) for d in cfg.data]
    for name in _PATH_FIELDS:
        data[name] = absolute(getattr(cfg, name))
    data["resume"] = None
    data["overwrite"] = False
    return data


def resumed_config(out_dir: str | None, resume: str | bool, given: dict[str, Any]) -> TrainConfig:
    """`--resume` alone: the TrainConfig the checkpoint was trained with, then the flags given now. A given
    flag that would change what the run is (FIXED_ON_RESUME) and differs from the checkpoint is an error
    naming it; the others (steps, learning rate, intervals ...) take the new value. Without `out_dir`, the
    run goes on in the run directory of `resume` (or the default runs/gemma3 for a bare --resume)."""
    path = ckpt.resolve_resume(resume, Path(out_dir or TrainConfig.out_dir))
    if out_dir is None:
        out_dir = str(path.parent.parent) if path.parent.name == ckpt.CHECKPOINTS else TrainConfig.out_dir
    stored = ckpt.read_train_state(path).get("train_config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: {ckpt.TRAIN_STATE} has no train_config to resume from")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in stored.items() if k in names}
    if base.get("lora") is not None:
        try:
            base["lora"] = LoraSettings(**{**base["lora"], "targets": tuple(base["lora"]["targets"])})
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable LoRA settings in {ckpt.TRAIN_STATE} ({e})") from None
    for name, value in given.items():
        if name not in FIXED_ON_RESUME:
            continue
        mine, theirs = value, base.get(name)
        if name == "data":
            mine, theirs = [absolute(d) for d in value], [absolute(d) for d in theirs or []]
        elif name in _PATH_FIELDS:
            mine, theirs = absolute(value), absolute(theirs)
        if mine != theirs:
            raise CheckpointError(f"cannot resume {path} with {FIXED_ON_RESUME[name]} {value!r}: the run was trained "
                                  f"with {theirs!r} (leave the flag out to use the checkpoint's)")
    merged = {**base, **given, "out_dir": out_dir, "resume": resume}
    if "steps" in given:  # a new --steps replaces the run's --epochs
        merged["epochs"] = None
    return TrainConfig(**merged)


# ----------------------------------------------------------------------------------------- run directory
RUN_FILES = (METRICS, "samples.jsonl", LOSS_PNG, ckpt.TOKENIZER)


def prepare_run_dir(cfg: TrainConfig) -> None:
    """Refuse an --out-dir that would mix two runs or destroy files (gemma3.files): without --resume it must
    be new or empty, or the user says --overwrite, which removes the old run's own files (its checkpoints,
    metrics, samples, loss curve, tokenizer and TensorBoard events; the token cache in data/ is kept and
    reused) and nothing else. Never the current directory, nor one that contains the data or the model."""
    from gemma3.files import check_not_protected, check_output_dir

    out = Path(cfg.out_dir)
    sources = [d for d in cfg.data if not d.startswith("hf:")] + [cfg.model, cfg.tokenizer]
    if cfg.init is not None and Path(cfg.init).expanduser().exists():
        sources.append(cfg.init)
    if cfg.resume:
        check_not_protected(out, sources, "--out-dir")
        return
    # data/ alone is the token cache of a run that stopped before its first step (bad data, say): reused
    check_output_dir(out, overwrite=cfg.overwrite, sources=sources, flag="--out-dir", allowed_existing=("data",))
    if cfg.overwrite and out.is_dir():
        root = out / ckpt.CHECKPOINTS
        for step_dir in root.glob("step-*") if root.is_dir() else ():
            if (step_dir / ckpt.TRAIN_STATE).is_file():
                shutil.rmtree(step_dir)
        (root / ckpt.LATEST).unlink(missing_ok=True)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        tb = out / "tensorboard"
        for events in tb.glob("events.out.tfevents.*") if tb.is_dir() else ():
            events.unlink()
