"""The one table of Gemma 3 tensor names, and the check every loader runs against it.

Our state dict uses HF's names without the leading ``model.`` (spec section 6). GGUF files use llama.cpp's
names (spec section 7); `GGUF_NAMES` maps between the two with a ``{}`` placeholder for the layer index, in
the style of torchtitan's state-dict adapters. Whatever the source, a loader ends by calling
`check_tensors`, so a missing, unexpected or mis-shaped tensor always fails the same way, with its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from gemma3.config import Gemma3Config
from gemma3.errors import CheckpointError

# GGUF name -> our name. Norm weights are stored as 1 + w in GGUF (llama.cpp's converter folds the "+1" of
# Gemma's zero-centred RMSNorm into the weight), so every `*norm.weight` needs -1 on the way in, +1 out.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "blk.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "layers.{}.self_attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
    "blk.{}.post_ffw_norm.weight": "layers.{}.post_feedforward_layernorm.weight",
}
OUR_TO_GGUF: dict[str, str] = {ours: gguf for gguf, ours in GGUF_NAMES.items()}
# The matrices a model may hold quantized (our names): every projection and the tied embedding / output head.
QUANTIZABLE = re.compile(r"^(embed_tokens|layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj)\.weight$")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str | None]:
    """Split ``blk.7.attn_q.weight`` into (``blk.{}.attn_q.weight``, ``"7"``)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end():], match.group(1)


def rename(name: str, table: Mapping[str, str]) -> str | None:
    """Translate one tensor name through `table` (GGUF_NAMES or OUR_TO_GGUF); None if it has no entry."""
    template, layer = _template(name)
    target = table.get(template)
    if target is None:
        return None
    return target.format(layer) if layer is not None else target


def is_norm(name: str) -> bool:
    """True for every zero-centred RMSNorm weight (both naming schemes end this way)."""
    return name.endswith("norm.weight")


def expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma 3 text model holds, with its shape (nn.Linear layout: [out, in])."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, d)}
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "post_attention_layernorm.weight": (d,),
        "pre_feedforward_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "post_feedforward_layernorm.weight": (d,),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{suffix}": shape for suffix, shape in per_layer.items()})
    shapes["norm.weight"] = (d,)
    return shapes


def check_tensors(found: Mapping[str, Sequence[int]], config: Gemma3Config, where: str,
                  display: Callable[[str], str] = str) -> None:
    """Raise CheckpointError unless `found` (our name -> shape) is exactly the model described by `config`.

    `display` turns one of our names into the name the file uses, so the message names what the user sees.
    """
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: missing tensor {display(name)} (expected shape {list(shape)})")
        if tuple(found[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {display(name)} has shape {list(found[name])}, expected {list(shape)} "
                f"for this config"
            )
    unexpected = sorted(map(display, set(found) - set(expected)))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
