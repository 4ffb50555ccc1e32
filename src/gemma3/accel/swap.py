"""Swapping a model's modules for others in place, the one way every fast path is put in (model.py never
learns of them)."""

from __future__ import annotations

from torch import nn


def swap_modules(module: nn.Module, replace) -> None:
    """Replace each descendant m by replace(m) when that is not None, children before their parents (so a
    replaced parent takes its already-replaced children along)."""
    for child_name, child in list(module.named_children()):
        swap_modules(child, replace)
        new = replace(child)
        if new is not None:
            setattr(module, child_name, new)
