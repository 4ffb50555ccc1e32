"""A quantized model's decode step in one native call (kernels/step.c), used by generation in place of
`model(token, cache=cache, logits_to_keep=1)` for one sequence.

Through the modules, a 270M decode step is ~700 dispatched calls (ctypes calls into the block kernels, torch
ops for RoPE, residuals, GELU, the cache writes) around 127 matrix products: on the 2-core test machine those
calls cost as much as a third of the step. `FusedDecodeStep` hands the whole step to C: the same block
products, norms and attention functions the modules call, in the same order, inside one OpenMP region. What
stays in Python is what decides *what* the step does, from the model's own code: the KV cache's bookkeeping
(`KVCache.begin`: positions, slots, masks) and the rotary tables (`model.rope`), so the fused step cannot
drift from the model's semantics on those. Logits equal the module path's bit for bit (the quantized model's
GELU is decode.c's on both: accel.native.NativeGeGLU); tests/test_decode_step.py checks it.

Used when it applies (`reason_not_fused(model, cache)` says why not): every projection and the tied embedding
quantized (gemma3.accel.quantize), native kernels built, no attention soft-capping, the SDPA implementation, and
a batch-1 KVCache on the CPU, fp32 or fp16 (`gemma3.kv_cache`: the fp16 cache the generator picks for it; or one
row of the server's SlotKVCache, for a step with one decoding row).
Anything else runs the modules as before.
"""

from __future__ import annotations

import ctypes
import math

import torch

from gemma3 import kernels
from gemma3.config import GLOBAL, SLIDING
from gemma3.errors import Gemma3Error
from gemma3.kv_cache import KVCache
from gemma3.accel.quantize import QuantizedEmbedding, QuantizedLinear

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
PROJECTIONS = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
               ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))
