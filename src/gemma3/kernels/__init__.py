"""Native CPU kernels, built on first use with the system C compiler: the matrix-vector products of a decode
step in bf16 and fp32 (`linear.c`, which says why it beats oneDNN and MKL there), the same products and
the dequantization for weights in ggml's block formats (`quants.c`, used by gemma3.accel.quantize), the fused
norm and one-token attention (`decode.c`), and a quantized model's whole decode step in one call (`step.c`,
used by gemma3.accel.fused_step). Apart from those, `bpe.c` is the tokenizer's BPE engine
(gemma3.text.native_bpe), built into its own small library without OpenMP or -march flags, so that tokenizing
never loads torch.

Nothing here is needed: without a C compiler, off x86-64, with `GEMMA3_NATIVE_KERNELS=0`, or when the build
fails, `available()` is False and the model uses torch's own kernels (same results up to the order of
fp32 additions, a slower decode). `status()` says which, in one line.

The library is built once per machine (`cc -O3 -march=native -fopenmp`) into
`$GEMMA3_KERNEL_CACHE` (default `$XDG_CACHE_HOME/gemma3/kernels`, i.e. ~/.cache/gemma3/kernels), named by a
hash of the source, the flags and the CPU's feature flags, and loaded with ctypes. Its OpenMP calls resolve
to the runtime torch has already loaded (same soname), so `torch.set_num_threads` sets its threads too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gemma3.files import owned_and_private, user_cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("linear.c", "quants.c", "decode.c", "step.c", "quantize.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
BPE_SOURCES = [Path(__file__).with_name("bpe.c")]
BPE_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c11"]  # portable C: the same ids on any CPU
DISABLE_ENV = "GEMMA3_NATIVE_KERNELS"
# extra compiler flags, e.g. "-mno-avx512f" to build (and test) the AVX2 kernels on an AVX-512 machine
FLAGS_ENV = "GEMMA3_KERNEL_CFLAGS"


def _flags() -> list[str]:
    return FLAGS + os.environ.get(FLAGS_ENV, "").split()


def cache_dir() -> Path:
    return user_cache_dir("kernels", "GEMMA3_KERNEL_CACHE")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, sources: Sequence[Path] = SOURCES, flags: Sequence[str] | None = None,
           stem: str = "linear") -> Path:
    """The compiled library for these sources, flags and CPU: from the cache, or compiled into it."""
    flags = list(_flags() if flags is None else flags)
    source = b"".join(p.read_bytes() for p in sources)
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = tempfile.NamedTemporaryFile(dir=directory, delete=True)
        probe.close()
        private = owned_and_private(directory)
    except OSError:
        private = False
    if not private:  # unwritable, or others could plant a library there: build for this process only
        directory = Path(tempfile.mkdtemp(prefix="gemma3-kernels-"))
    target = directory / f"{stem}-{key}.so"
    if target.exists() and owned_and_private(target):
        return target
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, *map(str, sources), "-o", partial], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else 'exit ' + str(done.returncode)}")
        os.chmod(partial, 0o755)
        os.replace(partial, target)  # atomic: processes building at once (torchrun ranks) never see half a file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _compiler() -> tuple[str | None, str]:
    """(the C compiler, or None; why not)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {DISABLE_ENV}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return compiler, "" if compiler else "no C compiler (cc) found"


