"""One way to turn "a model the user named" into a ready model, used by every command and by `gemma3.load`:
resolve the source (gemma3.weights.sources), read its weights (gemma3.weights: GGUF or safetensors), fold in a
LoRA adapter, quantize if asked (gemma3.accel.quantize), build the model, and find its tokenizer and chat
template.

Any source can also take a LoRA adapter at load time (`lora=`, the CLI's ``--lora ADAPTER``): it is
folded into the weights in memory, W + (alpha / r)·B·A in fp32, exactly what `gemma3 merge-lora` writes,
and the files are left as they are.

The model is built on the meta device (no allocation) and takes the loaded tensors as they are
(`load_state_dict(assign=True)`), so weights are materialised once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from gemma3.config import Gemma3Config
from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.weights.sources import ResolvedSource, resolve_model


def tensor_progress(enabled: bool, description: str):
    """Wraps an iterable of tensor names in a tqdm bar on stderr, shown only if the work takes over 1 s."""
    def wrap(names: Iterable[str]) -> Iterable[str]:
        if not enabled:
            return names
        from tqdm.auto import tqdm

        names = list(names)
        return tqdm(names, desc=description, unit="tensor", delay=1, file=sys.stderr, leave=False)
    return wrap


QUANTIZE_CHOICES = ("none", "int8", "int4")


def check_quantize(quantize: str | None, device: str | torch.device = "cpu") -> None:
    from gemma3.accel.quantize import SCHEMES

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise Gemma3Error(f"--quantize {quantize!r}: choose none, {', '.join(SCHEMES)} (default: a quantized "
                          "GGUF's own blocks)")
    if quantize in SCHEMES and torch.device(device).type != "cpu":
        raise Gemma3Error(f"--quantize {quantize} runs on the CPU only (its kernels are x86 CPU code); use "
                          f"--device cpu, or --quantize none on {device}")


def load_weights(source: str | Path | None = None, dtype: torch.dtype = torch.float32, progress: bool = True,
                 lora: str | Path | None = None, quantize: str | None = "none", device: str | torch.device = "cpu"
                 ) -> tuple[Gemma3Config, dict[str, torch.Tensor], ResolvedSource, dict | None]:
    """(config, state dict, resolved source of the base weights, GGUF metadata or None) without building a
    model. With an adapter (`lora`, or a source that is one) the weights are read in fp32, the adapter is
    folded in, and only then are they cast to `dtype`, as `gemma3 merge-lora` does.

    `quantize`: "none" = float weights in `dtype` (a quantized GGUF dequantised: the exact values of its
    weights); "int8" / "int4" = every projection and the embedding quantized at load (gemma3.accel.quantize.SCHEMES),
    from fp32; None = a quantized GGUF's matrices kept in their own blocks on the CPU (float otherwise). Those
    entries of the state dict are then gemma3.accel.quantize.QuantizedTensors.

    `gemma3 convert` and `gemma3 info` use this directly; `load` adds the model and the tokenizer.
    """
    return _load_weights(source, dtype, progress, lora, quantize, device)[:4]


def _load_weights(source, dtype, progress, lora, quantize, device):
    """load_weights, plus the tokenizer when it was built on the way (int4 calibrates with it), else None."""
    from gemma3.weights.gguf.reader import BlockTensor
    from gemma3.weights.gguf.translate import load_gguf
    from gemma3.weights.hf import load_hf

    check_quantize(quantize, device)
    resolved, adapter = resolve_model(source, lora)
    bar = tensor_progress(progress, f"loading {resolved.path.name}")
    requantize = quantize not in (None, "none")
    read_dtype = torch.float32 if adapter is not None or requantize else dtype
    keep_blocks = quantize is None and adapter is None and torch.device(device).type == "cpu"
    metadata = None
    if resolved.kind == "gguf":
        from gemma3.accel.quantize import FORMATS, QuantizedTensor

        notice = (lambda line: print(line, file=sys.stderr)) if progress else None
        # the matrices in a block format with a native kernel stay in their file's blocks (no copy)
        config, state, gguf = load_gguf(resolved.path, read_dtype, bar, keep_blocks=FORMATS if keep_blocks else (),
                                        notice=notice)
        state = {name: QuantizedTensor(t.type_name, t.data, t.shape) if isinstance(t, BlockTensor) else t
                 for name, t in state.items()}
        metadata = gguf.metadata
    else:
        config, state = load_hf(resolved.path, read_dtype, bar)
    if adapter is not None:
        from gemma3.weights.lora import merge_adapter

        merge_adapter(state, adapter)
        resolved = dataclasses.replace(resolved, description=f"{resolved.description} + LoRA {adapter}")
    tokenizer = None
    if requantize:
        from gemma3.accel.quantize import SCHEMES, quantize_state

        importance = None
        if SCHEMES[quantize].calibrated:
            tokenizer = load_tokenizer(resolved, metadata)
            importance = _importance(config, state, tokenizer, quantize, progress)
        state = quantize_state(state, quantize, importance)
    if read_dtype != dtype:
        state = {name: t.to(dtype) if isinstance(t, torch.Tensor) else t for name, t in state.items()}
    return config, state, resolved, metadata, tokenizer


def _importance(config: Gemma3Config, state: dict[str, torch.Tensor], tokenizer, quantize: str, progress: bool):
    """The importance matrix for `--quantize` (gemma3/imatrix.py): one fp32 forward of the calibration text
    through the float weights (2-5 s for the 270M on 2 cores). None, with a notice, when the source has no tokenizer."""
    from gemma3.accel import imatrix

    if tokenizer is None:
        print(f"note: --quantize {quantize}: the checkpoint has no tokenizer to calibrate with, so its 4-bit fits "
              "are not weighted by an importance matrix (on the 270M, about twice the perplexity loss)", file=sys.stderr)
        return None
    ids = imatrix.calibration_ids(tokenizer, config.max_position_embeddings)
    if progress:
        print(f"calibrating --quantize {quantize} on {len(ids)} tokens", file=sys.stderr)
    return imatrix.collect(build_model(config, dict(state)), ids)


def load_tokenizer(resolved: ResolvedSource, gguf_metadata: dict | None = None):
    """The tokenizer that belongs to `resolved` (None for a checkpoint directory that has none)."""
    from gemma3.text.tokenizer import Tokenizer

    tokenizer = None
    if resolved.kind == "gguf":
        if gguf_metadata is not None:
            tokenizer = Tokenizer.from_gguf_metadata(gguf_metadata, source=str(resolved.path))
        else:
            tokenizer = Tokenizer.from_gguf(resolved.path)
    elif (resolved.path / "tokenizer.json").is_file() or (resolved.path / "tokenizer.model").is_file():
        tokenizer = Tokenizer.from_dir(resolved.path)
    _return_freed_memory()
    return tokenizer


def _return_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim). Parsing a 262k-piece tokenizer
    (its 33 MB of JSON, 514k merges) leaves ~280 MB freed but still resident in the process: measured on the
    embedded model, RSS while generating 891 -> 615 MB. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def chat_template_of(resolved: ResolvedSource, gguf_metadata: dict | None = None):
    """The checkpoint's own chat template as a `gemma3.text.chat.ChatTemplate` naming its file, if it ships one
    (GGUF metadata, chat_template.jinja, or tokenizer_config.json); None means the built-in Gemma 3 format."""
    import json

    from gemma3.text.chat import ChatTemplate

    if resolved.kind == "gguf":
        template = (gguf_metadata or {}).get("tokenizer.chat_template")
        return ChatTemplate(template, f"{resolved.path} (tokenizer.chat_template)") \
            if isinstance(template, str) and template else None
    jinja = resolved.path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja))
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: cannot read the chat template ({e})") from None
    config = resolved.path / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{config}: not a valid JSON object") from None
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # transformers also accepts [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return ChatTemplate(template, str(config)) if isinstance(template, str) and template else None
    return None


def resolve_device(spec: str) -> torch.device:
    """A --device value: cpu, cuda, cuda:N or auto (CUDA when there is one); an unusable device is an error,
    never a silent fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise Gemma3Error(f"--device {spec!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Gemma3Error(f"--device {spec}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Gemma3Error(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise Gemma3Error(f"--device {spec}: only cpu and cuda are supported")
    return device


def build_model(config: Gemma3Config, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
    """A Gemma3Model in eval mode holding exactly `state` (already checked against `config`). Quantized
    entries (gemma3.accel.quantize.QuantizedTensor) swap their modules for quantized ones; the rest is loaded."""
    from gemma3.model import Gemma3Model
    from gemma3.accel.quantize import quantize_model, split_state

    with torch.device("meta"):
        model = Gemma3Model(config)
    state, quantized = split_state(state)
    if quantized:
        if torch.device(device).type != "cpu":
            raise Gemma3Error(f"quantized weights run on the CPU only, not on {device}")
        dtype = next(iter(state.values())).dtype if state else torch.float32
        quantize_model(model, quantized, dtype)
    if torch.device(device).type != "cpu":
        state = {name: tensor.to(device) for name, tensor in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def load(source: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         progress: bool = True, lora: str | Path | None = None, quantize: str | None = "none"):
    """Load a model and its tokenizer: ``model, tokenizer, config = gemma3.load("google/gemma-3-270m")``.

    `source`: None (the embedded 270M), a .gguf file, a checkpoint or run directory, a LoRA adapter or a
    Hub id; `lora`: an adapter folded into the weights in memory; `quantize`: "none" (float weights, the
    default here, so a loaded model can be trained), "int8" / "int4" (quantized at load, CPU inference), or
    None (a quantized GGUF kept in its own blocks: what the CLI does by default). The tokenizer is None only
    for a checkpoint directory without tokenizer files.
    """
    config, state, resolved, metadata, tokenizer = _load_weights(source, dtype, progress, lora, quantize, device)
    model = build_model(config, state, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolved, metadata)
    return model, tokenizer, config
