"""LoRA (Hu et al. 2021): W x + (alpha / r) · B A x, with W frozen and only A (r × in), B (out × r) trained.

Initialisation is PEFT's default: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B zeros, so training starts
exactly at the base model. The files (PEFT's format) and the merge arithmetic are gemma3.weights.lora's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.weights.lora import LoraSettings, read_adapter


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Parameter names match PEFT's (lora_A, lora_B)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.base_layer.weight.requires_grad_(False)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init: A as nn.Linear's Kaiming-uniform (bound 1/sqrt(in)), B zero, so the update starts at 0."""
        bound = 1.0 / math.sqrt(self.lora_A.in_features)
        self.lora_A.weight.uniform_(-bound, bound, generator=generator)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer.weight.dtype
        if x.dtype != base and not torch.is_autocast_enabled(x.device.type):  # a frozen weight held in bf16
            out = self.base_layer(x.to(base)).to(x.dtype)  # (hold_frozen_in), read outside autocast (samples)
        else:
            out = self.base_layer(x)
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The merged update (alpha / r) · B A, shape of the base weight, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def apply_lora(model: nn.Module, settings: LoraSettings, generator: torch.Generator | None = None) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted linear layer in a LoRALinear.
    Returns the wrapped module paths (in our naming, e.g. ``layers.0.self_attn.q_proj``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in settings.targets and isinstance(child, nn.Linear):
                if settings.r > min(child.in_features, child.out_features):
                    raise Gemma3Error(f"LoRA rank {settings.r} is larger than {child_name} itself "
                                      f"({child.out_features} x {child.in_features}): a low-rank update of a "
                                      "higher rank than the weight adds nothing")
                lora = LoRALinear(child, settings.r, settings.alpha, settings.dropout)
                lora.reset_lora(generator)
                setattr(module, child_name, lora)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise Gemma3Error(f"no linear layer named {', '.join(settings.targets)} in the model")
    return wrapped


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base weights of every LoRALinear in `dtype` (bf16 for mixed-precision training): they
    are only read, by matmuls that autocast runs in bf16 anyway, so an fp32 copy would be cast on every call
    and double their memory. The adapters stay fp32 (their optimizer needs the precision)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.base_layer.weight.data = module.base_layer.weight.data.to(dtype)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}



def load_adapter_into(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Wrap `model` per the adapter's config and copy its weights in (names and shapes checked)."""
    settings, weights, _ = read_adapter(directory)
    apply_lora(model, settings)
    modules = lora_modules(model)
    expected = {f"{n}.{ab}" for n in modules for ab in ("lora_A", "lora_B")}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(f"{directory}: adapter does not match the model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for key, tensor in weights.items():
            name, ab = key.rsplit(".", 1)
            param = getattr(modules[name], ab).weight
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}, "
                                      f"the model needs {tuple(param.shape)}")
            param.copy_(tensor)
    return settings



@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict (our names, no LoRA) with every adapter folded in: W + (alpha / r) · B A."""
    deltas = {f"{name}.weight": m.delta() for name, m in lora_modules(model).items()}
    out = {}
    for key, tensor in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain in deltas:
            tensor = (tensor.float() + deltas[plain]).to(tensor.dtype)
        out[plain] = tensor
    return out



def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
