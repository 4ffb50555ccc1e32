"""Training checkpoints: written atomically, loadable as a model source, enough to resume exactly.

Layout of a run directory::

    OUT/checkpoints/step-00000200/
        config.json           HF Gemma3ForCausalLM config          ┐ a model source for every command
        model.safetensors     weights, HF names ("model." + ours)  │ (LoRA runs write adapter_config.json
        tokenizer.json        the tokenizer the run used           ┘  + adapter_model.safetensors instead)
        trainer_state.pt      optimizer state (keyed by parameter name) and RNG states
        train_state.json      step, data position, model/training config: what --resume checks and restores
    OUT/checkpoints/latest    the name of the newest complete checkpoint

A checkpoint is assembled in a hidden temporary directory, every file fsynced, then renamed into place;
only after that is `latest` replaced (again temp file + rename). A process killed at any moment leaves
either the previous checkpoint as `latest` or the new one complete, never a half-written one; leftover
temporary directories are removed by the next save. The last `keep` checkpoints are kept.

`trainer_state.pt` is the only pickle we read, and only our own, with `torch.load(weights_only=True)`
(docs/security.md); weights and metadata are safetensors and JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from gemma3.config import Gemma3Config
from gemma3.errors import CheckpointError
from gemma3.weights.sources import CHECKPOINTS, LATEST, TRAIN_STATE, checkpoint_dir, is_checkpoint, latest_checkpoint

TRAINER_STATE = "trainer_state.pt"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
HF_PREFIX = "model."


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary directory next to `final`; on success it is synced and renamed to `final`
    (replacing an older `final` of the same name). On an exception the temporary directory is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, then drop the old one
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the tokenizer never changes during a run: one copy on disk for all checkpoints
    except OSError:
        shutil.copyfile(src, dst)


def write_model_files(directory: Path, config: Gemma3Config, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors with HF tensor names, the form `gemma3.loading` reads."""
    from safetensors.torch import save_file

    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    config.save_hf(directory, dtype=dtypes.pop() if len(dtypes) == 1 else "float32")
    tensors = {HF_PREFIX + k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / MODEL_WEIGHTS), metadata={"format": "pt"})


def save_checkpoint(out_dir: Path, step: int, *, config: Gemma3Config, model_state: dict[str, torch.Tensor] | None,
                    write_adapter=None, trainer_state: dict, train_state: dict, tokenizer_file: Path | None,
                    keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, then delete all but the newest `keep`.

    `model_state` is the full model (our names); a LoRA run passes None and `write_adapter(directory)`."""
    final = checkpoint_dir(out_dir, step)
    root = final.parent
    for stale in root.glob(".step-*.tmp-*") if root.is_dir() else ():  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(final) as tmp:
        if model_state is not None:
            write_model_files(tmp, config, model_state)
        else:
            write_adapter(tmp)
        if tokenizer_file is not None:
            _link_or_copy(tokenizer_file, tmp / TOKENIZER)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1) + "\n", encoding="utf-8")
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints, and only what the trainer wrote: a directory of its exact
    name pattern holding its train_state.json (a user's copy such as step-00000500-best is never touched)."""
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if is_checkpoint(p))
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str | bool, out_dir: Path) -> Path:
    """`--resume` (newest checkpoint of the run directory) or `--resume PATH` (a run or checkpoint directory)."""
    if resume is True or resume == "auto":
        path = latest_checkpoint(out_dir)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in {Path(out_dir) / CHECKPOINTS}")
        return path
    path = Path(resume).expanduser()
    if (path / TRAIN_STATE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"--resume {path}: not a training checkpoint or run directory")
    return found


def read_train_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / TRAIN_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {TRAIN_STATE} ({e})") from None


def read_trainer_state(path: Path) -> dict:
    """Optimizer and RNG state we wrote ourselves (weights_only=True: tensors and plain containers only)."""
    try:
        return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read {TRAINER_STATE} ({e})") from None


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Our-named tensors from a checkpoint's model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(Path(path) / MODEL_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read {MODEL_WEIGHTS} ({e})") from None
    return {k.removeprefix(HF_PREFIX): v for k, v in raw.items()}
