"""The Gemma 3 text decoder, top to bottom, with no I/O.

    token ids ──► embedding × sqrt(d) (rounded to the weight dtype)
              ──► L × TransformerBlock   (5 sliding-window layers : 1 global layer, repeating)
              ──► RMSNorm ──► logits = h @ Eᵀ   (output head tied to the embedding)

    TransformerBlock ("sandwich" norms: every sub-layer's *output* is normalised before the residual add)
        x = x + RMSNorm(GroupedQueryAttention(RMSNorm(x)))
        x = x + RMSNorm(FeedForward(RMSNorm(x)))

Module and parameter names follow HF transformers' `Gemma3ForCausalLM` (minus its `model.` prefix), so a
state dict maps one to one and anyone who has read that code finds their way here. Numerics follow the
reference exactly; each place where a choice matters says why.

Attention is driven by explicit token *positions*, never by hidden counters: a query at position i on a
sliding layer sees keys at positions j with i - W < j <= i, on a global layer every j <= i; padding
carries position -1 and is never seen. The same rule serves a plain forward, a left-padded batch and the
ring-buffer KV cache (gemma3.kv_cache), which hands back key positions alongside keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemma3.config import GLOBAL, SLIDING, Gemma3Config
from gemma3.errors import Gemma3Error

IGNORE_INDEX = -100  # a label that is no target (HF's convention)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a zero-centred gain: y = x̂ · (1 + w).

    The weight is stored as a delta from 1 (initialised to zeros), so a fresh norm is the identity gain.
    The whole product is computed in fp32 and cast once at the end: Gemma does (x̂·(1+w)).to(dtype), not
    Llama's x̂.to(dtype)·w, and in bf16 the two differ (transformers PR #29402).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x̂ · gain in the input's dtype (here fp32): bit-identical to spelling out
        # x * rsqrt(mean(x²) + eps) * (1 + w), but one call instead of seven (109 norms per decode step).
        return F.rms_norm(x.float(), (x.shape[-1],), self.gain(), self.eps).type_as(x)

    def gain(self) -> torch.Tensor:
        """(1 + w) in fp32."""
        return 1.0 + self.weight.float()


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head: `attend(h)` = h · Eᵀ (the name Gemma's own Flax
    code gives it). One table serves both ends, so an inference side that keeps it in another form (packed,
    quantized: gemma3.accel.native, gemma3.accel.quantize) swaps this one module and the head follows."""

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_size: int
                      ) -> torch.Tensor:
        """sum(cross_entropy(softcap(attend(h)), targets)) in fp32, `chunk_size` rows of logits at a time. Every
        head offers this; training swaps in one that also never keeps a chunk's logits for backward
        (gemma3.train.loss)."""
        return chunked_cross_entropy(self.attend, h, targets, softcap, chunk_size)

    def reset_parameters(self) -> None:
        # A model built on the meta device (to load weights into) has no values to draw, and drawing N(0, 1) on
        # meta imports torch's Python reference kernels, a large share of every load (docs/performance.md, "Figures
        # the source comments used to quote"). On a real device this is nn.Embedding's own init;
        # Gemma3Model.init_weights sets the trained-from-scratch one.
        if self.weight.device.type != "meta":
            super().reset_parameters()


