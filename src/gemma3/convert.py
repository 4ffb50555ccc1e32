"""`gemma3 convert` (and `gemma3 merge-lora`, which is a conversion with an adapter folded in): any model
source → an HF-layout directory or a GGUF file.

What is written carries what a runtime needs besides the weights: the tokenizer, and the chat template
(the source's own, or the official Gemma 3 one) both in tokenizer_config.json and as GGUF
``tokenizer.chat_template``, so llama.cpp's chat formats turns as Gemma 3 was trained to see them. The
output is checked before anything is read or written (gemma3.files): an existing target is replaced only
with ``overwrite``, and never the source itself, a directory containing it, or the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from gemma3.config import PRESETS, Gemma3Config
from gemma3.errors import CheckpointError
from gemma3.files import check_output_dir, check_output_file
from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE


def model_name(config: Gemma3Config, metadata: dict | None = None) -> str:
    """general.name for a GGUF: the source GGUF's own, else "Gemma 3 270M" ... for a preset's shape, else
    "Gemma 3 (custom)" — never a local path."""
    if metadata is not None and isinstance(metadata.get("general.name"), str) and metadata["general.name"]:
        return metadata["general.name"]
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim")
    for name, preset in PRESETS.items():
        if all(getattr(config, f) == getattr(preset, f) for f in shape):
            return f"Gemma 3 {name.upper()}"
    return "Gemma 3 (custom)"


def convert(source: str | Path | None, out: str | Path, to: str = "hf", dtype: str = "bfloat16",
            gguf_type: str = "BF16", progress: bool = True, overwrite: bool = False,
            lora: str | Path | None = None, extra_sources: Iterable[str | os.PathLike] = (),
            out_flag: str = "OUT") -> Path:
    """Write `source` (with the adapter `lora` folded in, if given) as an HF directory (`to="hf"`) or a
    GGUF file (`to="gguf"`); returns what was written. For GGUF, `out` is the file if it ends in .gguf,
    else a directory that receives ``model.gguf``."""
    from gemma3.loading import chat_template_of, load_tokenizer, load_weights, tensor_progress
    from gemma3.weights.sources import resolve_model
    from gemma3.text.gguf_metadata import tokenizer_metadata_from_json
    from gemma3.weights.gguf.writer import write_gguf
    from gemma3.weights.hf import save_hf

    if to not in ("hf", "gguf"):
        raise CheckpointError(f"unknown output format {to!r} (hf or gguf)")
    resolved, adapter = resolve_model(source, lora)  # checks the source and the output before any reading
    protected = [resolved.path, adapter, *extra_sources]
    out = Path(out).expanduser()
    if to == "hf":
        check_output_dir(out, overwrite=overwrite, sources=protected, flag=out_flag)
    else:
        if out.suffix != ".gguf":
            if out.exists() and not out.is_dir():
                raise CheckpointError(f"{out_flag} {out}: exists and is not a directory (name a .gguf file or a directory)")
            out = out / "model.gguf"
        check_output_file(out, overwrite=overwrite, sources=protected, flag=out_flag)

    config, state, resolved, metadata = load_weights(source, torch.float32, progress, lora)
    template = chat_template_of(resolved, metadata)
    template_text = template.text if template is not None else GEMMA3_CHAT_TEMPLATE
    if to == "hf":
        tokenizer_json = resolved.path / "tokenizer.json" if resolved.kind == "hf" else None
        tokenizer = None
        if tokenizer_json is None or not tokenizer_json.is_file():
            tokenizer_json, tokenizer = None, load_tokenizer(resolved, metadata)
        return save_hf(out, config, state, getattr(torch, dtype), tokenizer=tokenizer, tokenizer_json=tokenizer_json,
                       chat_template=template_text)

    if metadata is not None:
        tokenizer_keys = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    elif (resolved.path / "tokenizer.json").is_file():
        tokenizer_keys = tokenizer_metadata_from_json(resolved.path / "tokenizer.json")
    else:
        raise CheckpointError(f"{resolved.path}: no tokenizer.json, which a GGUF file must embed")
    tokenizer_keys["tokenizer.chat_template"] = template_text
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(out, config, state, tokenizer_keys, gguf_type, name=model_name(config, metadata),
                      progress=tensor_progress(progress, f"writing {out.name}"))


def merge_lora(base: str | None, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               progress: bool = True, overwrite: bool = False) -> Path:
    """`gemma3 merge-lora`: base model source + PEFT adapter → a standalone checkpoint directory (config.json,
    model.safetensors, tokenizer files) that loads as a model source everywhere, and in transformers.
    An existing non-empty `out_dir` is refused unless `overwrite` (gemma3.files)."""
    return convert(base, out_dir, to="hf", dtype=str(dtype).removeprefix("torch."), progress=progress,
                   overwrite=overwrite, lora=adapter_dir, extra_sources=(adapter_dir,), out_flag="-o")
