"""The model against the reference (transformers' Gemma3ForCausalLM) on identical random weights.

Each config is chosen to exercise a path others got wrong: sequences longer than the sliding window,
27B's query_pre_attn_scalar, the ×8 RoPE scaling on global layers only, trailing sliding layers, GQA with
several KV heads, left padding, bf16 rounding of the embedding scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3.config import GLOBAL, SLIDING, Gemma3Config, hybrid_layer_types
from gemma3.errors import Gemma3Error
from gemma3.model import Gemma3Model, RMSNorm, attention_mask
from reference import bf16_ulps, hf_model_like, native_model, random_model, set_attention_implementation, unpack_model

torch.set_num_threads(2)


def small(**overrides) -> Gemma3Config:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                max_position_embeddings=256)
    base.update(overrides)
    base.setdefault("layer_types", hybrid_layer_types(base["num_hidden_layers"]))
    return Gemma3Config(**base)


FAMILY = {
    # 270M / 1B shape: MQA, 8 layers = globals at 5 then trailing sliding layers 6, 7 (as 1B's 24, 25)
    "1b-like-mqa-trailing-sliding": small(),
    # 4B / 12B: GQA with several KV heads and linear ×8 RoPE scaling on global layers only
    "4b-like-gqa-rope-scaling": small(num_attention_heads=8, num_key_value_heads=4, rope_scaling_factor=8.0),
    # 27B: head_dim 128 with query_pre_attn_scalar 168 (= d/H, not hd), GQA, scaling, trailing sliding
    "27b-like-qpas-168": small(hidden_size=336, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                               query_pre_attn_scalar=168, rope_scaling_factor=8.0),
    # 12B: last layer global (L = 12), GQA 4:2
    "12b-like-last-global": small(num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
                                  rope_scaling_factor=8.0),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(FAMILY))
def test_parity_small_configs_past_window(name):
    config = FAMILY[name]
    model = random_model(config)
    ref = hf_model_like(model)
    ids = torch.randint(0, config.vocab_size, (2, 48))  # 6× the window of 8
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_parity_270m_exact_config_600_tokens():
    config = Gemma3Config()  # the 270M preset: window 512
    model = random_model(config, norm_scale=0.3)
    ref = hf_model_like(model)
    ids = torch.randint(0, config.vocab_size, (1, 640))
    ours = model(ids).logits
    theirs = ref(ids).logits
    assert ours.shape == (1, 640, 262_144)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the tail past the window is where a missing or off-by-one window shows: make sure it is not trivial
    assert ours[0, 600:].std() > 1e-3


@pytest.mark.parametrize("name", ["1b-like-mqa-trailing-sliding", "4b-like-gqa-rope-scaling"])
def test_inference_prefill_in_query_blocks_matches_reference(name):
    """Without autograd, a plain causal prefill of T >= 256 runs attention in blocks of 128 queries
    (gemma3.accel's CPUAttention._causal_in_blocks); with it, one SDPA call. Both match the reference, with
    a last block that is not full (T = 300)."""
    from gemma3.accel import accelerate

    config = FAMILY[name].replace(sliding_window=512)
    model = random_model(config)
    ref = hf_model_like(model)
    accelerate(model, native=False)
    ids = torch.randint(0, config.vocab_size, (2, 300))
    with torch.no_grad():
        blocked, theirs = model(ids).logits, ref(ids).logits
    single = model(ids).logits.detach()  # grad enabled: the single causal call
    torch.testing.assert_close(blocked, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked, single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sliding_window_matters():
    """Guard against a parity test that cannot fail: without the window the logits past it must differ."""
    config = small()
    model = random_model(config)
    unwindowed = random_model(config.replace(sliding_window=1000))
    unwindowed.load_state_dict(model.state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 40))
    windowed, full = model(ids).logits[0], unwindowed(ids).logits[0]
    torch.testing.assert_close(windowed[:8], full[:8])  # identical while the window holds everything
    assert not torch.allclose(windowed[10:], full[10:], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("name", ["1b-like-mqa-trailing-sliding", "4b-like-gqa-rope-scaling"])
def test_left_padded_batch_rows_equal_single_runs(name):
    config = FAMILY[name]
    model = random_model(config)
    ref = hf_model_like(model)
    lengths = [41, 30, 12]
    prompts = [torch.randint(1, config.vocab_size, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):], mask[row, T - len(p):] = p, 1
    batched = model(ids, padding_mask=mask).logits
    hf_positions = (mask.cumsum(1) - 1).clamp(min=0)
    hf_batched = ref(ids, attention_mask=mask, position_ids=hf_positions).logits
    for row, p in enumerate(prompts):
        alone = model(p[None]).logits[0]
        torch.testing.assert_close(batched[row, T - len(p):], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf_batched[row, T - len(p):], alone, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_eager_and_sdpa_equal():
    config = FAMILY["4b-like-gqa-rope-scaling"]
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    sdpa = model(ids, padding_mask=mask).logits
    set_attention_implementation(model, "eager")
    eager = model(ids, padding_mask=mask).logits
    torch.testing.assert_close(sdpa[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[1, 9:], eager[1, 9:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", list(FAMILY))
def test_bf16_parity(name):
    """In bf16 the reference runs the same operations in the same order (SDPA on both sides, the norms' gain
    (1 + w) in fp32 and one cast at the end, sqrt(d) rounded to bf16), so the logits are equal bit for bit. A
    difference of one bf16 ulp anywhere upstream shows here: the cast-order mistake model.py warns about (the
    gain in bf16, or x̂ cast before the multiply) and an unrounded sqrt(d) (the 27B-like config's d = 336) each
    move most logits; the old bound of 0.02 × max|logit| caught the first by a hair and missed the second
    (docs/exactness.md has the figures)."""
    config = FAMILY[name]
    model = random_model(config, dtype=torch.bfloat16)
    ref = hf_model_like(model, attn="sdpa")
    ids = torch.randint(0, config.vocab_size, (2, 40))  # 5× the window of 8
    ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs), f"{(ours != theirs).sum()} of {ours.numel()} logits differ, " \
                                      f"by up to {bf16_ulps(ours, theirs).max():.0f} bf16 ulps"
    # Against fp32 the operations differ (every bf16 rounding, 8 layers deep): measured 16–34 ulps at the row's
    # scale over these four configs × 3 seeds. A sanity bound only; the equality above is the exact check.
    fp32 = random_model(config)
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    exact = fp32(ids).logits
    assert bf16_ulps(ours, exact).max() <= 64
    assert not torch.equal(ours.float(), exact)  # it did run in bf16


def test_embedding_scale_rounded_to_weight_dtype():
    """sqrt(640) = 25.298, rounded to bf16 is 25.25 as in the reference (pitfall 3)."""
    config = Gemma3Config(vocab_size=300, hidden_size=640, intermediate_size=8, num_hidden_layers=1,
                          layer_types=(SLIDING,), num_attention_heads=1, head_dim=8)
    model = Gemma3Model(config).to(torch.bfloat16)
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1.0)
        captured = {}
        model.layers[0].input_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
        model(torch.tensor([[1]]))
    assert captured["x"].flatten()[0].item() == 25.25


def test_rmsnorm_zero_centred_fp32():
    norm = RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(norm(x), x / x.pow(2).mean().add(1e-6).sqrt())  # zero weight = gain 1
    with torch.no_grad():
        norm.weight.fill_(1.0)
    torch.testing.assert_close(norm(x), 2 * x / x.pow(2).mean().add(1e-6).sqrt())


def test_packed_norm_gain_follows_weight_changes():
    """The packed norm reuses its fp32 gain (1 + w) without autograd; it must never be stale."""
    from gemma3.accel.native import NativeRMSNorm

    plain = RMSNorm(8).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.normal_()
    norm = NativeRMSNorm(plain)
    assert norm.weight is plain.weight
    x = torch.randn(3, 8).to(torch.bfloat16)
    trained = plain(x)
    with torch.inference_mode():
        assert torch.equal(norm(x), trained)
        norm.weight.add_(1.0)  # in place: same storage, new version
        changed = norm(x)
        assert not torch.equal(changed, trained) and torch.equal(changed, plain(x))
        norm.load_state_dict({"weight": torch.zeros(8)})  # copied in: new version again
        assert torch.equal(norm(x), F.rms_norm(x.float(), (8,), eps=1e-6).to(torch.bfloat16))
    norm.weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))  # replaced: new storage
    with torch.no_grad():
        assert torch.equal(norm(x), (2 * F.rms_norm(x.float(), (8,), eps=1e-6)).to(torch.bfloat16))


@torch.no_grad()
def test_pack_model_swaps_modules_and_unpack_restores_them():
    """model.py never packs; gemma3.accel swaps modules in from outside, keeping every Parameter (the state dict
    is unchanged), and the plain modules can be put back (the tests' unpack_model)."""
    from gemma3.accel.attention import CPUAttention
    from gemma3.accel.native import NativeRMSNorm, PackedLinear

    model = random_model(FAMILY["1b-like-mqa-trailing-sliding"])
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (1, 12))
    plain = model(ids).logits
    native_model(model)
    attn = model.layers[0].self_attn
    assert isinstance(attn, CPUAttention) and isinstance(attn.q_proj, PackedLinear)
    assert isinstance(attn.q_norm, NativeRMSNorm) and isinstance(model.norm, NativeRMSNorm)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=1e-5)
    unpack_model(model)
    assert not any(type(m).__module__.startswith("gemma3.accel") for m in model.modules())
    assert torch.equal(model(ids).logits, plain)


def test_accelerate_native_after_a_plain_acceleration_takes_the_native_attention():
    """accelerate(native=False) (the lm-eval harness) and then accelerate() (a Generator) on the same model: the
    second decision holds, whatever came first."""
    from gemma3 import kernels
    from gemma3.accel import accelerate

    model = random_model(FAMILY["1b-like-mqa-trailing-sliding"])
    accelerate(model, native=False)
    assert all(layer.self_attn._lib is None for layer in model.layers)
    accelerate(model, native=True)
    assert all(layer.self_attn._lib is kernels.library() for layer in model.layers)


@torch.no_grad()
def test_packed_weights_stop_matching_when_weights_change():
    """A packed copy is used only while the weights are the ones it was made from."""
    model = random_model(FAMILY["4b-like-gqa-rope-scaling"])
    ids = torch.randint(0, 300, (1, 12))
    plain = model(ids).logits
    native_model(model)
    torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=1e-5)
    q_proj = model.layers[0].self_attn.q_proj
    q_proj.weight.mul_(2.0)  # in place: the packed copy is stale
    assert not q_proj.usable()
    changed = model(ids).logits
    assert not torch.allclose(changed, plain)
    q_proj.weight = torch.nn.Parameter(q_proj.weight / 2.0)  # replaced by another tensor
    assert not q_proj.usable()
    unpack_model(model)
    torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=1e-5)
    model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    torch.testing.assert_close(model(ids).logits, changed, atol=1e-5, rtol=1e-5)


