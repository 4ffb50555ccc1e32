"""The KV cache is exact: cached forwards equal a full uncached forward, past the window, in every mode."""

from __future__ import annotations

import pytest
import torch

from gemma3 import kv_cache
from gemma3.config import GLOBAL, SLIDING, Gemma3Config, hybrid_layer_types
from gemma3.errors import Gemma3Error
from gemma3.kv_cache import KVCache, SlotKVCache, cache_bytes
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
        with pytest.raises(Gemma3Error) as error:
            model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    assert str(error.value) == ("the sequence would reach 9 tokens, but the KV cache holds 8; "
                                "start a new cache or a shorter generation")


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


def test_cache_bytes_counts_every_tensor_a_kvcache_allocates():
    config = tiny(4)
    for batch_size, max_seq_len in ((2, 16), (3, 3), (1, 1)):  # ring of the window, and one shorter than it
        for dtype in (torch.float32, torch.float16):
            cache = KVCache(config, batch_size, max_seq_len, dtype=dtype)
            held = cache.keys + cache.values + [cache.global_pos, cache.ring_pos, cache.last_pos]
            allocated = sum(t.numel() * t.element_size() for t in held)
            assert cache_bytes(config, batch_size, max_seq_len, dtype) == allocated


def test_a_cache_of_no_rows_or_no_slots_is_a_clear_error():
    config = tiny(4)
    for batch_size, max_seq_len in ((0, 8), (1, 0)):
        with pytest.raises(Gemma3Error) as error:
            KVCache(config, batch_size, max_seq_len)
        assert str(error.value) == f"KV cache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}"


def test_a_cache_larger_than_free_memory_is_refused_before_allocating(monkeypatch):
    config = Gemma3Config()  # 270M at 32K context, 8 rows: 1.6 GiB of keys and values
    need = cache_bytes(config, 8, 32_768, torch.float32)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: need - 1)
    with pytest.raises(Gemma3Error) as error:
        KVCache(config, 8, 32_768, device="meta")
    assert str(error.value) == ("a KV cache for 8 x 32,768 tokens needs 1.6 GiB, more than the 1.6 GiB free on meta; "
                                "generate fewer tokens (-n) or use a shorter --context")
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 2**30)
    with pytest.raises(Gemma3Error, match="needs 1.6 GiB, more than the 1.0 GiB free on meta;"):
        KVCache(config, 8, 32_768, device="meta")
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: need)  # exactly enough
    assert KVCache(config, 8, 32_768, device="meta").keys[0].device.type == "meta"
    half = cache_bytes(config, 8, 32_768, torch.float16)  # counted in the cache's own dtype
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: half)
    assert KVCache(config, 8, 32_768, dtype=torch.float16, device="meta").keys[0].dtype == torch.float16


def test_a_batch_of_the_wrong_size_is_a_clear_error():
    cache = KVCache(tiny(4), batch_size=2, max_seq_len=8)
    with pytest.raises(Gemma3Error) as error:
        cache.begin(torch.zeros(1, 1, dtype=torch.long))
    assert str(error.value) == "KV cache was built for batch size 2, got 1"


def fresh_state(cache: KVCache) -> bool:
    return (cache.seq_len == 0 and bool((cache.global_pos == -1).all()) and bool((cache.ring_pos == -1).all())
            and cache.last_pos.tolist() == [-1] * cache.batch_size)


@torch.no_grad()
def test_reset_empties_the_cache_and_the_next_sequence_gets_a_fresh_caches_bits():
    config = tiny(4)
    model = random_model(config)
    first, second = torch.randint(0, 300, (2, 11)), torch.randint(0, 300, (2, 13))
    used = KVCache(config, batch_size=2, max_seq_len=16)
    run_in_chunks(model, first, [6, 1, 1, 3], used)
    used.reset()
    assert fresh_state(used)
    assert used.next_positions().tolist() == [0, 0]
    want = run_in_chunks(model, second, [5, 1, 1, 6], KVCache(config, batch_size=2, max_seq_len=16))
    assert torch.equal(run_in_chunks(model, second, [5, 1, 1, 6], used), want)


# ---------------------------------------------------------------- SlotKVCache: the server's per-row cache

