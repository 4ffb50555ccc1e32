"""A preallocated key/value cache that knows Gemma 3's two kinds of layer.

* Global layers keep every token: a (B, K, max_seq_len, hd) buffer per layer, filled slot by slot.
* Sliding layers only ever look back W - 1 tokens, so each keeps a ring buffer of W slots: the token in
  sequence slot s lives in ring slot s % W. For the 270M at 32K context that is 3 × 32 768 + 15 × 512
  cached positions instead of 18 × 32 768 (about 12× less memory).

Every slot also records the absolute *position* of the token it holds (-1 = empty or padding), and
attention masks are built from those positions (model.attention_mask), never from slot indices. That is
what keeps the ring buffer exact: slot order stops mattering, and left-padded rows, whose positions lag
their slots, are handled by the same rule.

One forward over T new tokens is one `CacheStep`:
* global layers write the T tokens first, then attend over slots [0, seq_len + T);
* sliding layers, for a single decode token, overwrite the slot of the token W positions back (which the
  new query may no longer see) and attend over the ring; for a chunk (prefill, or a chat turn's new
  tokens), which may be longer than W, they attend over ring + whole chunk (masked per query) and only
  then keep the chunk's last W tokens in the ring.

The cache's dtype need not be the activations': a float16 cache (what llama.cpp keeps by default) holds half
the bytes, and `update` hands its keys and values back widened to the activations' dtype, the new tokens'
too, rounded as stored, so a step sees the same keys however its tokens arrived (one prefill or many chunks,
the fused decode step or the modules). The generator picks float16 for a quantized model's fused decode step,
which reads it natively (kernels/decode.c); elsewhere the widening is a copy per layer and step.
"""

from __future__ import annotations

import torch

from gemma3.config import GLOBAL, SLIDING, Gemma3Config
from gemma3.errors import Gemma3Error
from gemma3.memory import available_memory
from gemma3.model import attention_mask