def test_attention_mask_window_semantics():
    """Sliding window W: query i sees keys i - W < j <= i (W keys including itself)."""
    pos = torch.arange(6)[None]
    mask = attention_mask(pos, pos, window=3)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert attention_mask(pos, pos, None)[0, 0, 5].all()
    padded = torch.tensor([[-1, -1, 0, 1]])
    m = attention_mask(padded, padded, None)[0, 0]
    assert m[3].tolist() == [False, False, True, True]


@torch.no_grad()
def test_loss_matches_reference_and_is_chunked():
    config = FAMILY["4b-like-gqa-rope-scaling"]
    model = random_model(config)
    ref = hf_model_like(model)
    ids = torch.randint(0, config.vocab_size, (2, 30))
    labels = ids.clone()
    labels[0, :5] = -100
    ours = model(ids, labels=labels)
    assert ours.logits is None
    theirs = ref(ids, labels=labels).loss
    torch.testing.assert_close(ours.loss, theirs, atol=1e-5, rtol=1e-5)
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    model(ids)
    torch.testing.assert_close(model.loss(hidden["h"], labels, chunk_size=7), theirs, atol=1e-5, rtol=1e-5)


def test_loss_backward_and_gradient_checkpointing_agree():
    config = small()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    grads = []
    for ckpt in (False, True):
        model = random_model(config).train()
        model.gradient_checkpointing = ckpt
        model(ids, labels=ids).loss.backward()
        grads.append(model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("name, total, embedding", [
    ("270m", 268_098_176, 167_772_160),
    ("1b", 999_885_952, 301_989_888),
    ("4b", 3_880_263_168, 671_252_480),
    ("12b", 11_766_034_176, 1_006_878_720),
    ("27b", 27_009_346_304, 1_409_630_208),
])
def test_preset_parameter_counts_on_meta(name, total, embedding):
    from gemma3.config import get_preset

    config = get_preset(name)
    with torch.device("meta"):
        model = Gemma3Model(config)
    assert model.num_parameters() == total == config.num_parameters()
    assert model.embed_tokens.weight.numel() == embedding
    assert all(p.device.type == "meta" for p in model.parameters())


def test_building_on_meta_draws_nothing():
    """A model built on the meta device to load weights into draws no initial values: drawing on meta pulls in
    torch's Python reference kernels (torch._dynamo and ~800 modules), a second of every load."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom gemma3.config import get_preset\nfrom gemma3.model import Gemma3Model\n"
            "with torch.device('meta'):\n    Gemma3Model(get_preset('270m'))\n"
            "assert 'torch._dynamo' not in sys.modules, 'the meta build drew values'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_meta_build_then_assign_weights():
    config = small()
    source = random_model(config)
    with torch.device("meta"):
        model = Gemma3Model(config)
    model.load_state_dict(source.state_dict(), assign=True)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits)
    assert model.embed_tokens.weight.data_ptr() == source.embed_tokens.weight.data_ptr()  # no second copy


def test_logits_to_keep_last_only():
    config = small()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])


@pytest.mark.parametrize("bad", [-1, 300, 10**6])
def test_token_ids_out_of_range(bad):
    model = random_model(small())
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(Gemma3Error, match=r"input_ids contains token id .*outside the vocabulary \[0, 300\)"):
        model(ids)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_loss_gradients_equal_plain_cross_entropy(softcap):
    """The training loss head (gemma3.train.loss) computes its gradients in the forward pass; they must equal
    autograd's."""
    from gemma3.train.loss import use_fused_loss

    config = small(final_logit_softcapping=softcap)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    labels = ids.clone()
    labels[1, :7] = -100
    grads = []
    for chunked in (True, False):
        model = random_model(config).train()
        if chunked:
            use_fused_loss(model)
        if chunked:
            loss = model(ids, labels=labels).loss
        else:
            logits = model(ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), model.embed_tokens.weight.grad.clone(),
                      model.layers[0].mlp.up_proj.weight.grad.clone()))
    for ours, plain in zip(*grads):
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the contract of each piece, on hand-made inputs
def test_rotary_tables_at_known_positions_with_padding_as_position_zero():
    """cos and the signed sin [-sin, sin] of angle p · base^(-2i/hd) / factor; padding (-1) rotates as position 0."""
    from gemma3.model import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=4, base=100.0, scaling_factor=2.0)
    cos, sin = rope(torch.tensor([[-1, 0, 3]]), torch.float64)
    assert cos.shape == sin.shape == (1, 3, 1, 4) and cos.dtype == sin.dtype == torch.float64
    angles = torch.tensor([3 / 2, 3 / 20], dtype=torch.float64)  # position 3: inv_freq 1 and 1/10, halved
    torch.testing.assert_close(cos[0, 2, 0], angles.cos().repeat(2), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[0, 2, 0], torch.cat([-angles.sin(), angles.sin()]), atol=1e-7, rtol=0)
    assert cos[0, :2].eq(1).all() and sin[0, :2].eq(0).all()


