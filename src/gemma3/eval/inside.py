"""A look inside the model at one step of a text: what `gemma3 serve`'s playground shows when a token is clicked.

For the token at `position` of `ids` (the model read ids[:position] and predicted it at position - 1):

    candidates  the most likely next tokens at that step and their probabilities (the final logits' softmax)
    lens        the logit lens there: the next token read off the residual stream after the embedding and after
                every layer (final norm, then the tied head), and the probability each gives the real token
    attention   where the query at position - 1 looked: its attention weights over keys 0 ... position - 1
                (mean over query heads) in a few layers, a sliding one and a global one by default

It is computed by the same function as `gemma3 plot attention / logit-lens` (gemma3.eval.plot.trace: one plain
forward with hooks on the layers), on whichever modules the model has (the server's are its fast CPU modules:
the attention of the traced layers goes through the model's own eager path for the weights). A deadline,
checked before each layer, bounds how long it may hold the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemma3.config import GLOBAL, SLIDING
from gemma3.errors import Gemma3Error
from gemma3.eval.plot import read_off, trace
from gemma3.generation.sampling import mask_padding


class DeadlinePassed(Gemma3Error):
    """The look inside ran past its time bound (it stops at the next layer)."""


@dataclass
class Inside:
    position: int
    token_id: int | None  # the token at `position`, None when position == len(ids) (the next one)
    token_prob: float | None
    candidates: list[tuple[int, float, float]]  # (id, probability, log-probability), most likely first
    lens: list[tuple[int, float, float | None]]  # per residual (embedding, layer 0, ...): (top id, its p, p(token))
    attention: dict[int, list[float]]  # layer → weights of the query at position - 1 over keys 0 ... position - 1


def default_layers(layer_types: Sequence[str]) -> tuple[int, ...]:
    """The first sliding and the first global layer (the pair `gemma3 plot attention` draws)."""
    return tuple(layer_types.index(kind) for kind in (SLIDING, GLOBAL) if kind in layer_types)


@torch.inference_mode()
def look_inside(model, ids: Sequence[int], position: int, top_k: int = 10, layers: Sequence[int] | None = None,
                vocab: int | None = None, deadline: float | None = None) -> Inside:
    """See the module docstring. `vocab`: ids at or past it (embedding padding rows) get no probability;
    `deadline`: a time.monotonic() after which it raises DeadlinePassed."""
    config = model.config
    if not 1 <= position <= len(ids):
        raise Gemma3Error(f"position must be in [1, {len(ids)}], got {position}")
    layers = default_layers(config.layer_types) if layers is None else tuple(layers)
    for i in layers:
        if not 0 <= i < config.num_hidden_layers:
            raise Gemma3Error(f"layer {i}: the model has layers 0-{config.num_hidden_layers - 1}")
    handles = []
    if deadline is not None:
        def check(module, args):
            if time.monotonic() > deadline:
                raise DeadlinePassed("the look inside ran past its time bound")
        handles = [layer.register_forward_pre_hook(check) for layer in model.layers]
    try:
        traced = trace(model, list(ids[:position]), layers)
    finally:
        for h in handles:
            h.remove()
    # the last position's residual after the embedding and each layer, read off as the logit lens reads it
    logits = read_off(model, torch.stack([r[-1] for r in traced["residual"]]))  # (L + 1, V)
    logp = torch.log_softmax(mask_padding(logits, vocab), dim=-1)
    token = int(ids[position]) if position < len(ids) else None
    final = logp[-1]
    values, index = torch.topk(final, top_k)
    candidates = [(int(i), float(v.exp()), float(v)) for i, v in zip(index, values)]
    top_p, top_id = logp.max(dim=-1)
    lens = [(int(i), float(p.exp()), None if token is None else float(row[token].exp()))
            for i, p, row in zip(top_id, top_p, logp)]
    attention = {}
    for i, probs in traced["probs"].items():  # (K, G·T, T): the rows of each KV head's G query heads
        T = probs.shape[-1]
        rows = probs.reshape(probs.shape[0], -1, T, T)[:, :, -1]  # (K, G, T): the last query, every head
        attention[i] = rows.mean(dim=(0, 1)).tolist()
    return Inside(position, token, None if token is None else float(final[token].exp()), candidates, lens,
                  attention)