def chunked_cross_entropy(attend, h: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_size: int
                          ) -> torch.Tensor:
    """sum(cross_entropy(softcap(attend(h)), targets)), fp32, over chunks of `chunk_size` rows."""
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = attend(h[start:start + chunk_size]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half / GPT-NeoX pairing: dim j pairs with dim j + hd/2).

    Gemma 3 uses two of these: base 10 000 on sliding layers (short range, fine resolution) and base
    1 000 000 on global layers (long range). On 4B/12B/27B the global one also has linear scaling ×8
    (positions / 8) to reach 128K context; the sliding one is never scaled. The tables are computed per
    forward (once for all layers of a kind) from the positions, in fp32, then cast to the activation dtype
    as the reference does. Nothing is stored, so a model built on the `meta` device needs no buffers
    materialised after loading weights.

    Returns cos and a *signed* sin, both (B, T, 1, hd) to broadcast over heads: rotate_half(x) · sin equals
    roll(x, hd/2) · [-sin, sin] exactly (negation is exact), and that form lets `apply_rotary` be one roll
    and three arithmetic ops instead of nine (36 calls per decode step).
    """

    def __init__(self, head_dim: int, base: float, scaling_factor: float = 1.0):
        super().__init__()
        self.head_dim, self.base, self.scaling_factor = head_dim, base, scaling_factor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.base**exponent) / self.scaling_factor  # (hd/2,)
        freqs = positions.clamp(min=0)[:, :, None, None].float() * inv_freq  # (B, T, 1, hd/2); padding as pos 0
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # (B, T, 1, hd)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, scaling_factor={self.scaling_factor:g}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, hd); cos/signed_sin: (B, T, 1, hd) from RotaryEmbedding.
    x' = x·cos + rotate_half(x)·sin with rotate_half([a, b]) = [-b, a], written as x·cos + [b, a]·[-sin, sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   documents: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may see, from absolute positions alone. True = attend.

    q_pos (B, T) and k_pos (B, S) hold token positions, -1 for padding (and for empty cache slots).
    Causal: j <= i. Sliding (window W): also j > i - W, i.e. the current token and the W - 1 before it.
    Example, W = 3, five tokens (rows are queries):

        global         sliding (W=3)
        1 . . . .      1 . . . .
        1 1 . . .      1 1 . . .
        1 1 1 . .      1 1 1 . .
        1 1 1 1 .      . 1 1 1 .
        1 1 1 1 1      . . 1 1 1

    `documents` (B, T), for a forward over packed sequences (queries and keys are the same tokens): each
    token's document number; a query sees only keys of its own document.

    Returns (B, 1, T, S). A padding query would see nothing, and a fully masked softmax row is NaN that can
    leak into real rows through 0·NaN; such rows are allowed to see key slot 0 instead (their output is
    never used).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    if documents is not None:
        mask &= documents[:, :, None] == documents[:, None, :]
    dead = ~mask.any(dim=-1, keepdim=True)
    if dead.any():
        first = torch.zeros_like(mask)
        first[..., 0] = True
        mask |= dead & first
    return mask[:, None]


@dataclass
class PackedMask:
    """The attention mask of rows that pack several documents (training), with the positions it was built
    from, so that a kernel may attend one document at a time instead of over the whole (T, T) mask
    (gemma3.train.attention). Every path that does not look inside reads `mask`."""

    mask: torch.Tensor  # (B, 1, T, T) bool, as attention_mask gives it
    positions: torch.Tensor  # (B, T), restarting at 0 for each document; -1 for padding
    window: int | None
    spans: list | None = None  # filled by the kernel that reads them, once per forward


def dense(mask):
    """The (B, 1, T, S) bool mask of either form (None stays None: plain causal)."""
    return mask.mask if isinstance(mask, PackedMask) else mask


def packed_documents(positions: torch.Tensor) -> torch.Tensor | None:
    """(B, T) document numbers where a row holds several sequences (its positions start again at 0 after the
    first token), else None: a new document begins at every position 0."""
    if positions.shape[1] < 2 or not bool((positions[:, 1:] == 0).any()):
        return None
    return (positions == 0).long().cumsum(dim=1)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when there is one KV head) and QK-norm.

    q: (B, H, T, hd), k/v: (B, K, T, hd); query head h reads KV head h // (H / K).
    QK-norm is an RMSNorm over each head's hd features (one weight shared by all heads), applied *before*
    RoPE; it replaces Gemma 2's attention soft-capping as the guard against runaway logits.
    Scores are scaled by query_pre_attn_scalar ** -0.5: 256 (= hd) for most sizes but 168 (= d/H) for the
    27B, whose hd is 128, so 1/sqrt(hd) would make its softmax 1.15× too sharp.
    Note H·hd ≠ d (270M: 4·256 = 1024 vs 640), so q_proj and o_proj are not square.
    """

    def __init__(self, config: Gemma3Config):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        self.implementation = "sdpa"  # or "eager": the same computation spelled out, for reading and testing
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.softmax = MaskedSoftmax()

    def forward(self, x, cos, sin, mask, cache=None, layer_idx: int = 0):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, hd)
        # Norm and rotate while each token's heads are still contiguous: the same elementwise work on the
        # (B, H, T, hd) transpose runs several times slower on CPU (docs/performance.md, "Figures the source
        # comments used to quote").
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:  # cached keys are post-norm, post-RoPE; returns every key this step may see
            k, v = cache.update(layer_idx, k, v)  # (B, K, S, hd)
        if self.implementation == "eager" or self.softcap is not None:
            out = self._eager(q, k, v, dense(mask))
        else:
            out = self.sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H·hd)
        return self.o_proj(out)

    def sdpa(self, q, k, v, mask):
        """softmax(q·kᵀ·scale + mask)·v by PyTorch's fused kernel; mask None = plain causal (its is_causal path,
        which skips the masked half of the scores). gemma3.accel swaps in CPU paths for inference here."""
        mask = dense(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def _eager(self, q, k, v, mask):
        """Explicit softmax(q·kᵀ·scale + mask)·v: fp32 scores and softmax, finfo.min for masked.

        Scores are computed from fp32 copies of q and k, the precision the fused kernels (SDPA, which HF
        uses by default) accumulate in. The probabilities go back to the activation dtype for the product
        with v, as in the reference.

        The G = H / K query heads that share a KV head are stacked along the query axis, so each KV head is
        read once (no repeat of K and V): q (B, H, T, hd) → (B, K, G·T, hd).
        """
        B, H, T, hd = q.shape
        probs = self.attention_probs(q, k, mask).to(q.dtype)  # (B, K, G·T, S)
        return (probs @ v).view(B, H, T, hd)  # (B, H, T, hd)

    def attention_probs(self, q, k, mask) -> torch.Tensor:
        """The attention weights softmax(q·kᵀ·scale + mask), fp32, as (B, K, G·T, S): for KV head k, the
        rows of its G query heads one after the other (query head h = k·G + g is rows g·T ... g·T + T - 1).
        `_eager` multiplies them with v; they leave through `self.softmax`, where a forward hook can read them
        (gemma3.eval.plot does)."""
        B, H, T, hd = q.shape
        G = H // self.num_kv_heads
        q = q.reshape(B, self.num_kv_heads, G * T, hd)  # (B, K, G·T, hd)
        scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, K, G·T, S), fp32
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:  # plain causal (see Gemma3Model.forward), with as many keys as queries
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]  # (1, 1, T, S)
        if T > 1:  # (B, 1, T, S) → (B, 1, G·T, S); one query's (B, 1, 1, S) row broadcasts as it is
            mask = mask[:, :, None].expand(B, 1, G, T, mask.shape[-1]).reshape(B, 1, G * T, -1)
        return self.softmax(scores, mask)


