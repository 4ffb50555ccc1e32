"""What `--quantize int4` is made of, on the real 270M: perplexity and KL from fp32 on held-out text for each
choice that went into it — how Q4_1's blocks are fitted, and which projections stay at Q8_0.

    python experiments/int4_ablation.py [--tokens 1024]

Prints one row per variant. The reference is the embedded 270M's exact weights in fp32 (its Q4_K_M blocks
dequantized); every variant quantizes those fp32 weights at load, the tied embedding / head always at Q8_0 (a
Q4_1 head alone costs +10 %). The text is the first `--tokens` tokens of CPython's pydoc topics (what
tests/test_quantize_real.py scores, with its `evaluate`: 512-token chunks through the KV cache). Q4_1 "min/max"
is gguf-py's reference quantizer; "fitted" is gemma3's (kernels/fit_q4_1.c). `--quantize int4` is the row
"fitted; k, v Q8_0". Takes ~1 min per variant on 2 cores (the head's Q8_0 quantization is most of it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gemma3.loading import build_model, embedded_gguf_path, load_weights  # noqa: E402
from gemma3.packed import pack_model  # noqa: E402
from gemma3.quantize import QUANTIZABLE, SCHEMES, QuantizedTensor, Scheme  # noqa: E402


def minmax_q4_1(weight: torch.Tensor) -> QuantizedTensor:
    """gguf-py's Q4_1 (min = the block's minimum, scale = range / 15): what `int4` used before the fit."""
    import gguf as gguf_py

    blocks = gguf_py.quants.quantize(weight.float().numpy(), gguf_py.GGMLQuantizationType.Q4_1)
    return QuantizedTensor("Q4_1", torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1), tuple(weight.shape))


VARIANTS = {  # name -> (scheme, Q4_1 by gguf-py's min/max instead of the fit)
    "Q4_1 min/max": (Scheme("Q4_1", "Q8_0"), True),
    "Q4_1 fitted": (Scheme("Q4_1", "Q8_0"), False),
    "fitted; v Q8_0": (Scheme("Q4_1", "Q8_0", ("v_proj",)), False),
    "fitted; k, v Q8_0 (= int4)": (SCHEMES["int4"], False),
    "fitted; v, down Q8_0": (Scheme("Q4_1", "Q8_0", ("v_proj", "down_proj")), False),
    "int8 (Q8_0 everywhere)": (SCHEMES["int8"], False),
}


def quantized(state: dict, scheme: Scheme, minmax: bool) -> dict:
    out = {}
    for name, t in state.items():
        if not QUANTIZABLE.match(name):
            out[name] = t
            continue
        fmt = scheme.format_of(name)
        out[name] = minmax_q4_1(t) if minmax and fmt == "Q4_1" else QuantizedTensor.quantize(t, fmt)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    from test_quantize_real import evaluate, held_out_ids

    from gemma3.tokenizer import Tokenizer

    config, state, _, _ = load_weights(embedded_gguf_path(), torch.float32, progress=False, quantize="none")
    ids = held_out_ids(Tokenizer.from_gguf(embedded_gguf_path()), args.tokens)
    reference = pack_model(build_model(config, dict(state)))
    models = {}
    for name, (scheme, minmax) in VARIANTS.items():
        start = time.perf_counter()
        models[name] = (pack_model(build_model(config, quantized(state, scheme, minmax))), 512)
        print(f"built {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    scores = evaluate(reference, models, ids)
    base = scores["reference"]["ppl"]
    print(f"{args.tokens} tokens of pydoc topics; fp32 reference perplexity {base:.4f}\n")
    print("| variant | perplexity | vs fp32 | KL from fp32 |\n|---|--:|--:|--:|")
    for name in VARIANTS:
        s = scores[name]
        print(f"| {name} | {s['ppl']:.4f} | {100 * (s['ppl'] / base - 1):+.2f} % | {s['kl']:.4f} |")


if __name__ == "__main__":
    main()
