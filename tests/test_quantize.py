"""Quantized weights (gemma3.accel.quantize, kernels/quants.c) and the fused decode kernels (kernels/decode.c): each
block format against a float64 product of gguf-py's dequantized weights, odd shapes, 1-8 rows, thread counts,
NaN/inf, bad shapes, the torch fallback, and the modules swapped into a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf as gguf_py
from gemma3 import kernels
from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.accel.quantize import (FORMATS, QuantizedEmbedding, QuantizedLinear, QuantizedTensor, is_quantized,
                             quantize_model, quantize_state, round_activation)
from gemma3.weights.gguf.reader import GGUFFile
from reference import random_model
from test_kernels import _tiny_model, needs_kernel

# one tensor of each format the embedded Q4_K_M file holds, as it is in the file
FILE_TENSORS = {"Q5_0": "blk.0.attn_q.weight", "Q8_0": "blk.0.attn_v.weight", "Q4_K": "blk.0.attn_output.weight",
                "Q6_K": "blk.0.ffn_down.weight"}


@pytest.fixture(scope="module")
def embedded(gguf_path):
    return GGUFFile.open(gguf_path)


def reference_weight(qt: QuantizedTensor) -> torch.Tensor:
    """gguf-py's dequantization of the same bytes, in float64."""
    rows = gguf_py.quants.dequantize(qt.data.numpy(), gguf_py.GGMLQuantizationType[qt.format.name])
    return torch.from_numpy(np.asarray(rows, dtype=np.float64))[:, :qt.shape[1]]


def file_blocks(embedded, name: str) -> QuantizedTensor:
    """A matrix of the file as gemma3.loading keeps it: its blocks over the mapping, as a QuantizedTensor."""
    blocks = embedded.blocks(name)
    return QuantizedTensor(blocks.type_name, blocks.data, blocks.shape)


def samples(embedded) -> list[QuantizedTensor]:
    g = torch.Generator().manual_seed(0)
    out = [file_blocks(embedded, name) for name in FILE_TENSORS.values()]
    out += [QuantizedTensor.quantize(torch.randn(37, 160, generator=g), fmt) for fmt in ("Q8_0", "Q4_0", "Q4_1", "Q5_0")]
    return out


def test_formats_are_ggml_sizes():
    for fmt in FORMATS.values():
        values, size = gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType[fmt.name]]
        assert (fmt.block_values, fmt.block_bytes) == (values, size)
        assert fmt.ggml_type == gguf_py.GGMLQuantizationType[fmt.name].value


def test_dequantize_is_gguf_py_exactly(embedded):
    for qt in samples(embedded):
        ref = reference_weight(qt)
        assert torch.equal(qt.dequantize().double(), ref), qt
        ids = torch.tensor([0, qt.shape[0] - 1, 3, 3])
        assert torch.equal(qt.dequantize(ids).double(), ref[ids]), qt