class MaskedSoftmax(nn.Module):
    """softmax over the keys with masked scores at finfo.min, in fp32: the attention weights. A module of its
    own so that a forward hook sees the weights of the eager path (it has no parameters)."""

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        return F.softmax(scores, dim=-1, dtype=torch.float32)


class FeedForward(nn.Module):
    """Gated MLP (GeGLU): down(gelu_tanh(gate(x)) · up(x)). The tanh approximation of GELU, as trained;
    exact-erf GELU was a shipped Gemma bug (transformers PR #29402)."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class TransformerBlock(nn.Module):
    """One decoder layer with four norms: pre- and post-norm around both attention and MLP.

    `post_attention_layernorm` normalises the attention *output* before the residual add (it is not the
    pre-MLP norm, as the name means in Llama code; that one is `pre_feedforward_layernorm`).
    """

    def __init__(self, config: Gemma3Config, layer_type: str):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = GroupedQueryAttention(config)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = FeedForward(config)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx: int = 0):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T', V) in the activation dtype; None when a loss was asked for
    loss: torch.Tensor | None = None


class Gemma3Model(nn.Module):
    """The Gemma 3 text decoder with its tied output head (HF's `Gemma3ForCausalLM`)."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = nn.ModuleDict({
            SLIDING: RotaryEmbedding(config.head_dim, config.rope_local_base_freq),
            GLOBAL: RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling_factor),
        })
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache=None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """
        input_ids     (B, T) token ids.
        positions     (B, T) absolute positions, -1 for padding. Default: counted from 0 over the real tokens
                      (continuing after what `cache` holds), so left padding does not shift positions. Without
                      a cache, positions that start again at 0 inside a row start a new document (packed
                      training sequences): each attends only within itself, as transformers reads packed
                      position_ids.
        padding_mask  (B, T) bool/int, True/1 for real tokens (HF's attention_mask for these tokens).
        cache         a gemma3.kv_cache.KVCache to read and extend; None for a plain full forward.
        labels        (B, T) targets aligned with input_ids (shifted inside, as HF does), -100 = ignore.
                      Returns the mean cross-entropy and no logits: the loss is computed in chunks so that
                      the (B, T, 262k) fp32 logits are never materialised at once.
        logits_to_keep  0 = logits for every position, n = only the last n (generation needs 1).
        """
        self._check_ids(input_ids)
        B, T = input_ids.shape
        positions = self._positions(input_ids, positions, padding_mask, cache)

        # Embedding scaled by sqrt(d), with sqrt(d) first rounded to the weight dtype as the reference does
        # (bf16: 25.25 for d = 640, not 25.298); only token embeddings are scaled, never the output head.
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(x.dtype)

        rope = {t: self.rope[t](positions, x.dtype) for t in (SLIDING, GLOBAL)}
        if cache is None:
            documents = packed_documents(positions)
            windows = {SLIDING: self.config.sliding_window, GLOBAL: None}
            masks = {t: attention_mask(positions, positions, w, documents) for t, w in windows.items()}
            if documents is not None:
                masks = {t: PackedMask(m, positions, windows[t]) for t, m in masks.items()}
            step = None
        else:
            step = cache.begin(positions)  # stores the new positions, returns masks over what it will hand back
            masks = step.masks
        # The usual prefill (the sequence's first chunk, no padding, no longer than the window) sees a plain
        # causal mask on every layer. None says so, and SDPA then takes its is_causal path, which skips the
        # masked half of the scores (docs/performance.md, "Figures the source comments used to quote").
        if (T > 1 and T <= self.config.sliding_window and (step is None or step.start == 0)
                and bool((positions == torch.arange(T, device=positions.device)).all())):
            masks = {SLIDING: None, GLOBAL: None}

        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.layer_type]
            args = (x, cos, sin, masks[layer.layer_type], step, i)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        x = self.norm(x)

        if labels is not None:
            return ModelOutput(logits=None, loss=self.loss(x, labels))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return ModelOutput(logits=self._head(x))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.embed_tokens.attend(h)  # tied: h · Eᵀ with the raw embedding, no sqrt(d) here
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """Mean next-token cross-entropy from final hidden states. The head computes it `chunk_size` positions
        at a time, so memory holds one chunk's (chunk, V) fp32 logits instead of the whole batch's:
        256 × 262 144 × 4 bytes = 256 MiB for Gemma 3's vocabulary, where a (8, 2048) batch needs 16 GiB."""
        targets = labels[:, 1:].reshape(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        keep = targets != IGNORE_INDEX
        h, targets = h[keep], targets[keep]
        if targets.numel() == 0:
            return hidden.sum() * 0.0  # no target in the batch: a zero that still has a graph
        total = self.embed_tokens.cross_entropy(h, targets, self.config.final_logit_softcapping, chunk_size)
        return total / targets.numel()

    # ------------------------------------------------------------------ helpers
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise Gemma3Error(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise Gemma3Error(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise Gemma3Error(f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def _positions(self, input_ids, positions, padding_mask, cache) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is not None:
            if positions.shape != (B, T):
                raise Gemma3Error(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
            return positions.to(device=input_ids.device, dtype=torch.long)
        start = cache.next_positions() if cache is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        if padding_mask is None:
            return start[:, None] + torch.arange(T, device=input_ids.device)
        if padding_mask.shape != (B, T):
            raise Gemma3Error(f"padding_mask must have shape {(B, T)}, got {tuple(padding_mask.shape)}")
        real = padding_mask.to(device=input_ids.device).bool()
        counted = start[:, None] + real.long().cumsum(dim=1) - 1
        return torch.where(real, counted, torch.full_like(counted, -1))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """From-scratch initialisation as HF's: N(0, 0.02) for the embedding and every projection, and
        zeros for every norm weight (a zero-centred gain of exactly 1)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
