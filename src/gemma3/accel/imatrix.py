"""The importance matrix: how strongly each input channel of each projection is driven on real text, so that a
4-bit fit spends its few levels where the products feel them (llama.cpp's `imatrix`, here built at load time
from ~1 300 tokens).

Why it matters: a projection computes y = x · Wᵀ, and quantizing W to Ŵ changes y by x · (W - Ŵ)ᵀ. Averaged
over inputs, the squared error of output i is Σ_j E[x_j²] (W_ij - Ŵ_ij)² (plus cross terms, small when the
errors are independent), so an error in column j costs in proportion to E[x_j²], the mean square of input
channel j. Those differ by orders of magnitude across channels (a few channels of the residual stream carry
most of its energy, and GeGLU's output, down_proj's input, is sparse and spiky). A fit that weights every
value alike (or by its own size) spends precision on columns nobody reads.

    calibration_ids(tokenizer)   the text we calibrate on, as ids (<bos> first): gemma3/data/calibration.txt,
                                 ~1 300 tokens of mixed prose, code, dialogue, lists, SQL/JSON, French,
                                 German and Spanish, written for this repository (not the held-out text the
                                 accuracy tests score)
    collect(model, ids)          {weight name: E[x_j²] per input column} for every projection, by forward
                                 hooks on one fp32 forward pass

gemma3/loading.py measures it for `--quantize int4` and kernels/quantize.c turns it into the per-value weights
of its least-squares fit. What it buys in perplexity and KL (experiments/int4_ablation.py):
docs/quantized-inference.md, "Accuracy".
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

from gemma3.errors import Gemma3Error

CALIBRATION_FILE = "calibration.txt"
FLOOR = 1e-4  # columns never driven still get this fraction of the mean weight (a fit must see every value)


def calibration_text() -> str:
    return resources.files("gemma3").joinpath("data", CALIBRATION_FILE).read_text(encoding="utf-8")


def calibration_ids(tokenizer, max_tokens: int = 2048) -> list[int]:
    return tokenizer.encode(calibration_text(), add_bos=True)[:max_tokens]


@torch.inference_mode()
def collect(model: nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """{'layers.0.self_attn.q_proj.weight': (in_features,) fp32, ...}: the mean square of each input channel of
    every nn.Linear in `model` over the tokens `ids`, floored at FLOOR × its mean. One forward, no cache."""
    if len(ids) < 2:
        raise Gemma3Error(f"calibration needs at least 2 tokens, got {len(ids)}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [module.register_forward_hook(hook(f"{name}.weight"))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        model(torch.tensor([ids]), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, total in sums.items():
        mean = (total / counts[name]).float()
        average = float(mean.mean())
        out[name] = mean.clamp_min(average * FLOOR if average > 0 else 1.0)
    return out