NORMS = (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
         ("pre_ffn_norm", "pre_feedforward_layernorm"), ("post_ffn_norm", "post_feedforward_layernorm"),
         ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"))
KINDS = (SLIDING, GLOBAL)  # index 0 and 1 of the step's per-kind arrays (step.c: layer_t.kind)


# The layouts of step.c's qmat_t, layer_t, model_t and step_t: change both together.
class _QMat(ctypes.Structure):
    _fields_ = [("w", _ptr), ("fmt", _i64), ("row_bytes", _i64), ("n", _i64), ("k", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = ([(name, _QMat) for name, _ in PROJECTIONS] + [(name, _ptr) for name, _ in NORMS]
                + [("keys", _ptr), ("values", _ptr), ("slots", _i64), ("kind", _i64)])


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("d", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("ffn", _i64), ("eps", _f32), ("attn_scale", _f32), ("embed_scale", _f32), ("kv_half", ctypes.c_int32),
                ("layers", ctypes.POINTER(_Layer)), ("final_norm", _ptr), ("embed", _QMat)]


class _Step(ctypes.Structure):
    _fields_ = [("token", _i64), ("slot", _i64 * 2), ("visible", _i64 * 2), ("mask", _ptr * 2),
                ("cos", _ptr * 2), ("sin", _ptr * 2)]


def _qmat(module) -> _QMat:
    qt = module.qweight
    return _QMat(qt.data.data_ptr(), qt.format.ggml_type, qt.data.shape[1], qt.shape[0], qt.shape[1])


def reason_not_fused(model, cache: KVCache | None = None) -> str | None:
    """None when `FusedDecodeStep` can run this model's decode steps (over `cache`, when given), else why not
    (one line)."""
    if cache is not None and (not isinstance(cache, KVCache) or cache.batch_size != 1 or any(
            k.dtype not in (torch.float32, torch.float16) or k.dtype != cache.keys[0].dtype or k.device.type != "cpu"
            or not k.is_contiguous() for k in cache.keys + cache.values)):
        return "the KV cache is not a batch-1 fp32 or fp16 KVCache on the CPU"
    if kernels.library() is None:
        return f"no native kernels ({kernels.status()})"
    if not isinstance(model.embed_tokens, QuantizedEmbedding):
        return "the embedding is not quantized"
    config = model.config
    if config.attn_logit_softcapping is not None:
        return "attention soft-capping is not fused"
    for i, layer in enumerate(model.layers):
        if layer.self_attn.implementation != "sdpa":
            return f"layer {i} uses the {layer.self_attn.implementation!r} attention implementation"
        for _, path in PROJECTIONS:
            module = layer.get_submodule(path)
            if not isinstance(module, QuantizedLinear):
                return f"layers.{i}.{path} is not quantized"
            if module.qweight.padded_in != module.in_features:
                return f"layers.{i}.{path} has padded rows"
    if model.embed_tokens.qweight.padded_in != config.hidden_size:
        return "the embedding has padded rows"
    return None


class FusedDecodeStep:
    """One sequence's decode steps for `model` over `cache` (a batch-1 fp32 or fp16 KVCache on the CPU): calling it
    with a token id feeds that token and returns the next logits (1, vocab) in fp32, as
    `model(torch.tensor([[token]]), cache=cache, logits_to_keep=1).logits[:, -1]` does.

    It holds pointers into the model's weights and the cache's buffers: build it for one generation, and do
    not change the model (or swap its modules) while it is in use. The norm gains are taken at build time."""

    def __init__(self, model, cache: KVCache):
        why = reason_not_fused(model, cache)
        if why is not None:
            raise Gemma3Error(f"the fused decode step cannot run here: {why}")
        self.model, self.cache, self.lib = model, cache, kernels.library()
        config = model.config
        self._keep = []  # tensors whose memory the structures point into
        layers = (_Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            entry = layers[i]
            for name, path in PROJECTIONS:
                setattr(entry, name, _qmat(layer.get_submodule(path)))
            for name, path in NORMS:
                setattr(entry, name, self._gain(layer.get_submodule(path)))
            entry.keys, entry.values = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
            entry.slots = cache.keys[i].shape[2]
            entry.kind = KINDS.index(layer.layer_type)
        self._layers = layers
        scale = float(torch.tensor(math.sqrt(config.hidden_size), dtype=torch.float32))  # as Gemma3Model.forward
        first = model.layers[0].self_attn
        self._model = _Model(len(model.layers), config.hidden_size, first.num_heads, first.num_kv_heads,
                             first.head_dim, config.intermediate_size, model.norm.eps, first.scale, scale,
                             int(cache.keys[0].dtype == torch.float16),
                             layers, self._gain(model.norm), _qmat(model.embed_tokens.head))
        self.vocab = model.embed_tokens.num_embeddings

    def _gain(self, norm) -> int:
        gain = (1.0 + norm.weight.detach().float()).contiguous()
        self._keep.append(gain)
        return gain.data_ptr()

    def __call__(self, token: int) -> torch.Tensor:
        cache, model = self.cache, self.model
        if not 0 <= token < self.vocab:  # checked before the cache takes the step's slot
            raise Gemma3Error(f"token id {token} is outside the vocabulary [0, {self.vocab})")
        positions = cache.next_positions()[:, None]  # (1, 1)
        step = cache.begin(positions)  # the cache's own bookkeeping: slot positions and the masks
        start, ring = step.start, cache.ring_size
        args = _Step()
        args.token = int(token)
        held = []
        for index, kind in enumerate(KINDS):
            mask = step.masks[kind].reshape(-1).contiguous().view(torch.uint8)
            cos, sin = model.rope[kind](positions, torch.float32)
            cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
            held += [mask, cos, sin]
            args.slot[index] = start % ring if kind == SLIDING else start
            args.visible[index] = mask.numel()
            args.mask[index], args.cos[index], args.sin[index] = mask.data_ptr(), cos.data_ptr(), sin.data_ptr()
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        rc = self.lib.gemma3_decode_step(ctypes.byref(self._model), ctypes.byref(args), logits.data_ptr())
        if rc:
            raise Gemma3Error(f"fused decode step failed (kernel error {rc}) for token {token}")
        cap = model.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
