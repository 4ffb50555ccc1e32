"""The fused decode step (gemma3.accel.fused_step, kernels/step.c) against the module path it replaces: the same
logits bit for bit, the same cache contents, the same greedy tokens, 1 and 2 threads giving the
same bits, and the models and caches it must leave to the modules."""

from __future__ import annotations

import pytest
import torch

from gemma3.config import Gemma3Config
from gemma3.accel.fused_step import FusedDecodeStep, reason_not_fused
from gemma3.errors import Gemma3Error
from gemma3.generation.generator import GenerationConfig, Generator
from gemma3.kv_cache import KVCache

from gemma3.accel.quantize import QuantizedTensor, quantize_model, quantize_state, split_state
from gemma3.generation.sampling import SamplingParams
from reference import native_model, random_model
from test_generate import LetterTokenizer
from test_kernels import needs_kernel

pytestmark = needs_kernel

CONFIG = Gemma3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention"))
# layer 0 mixes formats within its q/k/v and gate/up products (one range of rows over several matrices)
MIXED = {"layers.0.self_attn.k_proj.weight": "Q5_0", "layers.0.self_attn.v_proj.weight": "Q4_1",
         "layers.0.mlp.up_proj.weight": "Q4_0", "layers.1.self_attn.o_proj.weight": "Q5_0"}


def quantized_model(config: Gemma3Config = CONFIG, seed: int = 0):
    torch.manual_seed(seed)
    model = random_model(config)
    state = quantize_state(model.state_dict(), "int8")
    for name, fmt in MIXED.items():
        if name in state:
            state[name] = QuantizedTensor.quantize(model.state_dict()[name], fmt)
    floats, blocks = split_state(state)
    out = random_model(config)
    quantize_model(out, blocks, torch.float32)
    out.load_state_dict(floats, strict=True)
    return native_model(out.eval())  # the fused norms and attention generation runs the modules with


def prompt(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def run_both(model, steps: int = 20, cache_dtype: torch.dtype = torch.float32, prompt_len: int = 5,
             max_len: int = 32):
    """(module logits, fused logits, module cache, fused cache) over `steps` decode steps after a prefill,
    each path feeding the tokens the module path picks."""
    caches = [KVCache(model.config, 1, max_len, cache_dtype), KVCache(model.config, 1, max_len, cache_dtype)]
    ids = prompt(prompt_len)
    first = [model(ids, cache=c, logits_to_keep=1).logits[:, -1] for c in caches]
    fused = FusedDecodeStep(model, caches[1])
    token = int(first[0].argmax())
    plain, ours = [], []
    for _ in range(steps):
        plain.append(model(torch.tensor([[token]]), cache=caches[0], logits_to_keep=1).logits[:, -1])
        ours.append(fused(token))
        token = int(plain[-1].argmax())
    return torch.cat(plain), torch.cat(ours), caches[0], caches[1]


# head_dim 20: the attention's loops over a key's values run their scalar tails too (16 + 4 and 8 + 8 + 4)
ODD_HEADS = Gemma3Config(**{**CONFIG.__dict__, "num_attention_heads": 8, "head_dim": 20})


@pytest.mark.parametrize("config, cache_dtype", [(CONFIG, torch.float32), (CONFIG, torch.float16),
                                                 (ODD_HEADS, torch.float16)])
def test_fused_step_matches_the_module_path_across_the_window(config, cache_dtype):
    """Over an fp32 cache, and over the fp16 one generation gives the fused step: the same bits, logits and
    every key and value, because the step calls the very functions the modules call (GELU included: a quantized
    model's FeedForward is accel.native.NativeGeGLU) in the same order."""
    model = quantized_model(config)
    assert reason_not_fused(model) is None
    plain, ours, cache_plain, cache_ours = run_both(model, cache_dtype=cache_dtype)  # the window of 4 crossed 5 times
    assert ours.shape == plain.shape == (20, 512)
    assert torch.equal(ours, plain), float((ours - plain).abs().max() / plain.abs().max())
    for k_plain, k_ours in zip(cache_plain.keys + cache_plain.values, cache_ours.keys + cache_ours.values):
        assert k_plain.dtype == k_ours.dtype == cache_dtype
        assert torch.equal(k_plain, k_ours)
    assert cache_plain.seq_len == cache_ours.seq_len == 25
    assert torch.equal(cache_plain.ring_pos, cache_ours.ring_pos)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_one_and_two_threads_give_the_same_bits(cache_dtype):
    model = quantized_model()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_both(model, steps=8, cache_dtype=cache_dtype)[1]
        torch.set_num_threads(2)
        two = run_both(model, steps=8, cache_dtype=cache_dtype)[1]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# the attention splits the keys into parts of 256 (decode.c KEY_PART), the threads sharing them, and the new key
# is stored by the thread that reads its part: a window of 300 crossed, so the sliding layers' ring writes into
# part 0 of 2 while the full layer's new key lands in the last part
LONG = Gemma3Config(**{**CONFIG.__dict__, "sliding_window": 300})


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_several_key_parts_on_two_threads_match_the_modules_and_one_thread(cache_dtype):
    model = quantized_model(LONG)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        plain, two, cache_plain, cache_two = run_both(model, 24, cache_dtype, prompt_len=290, max_len=320)
        torch.set_num_threads(1)
        one, cache_one = run_both(model, 24, cache_dtype, prompt_len=290, max_len=320)[1::2]
    finally:
        torch.set_num_threads(before)
    assert cache_two.seq_len == 314 and cache_two.ring_size == 300  # the ring wrapped 14 keys ago
    assert torch.equal(one, two)
    for a, b in zip(cache_one.keys + cache_one.values, cache_two.keys + cache_two.values):
        assert torch.equal(a, b)
    assert torch.equal(two, plain)
    for k_plain, k_two in zip(cache_plain.keys + cache_plain.values, cache_two.keys + cache_two.values):
        assert torch.equal(k_plain, k_two)


def test_an_fp16_cache_moves_the_logits_by_its_rounding_only():
    """The fp16 cache against the fp32 one, on either path: every key and value rounded to 11 significant bits
    (relative error <= 2^-11) moves the logits by a small fraction of their range (the real 270M's perplexity
    cost is measured in tests/test_quantize_real.py)."""
    model = quantized_model()
    plain32, ours32 = run_both(model, cache_dtype=torch.float32)[:2]
    plain16, ours16 = run_both(model, cache_dtype=torch.float16)[:2]
    scale = plain32.abs().max()
    for a, b in ((plain32, plain16), (ours32, ours16)):
        gap = float((a - b).abs().max() / scale)
        assert 0 < gap < 5e-3, gap  # it does round (0 would mean the cache was not fp16 after all)


def test_generation_takes_the_fused_step_for_one_sequence_and_gives_the_same_tokens(monkeypatch):
    model = quantized_model(seed=2)
    calls = []
    original = FusedDecodeStep.__call__
    monkeypatch.setattr(FusedDecodeStep, "__call__", lambda self, token: calls.append(token) or original(self, token))
    config = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0.0), stop_token_ids=())
    ids = prompt(6)[0].tolist()
    gen = Generator(model, LetterTokenizer())
    fused = gen.generate(ids, config).token_ids
    assert len(calls) == 23  # every step after the prefill's first token
    assert gen.cache_dtype(1) == torch.float16  # what the fused step reads natively
    gen.fuse_steps = False
    assert gen.cache_dtype(1) == torch.float32
    calls.clear()
    gen.kv_cache_dtype = torch.float16  # the same cache, through the modules: the same tokens
    assert gen.generate(ids, config).token_ids == fused and not calls
    gen.fuse_steps, gen.kv_cache_dtype = True, None
    assert gen.cache_dtype(2) == torch.float32
    gen.generate_batch([ids, ids[:4]], config)  # a batch of two runs on the modules
    assert not calls
    gen.kv_cache_dtype = torch.float32  # asked for: the fused step reads fp32 too
    calls.clear()
    gen.generate(ids, config)
    assert len(calls) == 23