@functools.cache
def bpe_library() -> tuple[ctypes.CDLL | None, str]:
    """(the tokenizer's BPE engine, or None; a line saying what was loaded or why not). Tried once per process.
    Any CPU with a C compiler builds it; gemma3.text.native_bpe declares its functions."""
    compiler, why = _compiler()
    if not compiler:
        return None, why
    try:
        path = _build(compiler, BPE_SOURCES, BPE_FLAGS, "bpe")
        return ctypes.CDLL(str(path)), f"native BPE ({path})"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("gemma3 native BPE unavailable: %s", e)
        return None, f"build failed: {e}"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, or None; a line saying what was loaded or why not). Tried once per process."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no native kernel for {platform.machine()}"
    compiler, why = _compiler()
    if not compiler:
        return None, why
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("gemma3 native kernels unavailable: %s", e)
        return None, f"build failed: {e}"
    for fn in (lib.gemma3_linear_bf16, lib.gemma3_linear_f32):
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemma3_q_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr]
    lib.gemma3_q_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr]
    lib.gemma3_q_round_activation.argtypes = [ptr, i64, i64, ptr]
    for fn in (lib.gemma3_q_linear, lib.gemma3_q_dequantize, lib.gemma3_q_round_activation):
        fn.restype = ctypes.c_int
    lib.gemma3_rms_norm.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr]
    lib.gemma3_decode_attention.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ctypes.c_float,
                                            ptr]
    lib.gemma3_decode_attention.restype = ctypes.c_int
    lib.gemma3_rms_norm.restype = None
    lib.gemma3_gelu_tanh_mul.argtypes = [ptr, ptr, i64, ptr]
    lib.gemma3_gelu_tanh_mul.restype = None
    lib.gemma3_fit_q4_1.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.gemma3_fit_q4_1.restype = None
    lib.gemma3_quantize_q8_0.argtypes = [ptr, i64, i64, ptr]
    lib.gemma3_quantize_q8_0.restype = None
    lib.gemma3_decode_step.argtypes = [ptr, ptr, ptr]  # gemma3.accel.fused_step passes its Structures by reference
    lib.gemma3_decode_step.restype = ctypes.c_int
    isa = "AVX-512 BF16" if lib.gemma3_kernel_isa() == 512 else "AVX2"
    quants = "AVX-512 VNNI" if lib.gemma3_q_isa() == 512 else "AVX2"
    return lib, f"native kernels ({isa}; block formats {quants}; {path})"


def library() -> ctypes.CDLL | None:
    """The loaded library (None when unavailable): NativeLinear's GEMV, and quants.c for gemma3.accel.quantize."""
    return _library()[0]


def available() -> bool:
    return _library()[0] is not None


def status() -> str:
    return _library()[1]


class NativeLinear:
    """x · Wᵀ for a bf16 or fp32 weight W given as row blocks stacked along its output dimension (e.g. q, k
    and v), read in place: nothing is copied or concatenated. Takes up to `max_rows` rows of x per call.

    The caller keeps the weights unchanged while this is used (packed.PackedLinear checks before each call);
    the blocks are referenced here so their memory stays alive."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        import torch  # here, not at the top: the tokenizer's engine is built by this module without torch

        lib = _library()[0]
        if lib is None:
            raise RuntimeError(f"native kernels unavailable: {status()}")
        self.weights = [w.detach().contiguous() for w in weights]
        self.dtype = self.weights[0].dtype
        if self.dtype not in (torch.bfloat16, torch.float32) or any(
                w.dtype != self.dtype or w.device.type != "cpu" or w.dim() != 2 for w in self.weights):
            raise ValueError("NativeLinear takes 2-D CPU weights, all bfloat16 or all float32")
        self.in_features = self.weights[0].shape[1]
        if any(w.shape[1] != self.in_features for w in self.weights):
            raise ValueError("NativeLinear blocks must share their input size")
        self.out_features = sum(w.shape[0] for w in self.weights)
        self.max_rows = lib.gemma3_kernel_max_rows()
        self._fn = lib.gemma3_linear_bf16 if self.dtype == torch.bfloat16 else lib.gemma3_linear_f32
        self._ptrs = (ctypes.c_void_p * len(self.weights))(*(w.data_ptr() for w in self.weights))
        self._rows = (ctypes.c_int64 * len(self.weights))(*(w.shape[0] for w in self.weights))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) with at most max_rows rows, in the weights' dtype → (..., out)."""
        if x.dtype != self.dtype or x.device.type != "cpu" or x.shape[-1] != self.in_features:
            raise ValueError(f"NativeLinear expects {self.dtype} CPU input (..., {self.in_features}), got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        import torch

        rows = x.numel() // self.in_features
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"NativeLinear takes 1 to {self.max_rows} rows, got {rows}")
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=self.dtype)
        self._fn(len(self.weights), self._ptrs, self._rows, x.data_ptr(), rows, self.in_features, y.data_ptr())
        return y
