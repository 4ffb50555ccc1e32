"""Perplexity of a text under a model: the number to check a model, a conversion or a quantisation by.

Strided sliding windows as in HF's perplexity guide (https://huggingface.co/docs/transformers/perplexity):
each window of `context` tokens scores only the tokens the previous window did not, so every token is
predicted once, with up to `context - stride` tokens of history. Gemma is extremely sensitive to a
missing <bos> (pitfall 19: it is the attention sink), so the text starts with <bos> and every later
window is given a <bos> in front too, as context that is never scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gemma3.errors import Gemma3Error
from gemma3.model import IGNORE_INDEX, Gemma3Model


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int


def pydoc_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens (<bos> first) of CPython's pydoc topics (`pydoc_data.topics`, in every standard
    library): long, real English prose with code, that nothing here trains on. The held-out text of the
    accuracy tests, the pictures and the ablations."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))[:40 * n]
    ids = tokenizer.encode(text, add_bos=True)[:n]
    if len(ids) < n:
        raise Gemma3Error(f"the pydoc topics hold only {len(ids)} tokens, fewer than {n}")
    return ids


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) per window over token indices [1, n_tokens) (index 0 is <bos>)."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + context, n_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


@torch.inference_mode()
def perplexity(model: Gemma3Model, ids: list[int], context: int = 2048, stride: int | None = None,
               bos_id: int = 2, progress: bool = False) -> PerplexityResult:
    """Perplexity of `ids` (which must start with <bos>) with windows of `context` tokens every `stride`."""
    stride = stride or context // 2
    if context < 2 or context > model.config.max_position_embeddings:
        raise Gemma3Error(f"context must be in [2, {model.config.max_position_embeddings}], got {context}")
    if not 1 <= stride <= context - 1:
        raise Gemma3Error(f"stride must be in [1, context - 1] = [1, {context - 1}], got {stride}")
    if len(ids) < 2:
        raise Gemma3Error("the text is empty: nothing to score")
    device = next(model.parameters()).device
    spans = windows(len(ids), context - 1, stride)  # one slot of each window is kept for <bos>
    n_windows = len(spans)
    if progress:
        import sys

        from tqdm.auto import tqdm

        spans = tqdm(spans, desc="perplexity", unit="window", delay=1, file=sys.stderr)
    nll_sum, count = 0.0, 0
    for begin, end, first in spans:
        window = ([] if begin == 0 else [bos_id]) + ids[begin:end]
        offset = 0 if begin == 0 else 1
        labels = torch.full((len(window),), IGNORE_INDEX)
        scored = slice(first - begin + offset, end - begin + offset)
        labels[scored] = torch.tensor(window[scored])
        n = int((labels[1:] != IGNORE_INDEX).sum())
        loss = model(torch.tensor([window], device=device), labels=labels[None].to(device)).loss
        nll_sum += float(loss) * n
        count += n
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, n_windows)
