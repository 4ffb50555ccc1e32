"""What `--quantize int4` is made of, on the real 270M: perplexity and KL from fp32 on held-out text for each
choice that went into it — how Q4_1's blocks are fitted, and which projections stay at Q8_0.

    python experiments/int4_ablation.py [--tokens 1024]

Prints one row per variant. The reference is the embedded 270M's exact weights in fp32 (its Q4_K_M blocks
dequantized); every variant quantizes those fp32 weights at load, the tied embedding / head always at Q8_0 (a
Q4_1 head alone costs +10 %). The text is the first `--tokens` tokens of CPython's pydoc topics (what
tests/test_quantize_real.py scores, with its `evaluate`: 512-token chunks through the KV cache). Q4_1 "min/max"
is gguf-py's reference quantizer; "fitted" is gemma3's (kernels/quantize.c); "imatrix" weights each fit by
the importance matrix measured on gemma3/data/calibration.txt (gemma3/imatrix.py: not the scored text).
`--quantize int4` is the row marked "(= int4)". Takes ~20 s per variant on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gemma3.accel import imatrix  # noqa: E402
from gemma3.loading import build_model, load_weights  # noqa: E402
from gemma3.weights.sources import embedded_gguf_path  # noqa: E402
from gemma3.accel import accelerate  # noqa: E402
from gemma3.accel.quantize import SCHEMES, QuantizedTensor, Scheme, layer_count  # noqa: E402
from gemma3.weights.names import QUANTIZABLE  # noqa: E402


def minmax_q4_1(weight: torch.Tensor) -> QuantizedTensor:
    """gguf-py's Q4_1 (min = the block's minimum, scale = range / 15): what `int4` used before the fit."""
    import gguf as gguf_py

    blocks = gguf_py.quants.quantize(weight.float().numpy(), gguf_py.GGMLQuantizationType.Q4_1)
    return QuantizedTensor("Q4_1", torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1), tuple(weight.shape))


KV = ("k_proj", "v_proj")
VARIANTS = {  # name -> (scheme, how Q4_1 blocks are made: "minmax" (gguf-py), "fit", "imatrix" (fit, weighted))
    "Q4_1 min/max": (Scheme("Q4_1", "Q8_0"), "minmax"),
    "Q4_1 fitted": (Scheme("Q4_1", "Q8_0"), "fit"),
    "fitted; v Q8_0": (Scheme("Q4_1", "Q8_0", ("v_proj",)), "fit"),
    "fitted; k, v Q8_0": (Scheme("Q4_1", "Q8_0", KV), "fit"),
    "fitted + imatrix": (Scheme("Q4_1", "Q8_0"), "imatrix"),
    "fitted + imatrix; k, v Q8_0": (Scheme("Q4_1", "Q8_0", KV), "imatrix"),
    "fitted + imatrix; k, v, gate Q8_0": (Scheme("Q4_1", "Q8_0", KV + ("gate_proj",)), "imatrix"),
    "fitted + imatrix; k, v Q8_0, down Q8_0 in 9 layers (= int4)": (SCHEMES["int4"], "imatrix"),
    "int8 (Q8_0 everywhere)": (SCHEMES["int8"], "fit"),
}


def quantized(state: dict, scheme: Scheme, how: str, importance: dict) -> dict:
    out = {}
    n_layers = layer_count(state)
    for name, t in state.items():
        if not QUANTIZABLE.match(name):
            out[name] = t
            continue
        fmt = scheme.format_of(name, n_layers)
        if how == "minmax" and fmt == "Q4_1":
            out[name] = minmax_q4_1(t)
        else:
            out[name] = QuantizedTensor.quantize(t, fmt, importance.get(name) if how == "imatrix" else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    from test_quantize_real import evaluate, held_out_ids

    from gemma3.text.tokenizer import Tokenizer

    config, state, _, _ = load_weights(embedded_gguf_path(), torch.float32, progress=False, quantize="none")
    tokenizer = Tokenizer.from_gguf(embedded_gguf_path())
    ids = held_out_ids(tokenizer, args.tokens)
    importance = imatrix.collect(build_model(config, dict(state)), imatrix.calibration_ids(tokenizer))
    reference = accelerate(build_model(config, dict(state)), native=True).model
    models, bits = {}, {}
    for name, (scheme, how) in VARIANTS.items():
        start = time.perf_counter()
        weights = quantized(state, scheme, how, importance)
        layer_weights = [t for n, t in weights.items() if n.startswith("layers.") and isinstance(t, QuantizedTensor)]
        bits[name] = 8 * sum(t.nbytes for t in layer_weights) / sum(t.shape[0] * t.shape[1] for t in layer_weights)
        models[name] = (accelerate(build_model(config, weights), native=True).model, 512)
        print(f"built {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    scores = evaluate(reference, models, ids)
    base = scores["reference"]["ppl"]
    print(f"{args.tokens} tokens of pydoc topics; fp32 reference perplexity {base:.4f}\n")
    print("| variant | bits a weight (layers) | perplexity | vs fp32 | KL from fp32 |\n|---|--:|--:|--:|--:|")
    for name in VARIANTS:
        s = scores[name]
        print(f"| {name} | {bits[name]:.2f} | {s['ppl']:.4f} | {100 * (s['ppl'] / base - 1):+.2f} % | {s['kl']:.4f} |")


if __name__ == "__main__":
    main()
