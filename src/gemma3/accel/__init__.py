"""Inference-only fast paths, swapped into a model from outside: model.py never imports this package, and
training never calls it.

    accelerate(model)   decides, once per model, what it runs on, and returns that decision (`Acceleration`),
                        which the generator holds (and through it the server and the lm-eval harness):
        attention       CPUAttention (accel/attention.py) for every model: a decode step and a long prefill
                        cut the way the CPU computes them fastest (the native decode kernel with the modules below)
        native modules  float weights on the CPU (accel/native.py): the native GEMV for a decode step, a copy
                        of each layer weight in the GEMM's layout for a prefill, the norm's gain kept in fp32;
                        a quantized model (accel/quantize.py) gets the native norm only. Default: only when
                        the copies take under a quarter of the machine's RAM
        fused step      a quantized model's decode step in one native call (accel/fused_step.py), for one
                        sequence at a time, over a float16 KV cache (which it reads natively)

Block formats and quantization (quantize.py, imatrix.py) live here too: they are how a model runs, not what
it is. The C code is gemma3.kernels', which the tokenizer shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gemma3.errors import Gemma3Error
from gemma3.accel.swap import swap_modules
from gemma3.memory import physical_memory

KV_CACHE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)  # None = chosen per batch (cache_dtype)


@dataclass
class Acceleration:
    """What `accelerate` decided for one model."""

    model: nn.Module
    fuse_steps: bool  # one sequence of a quantized model may decode through the fused native step
    kv_cache_dtype: torch.dtype | None  # asked for; None = `cache_dtype` decides

    def cache_dtype(self, batch_size: int, compute_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for `batch_size` sequences: `kv_cache_dtype` when given; else float16 where the
        fused decode step runs, which reads it natively (half the cache's memory and half the bytes attention
        reads, as llama.cpp keeps it; its cost: docs/exactness.md); else the compute dtype."""
        if self.kv_cache_dtype is not None:
            return self.kv_cache_dtype
        if batch_size == 1 and self.fuse_steps:
            from gemma3.accel.fused_step import reason_not_fused

            if reason_not_fused(self.model) is None:
                return torch.float16
        return compute_dtype

    def fused_step(self, cache):
        """A FusedDecodeStep over `cache` where it applies, else None (the modules then run each step)."""
        if not self.fuse_steps:
            return None
        from gemma3.accel.fused_step import FusedDecodeStep, reason_not_fused

        if reason_not_fused(self.model, cache) is not None:
            return None
        return FusedDecodeStep(self.model, cache)


def accelerate(model: nn.Module, native: bool | None = None, kv_cache_dtype: torch.dtype | None = None
               ) -> Acceleration:
    """Swap the inference modules into `model` (in place; the parameters and the state dict are unchanged) and
    return what was decided. `native`: None = the native modules when their copies fit (see above); False =
    the attention paths on torch only (SDPA cut per step), so every product is the model's own arithmetic (the
    lm-eval harness's choice, and `gemma3 perplexity`'s)."""
    from gemma3.accel.attention import CPUAttention
    from gemma3.model import GroupedQueryAttention

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise Gemma3Error(f"kv_cache_dtype must be None (auto), float32, bfloat16 or float16, not {kv_cache_dtype}")
    if native is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ram = physical_memory()
        native = ram is not None and weight_bytes < ram / 4
    swap_modules(model, lambda m: CPUAttention(m, native) if type(m) is GroupedQueryAttention else None)
    if native:  # a model accelerated before with native=False: its attention takes the native kernel now too
        for m in model.modules():
            if isinstance(m, CPUAttention):
                m.use_native_kernel()
    if native:
        from gemma3.accel.native import use_native_modules

        use_native_modules(model)
    return Acceleration(model, fuse_steps=bool(native), kv_cache_dtype=kv_cache_dtype)
