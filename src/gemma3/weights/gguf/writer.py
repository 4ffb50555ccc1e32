"""The GGUF writer: our config and state dict -> a llama.cpp-loadable gemma3 GGUF (the tokenizer's keys come from
the caller: a source GGUF's own, or gemma3.text.gguf_metadata's rebuild from a tokenizer.json).

Q8_0 / Q5_0 / Q4_1 / Q4_0 are quantized by gguf-py (llama.cpp's reference quantizers); Q4_K, which gguf-py
cannot write, by gemma3.weights.gguf.q4_k. A matrix whose rows are not a multiple of Q4_K's 256 values is
written Q5_0 instead (llama.cpp's own fallback for Q4_K): for the 270M (hidden size 640) that is q, k, v, gate
and up; o and down are Q4_K. The tied embedding, which is also the output head, is Q8_0 (llama.cpp gives the
output Q6_K, or Q8_0 where its rows do not fit Q6_K's 256; we have no Q6_K quantizer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf as gguf_py  # the writer and quantisers of the reference implementation
import numpy as np
import torch

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import CheckpointError
from gemma3.files import replace_file
from gemma3.weights.gguf.q4_k import QK_K, quantize_q4_k
from gemma3.weights.gguf.translate import ARCH, LOCAL_ROPE_BASE, query_pre_attn_scalar
from gemma3.weights.names import OUR_TO_GGUF, is_norm, rename

WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q4_K")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K": 14, "BF16": 32}  # LLAMA_FTYPE_*
Q4_K_FALLBACK = "Q5_0"


def _block_type(tensor_type: str, gguf_name: str, cols: int) -> str:
    """The type one matrix is written in: `tensor_type`, but under Q4_K the embedding Q8_0 and rows that do not
    fill Q4_K's super-blocks Q4_K_FALLBACK (the module's docstring says why)."""
    if tensor_type != "Q4_K":
        return tensor_type
    if gguf_name == "token_embd.weight":
        return "Q8_0"
    return "Q4_K" if cols % QK_K == 0 else Q4_K_FALLBACK


def write_gguf(path: str | os.PathLike, config: Gemma3Config, state: Mapping[str, torch.Tensor],
               tokenizer_metadata: Mapping[str, Any], tensor_type: str = "BF16", name: str = "Gemma 3",
               progress: Callable[[Iterable[str]], Iterable[str]] | None = None) -> Path:
    """Write a llama.cpp-loadable gemma3 GGUF (atomically: a temporary file renamed into place).

    `tokenizer_metadata` holds the `tokenizer.ggml.*` keys (and optionally `tokenizer.chat_template`),
    e.g. copied from a source GGUF or built by gemma3.text.gguf_metadata. Norms are always F32 (as
    llama.cpp's converter does), stored as 1 + w; the other matrices use `tensor_type`.
    """
    if tensor_type not in WRITABLE_TYPES:
        raise CheckpointError(f"cannot write GGUF tensor type {tensor_type!r}; choose one of {', '.join(WRITABLE_TYPES)}")
    if config.layer_types != hybrid_layer_types(config.num_hidden_layers):
        raise CheckpointError("GGUF cannot record a layer pattern other than Gemma 3's 5 local : 1 global")
    if (config.query_pre_attn_scalar != query_pre_attn_scalar(config.hidden_size, config.num_attention_heads,
                                                              config.num_hidden_layers, config.head_dim)
            or config.rope_local_base_freq != LOCAL_ROPE_BASE):
        raise CheckpointError("GGUF cannot record this config's query_pre_attn_scalar / local RoPE base; "
                              "llama.cpp would run it wrongly")

    def write(tmp: Path) -> None:
        w = gguf_py.GGUFWriter(tmp, ARCH)
        _add_metadata(w, config, tokenizer_metadata, tensor_type, name)
        _add_tensors(w, state, tensor_type, progress)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = Path(path)
    replace_file(path, write)
    return path


def _add_metadata(w: gguf_py.GGUFWriter, config: Gemma3Config, tokenizer_metadata: Mapping[str, Any],
                  tensor_type: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[tensor_type])
    w.add_quantization_version(gguf_py.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_sliding_window(config.sliding_window)
    if config.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf_py.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling_factor)
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    for key, value in tokenizer_metadata.items():
        if key == "tokenizer.ggml.tokens":
            w.add_token_list(list(value))
        elif key == "tokenizer.ggml.scores":
            w.add_token_scores(np.asarray(value, dtype=np.float32).tolist())
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(np.asarray(value, dtype=np.int32).tolist())
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            raise CheckpointError(f"cannot write tokenizer metadata {key!r} of type {type(value).__name__}")


def _add_tensors(w: gguf_py.GGUFWriter, state: Mapping[str, torch.Tensor], tensor_type: str,
                 progress: Callable[[Iterable[str]], Iterable[str]] | None) -> None:
    names: Iterable[str] = list(state)
    if progress is not None:
        names = progress(names)
    for our_name in names:
        gguf_name = rename(our_name, OUR_TO_GGUF)
        if gguf_name is None:
            raise CheckpointError(f"cannot export tensor {our_name}: it has no GGUF name")
        tensor = state[our_name].detach().float()
        if is_norm(our_name):
            w.add_tensor(gguf_name, (tensor + 1.0).numpy())
            continue
        array = tensor.numpy()
        if tensor_type == "F32":
            w.add_tensor(gguf_name, array)
        elif tensor_type == "F16":
            w.add_tensor(gguf_name, array.astype(np.float16))
        else:
            kind = _block_type(tensor_type, gguf_name, array.shape[-1])
            qtype = gguf_py.GGMLQuantizationType[kind]
            block = gguf_py.GGML_QUANT_SIZES[qtype][0]
            if array.shape[-1] % block:
                raise CheckpointError(f"cannot write {gguf_name} {tuple(array.shape)} as {tensor_type}: its rows of "
                                      f"{array.shape[-1]} are not a multiple of the {block}-element block")
            data = quantize_q4_k(tensor) if kind == "Q4_K" else gguf_py.quants.quantize(array, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