def test_rotary_tables_are_fp32_whatever_the_default_dtype():
    """The angles are computed in fp32 as the reference does (its inv_freq is `.float()`), also under
    torch.set_default_dtype(float64): fp64 angles at position 10^5 round to other fp32 tables."""
    from gemma3.model import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=256, base=1e6)
    positions = torch.tensor([[0, 7, 4093, 100_003]])
    want = rope(positions, torch.float32)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = rope(positions, torch.float32)
    finally:
        torch.set_default_dtype(before)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_rotary_extra_repr_names_base_and_scaling():
    model = Gemma3Model(small(rope_scaling_factor=8.0))
    assert model.rope[SLIDING].extra_repr() == "head_dim=32, base=10000, scaling_factor=1"
    assert model.rope[GLOBAL].extra_repr() == "head_dim=32, base=1e+06, scaling_factor=8"


def test_apply_rotary_rotates_each_pair_of_halves():
    """Dim j pairs with dim j + hd/2 (rotate-half): (a, b) at angle θ goes to (a cos θ - b sin θ, b cos θ + a sin θ)."""
    from gemma3.model import RotaryEmbedding, apply_rotary

    cos, sin = RotaryEmbedding(head_dim=4, base=100.0)(torch.tensor([[5]]), torch.float64)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    theta = torch.tensor([5.0, 0.5], dtype=torch.float64)
    a, b = x[0, 0, 0, :2], x[0, 0, 0, 2:]
    want = torch.cat([a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()])
    torch.testing.assert_close(apply_rotary(x, cos, sin)[0, 0, 0], want, atol=1e-6, rtol=0)  # angles in fp32


