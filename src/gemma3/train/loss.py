"""The training loss without the logits: next-token cross-entropy over Gemma 3's 262 144-token vocabulary,
whose (tokens, V) fp32 logits are the largest tensor of a training step (16 GiB for a batch of 8 × 2048).

`FusedLossEmbedding` is the tied embedding with a head whose `cross_entropy` computes the loss and, in the same
pass, its gradients, chunk by chunk (`ChunkedLinearCrossEntropy`): no chunk's logits outlive the chunk, where
autograd over the model's own chunked loss keeps every chunk's for backward. The trainer swaps it in
(`use_fused_loss`); the model, and everything that only evaluates a loss, keeps the plain head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma3.model import TiedEmbedding


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(softcap(h @ Wᵀ), targets)), computed chunk by chunk, with its gradients.

    The (N, V) logits of a batch are the largest tensor in training (V = 262 144), so they are never held
    whole: each chunk's logits are computed, turned into the loss and, right away, into the chunk's
    gradients for h and W; then they are freed. Computing the gradients in the forward pass costs no more
    than autograd would (the same three matmuls) and, unlike recomputing the logits in backward, no extra
    matmul. Gradients are kept for backward, which only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, softcap: float | None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # fp32 (V, d): the first chunk's product becomes it, no zeroed table beside it
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, targets.numel(), chunk_size):
            h_c, t_c = h[start:start + chunk_size], targets[start:start + chunk_size]
            logits = (h_c @ w.t()).float()  # (n, V)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            total += F.cross_entropy(logits, t_c, reduction="sum")
            if need_h or need_w:
                grad = logits.softmax(dim=-1)  # d(loss)/d(logits) = softmax - one_hot(target)
                grad[torch.arange(len(t_c), device=grad.device), t_c] -= 1.0
                if softcap is not None:
                    grad *= 1.0 - capped * capped
                grad = grad.to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = grad @ w  # (n, d)
                if need_w:
                    part = (grad.t() @ h_c).float()  # (V, d)
                    grad_w = part if grad_w is None else grad_w.add_(part)
                    del part
        if need_w and grad_w is None:  # no targets: a zero gradient
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h)
        # Held on ctx, not saved, so that backward scales it in place: a second (V, d) fp32 table at the start
        # of backward, when every activation is still held, was the peak of a full fine-tuning step.
        ctx.grad_w = grad_w
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
        grad_w, ctx.grad_w = ctx.grad_w, None
        if grad_w is None and ctx.needs_input_grad[1]:
            raise RuntimeError("ChunkedLinearCrossEntropy: backward through the same loss twice (its weight "
                               "gradient is scaled in place and given away once)")
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


class FusedLossEmbedding(TiedEmbedding):
    """TiedEmbedding whose summed cross-entropy is ChunkedLinearCrossEntropy over its own table."""

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_size: int
                      ) -> torch.Tensor:
        return ChunkedLinearCrossEntropy.apply(h, self.weight, targets, chunk_size, softcap)


def use_fused_loss(model: nn.Module) -> nn.Module:
    """Give `model` the fused loss head, keeping its embedding Parameter (the state dict is unchanged)."""
    old = model.embed_tokens
    if type(old) is TiedEmbedding:
        new = FusedLossEmbedding(old.num_embeddings, old.embedding_dim, device="meta")
        new.weight = old.weight
        model.embed_tokens = new
    return model