def test_the_generator_refuses_a_cache_dtype_it_does_not_have():
    with pytest.raises(Gemma3Error, match="kv_cache_dtype"):
        Generator(quantized_model(), LetterTokenizer(), kv_cache_dtype=torch.int8)


def test_models_and_caches_it_cannot_run_are_left_to_the_modules():
    assert "not quantized" in reason_not_fused(random_model(CONFIG))
    model = quantized_model()
    model.layers[1].self_attn.implementation = "eager"
    assert "eager" in reason_not_fused(model)
    model.layers[1].self_attn.implementation = "sdpa"
    with pytest.raises(Gemma3Error, match="batch-1 fp32"):
        FusedDecodeStep(model, KVCache(CONFIG, 2, 16))
    with pytest.raises(Gemma3Error, match="batch-1 fp32"):
        FusedDecodeStep(model, KVCache(CONFIG, 1, 16, dtype=torch.bfloat16))
    capped = Gemma3Config(**{**CONFIG.__dict__, "attn_logit_softcapping": 50.0})
    assert "soft-capping" in reason_not_fused(quantized_model(capped))


@torch.inference_mode()
def test_a_bad_token_is_an_error_and_writes_nothing():
    model = quantized_model()
    cache = KVCache(CONFIG, 1, 16)
    model(prompt(), cache=cache, logits_to_keep=1)
    keys, length = [k.clone() for k in cache.keys], cache.seq_len
    for bad in (512, -1):
        with pytest.raises(Gemma3Error, match="outside the vocabulary"):
            FusedDecodeStep(model, cache)(bad)
    assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys)) and cache.seq_len == length


@torch.inference_mode()
def test_the_kernel_refuses_a_step_outside_the_cache():
    """kernels/step.c checks the slots and key counts it is handed against every layer's cache before writing."""
    import ctypes

    from gemma3.accel.fused_step import _Step

    model = quantized_model()
    cache = KVCache(CONFIG, 1, 16)
    fused = FusedDecodeStep(model, cache)
    logits = torch.empty(1, 512)
    for slot, visible in ((4, 1), (0, 17), (-1, 1), (0, 0)):  # the ring holds 4 slots, the global layer 16
        args = _Step()
        args.token, args.slot[0], args.slot[1], args.visible[0], args.visible[1] = 3, slot, 0, 1, visible
        assert fused.lib.gemma3_decode_step(ctypes.byref(fused._model), ctypes.byref(args), logits.data_ptr()) == -1
    assert all(not k.any() for k in cache.keys)