def test_attention_mask_documents_and_dead_rows():
    """Packed documents see only themselves; a query that may see nothing (padding) is given key slot 0 alone, and
    the real rows keep exactly their mask."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    docs = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])
    mask = attention_mask(pos, pos, window=2, documents=docs)
    assert mask.shape == (1, 1, 7, 7)
    assert mask[0, 0, 2].tolist() == [False, True, True, False, False, False, False]
    assert mask[0, 0, 3].tolist() == [False, False, False, True, False, False, False]
    assert mask[0, 0, 6].tolist() == [False, False, False, False, False, True, True]
    padded = torch.tensor([[-1, 0, 1], [0, 1, 2]])
    mask = attention_mask(padded, padded, None)[:, 0]
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("positions, documents", [
    ([[0]], None),
    ([[0, 1, 2]], None),
    ([[-1, -1, 0, 1]], [[0, 0, 1, 1]]),  # left padding: document 0, never seen (position -1)
    ([[0, 0]], [[1, 2]]),
    ([[0, 1, 0]], [[1, 1, 2]]),
    ([[0, 1, 0, 1, 2, 0]], [[1, 1, 2, 2, 2, 3]]),
    ([[0, 1, 2], [0, 1, 0]], [[1, 1, 1], [1, 1, 2]]),  # one packed row makes the whole batch packed
])
def test_packed_documents_numbers_each_restart_at_position_zero(positions, documents):
    from gemma3.model import packed_documents

    got = packed_documents(torch.tensor(positions))
    assert (got if got is None else got.tolist()) == documents


def capture_masks(model):
    """The mask each layer's attention is called with, per layer index, filled by the next forward."""
    masks = {}
    for i, layer in enumerate(model.layers):
        layer.self_attn.register_forward_pre_hook(lambda m, args, i=i: masks.__setitem__(i, args[3]))
    return masks


