"""llama-cpp-python as the tests and benchmarks run it. No torch here: the benchmark's llama.cpp worker imports
this, and its peak RSS must be llama.cpp's own."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def llama_cpp_plain_kernels():
    """Within it, llama-cpp-python's models load with its plain ggml CPU kernels (`use_extra_bufts=False`).
    Its extra buffer types (AMX tiles, repacked weights) crash with a segmentation fault in the first decode on
    an AMX Xeon with 0.3.36 built with native flags (benchmarks/bench_quant.py probes for it, and uses this)."""
    import llama_cpp.llama_cpp as low_level  # the module Llama takes its default model parameters from

    default = low_level.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = plain
    try:
        yield
    finally:
        low_level.llama_model_default_params = default
