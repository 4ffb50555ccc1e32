"""gemma3.train.optim.AdamW is torch's AdamW bit for bit (the same arithmetic a slice at a time), state dict
included, and its temporaries are a slice, not the largest tensor."""

from __future__ import annotations

import copy

import pytest
import torch

from gemma3.train.optim import AdamW


def params(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 111), (4099,), (8,), (3, 5, 7)]  # sizes not multiples of the slice or a vector
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ps.append(torch.nn.Parameter(torch.randn(64, 40, generator=g).t()))  # not contiguous: stepped whole
    ps.append(torch.nn.Parameter(torch.randn(5, generator=g)))  # never gets a gradient
    return ps


def groups(ps):
    return [{"params": ps[:2] + ps[4:], "weight_decay": 0.1}, {"params": ps[2:4], "weight_decay": 0.0}]


def run(optimizer_class, steps=5, state=None, **kwargs):
    ps = params(0)
    opt = optimizer_class(groups(ps), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, **kwargs)
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))  # it keeps the given tensors: a second run would share them
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps[:-1]:
            p.grad = torch.randn(p.shape, generator=g) * 10 ** torch.randint(-4, 2, (), generator=g).item()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("slice_size", [1000, 1 << 22])
def test_the_same_bits_as_torch(slice_size, monkeypatch):
    monkeypatch.setattr(AdamW, "slice_size", slice_size)
    want, want_opt = run(torch.optim.AdamW)
    got, got_opt = run(AdamW)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    for w, g in zip(want_opt.state_dict()["state"].values(), got_opt.state_dict()["state"].values()):
        assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    # each resumes from the other's state dict to the same bits
    ours_after_theirs, _ = run(AdamW, steps=2, state=want_opt.state_dict())
    theirs_after_theirs, _ = run(torch.optim.AdamW, steps=2, state=want_opt.state_dict())
    for a, b in zip(ours_after_theirs, theirs_after_theirs):
        assert torch.equal(a, b)


def test_options_it_does_not_reimplement_go_to_torch():
    for kwargs in ({"amsgrad": True}, {"maximize": True}):
        want, _ = run(torch.optim.AdamW, **kwargs)
        got, _ = run(AdamW, **kwargs)
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_temporaries_are_a_slice(monkeypatch):
    """The largest tensor a step allocates, seen through the ops it runs: torch's makes two of the parameter's
    size (sqrt, then the division); ours none larger than a slice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            in_place = func._schema.name.endswith("_") or any(a.is_out for a in func._schema.arguments)
            if isinstance(out, torch.Tensor) and not func.is_view and not in_place:  # memory of its own
                Largest.biggest = max(Largest.biggest, out.numel())
            return out

    monkeypatch.setattr(AdamW, "slice_size", 1000)
    p = torch.nn.Parameter(torch.randn(100_000))
    for optimizer_class, bound in ((torch.optim.AdamW, 100_000), (AdamW, 1000)):
        opt = optimizer_class([p], lr=1e-3)
        p.grad = torch.randn(100_000)
        opt.step()  # the state is created outside the measurement
        Largest.biggest = 0
        with Largest():
            opt.step()
        assert Largest.biggest == bound, optimizer_class
