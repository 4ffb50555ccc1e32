"""HF-layout checkpoint directories: load (config.json + safetensors, single or sharded) and export.

Safetensors is safe by construction (a JSON header of name -> dtype/shape/offsets, then raw bytes; its
reader rejects oversized headers and offsets that do not tile the buffer), but a valid file can still
hold the wrong model, so every name and shape is checked against config.json before any data is read.
Tensors are memory-mapped by `safe_open` and converted to the requested dtype at most once (not at all
when the file already has it); the model then takes them with `load_state_dict(assign=True)`.

Accepted name prefixes: ``model.`` (text-only Gemma3ForCausalLM: 270M, 1B), ``language_model.model.``
(the multimodal 4B/12B/27B checkpoints on the Hub) and ``model.language_model.`` (the same models saved
by transformers 5). The vision tower and projector are skipped; ``lm_head.weight``, which some exporters
write although Gemma 3 ties it to the embedding, is skipped too, as transformers does for tied models.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from gemma3.config import Gemma3Config
from gemma3.errors import CheckpointError
from gemma3.files import replace_file
from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE
from gemma3.weights.names import check_tensors

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.", "lm_head.")
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / SAFETENSORS).is_file() or (path / SAFETENSORS_INDEX).is_file())


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or the shards its index names."""
    index_path = directory / SAFETENSORS_INDEX
    if not index_path.is_file():
        if not (directory / SAFETENSORS).is_file():
            raise CheckpointError(f"{directory}: no {SAFETENSORS} or {SAFETENSORS_INDEX} in this directory")
        return [directory / SAFETENSORS]
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
    for name in names:
        # Shards must be plain files next to the index: no paths, so an index cannot point elsewhere.
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index_path}: invalid shard file name {name!r}")
        if not (directory / name).is_file():
            raise CheckpointError(f"{index_path}: shard {name} is missing")
    return [directory / name for name in names]


def our_name(name: str) -> str | None:
    """HF tensor name -> our state-dict name; None for tensors a text model does not use."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name  # no known prefix: reported as unexpected by check_tensors under its own name


def load_hf(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
            progress: Callable[[Iterable[str]], Iterable[str]] | None = None
            ) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    """Read an HF checkpoint directory into (config, our state dict in `dtype`)."""
    from safetensors import SafetensorError, safe_open  # here: running a GGUF never needs safetensors

    directory = Path(directory)
    config = Gemma3Config.from_json_file(directory / CONFIG)
    files = shard_files(directory)
    handles, where, shapes, file_names = {}, {}, {}, {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
        handles[path] = handle
        for key in keys:
            name = our_name(key)
            if name is None:
                continue
            if name in where:
                raise CheckpointError(f"{path}: tensor {key} also appears in {where[name].name}")
            tensor_slice = handle.get_slice(key)
            if tensor_slice.get_dtype() not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has dtype {tensor_slice.get_dtype()}; "
                                      f"expected one of {', '.join(FLOAT_DTYPES)}")
            where[name], shapes[name], file_names[name] = path, tuple(tensor_slice.get_shape()), key
    check_tensors(shapes, config, str(directory), display=lambda n: file_names.get(n, f"model.{n}"))

    state: dict[str, torch.Tensor] = {}
    names: Iterable[str] = list(file_names)
    if progress is not None:
        names = progress(names)
    for name in names:
        try:
            state[name] = handles[where[name]].get_tensor(file_names[name]).to(dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{where[name]}: cannot read tensor {file_names[name]} ({_one_line(e)})") from None
    return config, state


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# ---------------------------------------------------------------------- export
def generation_config(config: Gemma3Config) -> dict[str, Any]:
    """generation_config.json: stop on <eos> and <end_of_turn>; Gemma's recommended sampling defaults."""
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": sorted({*config.eos_token_id, 1, 106}),
        "pad_token_id": config.pad_token_id,
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
    }


def tokenizer_config(chat_template: str = GEMMA3_CHAT_TEMPLATE) -> dict[str, Any]:
    """A tokenizer_config.json for the Gemma 3 tokenizer.json, carrying a chat template (the official IT one
    unless the source had its own)."""
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": 32768,
        "chat_template": chat_template,
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8"))


def _remove_shadowing_files(directory: Path) -> None:
    """Files an older checkpoint in `directory` may hold that would win over what save_hf writes: a shard
    index (loaders read it before model.safetensors) with its shards, and a chat_template.jinja (read before
    tokenizer_config.json's template). Only reached when the user allowed overwriting (gemma3.files)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        for name in shards:  # plain names next to the index only, as shard_files reads them
            if isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors") \
                    and name != SAFETENSORS:
                (directory / name).unlink(missing_ok=True)
        index.unlink()
    (directory / "chat_template.jinja").unlink(missing_ok=True)


def save_hf(directory: str | os.PathLike, config: Gemma3Config, state: Mapping[str, torch.Tensor],
            dtype: torch.dtype = torch.bfloat16, tokenizer: Any = None,
            tokenizer_json: str | os.PathLike | None = None, chat_template: str | None = None) -> Path:
    """Write a transformers-loadable Gemma3ForCausalLM directory.

    The tokenizer comes from `tokenizer_json` (copied as is) or else from a gemma3 `Tokenizer` (`save`);
    with neither, no tokenizer files are written. tokenizer_config.json carries `chat_template` (default:
    the official Gemma 3 one). Each file is written to a temporary name and renamed. Whether the directory
    may be written at all is the caller's decision (gemma3.files.check_output_dir); files of an older
    checkpoint there that would shadow the new ones are removed.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, config, "state dict")
    directory.mkdir(parents=True, exist_ok=True)
    _remove_shadowing_files(directory)
    _write_json(directory / CONFIG, config.to_hf_dict(str(dtype).removeprefix("torch.")))
    _write_json(directory / "generation_config.json", generation_config(config))
    tensors = {f"model.{name}": tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
    replace_file(directory / SAFETENSORS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if tokenizer_json is not None:
        replace_file(directory / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_json, tmp))
    elif tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
    if tokenizer_json is not None or tokenizer is not None:
        _write_json(directory / "tokenizer_config.json", tokenizer_config(chat_template or GEMMA3_CHAT_TEMPLATE))
    return directory
