"""The Q4_K quantizer (gemma3.weights.gguf.q4_k) that `gemma3 convert --gguf-type Q4_K` writes with: blocks gguf-py
reads as we do, an error below gguf-py's Q4_0 at the same 4.5 bits a weight, Q4_K weights coming back as they
were, and the edge cases of its fit (all-zero, one-signed and outlier sub-blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3.weights.gguf.dequantize import dequantize_blocks
from gemma3.weights.gguf.q4_k import quantize_q4_k

gguf = pytest.importorskip("gguf")
Q4_K = gguf.GGMLQuantizationType.Q4_K


def dequantize(blocks: np.ndarray, shape) -> torch.Tensor:
    ours = torch.from_numpy(dequantize_blocks("Q4_K", blocks.reshape(-1, 144))).reshape(shape)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, Q4_K)).reshape(shape)
    assert torch.equal(ours, theirs)  # the bytes mean the same to gguf-py's reader as to ours
    return ours


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum() / (b.double() ** 2).sum())


def test_error_is_below_q4_0_at_the_same_bits():
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    blocks = quantize_q4_k(w)
    assert blocks.shape == (256, 4 * 144) and blocks.dtype == np.uint8
    ours = rel_mse(dequantize(blocks, w.shape), w)
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    theirs = rel_mse(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q4_0), q4_0)).reshape(w.shape), w)
    print(f"\nrelative MSE: Q4_K {ours:.3e}, gguf-py Q4_0 {theirs:.3e}")
    assert 0 < ours < 0.95 * theirs


def test_q4_k_weights_come_back_as_they_were():
    torch.manual_seed(1)
    w = dequantize(quantize_q4_k(torch.randn(64, 512)), (64, 512))  # values on a Q4_K grid
    again = dequantize(quantize_q4_k(w), w.shape)
    assert rel_mse(again, w) < 1e-6


def test_edge_cases_of_the_fit():
    torch.manual_seed(2)
    w = torch.randn(6, 256)
    w[0] = 0                      # nothing to fit
    w[1, :32] = w[1, :32].abs() + 1  # one sub-block all positive: its min is clamped to 0
    w[2, :32] = -w[2, :32].abs() - 1  # all negative
    w[3, 7] = 100.0               # an outlier sets the super-block's scales
    w[4, :] = 0.5                 # constant
    out = dequantize(quantize_q4_k(w), w.shape)
    assert torch.equal(out[0], torch.zeros(256))
    assert torch.isfinite(out).all()
    assert abs(float(out[3, 7]) - 100.0) < 100.0 / 15
    torch.testing.assert_close(out[4], w[4], rtol=0, atol=0.5 / 30)
    for row in (1, 2):
        assert rel_mse(out[row, :32], w[row, :32]) < 0.01


def test_rows_that_are_not_a_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(torch.randn(4, 640))
