"""AdamW that updates each tensor a slice at a time: torch's AdamW, the same arithmetic in the same order (so
the same bits and the same state dict), with temporaries the size of a slice instead of the largest parameter.

Why: on a CPU torch's AdamW runs one tensor at a time, op by op, and `(exp_avg_sq.sqrt() / c).add_(eps)` makes
two temporaries the size of the tensor. For Gemma 3 the largest is the tied embedding, 262 144 × 640 fp32 =
671 MB, so a full fine-tuning step peaked 1.25 GiB above its resting memory inside `optimizer.step()` (measured,
docs/performance.md). torch's `fused=True` would avoid them, but it rounds differently from the default (and
from itself when FSDP2 shards a tensor: a vector's tail is computed apart from its body), so a run's curve would
depend on the optimizer's implementation and on the number of processes. Here every op is elementwise, so a
slice computes exactly what the whole tensor would.
"""

from __future__ import annotations

import torch

SLICE = 1 << 22  # elements a temporary holds: 16 MiB of fp32


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW with its default CPU arithmetic, applied to contiguous tensors SLICE elements at a
    time. Options it does not reimplement (amsgrad, maximize, capturable, differentiable, foreach, fused, a
    tensor lr) and complex parameters go to torch's own step."""

    slice_size = SLICE

    @torch.no_grad()
    def step(self, closure=None):
        if any(self._torch_steps(group) for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:  # as torch initialises it (a float step on the CPU, moments like the parameter)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                step = state["step"].item()
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                for param, grad, exp_avg, exp_avg_sq in _slices(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                                                size=self.slice_size):
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss

    @staticmethod
    def _torch_steps(group) -> bool:
        """Whether this group needs torch's own step (an option or a parameter this class does not handle)."""
        if (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable")
                or group.get("foreach") or group.get("fused") or isinstance(group["lr"], torch.Tensor)
                or any(isinstance(b, torch.Tensor) for b in group["betas"])):
            return True
        return any(torch.is_complex(p) for p in group["params"])


def _slices(*tensors, size: int):
    """Matching flat slices of same-shaped tensors; the whole tensors where they are not all plain contiguous
    CPU tensors (FSDP2's DTensors, say), so the arithmetic is the same either way."""
    plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_contiguous() and t.device.type == "cpu"
                for t in tensors)
    if not plain or tensors[0].numel() <= size:
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), size):
        yield tuple(t[start:start + size] for t in flat)
