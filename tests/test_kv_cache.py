"""The KV cache is exact: cached forwards equal a full uncached forward, past the window, in every mode."""

from __future__ import annotations

import pytest
import torch

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import Gemma3Error
from gemma3.kv_cache import KVCache
from reference import random_model

torch.set_num_threads(2)


def tiny(window: int, **overrides) -> Gemma3Config:
    base = dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
                layer_types=hybrid_layer_types(7), rope_scaling_factor=8.0)
    base.update(overrides)
    return Gemma3Config(**base)


def run_in_chunks(model, ids, chunks, cache, **kwargs):
    out, start = [], 0
    for size in chunks:
        out.append(model(ids[:, start:start + size], cache=cache, **kwargs).logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("window", [4, 5, 8])
@pytest.mark.parametrize("chunks", [
    [1] * 40,                 # token by token from the start
    [6] + [1] * 34,           # short prefill, long decode (wraps the ring many times)
    [19] + [1] * 21,          # prefill longer than the window
    [3, 11, 1, 1, 9, 2, 13],  # mixed chunks, several longer than the window
])
def test_cached_equals_full_forward(window, chunks):
    config = tiny(window)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 40))
    full = model(ids).logits
    cache = KVCache(config, batch_size=2, max_seq_len=40)
    torch.testing.assert_close(run_in_chunks(model, ids, chunks, cache), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == 40


@torch.no_grad()
def test_ring_buffer_memory():
    config = Gemma3Config()  # 270M: 3 global + 15 sliding layers, window 512
    with torch.device("meta"):
        cache = KVCache(config, batch_size=1, max_seq_len=32_768, device="meta")
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4  # k + v, fp32
    assert cache.nbytes() == (3 * 32_768 + 15 * 512) * per_position


@torch.no_grad()
def test_cache_reused_across_chat_turns():
    """Turn 2 only prefills its new tokens on top of turn 1's cache, and still equals the full forward."""
    config = tiny(6)
    model = random_model(config)
    turn1, reply1, turn2 = (torch.randint(0, 300, (1, n)) for n in (9, 7, 15))
    ids = torch.cat([turn1, reply1, turn2], dim=1)
    full = model(ids).logits
    cache = KVCache(config, batch_size=1, max_seq_len=64)
    a = model(turn1, cache=cache).logits
    b = torch.cat([model(reply1[:, i:i + 1], cache=cache).logits for i in range(7)], dim=1)
    c = model(turn2, cache=cache).logits  # the next turn, longer than the window, in one chunk
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_with_cache():
    config = tiny(5)
    model = random_model(config)
    long, short = torch.randint(1, 300, (1, 17)), torch.randint(1, 300, (1, 9))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    cache = KVCache(config, batch_size=2, max_seq_len=40)
    prefill = model(ids, padding_mask=mask, cache=cache).logits
    steps = torch.randint(1, 300, (2, 12))
    decoded = torch.cat([model(steps[:, i:i + 1], cache=cache).logits for i in range(12)], dim=1)
    for row, prompt in enumerate((long, short)):
        alone = model(torch.cat([prompt, steps[row:row + 1]], dim=1)).logits[0]
        n = prompt.shape[1]
        torch.testing.assert_close(prefill[row, -n:], alone[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoded[row], alone[n:], atol=1e-5, rtol=1e-5)


def test_overflow_is_a_clear_error():
    config = tiny(4)
    model = random_model(config)
    cache = KVCache(config, batch_size=1, max_seq_len=8)
    with torch.no_grad():
        model(torch.ones(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(Gemma3Error, match="KV cache holds 8"):
            model(torch.ones(1, 3, dtype=torch.long), cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("window", [4, 8])
def test_an_fp16_cache_gives_the_same_logits_however_the_tokens_arrive(window):
    """A float16 cache rounds every key and value as it stores it, the new chunk's own included, so one prefill,
    token by token and mixed chunks all attend over rounded keys. They still part a little: where two chunkings'
    fp32 projections differ by an ulp, a key can round to the neighbouring fp16 value (fp32 caches agree to
    1e-5 here). Measured: the chunkings part by ~1/5 of what the rounding itself moves against the fp32 cache;
    had the chunk used its own unrounded keys, a prefill would part from token-by-token by the whole of it."""
    config = tiny(window)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 40))
    runs = {}
    for chunks in ([40], [1] * 40, [3, 11, 1, 1, 9, 2, 13]):
        cache = KVCache(config, batch_size=2, max_seq_len=40, dtype=torch.float16)
        runs[tuple(chunks)] = run_in_chunks(model, ids, chunks, cache)
        assert all(k.dtype == torch.float16 for k in cache.keys + cache.values)
    one, *others = runs.values()
    exact = model(ids).logits
    scale = exact.abs().max()
    rounding = float((one - exact).abs().max() / scale)
    print(f"\nwindow {window}: fp16 vs fp32 {rounding:.2e}, between chunkings " + ", ".join(
        f"{float((other - one).abs().max() / scale):.2e}" for other in others))
    assert 0 < rounding < 3e-3, rounding
    for other in others:
        assert float((other - one).abs().max() / scale) < rounding / 2


@torch.no_grad()
def test_an_fp16_cache_holds_half_the_bytes():
    config = tiny(4)
    assert KVCache(config, 1, 32, dtype=torch.float16).nbytes() * 2 == KVCache(config, 1, 32).nbytes()


@torch.no_grad()
def test_a_block_or_attention_called_alone_with_a_cache_step_writes_layer_zero():
    """layer_idx defaults to 0 in TransformerBlock and GroupedQueryAttention: called alone with a cache step, each
    writes the first layer's keys and leaves the others as they were."""
    from gemma3.config import SLIDING

    config = tiny(4)
    model = random_model(config)
    positions = torch.arange(3)[None]
    x = model.embed_tokens(torch.randint(0, 300, (1, 3)))
    cos, sin = model.rope[SLIDING](positions, x.dtype)
    for module in (model.layers[0], model.layers[0].self_attn):
        stored = []
        for explicit in (False, True):
            cache = KVCache(config, batch_size=1, max_seq_len=8)
            step = cache.begin(positions)
            args = (x, cos, sin, step.masks[SLIDING], step)
            module(*args, layer_idx=0) if explicit else module(*args)
            stored.append(cache.keys)
        assert stored[0][0].abs().sum() > 0 and all(k.eq(0).all() for k in stored[0][1:])
        assert all(torch.equal(a, b) for a, b in zip(*stored))


@torch.no_grad()
def test_eager_attention_with_a_cache_equals_the_full_forward():
    """The eager path over cached keys: chunks longer than one token see more keys than queries (S > T)."""
    from reference import set_attention_implementation

    config = tiny(4)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    full = model(ids).logits
    set_attention_implementation(model, "eager")
    cache = KVCache(config, batch_size=2, max_seq_len=24)
    torch.testing.assert_close(run_in_chunks(model, ids, [3, 7, 1, 13], cache), full, atol=1e-5, rtol=1e-5)