@torch.no_grad()
def test_packed_rows_attend_within_each_document():
    """Positions that start again at 0 pack two documents into one row: each gives the logits it gives alone, the
    second one longer than the window, and the layers get a PackedMask with their own window for a kernel."""
    from gemma3.model import PackedMask

    config = small()
    model = random_model(config)
    first, second = torch.randint(0, config.vocab_size, (1, 5)), torch.randint(0, config.vocab_size, (1, 11))
    positions = torch.cat([torch.arange(5), torch.arange(11)])[None]
    alone = model(first).logits[0], model(second).logits[0]
    masks = capture_masks(model)
    packed = model(torch.cat([first, second], dim=1), positions=positions).logits[0]
    torch.testing.assert_close(packed[:5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[5:], alone[1], atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(model.layers):
        mask = masks[i]
        assert isinstance(mask, PackedMask) and torch.equal(mask.positions, positions) and mask.spans is None
        assert mask.window == (8 if layer.layer_type == SLIDING else None)
        want = attention_mask(positions, positions, mask.window, torch.tensor([[1] * 5 + [2] * 11]))
        assert torch.equal(mask.mask, want)


@torch.no_grad()
@pytest.mark.parametrize("T, padded, plain_causal", [(2, False, True), (8, False, True), (1, False, False),
                                                     (9, False, False), (6, True, False)])
def test_plain_prefill_passes_no_mask(T, padded, plain_causal):
    """The usual prefill (from position 0, no padding, no longer than the window) gives every layer mask None, so
    SDPA takes its is_causal path; anything else gets the explicit mask of its layer's kind."""
    from gemma3.model import dense, packed_documents

    config = small()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, T))
    padding = torch.ones_like(ids)
    if padded:
        padding[1, :2] = 0
    masks = capture_masks(model)
    model(ids, padding_mask=padding)
    positions = model._positions(ids, None, padding, None)
    for i, layer in enumerate(model.layers):
        if plain_causal:
            assert masks[i] is None
        else:
            window = config.sliding_window if layer.layer_type == SLIDING else None
            want = attention_mask(positions, positions, window, packed_documents(positions))
            assert torch.equal(dense(masks[i]), want)  # a padded row counts as packed: its padding is document 0


@torch.no_grad()
def test_cached_prefill_from_zero_passes_no_mask_and_the_next_chunk_a_mask():
    from gemma3.kv_cache import KVCache

    config = small()
    model = random_model(config)
    cache = KVCache(config, batch_size=1, max_seq_len=16)
    masks = capture_masks(model)
    model(torch.randint(0, config.vocab_size, (1, 4)), cache=cache)
    assert all(m is None for m in masks.values())
    model(torch.randint(0, config.vocab_size, (1, 3)), cache=cache)
    assert all(isinstance(m, torch.Tensor) for m in masks.values())


def test_positions_count_real_tokens_from_zero_and_pad_with_minus_one():
    model = Gemma3Model(small())
    ids = torch.ones(2, 4, dtype=torch.long)
    counted = model._positions(ids, None, None, None)
    assert counted.dtype == torch.long and counted.tolist() == [[0, 1, 2, 3]] * 2
    padding = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.int32)
    padded = model._positions(ids, None, padding, None)
    assert padded.dtype == torch.long and padded.tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]
    given = model._positions(ids, torch.tensor([[4, 5, 6, 7]] * 2, dtype=torch.int32), padding, None)
    assert given.dtype == torch.long and given.tolist() == [[4, 5, 6, 7]] * 2


