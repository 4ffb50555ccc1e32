"""GGUF metadata and tensors -> our config and state dict: what llama.cpp's gemma3 GGUF records, what it leaves
out and hard-codes (spec section 8), and its tensor names and norm convention (gemma3.weights.names)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch

from gemma3.config import MAX_LAYERS, MAX_SIZE, Gemma3Config, hybrid_layer_types
from gemma3.errors import CheckpointError, ConfigError
from gemma3.weights.gguf.reader import BlockTensor, GGUFFile
from gemma3.weights.names import GGUF_NAMES, OUR_TO_GGUF, QUANTIZABLE, check_tensors, is_norm, rename

ARCH = "gemma3"
END_OF_TURN = "<end_of_turn>"
FLOAT_TYPES = ("F32", "F16", "BF16")
# Not in a GGUF: llama.cpp hard-codes the sliding layers' RoPE base (and the 5 local : 1 global layer pattern,
# hybrid_layer_types) for gemma3.
LOCAL_ROPE_BASE = 10_000.0


def query_pre_attn_scalar(hidden_size: int, num_attention_heads: int, num_hidden_layers: int, head_dim: int) -> int:
    """What llama.cpp scales queries by, which a GGUF does not record: the 27B (62 layers) by d/H (= 168),
    every other size by head_dim."""
    return hidden_size // num_attention_heads if num_hidden_layers == 62 else head_dim


def _show(value: Any) -> str:
    """A metadata value in an error message: a number or a short string as it is, anything else by its kind
    (never a whole array: it may be 262 144 strings)."""
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64):
        return repr(value)
    if isinstance(value, str):
        return f"a string of {len(value):,} characters"
    if isinstance(value, list):
        return f"an array of {'/'.join(sorted({type(v).__name__ for v in value})) or 'nothing'}"
    return f"an array of {value.dtype}" if hasattr(value, "dtype") else f"a {type(value).__name__}"


def config_from_gguf(gguf: GGUFFile) -> Gemma3Config:
    """Translate GGUF metadata into a Gemma3Config, supplying what llama.cpp hard-codes (spec section 8)."""
    meta, where = gguf.metadata, str(gguf.path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{where}: metadata key general.architecture is missing (not a model GGUF)")
    if arch != ARCH:
        raise CheckpointError(f"{where}: general.architecture is {_show(arch)}, not {ARCH!r} (a Gemma 3 text model)")

    def number(key: str, default: Any = None, kind: type = int, maximum: int = MAX_SIZE) -> Any:
        """A positive int at most `maximum` (the config's bounds), or a positive finite float."""
        value = meta.get(f"{ARCH}.{key}", default)
        if value is None:
            raise CheckpointError(f"{where}: metadata key {ARCH}.{key} is missing")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and isinstance(value, int)
        if not ok or not 0 < value < math.inf:
            raise CheckpointError(f"{where}: metadata key {ARCH}.{key} must be a positive "
                                  f"{'int' if kind is int else 'finite number'}, got {_show(value)}")
        if kind is int and value > maximum:
            raise CheckpointError(f"{where}: metadata key {ARCH}.{key} is {value:,}, more than the {maximum:,} "
                                  "a model may have")
        return value

    d = number("embedding_length")
    n_layers = number("block_count", maximum=MAX_LAYERS)
    n_heads = number("attention.head_count")
    head_dim = number("attention.key_length", d // n_heads)
    value_length = number("attention.value_length", head_dim)
    if value_length != head_dim:
        raise CheckpointError(f"{where}: metadata key {ARCH}.attention.value_length is {value_length}, but "
                              f"key_length is {head_dim}; Gemma 3 uses one head size for both")

    factor = 1.0
    scaling_type = meta.get(f"{ARCH}.rope.scaling.type", "linear")
    if f"{ARCH}.rope.scaling.factor" in meta and scaling_type not in ("none",):
        if scaling_type != "linear":
            raise CheckpointError(f"{where}: rope scaling type {_show(scaling_type)} is not supported (Gemma 3 uses "
                                  "linear)")
        factor = float(number("rope.scaling.factor", kind=float))

    embd = gguf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(f"{where}: missing tensor token_embd.weight")
    if "output.weight" in gguf.tensors:
        raise CheckpointError(f"{where}: has an untied output.weight; Gemma 3 ties its output head to "
                              f"token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise CheckpointError(f"{where}: metadata key tokenizer.ggml.tokens must be an array of strings, got "
                              f"{_show(tokens)}")
    if tokens is not None and len(tokens) > embd.shape[0]:
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens lists {len(tokens):,} tokens, but token_embd.weight "
                              f"has {embd.shape[0]:,} rows")

    def token_id(key: str, default: int) -> int:
        value = meta.get(f"tokenizer.ggml.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{where}: tokenizer.ggml.{key} must be an integer, got {_show(value)}")
        if not 0 <= value < embd.shape[0]:
            raise CheckpointError(f"{where}: tokenizer.ggml.{key} is {value:,}, not a token id: token_embd.weight "
                                  f"has {embd.shape[0]:,} rows")
        return value

    eos = [token_id("eos_token_id", 1)]
    # <end_of_turn> ends chat turns but the GGUF records only <eos>; llama.cpp finds it by its text too.
    if tokens is not None and END_OF_TURN in tokens[:1024]:
        eos.append(tokens.index(END_OF_TURN))
    softcap = meta.get(f"{ARCH}.final_logit_softcapping")
    if softcap is not None:
        softcap = number("final_logit_softcapping", kind=float)
    try:
        return Gemma3Config(
            vocab_size=embd.shape[0],  # rows of the weight, not the tokenizer (spec pitfall 21)
            hidden_size=d,
            intermediate_size=number("feed_forward_length"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=number("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar(d, n_heads, n_layers, head_dim),
            sliding_window=number("attention.sliding_window"),
            layer_types=hybrid_layer_types(n_layers),
            rope_theta=float(number("rope.freq_base", 1_000_000.0, float)),
            rope_local_base_freq=LOCAL_ROPE_BASE,
            rope_scaling_factor=factor,
            max_position_embeddings=number("context_length"),
            rms_norm_eps=float(number("attention.layer_norm_rms_epsilon", 1e-6, float)),
            final_logit_softcapping=float(softcap) if softcap is not None else None,
            pad_token_id=token_id("padding_token_id", 0),
            eos_token_id=tuple(dict.fromkeys(eos)),
            bos_token_id=token_id("bos_token_id", 2),
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: metadata describes an invalid model: {e}") from None


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              progress: Callable[[Iterable[str]], Iterable[str]] | None = None, keep_blocks: Collection[str] = (),
              notice: Callable[[str], None] | None = None
              ) -> tuple[Gemma3Config, dict[str, torch.Tensor | BlockTensor], GGUFFile]:
    """Read a Gemma 3 GGUF into (config, our state dict in `dtype`, the open file).

    Names and shapes are checked against the config before any tensor is dequantised. `keep_blocks`: the
    block types (e.g. gemma3.accel.quantize.FORMATS) in which projections and the embedding (QUANTIZABLE) stay
    as they are in the file, as BlockTensors over its mapping; a matrix in another block type is dequantised,
    and `notice` is told so in one line.
    """
    gguf = GGUFFile.open(path)
    config = config_from_gguf(gguf)
    ours: dict[str, str] = {}
    for name in gguf.tensors:
        target = rename(name, GGUF_NAMES)
        if target is None:
            raise CheckpointError(f"{gguf.path}: unexpected tensor {name}")
        ours[target] = name
    check_tensors({o: gguf.tensors[g].shape for o, g in ours.items()}, config, str(gguf.path),
                  display=lambda n: ours.get(n) or rename(n, OUR_TO_GGUF) or n)
    state: dict[str, torch.Tensor | BlockTensor] = {}
    names: Iterable[str] = ours
    if progress is not None:
        names = progress(names)
    slow: dict[str, int] = {}
    for name in names:
        info = gguf.tensors[ours[name]]
        if keep_blocks and QUANTIZABLE.match(name) and info.type_name not in FLOAT_TYPES:
            if info.type_name in keep_blocks and len(info.shape) == 2:
                state[name] = gguf.blocks(ours[name])
                continue
            slow[info.type_name] = slow.get(info.type_name, 0) + 1
        tensor = gguf.dequantize(ours[name])
        if is_norm(name):
            tensor = tensor - 1.0  # GGUF stores 1 + w; our RMSNorm computes x̂ · (1 + w)
        state[name] = tensor.to(dtype)
    if slow and notice is not None:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(slow.items()))
        notice(f"note: {gguf.path.name}: no native kernel for {kinds} tensor(s); those are dequantised to {dtype} "
               "and run as float weights")
    return config, state, gguf