def cache_bytes(config: Gemma3Config, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """What a KVCache of this shape allocates: keys and values of every layer, plus the slot positions."""
    ring = min(config.sliding_window, max_seq_len)
    slots = sum(max_seq_len if kind == GLOBAL else ring for kind in config.layer_types)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch_size * config.num_key_value_heads * config.head_dim * slots * element \
        + 8 * batch_size * (max_seq_len + ring + 1)


class KVCache:
    def __init__(self, config: Gemma3Config, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_seq_len <= 0 or batch_size <= 0:
            raise Gemma3Error(f"KV cache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        # Checked before allocating: a config's context_length can be anything, and an allocation the machine
        # cannot hold ends in an out-of-memory kill, not an error.
        need, free = cache_bytes(config, batch_size, max_seq_len, dtype), available_memory(device)
        if free is not None and need > free:
            raise Gemma3Error(f"a KV cache for {batch_size} x {max_seq_len:,} tokens needs {need / 2**30:.1f} GiB, "
                              f"more than the {free / 2**30:.1f} GiB free on {torch.device(device)}; generate "
                              "fewer tokens (-n) or use a shorter --context")
        self.config, self.batch_size, self.max_seq_len = config, batch_size, max_seq_len
        self.ring_size = min(config.sliding_window, max_seq_len)
        K, hd = config.num_key_value_heads, config.head_dim
        self.layer_types = config.layer_types
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for kind in self.layer_types:
            slots = max_seq_len if kind == GLOBAL else self.ring_size
            self.keys.append(torch.zeros(batch_size, K, slots, hd, dtype=dtype, device=device))
            self.values.append(torch.zeros(batch_size, K, slots, hd, dtype=dtype, device=device))
        # position held by each slot, per row; -1 = empty or padding
        self.global_pos = torch.full((batch_size, max_seq_len), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((batch_size, self.ring_size), -1, dtype=torch.long, device=device)
        self.last_pos = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.seq_len = 0  # sequence slots filled so far (shared by all rows; padding occupies slots too)

    def reset(self) -> None:
        self.global_pos.fill_(-1)
        self.ring_pos.fill_(-1)
        self.last_pos.fill_(-1)
        self.seq_len = 0

    def next_positions(self) -> torch.Tensor:
        """(B,) the position the next real token of each row will take."""
        return self.last_pos + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin(self, positions: torch.Tensor) -> "CacheStep":
        """Start a forward over tokens at `positions` (B, T) (-1 = padding), occupying the next T slots."""
        B, T = positions.shape
        if B != self.batch_size:
            raise Gemma3Error(f"KV cache was built for batch size {self.batch_size}, got {B}")
        start = self.seq_len
        if start + T > self.max_seq_len:
            raise Gemma3Error(f"the sequence would reach {start + T} tokens, but the KV cache holds "
                              f"{self.max_seq_len}; start a new cache or a shorter generation")
        positions = positions.to(self.global_pos.device)
        self.global_pos[:, start:start + T] = positions
        global_keys = self.global_pos[:, :start + T]

        decode = T == 1
        write_slots = self._ring_slots(start, T)
        kept = positions[:, T - len(write_slots):]
        if decode:  # overwrite first: the slot held position p - W, which the new query may not see
            self.ring_pos[:, write_slots] = kept
            sliding_keys = self.ring_pos[:, :min(start + 1, self.ring_size)]
        else:  # a chunk: attend over what the ring held + the whole chunk, then keep the chunk's tail
            sliding_keys = torch.cat([self.ring_pos[:, :min(start, self.ring_size)], positions], dim=1)
            self.ring_pos[:, write_slots] = kept

        self.last_pos.copy_(torch.maximum(self.last_pos, positions.max(dim=1).values))
        self.seq_len = start + T
        masks = {GLOBAL: attention_mask(positions, global_keys, None),
                 SLIDING: attention_mask(positions, sliding_keys, self.config.sliding_window)}
        return CacheStep(self, start, T, write_slots, masks)

    def _ring_slots(self, start: int, T: int) -> torch.Tensor:
        """Ring slots for the last min(T, ring) of the sequence slots [start, start + T)."""
        first = start + T - min(T, self.ring_size)
        return torch.arange(first, start + T, device=self.ring_pos.device) % self.ring_size


class CacheStep:
    """The cache's side of one forward: per-layer key/value writes and the masks that match them."""

    def __init__(self, cache: KVCache, start: int, length: int, write_slots: torch.Tensor, masks: dict):
        self.cache, self.start, self.length, self.write_slots, self.masks = cache, start, length, write_slots, masks

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k/v (B, K, T, hd); return every key/value the new queries may attend to,
        in the order of the key positions that `masks` was built from, in k's dtype (as stored: a float16
        cache rounds the new tokens too)."""
        cache, start, T = self.cache, self.start, self.length
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        if cache.layer_types[layer_idx] == GLOBAL:
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            return _widened(k_buf[:, :, :start + T], k.dtype), _widened(v_buf[:, :, :start + T], v.dtype)
        n = len(self.write_slots)
        if T == 1:  # a plain slice copy into the one ring slot (an index_put with a slot tensor is slower)
            slot = start % cache.ring_size
            k_buf[:, :, slot:slot + 1] = k
            v_buf[:, :, slot:slot + 1] = v
            filled = min(start + 1, cache.ring_size)
            return _widened(k_buf[:, :, :filled], k.dtype), _widened(v_buf[:, :, :filled], v.dtype)
        filled = min(start, cache.ring_size)
        k_new, v_new = k.to(k_buf.dtype), v.to(v_buf.dtype)  # as stored (no copy when the dtypes agree)
        k_all = torch.cat([k_buf[:, :, :filled], k_new], dim=2)
        v_all = torch.cat([v_buf[:, :, :filled], v_new], dim=2)
        k_buf[:, :, self.write_slots] = k_new[:, :, T - n:]
        v_buf[:, :, self.write_slots] = v_new[:, :, T - n:]
        return _widened(k_all, k.dtype), _widened(v_all, v.dtype)


def _widened(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the cache holds, in the activations' dtype: `t` itself (no copy) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


class SlotKVCache:
    """A KV cache of `slots` independent rows, for a server that batches requests which start and end at
    different times (continuous batching; llama.cpp's server calls the rows slots).

    `KVCache` holds one left-padded batch that advances together: one write position for every row. Here
    each row keeps its own length. A request takes a free row, is prefilled into it alone through `row(i)`
    (a batch-1 KVCache over that row's storage), and then decodes together with every other running row in
    one `begin` step, each writing its token at its own slot. The masks come from positions, as in
    KVCache, so a row never sees another request's tokens or the stale ones of a finished request, and the
    shorter rows' empty slots at the end are masked (the native attention kernel also leaves them out of its
    sums, so a row gives the same bits as the request served alone).
    """

    def __init__(self, config: Gemma3Config, slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.shared = KVCache(config, slots, max_seq_len, dtype, device)
        self.config, self.slots, self.max_seq_len = config, slots, max_seq_len
        self.lengths = [0] * slots  # sequence slots filled, per row

    def nbytes(self) -> int:
        return self.shared.nbytes()

    def release(self, row: int) -> None:
        """Forget row `row`'s tokens (its keys stay in memory, masked, until overwritten)."""
        c = self.shared
        c.global_pos[row].fill_(-1)
        c.ring_pos[row].fill_(-1)
        c.last_pos[row] = -1
        self.lengths[row] = 0

    def row(self, row: int) -> "_RowView":
        """A batch-1 KVCache over row `row` (views of its storage): a forward with it extends that row only."""
        return _RowView(self, row)

    def begin(self, positions: torch.Tensor) -> "DecodeStep":
        """Start a one-token forward over rows [0, n): positions (n, 1) holds the position of each row's new
        token, -1 for a row that takes no part (free, or being prefilled): it writes nothing and sees only
        slot 0 (its output is discarded). Each taking part writes at its own next slot."""
        c, W = self.shared, self.shared.ring_size
        n, T = positions.shape
        if T != 1 or n > self.slots:
            raise Gemma3Error(f"a SlotKVCache step takes (rows <= {self.slots}, 1) positions, got {tuple(positions.shape)}; "
                              "prefill a row through row(i)")
        positions = positions.to(c.global_pos.device)
        rows = [r for r in range(n) if int(positions[r, 0]) >= 0]
        if not rows:
            raise Gemma3Error("a SlotKVCache step needs at least one row with a position")
        for r in rows:
            if self.lengths[r] >= self.max_seq_len:
                raise Gemma3Error(f"row {r} of the KV cache is full ({self.max_seq_len} tokens)")
        rows_t = torch.tensor(rows, device=c.global_pos.device)
        pos_t = positions[rows_t, 0]
        slot_t = torch.tensor([self.lengths[r] for r in rows], device=c.global_pos.device)
        c.global_pos[rows_t, slot_t] = pos_t
        c.ring_pos[rows_t, slot_t % W] = pos_t
        c.last_pos[rows_t] = torch.maximum(c.last_pos[rows_t], pos_t)
        longest = max(self.lengths[r] for r in rows) + 1
        for r in rows:
            self.lengths[r] += 1
        masks = {GLOBAL: attention_mask(positions, c.global_pos[:n, :longest], None),
                 SLIDING: attention_mask(positions, c.ring_pos[:n, :min(longest, W)], self.config.sliding_window)}
        return DecodeStep(self, n, rows_t, slot_t, longest, masks)


class DecodeStep:
    """SlotKVCache's side of one batched decode forward (the model calls `update` per layer)."""

    def __init__(self, cache: SlotKVCache, n: int, rows: torch.Tensor, slots: torch.Tensor, longest: int,
                 masks: dict):
        self.cache, self.n, self.rows, self.slots, self.longest = cache, n, rows, slots, longest
        self.masks = masks
        self.start = 0  # read by the model only for chunks (T > 1)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache.shared
        k_buf, v_buf = c.keys[layer_idx], c.values[layer_idx]
        n, filled = self.n, self.longest
        slots = self.slots
        if c.layer_types[layer_idx] != GLOBAL:
            slots, filled = slots % c.ring_size, min(filled, c.ring_size)
        k_buf[self.rows, :, slots] = k[self.rows, :, 0].to(k_buf.dtype)
        v_buf[self.rows, :, slots] = v[self.rows, :, 0].to(v_buf.dtype)
        return _widened(k_buf[:n, :, :filled], k.dtype), _widened(v_buf[:n, :, :filled], v.dtype)


class _RowView(KVCache):
    """One row of a SlotKVCache as a batch-1 KVCache (no storage of its own; its length is the row's)."""

    def __init__(self, parent: SlotKVCache, row: int):  # noqa: super().__init__ would allocate
        shared = parent.shared
        self.parent, self.index = parent, row
        self.config, self.batch_size, self.max_seq_len = shared.config, 1, shared.max_seq_len
        self.ring_size, self.layer_types = shared.ring_size, shared.layer_types
        self.keys = [k[row:row + 1] for k in shared.keys]
        self.values = [v[row:row + 1] for v in shared.values]
        self.global_pos = shared.global_pos[row:row + 1]
        self.ring_pos = shared.ring_pos[row:row + 1]
        self.last_pos = shared.last_pos[row:row + 1]

    @property
    def seq_len(self) -> int:
        return self.parent.lengths[self.index]

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        self.parent.lengths[self.index] = value

    def reset(self) -> None:
        self.parent.release(self.index)