def test_positions_continue_after_the_cache():
    from gemma3.kv_cache import KVCache

    config = small()
    model = random_model(config)
    cache = KVCache(config, batch_size=2, max_seq_len=16)
    with torch.no_grad():
        model(torch.ones(2, 3, dtype=torch.long), padding_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), cache=cache)
    ids = torch.ones(2, 2, dtype=torch.long)
    assert model._positions(ids, None, None, cache).tolist() == [[3, 4], [2, 3]]
    assert model._positions(ids, None, torch.tensor([[0, 1], [1, 1]]), cache).tolist() == [[-1, 3], [2, 3]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=torch.zeros(1, 4, dtype=torch.long)), "positions must have shape (1, 3), got (1, 4)"),
    (dict(padding_mask=torch.ones(3)), "padding_mask must have shape (1, 3), got (3,)"),
])
def test_positions_and_padding_mask_of_the_wrong_shape(kwargs, message):
    model = Gemma3Model(small())
    with pytest.raises(Gemma3Error) as error:
        model(torch.ones(1, 3, dtype=torch.long), **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("ids, message", [
    (torch.ones(3, dtype=torch.long), "input_ids must have shape (batch, seq_len), got (3,)"),
    (torch.ones(1, 1, 3, dtype=torch.long), "input_ids must have shape (batch, seq_len), got (1, 1, 3)"),
    (torch.ones(1, 3), "input_ids must be an integer tensor, got torch.float32"),
    (torch.ones(1, 3, dtype=torch.int16), "input_ids must be an integer tensor, got torch.int16"),
    (torch.tensor([[5, -1, 2]]), "input_ids contains token id -1, outside the vocabulary [0, 300)"),
    (torch.tensor([[5, 300, 2]]), "input_ids contains token id 300, outside the vocabulary [0, 300)"),
    (torch.tensor([[400, -3, 2]]), "input_ids contains token id -3, outside the vocabulary [0, 300)"),
    (torch.tensor([[0, 300, 2]]), "input_ids contains token id 300, outside the vocabulary [0, 300)"),
])
def test_bad_input_ids_are_one_clear_error(ids, message):
    model = Gemma3Model(small())
    with pytest.raises(Gemma3Error) as error:
        model(ids)
    assert str(error.value) == message


@torch.no_grad()
def test_int32_ids_the_last_vocabulary_row_and_an_empty_sequence_are_accepted():
    model = random_model(small())
    ids = torch.tensor([[0, 7, 299]])
    torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, atol=0, rtol=0)
    assert model(torch.zeros(2, 0, dtype=torch.long)).logits.shape == (2, 0, 300)
    model._check_ids(torch.zeros(1, 3, dtype=torch.long, device="meta"))  # no values to range-check on meta