def test_a_slot_cache_allocates_what_a_kvcache_of_its_rows_would():
    config = tiny(4)
    cache = SlotKVCache(config, 3, 16, dtype=torch.float16, device="meta")
    assert cache.slots == 3 and cache.max_seq_len == 16 and cache.lengths == [0, 0, 0]
    assert cache.nbytes() == KVCache(config, 3, 16, dtype=torch.float16, device="meta").nbytes()
    shared = cache.shared
    assert all(t.dtype == torch.float16 and t.device.type == "meta" for t in shared.keys + shared.values)
    positions = (shared.global_pos, shared.ring_pos, shared.last_pos)
    assert all(t.dtype == torch.long and t.device.type == "meta" for t in positions)


def test_a_row_view_is_a_batch_1_kvcache_over_its_rows_storage():
    config = tiny(4)
    cache = SlotKVCache(config, 3, 16)
    view = cache.row(1)
    assert isinstance(view, KVCache)
    assert (view.config, view.batch_size, view.max_seq_len, view.ring_size) == (config, 1, 16, 4)
    assert view.layer_types == config.layer_types
    shared = cache.shared
    for mine, whole in zip(view.keys + view.values + [view.global_pos, view.ring_pos, view.last_pos],
                           shared.keys + shared.values + [shared.global_pos, shared.ring_pos, shared.last_pos]):
        assert mine.shape == (1, *whole.shape[1:]) and mine.data_ptr() == whole[1].data_ptr()
    view.seq_len = 5
    assert cache.lengths == [0, 5, 0] and view.seq_len == 5


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_row_view_gives_a_kvcaches_bits_and_leaves_the_other_rows_alone(dtype):
    config = tiny(4)
    model = random_model(config)
    ids = torch.randint(0, 300, (1, 13))
    chunks = [5, 1, 1, 6]  # past the window, the last chunk longer than it
    alone = KVCache(config, 1, 16, dtype=dtype)
    want = run_in_chunks(model, ids, chunks, alone)
    cache = SlotKVCache(config, 3, 16, dtype=dtype)
    view = cache.row(1)
    assert torch.equal(run_in_chunks(model, ids, chunks, view), want)
    assert cache.lengths == [0, 13, 0] and view.seq_len == 13 and view.next_positions().tolist() == [13]
    shared = cache.shared
    assert shared.last_pos.tolist() == [-1, 12, -1]
    assert torch.equal(shared.global_pos[1], alone.global_pos[0]) and torch.equal(shared.ring_pos[1], alone.ring_pos[0])
    for i in range(len(config.layer_types)):
        assert torch.equal(shared.keys[i][1], alone.keys[i][0]) and torch.equal(shared.values[i][1], alone.values[i][0])
        for other in (0, 2):
            assert not shared.keys[i][other].any() and not shared.values[i][other].any()
    assert bool((shared.global_pos[[0, 2]] == -1).all()) and bool((shared.ring_pos[[0, 2]] == -1).all())


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_slot_row_decoding_gives_a_kvcaches_bits(dtype):
    """A step of one row runs the same operations as a batch-1 KVCache's decode step."""
    config = tiny(4)
    model = random_model(config)
    ids = torch.randint(0, 300, (1, 14))
    alone = KVCache(config, 1, 16, dtype=dtype)
    want = run_in_chunks(model, ids, [5] + [1] * 9, alone)
    cache = SlotKVCache(config, 3, 16, dtype=dtype)
    got = [model(ids[:, :5], cache=cache.row(0)).logits]
    for i in range(5, 14):
        got.append(model(ids[:, i:i + 1], positions=torch.tensor([[i]]), cache=cache).logits)
    assert torch.equal(torch.cat(got, dim=1), want)
    assert cache.lengths == [14, 0, 0]
    for i in range(len(config.layer_types)):
        assert torch.equal(cache.shared.keys[i][0], alone.keys[i][0])
        assert torch.equal(cache.shared.values[i][0], alone.values[i][0])


