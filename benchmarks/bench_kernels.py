"""The quantized decode kernels on their own: each block format's one-row product over the embedded model's own
matrices, the Q8_0 head, and one-token attention over a 512-key fp32 cache, with and without the software
prefetch (kernels/quants.c PREFETCH, kernels/decode.c ATTN_PREFETCH).

    python benchmarks/bench_kernels.py [--threads 1] [--rounds 15]

The library is compiled twice here (default, and with both prefetch distances 0), loaded side by side, and
the two run interleaved, best of `--rounds` (the machine may be shared). Prints ns per 32-value group and the
rate the weights stream at, per format; the head; all 126 layer products of a step; and the 18 layers'
attention at 512 keys (each layer's keys and values in their own memory, so they come from DRAM as in a step).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

KERNELS = Path(__file__).resolve().parent.parent / "src" / "gemma3" / "kernels"


def build(directory: str, name: str, defines: list[str]) -> ctypes.CDLL:
    out = Path(directory) / f"{name}.so"
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", *defines,
                    str(KERNELS / "quants.c"), str(KERNELS / "decode.c"), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemma3_q_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr]
    lib.gemma3_decode_attention.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ctypes.c_float, ptr]
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the libraries' OpenMP is the runtime torch loaded

    from gemma3.loading import load
    from gemma3.accel.quantize import QuantizedLinear

    model, _, _ = load(None, progress=False, quantize=None)  # the embedded Q4_K_M file in its own blocks
    layers = [m.qweight for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n.startswith("layers.")]
    head = model.embed_tokens.qweight
    xs = {k: torch.randn(1, k) for k in {q.shape[1] for q in layers + [head]}}
    ys = {n: torch.empty(1, n) for n in {q.shape[0] for q in layers + [head]}}
    S, hd, G = 512, 256, 4
    caches = [torch.randn(2, 1, 1, S, hd) for _ in model.layers]
    q, out = torch.randn(1, 1, G, hd), torch.empty(1, 1, G, hd)

    with tempfile.TemporaryDirectory() as tmp:
        variants = {"prefetch": build(tmp, "default", []),
                    "no prefetch": build(tmp, "plain", ["-DPREFETCH=0", "-DATTN_PREFETCH=0"])}

        def product(lib, qt) -> None:
            x, y = xs[qt.shape[1]], ys[qt.shape[0]]
            if lib.gemma3_q_linear(qt.format.ggml_type, qt.data.data_ptr(), qt.data.shape[1], qt.shape[0], qt.shape[1],
                                   x.data_ptr(), 1, y.data_ptr()):
                raise RuntimeError(f"kernel error on {qt}")

        best = {v: defaultdict(lambda: float("inf")) for v in variants}
        for _ in range(args.rounds):
            for name, lib in variants.items():
                spent = defaultdict(float)
                start = time.perf_counter()
                for qt in layers:
                    t = time.perf_counter()
                    product(lib, qt)
                    spent[qt.format.name] += time.perf_counter() - t
                spent["layers"] = time.perf_counter() - start
                t = time.perf_counter()
                product(lib, head)
                spent["head"] = time.perf_counter() - t
                t = time.perf_counter()
                for c in caches:
                    if lib.gemma3_decode_attention(q.data_ptr(), c[0].data_ptr(), c[1].data_ptr(), 1, 1, G, S, hd, S * hd,
                                                   S * hd, None, 0.0625, out.data_ptr()):
                        raise RuntimeError("attention: out of memory")
                spent["attention"] = time.perf_counter() - t
                for key, seconds in spent.items():
                    best[name][key] = min(best[name][key], seconds)

    groups, nbytes = defaultdict(int), defaultdict(int)
    for qt in layers:
        groups[qt.format.name] += qt.shape[0] * qt.shape[1] // 32
        nbytes[qt.format.name] += qt.nbytes
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} interleaved rounds")
    print("| what | " + " | ".join(variants) + " |")
    print("|---|" + "--:|" * len(variants))
    for fmt in sorted(groups):
        cells = [f"{best[v][fmt] / groups[fmt] * 1e9:.2f} ns/group, {nbytes[fmt] / best[v][fmt] / 1e9:.1f} GB/s"
                 for v in variants]
        print(f"| {fmt} layer products ({nbytes[fmt] / 1e6:.1f} MB) | " + " | ".join(cells) + " |")
    total = sum(nbytes.values())
    print("| all 126 layer products | " + " | ".join(
        f"{best[v]['layers'] * 1e3:.2f} ms, {total / best[v]['layers'] / 1e9:.1f} GB/s" for v in variants) + " |")
    print(f"| head ({head.format.name}, {head.nbytes / 1e6:.0f} MB) | " + " | ".join(
        f"{best[v]['head'] * 1e3:.2f} ms, {head.nbytes / best[v]['head'] / 1e9:.1f} GB/s" for v in variants) + " |")
    print(f"| attention, {len(caches)} layers × {S} keys | " + " | ".join(
        f"{best[v]['attention'] * 1e3:.2f} ms" for v in variants) + " |")


if __name__ == "__main__":
    main()