@needs_kernel
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_kernel_and_numpy_dequantisers_agree_on_random_blocks(fmt, no_kernels):
    """The native kernel (kernels/quants.c) and the numpy fallback (gemma3.weights.gguf.dequantize) read every
    block format the same, to the bit, on random bytes (scales drawn finite: NaN and inf halves are left out)."""
    spec = FORMATS[fmt]
    rng = np.random.default_rng(spec.ggml_type)
    rows, blocks_per_row = 7, 3
    data = rng.integers(0, 256, size=(rows * blocks_per_row, spec.block_bytes), dtype=np.uint8)
    halves = {"Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}.get(fmt, (0,))  # where its fp16 factors are
    for at in halves:  # scales and mins in [-2, 2]
        data[:, at:at + 2] = rng.uniform(-2, 2, size=(len(data), 1)).astype(np.float16).view(np.uint8)
    qt = QuantizedTensor(fmt, torch.from_numpy(data).reshape(-1), (rows, blocks_per_row * spec.block_values))
    ids = torch.tensor([6, 0, 3, 3])
    numpy_whole, numpy_rows = qt.dequantize(), qt.dequantize(ids)
    kernels._library.cache_clear()
    import os

    os.environ["GEMMA3_NATIVE_KERNELS"] = "1"
    assert kernels.available()
    assert torch.equal(qt.dequantize(), numpy_whole) and torch.equal(qt.dequantize(ids), numpy_rows)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_kernel_matches_fp64_product_of_gguf_py_weights(embedded, rows):
    """Against x rounded as the kernel rounds it (int16 per 32 values): only fp32 summation differs. Against
    the exact x: the activation's rounding, 1e-5 to 1.2e-4 of the largest output here (int8 would be ~256×)."""
    g = torch.Generator().manual_seed(rows)
    for qt in samples(embedded):
        ref = reference_weight(qt)
        x = torch.randn(rows, qt.shape[1], generator=g)
        y = qt.matmul(x).double()
        scale = (x.double() @ ref.T).abs().max()
        rounded = round_activation(x).double() @ ref.T
        assert (y - rounded).abs().max() / scale < 2e-6, qt
        assert (y - x.double() @ ref.T).abs().max() / scale < 5e-4, qt


@needs_kernel
def test_rows_of_a_batch_are_independent_and_threads_give_the_same_bits(embedded):
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for qt in samples(embedded):
            x = torch.randn(20, qt.shape[1], generator=g)  # > 8 rows: the kernel 8 rows at a time
            torch.set_num_threads(1)
            one = qt.matmul(x)
            single = torch.cat([qt.matmul(x[i:i + 1]) for i in range(20)])
            torch.set_num_threads(2)
            assert torch.equal(qt.matmul(x), one), qt
            assert torch.equal(single, one), qt
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(1, 40), (3, 100), (7, 33), (5, 256)])
def test_rows_not_a_multiple_of_the_block_are_padded(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    for fmt in ("Q8_0", "Q4_1"):
        qt = QuantizedTensor.quantize(w, fmt)
        assert qt.shape == shape and qt.padded_in % 32 == 0
        ref = reference_weight(qt)
        for rows in (1, 9, 40):  # the kernel, the kernel twice, and the dequantized GEMM
            x = torch.randn(rows, shape[1], generator=g)
            y = QuantizedLinear(qt)(x)
            assert y.shape == (rows, shape[0])
            torch.testing.assert_close(y.double(), x.double() @ ref.T, rtol=1e-4, atol=1e-3)  # N(0, 1) weights


@needs_kernel
def test_non_finite_inputs_and_scales_stay_non_finite(embedded):
    """In every format's product (the int16 route of Q8_0 and the byte route of the others): a NaN or inf in
    x makes its row's outputs NaN, an inf block scale in W makes that output non-finite, and nothing else."""
    for qt in samples(embedded):
        x = torch.randn(3, qt.shape[1])
        x[1, 5], x[2, 7] = float("nan"), float("inf")
        y = qt.matmul(x)
        assert torch.isfinite(y[0]).all() and y[1].isnan().all() and y[2].isnan().all(), qt
        broken = qt.data.clone()
        at = 208 if qt.format.name == "Q6_K" else 0  # the f16 d of row 0's first block
        broken[0, at:at + 2] = torch.tensor(np.array([np.inf], dtype="<f2").view(np.uint8))
        y = QuantizedTensor(qt.format.name, broken.reshape(-1), qt.shape).matmul(torch.randn(1, qt.shape[1]))
        assert not torch.isfinite(y[0, 0]) and torch.isfinite(y[0, 1:]).all(), qt


def test_bad_shapes_and_formats_are_rejected():
    with pytest.raises(CheckpointError, match="must be 68 bytes"):
        QuantizedTensor("Q8_0", torch.zeros(67, dtype=torch.uint8), (2, 32))
    with pytest.raises(CheckpointError, match="no native kernel for Q3_K"):
        QuantizedTensor("Q3_K", torch.zeros(110, dtype=torch.uint8), (1, 256))
    qt = QuantizedTensor.quantize(torch.randn(4, 64), "Q8_0")
    with pytest.raises(Gemma3Error, match="expected 64"):
        qt.matmul(torch.randn(1, 63))
    with pytest.raises(Gemma3Error, match=r"row ids must be in \[0, 4\)"):
        qt.dequantize(torch.tensor([0, 4]))  # never a read past the blocks
    with pytest.raises(Gemma3Error, match="row ids"):
        QuantizedEmbedding(qt)(torch.tensor([[-1]]))
    with pytest.raises(Gemma3Error, match="NaN or inf"):
        QuantizedTensor.quantize(torch.tensor([[float("nan")] * 32]), "Q8_0")
    with pytest.raises(Gemma3Error, match="cannot quantize to Q6_K"):
        QuantizedTensor.quantize(torch.randn(4, 256), "Q6_K")
    lib = kernels.library()
    if lib is not None:  # the C entry points check what they are given as well
        y = torch.empty(4)
        assert lib.gemma3_q_linear(99, qt.data.data_ptr(), 34 * 2, 4, 64, torch.zeros(64).data_ptr(), 1, y.data_ptr()) == -1
        assert lib.gemma3_q_linear(8, qt.data.data_ptr(), 34 * 2, 4, 60, torch.zeros(64).data_ptr(), 1, y.data_ptr()) == -1
        assert lib.gemma3_q_linear(8, qt.data.data_ptr(), 34 * 2, 4, 64, torch.zeros(64 * 9).data_ptr(), 9,
                                   torch.empty(36).data_ptr()) == -1


def test_q4_1_fit_beats_min_max_and_the_fallback_gives_the_same_blocks():
    """Q4_1 by a least-squares fit of each block's scale and min (kernels/quantize.c): a smaller error than gguf-py's
    min/max blocks on the same weights, exact on blocks that are constant or already on a 16-level grid, and
    the torch fallback gives the same bytes (but for rare ties in the last rounding)."""
    import gguf as gguf_py

    from gemma3.accel.quantize import _fit_q4_1_torch, fit_q4_1

    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 320, generator=g) * 0.05
    w[0] = 0.0
    w[1, :32] = -0.25  # constant block
    w[2, :32] = 0.01 * torch.randint(0, 16, (32,), generator=g) - 0.03  # a 16-level grid, all levels used or not
    fitted = QuantizedTensor.quantize(w, "Q4_1")
    minmax = QuantizedTensor("Q4_1", torch.from_numpy(gguf_py.quants.quantize(
        w.numpy(), gguf_py.GGMLQuantizationType.Q4_1)).reshape(-1), tuple(w.shape))
    err_fit = (fitted.dequantize() - w).pow(2).mean()
    err_minmax = (minmax.dequantize() - w).pow(2).mean()
    assert err_fit < 0.9 * err_minmax
    back = fitted.dequantize()
    assert back[0].abs().max() == 0 and torch.equal(back[1, :32], w[1, :32])
    torch.testing.assert_close(back[2, :32], w[2, :32], rtol=0, atol=2e-4)  # fp16 scale and min
    if kernels.library() is not None:
        same = (fit_q4_1(w) == _fit_q4_1_torch(w)).all(dim=1).float().mean()
        assert same > 0.999