@torch.no_grad()
def test_slot_rows_decoded_together_equal_each_row_alone():
    """Rows at different lengths (one starting from nothing, one joining late) decode in one step across the
    window, then each continues with a chunk through its view, and each gets what a KVCache alone gives it."""
    config = tiny(4)
    model = random_model(config)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (7, 0, 2)]
    conts = [torch.randint(0, 300, (9,), generator=g).tolist() for _ in prompts]
    turns = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 3, 5)]
    cache = SlotKVCache(config, 3, 24)
    got = [[] for _ in prompts]
    for r in (0, 1):
        if prompts[r]:
            got[r].append(model(torch.tensor([prompts[r]]), cache=cache.row(r)).logits[0, -1])
    fed = [0, 0, 0]
    for step in range(11):
        if step == 2:  # row 2 joins while the others decode; until then it takes no part (-1)
            got[2].append(model(torch.tensor([prompts[2]]), cache=cache.row(2)).logits[0, -1])
        rows = [r for r in range(3) if fed[r] < 9 and (r != 2 or step >= 2)]
        tokens = torch.tensor([[conts[r][fed[r]] if r in rows else 0] for r in range(3)])
        positions = torch.tensor([[len(prompts[r]) + fed[r] if r in rows else -1] for r in range(3)])
        logits = model(tokens, positions=positions, cache=cache).logits[:, -1]
        for r in rows:
            got[r].append(logits[r])
            fed[r] += 1
    for r in range(3):  # the next chat turn of each row, its positions counted on from the row's own
        got[r].extend(model(torch.tensor([turns[r]]), cache=cache.row(r)).logits[0])
    assert cache.lengths == [len(p) + 9 + len(t) for p, t in zip(prompts, turns)]
    for r in range(3):
        alone = KVCache(config, 1, 24)
        want = [] if not prompts[r] else [model(torch.tensor([prompts[r]]), cache=alone).logits[0, -1]]
        want += [model(torch.tensor([[t]]), cache=alone).logits[0, -1] for t in conts[r]]
        want += list(model(torch.tensor([turns[r]]), cache=alone).logits[0])
        torch.testing.assert_close(torch.stack(got[r]), torch.stack(want), atol=1e-5, rtol=1e-5)


def slot_state(cache: SlotKVCache, row: int):
    c = cache.shared
    return ([k[row].clone() for k in c.keys + c.values],
            c.global_pos[row].tolist(), c.ring_pos[row].tolist(), int(c.last_pos[row]), cache.lengths[row])


@torch.no_grad()
def test_release_frees_a_row_for_reuse_with_no_leftover_state():
    """A released row is a fresh row again: its positions are forgotten (its stale keys stay, masked), the other
    rows keep theirs, and a new request in it gets the bits it would in a cache that never held the old one."""
    config = tiny(4)
    model = random_model(config)
    g = torch.Generator().manual_seed(2)
    first, stale, new = (torch.randint(0, 300, (1, n), generator=g) for n in (3, 11, 2))
    steps = torch.randint(0, 300, (2, 12), generator=g)

    def decode(cache, starts, first, count):  # row r's steps from position starts[r]; None sits out
        out = []
        for i in range(first, first + count):
            positions = torch.tensor([[-1 if p is None else p + i - first] for p in starts])
            out.append(model(steps[:, i:i + 1], positions=positions, cache=cache).logits[:, -1])
        return out

    reused, fresh = SlotKVCache(config, 3, 24), SlotKVCache(config, 3, 24)
    for cache in (reused, fresh):
        model(first, cache=cache.row(0))
    model(stale, cache=reused.row(1))
    decode(reused, [None, 11], 0, 4)  # the old request decodes past the window, then finishes
    row0 = slot_state(reused, 0)
    reused.release(1)
    assert slot_state(reused, 1)[1:] == ([-1] * 24, [-1] * 4, -1, 0)
    assert fresh_state(reused.row(1))
    after = slot_state(reused, 0)
    assert all(torch.equal(a, b) for a, b in zip(after[0], row0[0])) and after[1:] == row0[1:]
    for cache in (reused, fresh):
        model(new, cache=cache.row(1))
    got, want = decode(reused, [3, 2], 4, 8), decode(fresh, [3, 2], 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert reused.lengths == fresh.lengths == [11, 10, 0]


def test_a_row_views_reset_releases_its_row():
    config = tiny(4)
    cache = SlotKVCache(config, 2, 8)
    for r in (0, 1):
        cache.row(r).begin(torch.arange(6)[None])
    cache.row(1).reset()
    assert cache.lengths == [6, 0] and cache.shared.last_pos.tolist() == [5, -1]
    assert fresh_state(cache.row(1)) and cache.shared.global_pos[0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]


def test_a_slot_step_writes_each_row_at_its_own_slot_and_masks_by_position():
    """Rows of lengths 5 (ring wrapped), 0 taking no part, 2 (jumping to position 4), 0 (its first token):
    what begin records, the masks, and where the step's keys and values land."""
    config = tiny(3)  # window 3; layer 0 slides, layer 5 is global
    cache = SlotKVCache(config, 4, 8, dtype=torch.float16)
    cache.row(0).begin(torch.arange(5)[None])
    cache.row(2).begin(torch.arange(2)[None])
    step = cache.begin(torch.tensor([[5], [-1], [4], [0]]))
    c = cache.shared
    assert (step.n, step.rows.tolist(), step.slots.tolist(), step.longest) == (4, [0, 2, 3], [5, 2, 0], 6)
    assert cache.lengths == [6, 0, 3, 1] and c.last_pos.tolist() == [5, -1, 4, 0]
    assert c.global_pos.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1], [-1] * 8,
                                     [0, 1, 4, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1, -1]]
    assert c.ring_pos.tolist() == [[3, 4, 5], [-1, -1, -1], [0, 1, 4], [0, -1, -1]]
    T, F = True, False  # a row taking no part sees slot 0 only; row 2's window (4 - 3, 4] leaves out 0 and 1
    assert step.masks[GLOBAL].tolist() == [[[[T, T, T, T, T, T]]], [[[T, F, F, F, F, F]]],
                                           [[[T, T, T, F, F, F]]], [[[T, F, F, F, F, F]]]]
    assert step.masks[SLIDING].tolist() == [[[[T, T, T]]], [[[T, F, F]]], [[[F, F, T]]], [[[T, F, F]]]]
    K, hd = config.num_key_value_heads, config.head_dim
    k = torch.arange(1.0, 5.0)[:, None, None, None].expand(4, K, 1, hd)  # row r's new key: r + 1 everywhere
    for layer, width, slots in ((5, 6, [5, 2, 0]), (0, 3, [2, 2, 0])):
        keys, values = step.update(layer, k, -k)
        assert keys.dtype == values.dtype == torch.float32 and keys.shape == values.shape == (4, K, width, hd)
        assert torch.equal(keys, c.keys[layer][:, :, :width].float()) and torch.equal(values, -keys)
        for r, slot in zip([0, 2, 3], slots):
            assert bool((c.keys[layer][r, :, slot] == r + 1).all())
            assert bool((c.values[layer][r, :, slot] == -r - 1).all())
        assert not c.keys[layer][1].any() and int((c.keys[layer] != 0).sum()) == 3 * K * hd