@torch.no_grad()
def test_final_logit_softcap_matches_reference():
    """Gemma 2's final soft-capping (None in every Gemma 3 release, still read from config): tanh(x / cap) · cap on
    the logits, and the loss is taken over the capped logits."""
    config = small(final_logit_softcapping=0.2)
    model = random_model(config)
    ref = hf_model_like(model)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    ours = model(ids).logits
    torch.testing.assert_close(ours, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert 0.19 < ours.abs().max() < 0.2  # the cap bites (uncapped: 0.67; the loss moves by 4e-3)
    torch.testing.assert_close(model(ids, labels=ids).loss, ref(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_attention_softcap_caps_scores_before_the_mask():
    """Gemma 2's attention soft-capping, tanh(s / cap) · cap on the scaled scores, then the mask and the softmax.
    (transformers' Gemma 3 reads attn_logit_softcapping but never applies it, so the check is by hand.) A capped
    attention always takes the eager path, whatever `implementation` says."""
    config = small(num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                   attn_logit_softcapping=0.5)
    attn = random_model(config).layers[0].self_attn
    q, k = torch.randn(1, 4, 3, 8) * 3, torch.randn(1, 2, 3, 8) * 3
    mask = attention_mask(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 2]]), None)
    probs = attn.attention_probs(q, k, mask)  # (B, K, G·T, S)
    for h in range(4):
        scores = torch.tanh(q[0, h] @ k[0, h // 2].T * 8**-0.5 / 0.5) * 0.5
        want = scores.masked_fill(~mask[0, 0], float("-inf")).softmax(dim=-1)
        torch.testing.assert_close(probs[0, h // 2, (h % 2) * 3:(h % 2) * 3 + 3], want, atol=1e-6, rtol=1e-6)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    capped = model(ids).logits
    set_attention_implementation(model, "eager")
    assert torch.equal(model(ids).logits, capped)
    uncapped = random_model(config.replace(attn_logit_softcapping=None))
    assert not torch.allclose(uncapped(ids).logits, capped, atol=1e-2)


def test_chunked_cross_entropy_chunks_and_sums_in_fp32():
    """sum of per-row cross-entropy over softcap(attend(h)), `chunk_size` rows at a time, in fp32 whatever h's dtype
    (zero when there are no rows)."""
    from gemma3.model import chunked_cross_entropy

    weight = torch.randn(11, 6)
    h, targets = torch.randn(10, 6), torch.randint(0, 11, (10,))
    rows = []

    def attend(x):
        rows.append(x.shape[0])
        return F.linear(x, weight)

    for softcap in (None, 1.5):
        logits = h @ weight.T
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        want = F.cross_entropy(logits, targets, reduction="sum")
        rows.clear()
        torch.testing.assert_close(chunked_cross_entropy(attend, h, targets, softcap, 4), want, atol=1e-5, rtol=1e-6)
        assert rows == [4, 4, 2]
    rows.clear()
    half = chunked_cross_entropy(lambda x: F.linear(x, weight.bfloat16()), h.bfloat16(), targets, None, 3)
    assert half.dtype == torch.float32
    empty = chunked_cross_entropy(attend, h[:0].bfloat16(), targets[:0], None, 4)
    assert empty.dtype == torch.float32 and empty.item() == 0.0 and rows == []


def test_loss_is_computed_256_positions_at_a_time_by_default():
    config = small()
    model = random_model(config)
    rows = []
    attend = model.embed_tokens.attend
    model.embed_tokens.attend = lambda h: rows.append(h.shape[0]) or attend(h)
    ids = torch.randint(0, config.vocab_size, (3, 172))  # 3 · 171 = 513 targets
    labels = ids.clone()
    with torch.no_grad():
        model(ids, labels=labels)
        assert rows == [256, 256, 1]
        rows.clear()
        labels[0] = -100  # 342 targets left: the ignored ones are dropped before chunking
        model(ids, labels=labels)
        assert rows == [256, 86]


def test_loss_of_a_single_target_is_its_cross_entropy():
    model = random_model(small())
    ids = torch.randint(0, 300, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[1, 3] = 7  # predicted from row 1, position 2
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        logits = model(ids).logits
    torch.testing.assert_close(loss, F.cross_entropy(logits[1, 2], torch.tensor(7)), atol=1e-6, rtol=1e-6)


def test_loss_with_every_label_ignored_is_zero_with_a_graph():
    model = random_model(small()).train()
    ids = torch.randint(0, 300, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first label is never a target (shifted out)
    loss = model(ids, labels=labels).loss
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.eq(0).all()


def test_loss_in_bf16_is_fp32():
    model = random_model(small(), dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        logits = model(ids).logits.float()
    assert loss.dtype == torch.float32
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_tied_embedding_draws_initial_values_except_on_meta(monkeypatch):
    from gemma3.model import TiedEmbedding

    draws = []
    normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: draws.append(t.device.type) or normal(t, *a, **k))
    TiedEmbedding(10, 4)
    with torch.device("meta"):
        TiedEmbedding(10, 4)
    assert draws == ["cpu"]


def test_init_weights_normal_projections_zero_norms_from_the_generator():
    """N(0, initializer_range) for the embedding and every projection, from the generator given; every norm weight
    exactly zero (gain 1)."""
    config = small(initializer_range=0.05)
    model = random_model(config)  # random norms, to see them zeroed
    torch.manual_seed(123)
    model.init_weights(torch.Generator().manual_seed(7))
    again = Gemma3Model(config)
    torch.manual_seed(456)  # the global generator is not what draws
    again.init_weights(torch.Generator().manual_seed(7))
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
        if name.endswith("norm.weight"):
            assert p.eq(0).all(), name
        else:
            assert abs(p.mean().item()) < 0.005 and abs(p.std().item() - 0.05) < 0.004, name


def test_gradient_checkpointing_off_by_default_and_recomputes_only_in_training():
    config = small(num_hidden_layers=2)
    model = random_model(config)
    assert model.gradient_checkpointing is False
    model.gradient_checkpointing = True
    calls = []
    model.layers[0].register_forward_pre_hook(lambda m, args: calls.append(1))
    ids = torch.randint(0, 300, (1, 5))
    for training, forwards in ((False, 1), (True, 2)):
        calls.clear()
        model.train(training)
        model(ids, labels=ids).loss.backward()
        assert len(calls) == forwards


def test_gradient_checkpointing_with_a_frozen_embedding_still_trains_the_layers():
    """LoRA trains with the embedding frozen, so no input of a checkpointed layer needs a gradient: only the
    non-reentrant checkpoint still takes the layers' parameters into the graph."""
    model = random_model(small(num_hidden_layers=2)).train()
    model.embed_tokens.weight.requires_grad_(False)
    model.gradient_checkpointing = True
    ids = torch.randint(0, 300, (1, 5))
    model(ids, labels=ids).loss.backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_attention_implementation_defaults_to_sdpa():
    """gemma3.accel.fused_step and gemma3.eval.plot read `implementation` by name: "sdpa" unless a caller sets "eager"."""
    model = Gemma3Model(small())
    assert all(layer.self_attn.implementation == "sdpa" for layer in model.layers)


@torch.no_grad()
def test_rms_norm_eps_comes_from_config_everywhere():
    """Every norm (block, QK and final) takes config.rms_norm_eps; a large one moves the logits, and the reference
    agrees."""
    config = small(rms_norm_eps=0.1)
    model = random_model(config)
    assert {m.eps for m in model.modules() if isinstance(m, RMSNorm)} == {0.1}
    ids = torch.randint(0, config.vocab_size, (2, 12))
    torch.testing.assert_close(model(ids).logits, hf_model_like(model)(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 2, 5, 12])
def test_eager_path_passes_attention_weights_through_its_softmax_module(T):
    """implementation "eager" computes the weights as a tensor of their own, which leave through `self.softmax` where a
    forward hook reads them (gemma3.eval.plot); "sdpa" never calls it. Both give the same logits, on the plain causal
    prefill (mask None) as past the window."""
    config = small(num_attention_heads=4, num_key_value_heads=2)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, T))
    seen = []
    model.layers[0].self_attn.softmax.register_forward_hook(lambda m, i, o: seen.append(o))
    sdpa = model(ids).logits
    assert seen == []
    set_attention_implementation(model, "eager")
    eager = model(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    (probs,) = seen
    assert probs.shape == (2, 2, 2 * T, T) and probs.dtype == torch.float32  # (B, K, G·T, S)
    causal = attention_mask(torch.arange(T)[None], torch.arange(T)[None], config.sliding_window)[0, 0]
    assert torch.equal(probs > 0, causal.repeat(2, 1).expand(2, 2, 2 * T, T))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 2 * T))


def test_masked_softmax_is_fp32_whatever_the_scores():
    from gemma3.model import MaskedSoftmax

    scores = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    probs = MaskedSoftmax()(scores, torch.tensor([[True, False, True]]))
    assert probs.dtype == torch.float32
    kept = torch.tensor([1.0, 3.0]).softmax(dim=-1)
    torch.testing.assert_close(probs, torch.tensor([[kept[0], 0.0, kept[1]]]))


def test_positions_and_tables_follow_the_device_of_the_ids():
    """Positions (given, counted or padded) go to input_ids' device, and RoPE tables and the eager causal mask are
    built on their input's device (meta stands in for an accelerator here)."""
    from gemma3.model import RotaryEmbedding

    model = Gemma3Model(small())
    ids = torch.ones(1, 4, dtype=torch.long, device="meta")
    for positions, padding in ((None, None), (torch.arange(4)[None], None), (None, torch.ones(1, 4))):
        assert model._positions(ids, positions, padding, None).device.type == "meta"
    cos, sin = RotaryEmbedding(8, 100.0)(torch.zeros(1, 4, dtype=torch.long, device="meta"), torch.float32)
    assert cos.device.type == sin.device.type == "meta" and cos.shape == (1, 4, 1, 8)
    attn = model.layers[0].self_attn
    q, k = torch.zeros(1, 4, 3, 32, device="meta"), torch.zeros(1, 1, 3, 32, device="meta")
    probs = attn.attention_probs(q, k, None)
    assert probs.device.type == "meta" and probs.shape == (1, 1, 12, 3)


@torch.no_grad()
def test_eager_path_in_bf16_weights_v_in_the_activation_dtype():
    """The eager path computes fp32 weights and multiplies them with v in the activations' dtype, as the reference
    does: bf16 logits, within the bf16 rounding of the SDPA path (measured up to 20 ulps over the four configs)."""
    config = FAMILY["4b-like-gqa-rope-scaling"]
    model = random_model(config, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    sdpa = model(ids).logits
    set_attention_implementation(model, "eager")
    eager = model(ids).logits
    assert eager.dtype == torch.bfloat16
    assert bf16_ulps(eager, sdpa).max() <= 32