@needs_kernel
def test_q8_0_kernel_writes_gguf_py_bytes():
    """kernels/quantize.c's Q8_0 is gguf-py's (llama.cpp's reference) byte for byte: random scales over many
    magnitudes, zero blocks, exact halves (round half away from zero), a tiny scale (fp16 subnormal) and one at
    fp16's top."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-6, 2, 64)[:, None]
    w[0] = 0.0
    w[1, :32] = torch.arange(-16, 16) + 0.5
    w[1, 0] = 127.0  # d = 1: every other value is an exact half
    w[2, :32] = 3e-6 * torch.randn(32, generator=g)  # d below fp16's smallest normal
    w[3, 40] = 65504.0
    ours = QuantizedTensor.quantize(w, "Q8_0").data.reshape(-1).numpy()
    ref = gguf_py.quants.quantize(w.numpy(), gguf_py.GGMLQuantizationType.Q8_0).reshape(-1)
    assert (ours == ref).all()


def test_importance_weighted_q4_1_fits_the_important_columns_closer():
    """With an importance per column (gemma3/imatrix.py), the fit trades error in columns that matter little for
    error in those that matter: the weighted error falls, and the torch fallback gives the same blocks."""
    from gemma3.accel.quantize import _fit_q4_1_torch, fit_q4_1

    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, 96, generator=g) * 0.05
    importance = torch.ones(96)
    importance[::8] = 100.0  # a few loud input channels, as in the residual stream
    plain = QuantizedTensor.quantize(w, "Q4_1").dequantize()
    weighted = QuantizedTensor.quantize(w, "Q4_1", importance).dequantize()

    def cost(back):
        return float(((back - w) ** 2 * importance).sum())

    assert cost(weighted) < 0.7 * cost(plain)
    assert (weighted - w)[:, ::8].pow(2).mean() < 0.5 * (plain - w)[:, ::8].pow(2).mean()
    odd = QuantizedTensor.quantize(w[:, :80], "Q4_1", importance[:80])  # padded to 96 columns, importance too
    assert odd.shape == (64, 80)
    if kernels.library() is not None:
        same = (fit_q4_1(w, importance) == _fit_q4_1_torch(w, importance)).all(dim=1).float().mean()
        assert same > 0.999
    for bad in (torch.ones(95), -importance, importance * float("nan")):
        with pytest.raises(Gemma3Error, match="importance"):
            fit_q4_1(w, bad)


def test_imatrix_is_the_mean_square_of_each_projection_input():
    """imatrix.collect: per projection, E[x_j²] of its input over the calibration tokens — checked on layer 0,
    whose q/k/v input is the first norm of the scaled embeddings — and the calibration text is real text."""
    from gemma3.accel import imatrix

    model = _tiny_model(torch.float32)
    ids = [2] + list(range(5, 40))
    imp = imatrix.collect(model, ids)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(imp) == {f"{n}.weight" for n in names}
    with torch.inference_mode():
        h = model.embed_tokens(torch.tensor([ids])) * torch.tensor(model.config.hidden_size ** 0.5)
        x = model.layers[0].input_layernorm(h)[0]
    expected = (x.double() ** 2).mean(0).float()
    torch.testing.assert_close(imp["layers.0.self_attn.q_proj.weight"], expected, rtol=1e-4, atol=1e-7)
    assert torch.equal(imp["layers.0.self_attn.q_proj.weight"], imp["layers.0.self_attn.v_proj.weight"])
    assert all(bool((v > 0).all()) for v in imp.values())
    assert len(imatrix.calibration_text()) > 4000
    with pytest.raises(Gemma3Error, match="at least 2 tokens"):
        imatrix.collect(model, [2])


def test_many_rows_take_a_tiled_dequantized_gemm(monkeypatch):
    g = torch.Generator().manual_seed(2)
    qt = QuantizedTensor.quantize(torch.randn(300, 64, generator=g), "Q4_1")
    x = torch.randn(40, 64, generator=g)  # more than MAX_DECODE_ROWS
    whole = qt.matmul(x)
    torch.testing.assert_close(whole, F.linear(x, qt.dequantize()), rtol=0, atol=0)
    monkeypatch.setattr("gemma3.accel.quantize.GEMM_TILE_BYTES", 64 * 4 * 7)  # 7 rows a tile
    torch.testing.assert_close(qt.matmul(x), whole, rtol=1e-5, atol=1e-5)  # GEMM blocking sums differently


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setenv("GEMMA3_NATIVE_KERNELS", "0")
    kernels._library.cache_clear()
    yield
    monkeypatch.delenv("GEMMA3_NATIVE_KERNELS")
    kernels._library.cache_clear()


@needs_kernel
def test_torch_fallback_equals_the_kernel_within_rounding(embedded, no_kernels):
    from gemma3.accel.quantize import kernel_note

    g = torch.Generator().manual_seed(3)
    cases = [(qt, torch.randn(3, qt.shape[1], generator=g)) for qt in samples(embedded)]
    assert "torch fallback" in kernel_note()
    fallback = [(qt.matmul(x), qt.dequantize()) for qt, x in cases]
    kernels._library.cache_clear()
    import os

    os.environ["GEMMA3_NATIVE_KERNELS"] = "1"
    assert kernels.available() and kernel_note() is None
    for (qt, x), (y, w) in zip(cases, fallback):
        native = qt.matmul(x)
        assert torch.equal(qt.dequantize(), w)
        torch.testing.assert_close(native, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_round_activation_matches_the_kernel():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 96, generator=g) * torch.logspace(-3, 3, 96)
    x[1, :32] = 0.0
    x[2, 40] = float("nan")
    ours = round_activation(x)
    assert torch.equal(ours[1, :32], torch.zeros(32)) and ours[2, 32:64].isnan().all()
    assert (ours[0] - x[0]).abs().max() <= x[0].abs().max() / 32639
    lib = kernels.library()
    if lib is not None:
        out = torch.empty_like(x)
        assert lib.gemma3_q_round_activation(x.data_ptr(), 3, 96, out.data_ptr()) == 0
        assert torch.equal(out.nan_to_num(7.0), ours.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------- modules
@torch.no_grad()
def test_quantized_model_is_close_to_float_and_holds_no_float_matrices():
    model = _tiny_model(torch.float32)
    ids = torch.randint(0, 512, (2, 9))
    plain = model(ids).logits
    state = quantize_state(model.state_dict(), "int8")
    assert sum(isinstance(t, QuantizedTensor) for t in state.values()) == 1 + 7 * 2
    quantized = random_model(model.config)
    from gemma3.accel.quantize import split_state

    floats, blocks = split_state(state)
    quantize_model(quantized, blocks, torch.float32)
    quantized.load_state_dict(floats, strict=True)
    assert is_quantized(quantized) and isinstance(quantized.embed_tokens, QuantizedEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    got = quantized(ids).logits
    assert (got - plain).abs().max() < 0.02 * plain.abs().max()
    assert torch.equal(quantized.embed_tokens(ids[:, :2]).reshape(-1, 64),
                       blocks["embed_tokens.weight"].dequantize(ids[:, :2].reshape(-1)))


def test_quantize_rejects_unknown_schemes_and_mismatched_shapes():
    model = _tiny_model(torch.float32)
    with pytest.raises(Gemma3Error, match="unknown quantization"):
        quantize_state(model.state_dict(), "int3")
    wrong = QuantizedTensor.quantize(torch.randn(10, 64), "Q8_0")
    with pytest.raises(CheckpointError, match="does not match"):
        quantize_model(model, {"layers.0.self_attn.q_proj.weight": wrong}, torch.float32)
    with pytest.raises(CheckpointError, match="only projections"):
        quantize_model(model, {"norm.weight": wrong}, torch.float32)


def test_quantize_on_cuda_is_a_clear_error():
    from gemma3.loading import check_quantize

    with pytest.raises(Gemma3Error, match="CPU only"):
        check_quantize("int8", "cuda")
    with pytest.raises(Gemma3Error, match="choose none"):
        check_quantize("int2")
    check_quantize(None, "cuda")  # the default: a GGUF is dequantised on CUDA


# ---------------------------------------------------------------------------------------------- fused decode ops
@needs_kernel
def test_fused_rms_norm_and_decode_attention_match_torch():
    lib = kernels.library()
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 640, generator=g) * 30, torch.randn(640, generator=g)
    out, gain = torch.empty_like(x), 1 + w
    lib.gemma3_rms_norm(x.data_ptr(), gain.data_ptr(), 3, 640, 1e-6, out.data_ptr())
    torch.testing.assert_close(out, F.rms_norm(x, (640,), gain, 1e-6), rtol=2e-6, atol=2e-6)
    # 512 and 700 keys: two and three parts of 256 (kernels/decode.c), a part wholly masked in one row
    for B, KH, G, S, hd in ((1, 1, 4, 512, 256), (2, 2, 3, 37, 20), (1, 4, 1, 1, 128), (2, 1, 4, 700, 64)):
        q = torch.randn(B, KH, G, hd, generator=g)
        buf = torch.randn(2, B, KH, S + 5, hd, generator=g)  # a cache with room for more keys
        k, v = buf[0, :, :, :S], buf[1, :, :, :S]
        mask = torch.rand(B, S, generator=g) > 0.3
        mask[:, 0] = True
        if S == 700:
            mask[0, 256:512] = False  # row 0's second part sees nothing
            mask[1, 600:] = False  # row 1 ends early: its third part is short
        got, m8 = torch.empty_like(q), mask.to(torch.uint8)
        assert lib.gemma3_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, KH, G, S, hd, k.stride(0),
                                           k.stride(1), m8.data_ptr(), 0.0625, got.data_ptr()) == 0
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.0625)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    m8.zero_()  # a query that sees nothing: NaN, as SDPA gives
    lib.gemma3_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, KH, G, S, hd, k.stride(0), k.stride(1),
                                m8.data_ptr(), 0.0625, got.data_ptr())
    assert got.isnan().all()


def test_fused_gelu_matches_torch():
    """GeGLU's gelu_tanh(g) · u as the fused decode step computes it (kernels/decode.c): as close to an fp64
    gelu as torch's own fp32 one, signs and non-finite values kept."""
    lib = kernels.library()
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(9)) * 4, torch.linspace(-40, 40, 10_001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan")])])
    u = torch.rand_like(x) + 0.5
    out = torch.empty_like(x)
    lib.gemma3_gelu_tanh_mul(x.data_ptr(), u.data_ptr(), x.numel(), out.data_ptr())
    exact = F.gelu(x.double(), approximate="tanh") * u.double()
    scale = exact.abs().clamp(min=1.0)  # relative error, absolute below 1
    ours = (out.double() - exact).abs() / scale
    theirs = (F.gelu(x, approximate="tanh").double() * u.double() - exact).abs() / scale
    finite = exact.isfinite()
    print(f"max error: ours {ours[finite].max():.2e}, torch's {theirs[finite].max():.2e}")
    assert ours[finite].max() <= 2 * theirs[finite].max()
    assert torch.equal(out[-7:-3], F.gelu(x[-7:-3], approximate="tanh") * u[-7:-3])  # ±0 and tiny values exactly
    assert out[-3] == float("inf") and out[-2].isnan() == F.gelu(x[-2:-1], approximate="tanh").isnan().item()
    assert out[-1].isnan()


def test_int4_load_calibrates_with_the_tokenizer_or_says_it_cannot(tiny_hf_dir, tmp_path, capsys):
    """--quantize int4 measures the importance matrix on the calibration text with the source's tokenizer; a
    checkpoint without one is quantized unweighted, with a one-line notice. down_proj is Q8_0 in the layers
    llama.cpp gives it more bits (of 2 layers: the last)."""
    import shutil

    from gemma3.loading import load, load_weights
    from gemma3.accel.quantize import more_bits_layer

    _, calibrated, _, _ = load_weights(tiny_hf_dir, quantize="int4", progress=True)
    assert "calibrating --quantize int4 on 64 tokens" in capsys.readouterr().err  # capped at the context
    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf_dir, bare)
    for name in bare.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            name.unlink()
    _, plain, _, _ = load_weights(bare, quantize="int4", progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer to calibrate with" in err[0]
    formats = {n: t.format.name for n, t in calibrated.items() if isinstance(t, QuantizedTensor)}
    assert [more_bits_layer(i, 2) for i in range(2)] == [False, True]
    assert formats["layers.0.mlp.down_proj.weight"] == "Q4_1" and formats["layers.1.mlp.down_proj.weight"] == "Q8_0"
    assert formats["layers.0.self_attn.k_proj.weight"] == "Q8_0" and formats["embed_tokens.weight"] == "Q8_0"
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(calibrated[q].data, plain[q].data)  # the importance changed the fit
    model, tokenizer, _ = load(tiny_hf_dir, quantize="int4", progress=False)
    assert tokenizer is not None and is_quantized(model)