def test_a_slot_row_fills_to_its_last_slot_and_no_further():
    cache = SlotKVCache(tiny(4), 2, 8)
    cache.row(0).begin(torch.arange(7)[None])
    cache.begin(torch.tensor([[7], [0]]))  # the last slot of row 0
    assert cache.lengths == [8, 1]
    with pytest.raises(Gemma3Error) as error:
        cache.begin(torch.tensor([[8], [1]]))
    assert str(error.value) == "row 0 of the KV cache is full (8 tokens)"
    assert cache.lengths == [8, 1]  # refused before anything was written


def test_a_slot_step_of_the_wrong_shape_or_no_row_is_a_clear_error():
    cache = SlotKVCache(tiny(4), 2, 8)
    for shape in ((3, 1), (2, 2), (1, 3)):
        with pytest.raises(Gemma3Error) as error:
            cache.begin(torch.zeros(shape, dtype=torch.long))
        assert str(error.value) == (f"a SlotKVCache step takes (rows <= 2, 1) positions, got {shape}; "
                                    "prefill a row through row(i)")
    with pytest.raises(Gemma3Error) as error:
        cache.begin(torch.full((2, 1), -1))
    assert str(error.value) == "a SlotKVCache step needs at least one row with a position"
    assert cache.lengths == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_a_cache_on_the_gpu_takes_positions_built_on_the_cpu():
    """The scheduler builds a step's positions on the CPU whatever the model's device; both caches move them."""
    cache = SlotKVCache(tiny(3), 2, 8, device="cuda")
    cache.row(0).begin(torch.arange(4)[None])  # through KVCache.begin
    step = cache.begin(torch.tensor([[4], [0]]))
    assert step.masks[GLOBAL].device.type == step.masks[SLIDING].device.type == "cuda"
    assert cache.shared.global_pos.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1, -1]]
    assert cache.shared.ring_pos.tolist() == [[3, 4, 2], [0, -1, -1]] and cache.shared.last_pos.tolist() == [4, 0]

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
