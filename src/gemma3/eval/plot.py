"""Pictures of Gemma 3 at work, drawn from the real weights (matplotlib; `gemma3 plot KIND`, and the notebooks).

Each `*_figure` function computes what it shows with the package's own modules and returns a matplotlib Figure:

    masks       the causal masks of a sliding layer (window W) and of a global layer
    rope        the wavelength of every rotary frequency pair for the two bases (sliding 10k, global 1M)
    attention   attention weights of a sliding and of a global layer on a real text longer than the window
    residual    the residual stream's size after every layer (why fp16, max 65 504, overflows)
    logit-lens  the most likely next token read off the residual stream after every layer
    kv-cache    the KV cache's bytes for the 5 : 1 hybrid against all-global layers, per preset, as context grows

Figures are computed in fp32 on the CPU with the plain modules (no fused or quantized fast paths), so what
is drawn is the architecture's own arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from gemma3.config import GLOBAL, PRESETS, SLIDING, Gemma3Config
from gemma3.errors import Gemma3Error
from gemma3.kv_cache import cache_bytes
from gemma3.model import attention_mask

KINDS = ("masks", "rope", "attention", "residual", "logit-lens", "kv-cache")
FP16_MAX = 65504.0


def _figure(**kwargs):
    """A matplotlib Figure of its own (no pyplot state to leak or close)."""
    try:
        import warnings

        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise Gemma3Error("plots need matplotlib: pip install matplotlib (it comes with the train and test "
                          "extras)") from e
    # tokens in scripts the default font lacks (CJK, Thai) are drawn as boxes: say nothing about each
    warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
    return Figure(**kwargs)


# ------------------------------------------------------------------------------------------ no weights
def masks_figure(config: Gemma3Config, tokens: int = 24, window: int | None = None):
    """The two masks over `tokens` positions; `window` defaults to a small one (6) so the band is visible
    (the real W is config.sliding_window)."""
    W = window or min(6, config.sliding_window)
    pos = torch.arange(tokens)[None]
    sliding = attention_mask(pos, pos, W)[0, 0].float()
    full = attention_mask(pos, pos, None)[0, 0].float()
    fig = _figure(figsize=(9, 4.6))
    axes = fig.subplots(1, 2)
    for ax, m, title in ((axes[0], sliding, f"sliding layer: window W = {W}\n(query i sees i - W < j ≤ i)"),
                         (axes[1], full, "global layer\n(query i sees every j ≤ i)")):
        ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
    fig.suptitle(f"Gemma 3 attention masks ({config.layer_types.count(SLIDING)} sliding : "
                 f"{config.layer_types.count(GLOBAL)} global layers; the real W is {config.sliding_window})")
    fig.tight_layout()
    return fig


def rope_figure(config: Gemma3Config):
    """Wavelength (tokens per full turn) of each of the head_dim / 2 rotation frequencies, per base."""
    hd = config.head_dim
    i = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    fig = _figure(figsize=(8, 4.6))
    ax = fig.subplots()
    for base, label in ((config.rope_local_base_freq, "sliding layers"), (config.rope_theta, "global layers")):
        wavelength = 2 * math.pi * base ** i
        ax.plot(range(hd // 2), wavelength, label=f"{label}: base {base:,.0f}")
    if config.rope_scaling_factor != 1:
        ax.plot(range(hd // 2), 2 * math.pi * config.rope_theta ** i * config.rope_scaling_factor, "--",
                label=f"global, positions / {config.rope_scaling_factor:g} (long context)")
    ax.axhline(config.sliding_window, color="gray", lw=0.8, ls=":")
    ax.text(1, config.sliding_window * 1.3, f"sliding window {config.sliding_window}", color="gray", fontsize=8)
    ax.axhline(config.max_position_embeddings, color="gray", lw=0.8, ls=":")
    ax.text(1, config.max_position_embeddings * 1.3, f"context {config.max_position_embeddings:,}", color="gray",
            fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair (dimensions 2k, 2k + 1 of each head)")
    ax.set_ylabel("wavelength (tokens per turn)")
    ax.set_title("RoPE's two bases: a sliding layer looks back at most W tokens, a global layer across the\n"
                 "whole context, so its base is 100× larger and far more of its wavelengths exceed the context",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kv_cache_figure(presets: Sequence[str] = tuple(PRESETS), dtype: torch.dtype = torch.bfloat16):
    """KV cache bytes (batch 1) against context length: the hybrid's ring buffers against every layer global."""
    fig = _figure(figsize=(8, 4.8))
    ax = fig.subplots()
    lengths = [2 ** p for p in range(9, 18)]
    for n, name in enumerate(presets):
        config = PRESETS[name]
        allglobal = dataclasses.replace(config, layer_types=(GLOBAL,) * config.num_hidden_layers)
        hybrid = [cache_bytes(config, 1, L, dtype) / 2**30 for L in lengths if L <= config.max_position_embeddings]
        full = [cache_bytes(allglobal, 1, L, dtype) / 2**30 for L in lengths if L <= config.max_position_embeddings]
        xs = [L for L in lengths if L <= config.max_position_embeddings]
        color = f"C{n}"
        ax.plot(xs, full, "--", color=color, lw=1)
        ax.plot(xs, hybrid, "-", color=color, label=f"{name}: {full[-1] / hybrid[-1]:.1f}× less at {xs[-1]:,}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache, GiB ({str(dtype).replace('torch.', '')}, batch 1)")
    ax.set_title("The 5 : 1 hybrid (solid) against all-global layers (dashed): sliding layers keep only W tokens",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ real weights
@torch.inference_mode()
def trace(model, ids: list[int], layers: Sequence[int] = ()) -> dict:
    """One plain forward over `ids`, recording the residual stream after the embedding and after every
    layer, and the attention weights (B=1, mean over heads is left to the caller) of `layers`."""
    residual, probs = [], {}
    handles = [model.layers[0].register_forward_pre_hook(lambda m, args: residual.append(args[0][0].float()))]
    for layer in model.layers:
        handles.append(layer.register_forward_hook(lambda m, args, out: residual.append(out[0].float())))
    implementations = {}  # layer → its attention implementation, restored afterwards
    for i in layers:
        attn = model.layers[i].self_attn
        implementations[i] = attn.implementation
        attn.implementation = "eager"  # the path that computes the weights as a tensor of their own
        # MaskedSoftmax's output: (B, K, G·T, S) fp32, the rows of a KV head's G query heads one after another
        handles.append(attn.softmax.register_forward_hook(lambda m, args, out, i=i: probs.__setitem__(i, out[0])))
    try:
        model(torch.tensor([ids]), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        for i, implementation in implementations.items():
            model.layers[i].self_attn.implementation = implementation
    return {"residual": residual, "probs": probs}


def attention_figure(model, tokenizer, ids: list[int], layers: Sequence[int] | None = None):
    """Attention weights (mean over query heads) of a sliding and a global layer over `ids`."""
    config = model.config
    if layers is None:
        layers = (config.layer_types.index(SLIDING), config.layer_types.index(GLOBAL))
    for i in layers:
        if not 0 <= i < config.num_hidden_layers:
            raise Gemma3Error(f"--layer {i}: the model has layers 0-{config.num_hidden_layers - 1}")
    probs = trace(model, ids, layers)["probs"]
    T = len(ids)
    fig = _figure(figsize=(4.4 * len(layers), 4.4))
    axes = fig.subplots(1, len(layers), squeeze=False)
    for ax, i in zip(axes[0], layers):
        p = probs[i]  # (K, G·T, T)
        K = p.shape[0]
        mean = p.reshape(K, -1, T, T).mean(dim=(0, 1))  # (T, T)
        ax.imshow(torch.log10(mean.clamp(min=1e-6)).numpy(), cmap="magma", vmin=-6, vmax=0)
        kind = config.layer_types[i]
        ax.set_title(f"layer {i} ({kind}" + (f", W = {config.sliding_window})" if kind == SLIDING else ")"),
                     fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(f"Attention weights on a real text of {T} tokens (mean over heads, log10 scale)", fontsize=11)
    fig.tight_layout()
    return fig


def residual_figure(model, ids: list[int]):
    """RMS and largest |value| of the residual stream after the embedding and each layer."""
    residual = trace(model, ids)["residual"]
    rms = [float(r.pow(2).mean().sqrt()) for r in residual]
    peak = [float(r.abs().max()) for r in residual]
    fig = _figure(figsize=(8, 4.6))
    ax = fig.subplots()
    xs = range(len(residual))
    ax.plot(xs, peak, "o-", label="largest |value|")
    ax.plot(xs, rms, "s-", label="RMS")
    ax.axhline(FP16_MAX, color="red", lw=1, ls="--")
    ax.text(0, FP16_MAX * 1.25, "float16 max 65 504", color="red", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(["emb"] + [str(i) for i in range(len(residual) - 1)], fontsize=7)
    ax.set_xlabel("after layer")
    ax.set_ylabel("residual stream")
    ax.set_title(f"The residual stream over {len(ids)} tokens: the sandwich norms keep each block's output "
                 "small,\nbut the sum grows; bfloat16 (fp32's range) holds it", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_off(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits read off residual-stream rows (..., d) as the model reads its last layer's: the
    final norm, then the tied head (the logit lens)."""
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32  # a quantized model's activations are fp32
    return model._head(model.norm(hidden.to(dtype))).float()


@torch.inference_mode()
def logit_lens(model, ids: list[int], positions: int = 8) -> tuple[list[list[int]], list[list[float]]]:
    """For the last `positions` tokens: the top next-token id and its probability read off the residual
    stream after the embedding and after every layer (final norm, then the tied head)."""
    residual = trace(model, ids)["residual"]
    top, prob = [], []
    for r in residual:
        p = read_off(model, r[-positions:]).softmax(-1)
        values, index = p.max(-1)
        top.append(index.tolist())
        prob.append(values.tolist())
    return top, prob


def logit_lens_figure(model, tokenizer, ids: list[int], positions: int = 8):
    positions = min(positions, len(ids))
    top, prob = logit_lens(model, ids, positions)
    fig = _figure(figsize=(1.3 * positions + 2, 0.32 * len(top) + 1.8))
    ax = fig.subplots()
    ax.imshow(torch.tensor(prob).numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for y, row in enumerate(top):
        for x, token in enumerate(row):
            text = tokenizer.decode([token]).replace("\n", "\\n")[:10]
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white" if prob[y][x] > 0.6 else "black")
    inputs = [tokenizer.decode([t]).replace("\n", "\\n")[:10] for t in ids[-positions:]]
    ax.set_xticks(range(positions))
    ax.set_xticklabels(inputs, fontsize=8)
    ax.set_yticks(range(len(top)))
    ax.set_yticklabels(["emb"] + [f"layer {i}" for i in range(len(top) - 1)], fontsize=7)
    ax.set_xlabel("input token (the cell: the most likely next token, its probability as colour)")
    ax.set_title("Logit lens: the next token read off the residual stream after each layer", fontsize=10)
    fig.tight_layout()
    return fig
