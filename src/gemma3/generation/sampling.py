"""Logits → next token: repetition penalty, temperature, top-k, top-p, min-p, then a draw.

Every step is a small pure function over a float32 logits tensor of shape (B, V); filters mask the
tokens they drop with -inf. `process_logits` chains them in the order transformers uses, so the same
`SamplingParams` give the same distribution as `model.generate(do_sample=True, ...)`:

    repetition penalty → temperature → top-k → top-p → min-p → softmax → multinomial

Source: `GenerationMixin._get_logits_processor` in transformers/generation/utils.py (5.24). It appends
`RepetitionPenaltyLogitsProcessor` with the non-sampling processors, then, only when `do_sample`, the
former "warpers" in this order: `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
`MinPLogitsWarper` (min-p after temperature, as llama.cpp argued in ggml-org/llama.cpp#3841). Greedy
decoding (temperature 0, HF's `do_sample=False`) applies only the repetition penalty, then argmax; the
filters never remove the top token, so skipping them there changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gemma3.errors import Gemma3Error

# Below this a positive temperature can overflow float32 (logit / T = inf, then softmax gives NaN);
# anything that cold is greedy in practice, so ask for 0 instead.
MIN_TEMPERATURE = 1e-5
# Above this the float32 division overflows nothing yet, but the distribution is flat over what top-k/top-p
# keep; far above it (past float32's range) -inf / T becomes NaN.
MAX_TEMPERATURE = 1e4
# The same for the repetition penalty, which divides (or multiplies) logits: outside [1e-3, 1e3] a logit can
# overflow, and no such penalty means anything a milder one does not.
MIN_PENALTY, MAX_PENALTY = 1e-3, 1e3


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are Gemma 3's own: temperature 1.0, top-k 64, top-p 0.95
    (gemma_pytorch, spec §9; the IT checkpoints' `generation_config.json` sets the same top-k and top-p),
    with min-p and repetition penalty off.

    `temperature=0` means greedy. `top_k=0`, `top_p=1` and `min_p=0` switch their filter off, and
    `repetition_penalty=1` does too. Construction validates, so an invalid object cannot exist.
    """

    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise `Gemma3Error` naming the first out-of-range field. Values come from users (CLI flags,
        HTTP requests): NaN, inf and absurd values are rejected here rather than turning into NaN logits."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise Gemma3Error(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise Gemma3Error(f"top_k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise Gemma3Error(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE or self.temperature > MAX_TEMPERATURE:
            raise Gemma3Error(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                              f"got {self.temperature}")
        if self.top_k < 0:
            raise Gemma3Error(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Gemma3Error(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise Gemma3Error(f"min_p must be in [0, 1], got {self.min_p}")
        if not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise Gemma3Error(f"repetition_penalty must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1 disables it), "
                              f"got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id already in the sequence (prompt included), once however often it occurs:
    positive logits are divided by `penalty`, negative ones multiplied (CTRL, Keskar et al. 2019; HF's
    `RepetitionPenaltyLogitsProcessor`), so penalty > 1 always makes a seen token less likely.

    logits: (B, V). prev_ids: (B, T) token history; ids < 0 (padding) and ids >= V (rows of a larger
    embedding than the logits cover) are ignored.
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    # Send ignored ids to an extra column that is cut off again, so gather/scatter need no branches.
    ids = torch.where((prev_ids >= 0) & (prev_ids < vocab), prev_ids, vocab)  # (B, T)
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it. Must be > 0."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept too, as in HF); k = 0 keeps all."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    Like HF, work from the *least* likely end: a token goes if the tokens up to and including it
    (ascending order) hold at most 1 - p of the mass. The most likely token always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one (Nguyen et al. 2024): the cut
    adapts to the model's confidence. min_p = 0 keeps all; the most likely token always stays."""
    if min_p == 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    drop = probs < threshold
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, -math.inf)


def greedy(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The most likely token per row: (B, V) → (B,), the first one on ties (and the first NaN), as argmax.

    torch's CPU argmax runs on one thread without vectorizing; taking the max of each block of 1 024
    (vectorized), then the argmax over the block maxima and inside the first block that holds the overall max,
    gives the same index several times faster (docs/performance.md, "Generation")."""
    B, V = logits.shape
    if V % block or V < 16 * block:
        return logits.argmax(dim=-1)
    blocks = logits.view(B, V // block, block)
    first = blocks.amax(dim=-1).argmax(dim=-1)  # (B,) the first block holding the max; amax keeps NaN
    inside = blocks[torch.arange(B, device=logits.device), first].argmax(dim=-1)
    return first * block + inside


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits): (B, V) → (B,). Pass a seeded `torch.Generator`
    (on the logits' device) for reproducible draws; None uses torch's global RNG."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def process_logits(logits: torch.Tensor, params: SamplingParams, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """All of `params`' logit transforms in HF's order (see the module docstring), in float32.
    For greedy params only the repetition penalty applies, as with HF's `do_sample=False`."""
    logits = logits.float()
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def check_finite(logits: torch.Tensor, generated: int, cache_dtype: torch.dtype | None = None) -> None:
    """Stop with a clear error when the model's logits hold NaN or inf (sampling would fail on them, and an
    argmax would pick garbage). One sum is the check (cheap next to a decode step): non-finite iff any is."""
    if not bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        cache = (", or a key or value beyond ±65504 overflowed the float16 KV cache (try --kv-cache-dtype float32)"
                 if cache_dtype == torch.float16 else "")
        raise Gemma3Error(f"the model produced non-finite logits (NaN or inf) after {generated} generated token(s): "
                          "its weights are probably non-finite (a corrupt or overflowed checkpoint), or the "
                          "dtype cannot hold its activations (Gemma 3 needs bfloat16 or float32, never float16)"
                          + cache)


def tokenizer_vocab(tokenizer) -> int | None:
    """How many token ids the tokenizer has (None where it does not say): `mask_padding`'s `vocab`."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else None


def mask_padding(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Set the logits (..., V) of the embedding rows past the tokenizer's `vocab` ids to -inf, in place, and
    return them: no token maps to those rows (the 4B-27B's 64 padding rows), so they are never sampled."""
    if vocab is not None and logits.shape[-1] > vocab:
        logits[..., vocab:] = -math.inf
    return logits


# Top-k at or below this: filter and draw among the k candidates (see `next_token`).
TOP_K_CANDIDATES = 1024


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    prev_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token for each row of `logits` (B, V) given the token history `prev_ids` (B, T,
    prompt included, used by the repetition penalty). Returns (B,) int64 token ids.

    With a top-k (Gemma's default is 64), top-p, min-p and the draw work on the k candidates only: the same
    distribution as `process_logits` over the whole vocabulary (tokens outside the top k are -inf there,
    probability 0), without sorting and drawing over 262 144 logits, which cost about a decode step
    (docs/generation.md, "Sampling")."""
    if params.greedy or not 0 < params.top_k <= TOP_K_CANDIDATES or params.top_k >= logits.shape[-1]:
        logits = process_logits(logits, params, prev_ids)
        return greedy(logits) if params.greedy else sample(logits, generator)
    logits = logits.float()
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty)
    logits = apply_temperature(logits, params.temperature)
    kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for row in range(logits.shape[0]):
        keep = logits[row] >= kth[row]  # the top k and their ties, in id order (as HF)
        if kth[row, 0] == -math.inf:  # fewer than k allowed (a grammar): not the -inf "ties", all the vocabulary
            keep &= logits[row] > -math.inf
        ids = keep.nonzero().squeeze(1)
        candidates = logits[row, ids][None]
        candidates = apply_min_p(apply_top_p(candidates, params.top_p), params.min_p)
        tokens[row] = ids[sample(candidates, generator)[0]]
    return tokens
