"""`gemma3 info` and `gemma3 convert`: inspect a model's size and costs, and move weights between formats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gemma3.config import GLOBAL, PRESETS, Gemma3Config

# gemma3.weights.gguf.writer.WRITABLE_TYPES, spelled out so that --help does not import the writer (a test holds them equal)
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q4_K")

EMBEDDED_NAMES = ("embedded", "default")


def _source(value: str | None) -> str | None:
    """CLI spelling of a source: nothing or "embedded" means the embedded 270M."""
    return None if value is None or value in EMBEDDED_NAMES else value


# ---------------------------------------------------------------------- info
def model_info(config: Gemma3Config) -> dict[str, Any]:
    """Parameter breakdown, weight memory per dtype and KV-cache cost of a config (all exact integers)."""
    d, f, hd, n_layers = config.hidden_size, config.intermediate_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    params = {
        "embedding": config.vocab_size * d,  # also the output head (tied)
        "attention": n_layers * (2 * d * q + 2 * d * kv),
        "mlp": n_layers * 3 * d * f,
        "norms": n_layers * (4 * d + 2 * hd) + d,
    }
    params["total"] = sum(params.values())  # == config.num_parameters()
    # Per token and layer the cache holds one key and one value vector per KV head.
    per_layer_token = 2 * kv
    context = config.max_position_embeddings
    window = min(config.sliding_window, context)
    kv_cache = {}
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        kv_cache[dtype] = {
            "per_token_global_layers": config.num_global_layers * per_layer_token * size,
            "per_token_sliding_layers": config.num_sliding_layers * per_layer_token * size,
            "full_context": (config.num_global_layers * context + config.num_sliding_layers * window)
            * per_layer_token * size,
        }
    return {
        "config": config.to_dict(),
        "parameters": params,
        "weight_bytes": {"float32": 4 * params["total"], "bfloat16": 2 * params["total"], "int8": params["total"]},
        "kv_cache_bytes": kv_cache,
        "context_length": context,
    }


def _config_of(source: str | None) -> tuple[Gemma3Config, str]:
    """The config of a source without loading its weights; preset names (270m ... 27b) also work here."""
    from gemma3.weights.sources import resolve_model
    from gemma3.weights.gguf.reader import GGUFFile
    from gemma3.weights.gguf.translate import config_from_gguf

    if source is not None and source.lower() in PRESETS and not Path(source).exists():
        return PRESETS[source.lower()], f"preset {source.lower()}"
    resolved, adapter = resolve_model(source)  # a LoRA adapter has its base model's config
    description = resolved.description + (f" + LoRA {adapter}" if adapter else "")
    if resolved.kind == "gguf":
        return config_from_gguf(GGUFFile.open(resolved.path)), description
    return Gemma3Config.from_json_file(resolved.path / "config.json"), description


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run_info(args: argparse.Namespace) -> int:
    config, description = _config_of(_source(args.model))
    info = model_info(config)
    if args.json:
        print(json.dumps({"source": description, **info}, indent=2))
        return 0
    c, p = config, info["parameters"]
    globals_ = [i for i, t in enumerate(c.layer_types) if t == GLOBAL]
    lines = [
        f"source        {description}",
        f"layers        {c.num_hidden_layers} ({c.num_sliding_layers} sliding, window {c.sliding_window}; "
        f"{c.num_global_layers} global: {', '.join(map(str, globals_))})",
        f"hidden        {c.hidden_size}   intermediate {c.intermediate_size}   vocab {c.vocab_size}",
        f"attention     {c.num_attention_heads} query heads, {c.num_key_value_heads} KV heads, head_dim "
        f"{c.head_dim}, query_pre_attn_scalar {c.query_pre_attn_scalar:g}",
        f"rope          local base {c.rope_local_base_freq:g}, global base {c.rope_theta:g}"
        + (f" (linear scaling x{c.rope_scaling_factor:g})" if c.rope_scaling_factor != 1 else ""),
        f"context       {c.max_position_embeddings} tokens",
        "",
        "parameters",
    ]
    for name in ("embedding", "attention", "mlp", "norms"):
        lines.append(f"  {name:<12}{p[name]:>16,}  {100 * p[name] / p['total']:5.1f} %")
    lines.append(f"  {'total':<12}{p['total']:>16,}   (output head tied to the embedding)")
    lines += ["", "weights       " + "   ".join(f"{k} {_size(v)}" for k, v in info["weight_bytes"].items())]
    for dtype, kv in info["kv_cache_bytes"].items():
        lines.append(f"KV cache {dtype:<9}{_size(kv['per_token_global_layers'])}/token on global layers, "
                     f"{_size(kv['per_token_sliding_layers'])}/token on sliding layers (at most "
                     f"{c.sliding_window} tokens kept); {_size(kv['full_context'])} at {info['context_length']} tokens")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------- convert
def run_convert(args: argparse.Namespace) -> int:
    from gemma3.convert import convert

    written = convert(_source(args.source), args.out, to=args.to, dtype=args.dtype, gguf_type=args.gguf_type,
                      overwrite=args.overwrite, progress=not args.quiet)
    print(written)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    sources = ("SOURCE is a .gguf file, a checkpoint directory (config.json + safetensors), a Hugging Face "
               "Hub id such as google/gemma-3-270m, or 'embedded' for the built-in Gemma 3 270M.")
    info = subparsers.add_parser(
        "info", help="show a model's architecture, parameter counts, memory and KV-cache sizes",
        description="Show a model's architecture, parameters by component, weight memory per dtype and "
        "KV-cache bytes (global vs sliding layers, and for a full context). Reads only the config, "
        "not the weights.", epilog=sources + " For info, a preset name (270m, 1b, 4b, 12b, 27b) works too.")
    info.add_argument("-m", "--model", metavar="SOURCE", help="model to describe (default: the embedded 270M)")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=run_info)

    convert_p = subparsers.add_parser(
        "convert", help="convert weights between GGUF and HF safetensors",
        description="Convert a model to an HF-layout directory (config.json, generation_config.json, "
        "model.safetensors, tokenizer.json, tokenizer_config.json with the Gemma 3 chat template) that "
        "transformers loads with AutoModelForCausalLM, or to a GGUF file that llama.cpp loads. Quantised "
        "GGUF sources are dequantised first.", epilog=sources)
    convert_p.add_argument("source", metavar="SOURCE", help="model to convert")
    convert_p.add_argument("out", metavar="OUT", help="output directory (for --to gguf: a directory or a .gguf path)")
    convert_p.add_argument("--to", choices=("hf", "gguf"), default="hf", help="output format (default: hf)")
    convert_p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                           help="safetensors dtype for --to hf (default: bfloat16, as Google ships Gemma 3)")
    convert_p.add_argument("--gguf-type", choices=GGUF_TYPES, default="BF16",
                           help="tensor type for --to gguf (default: BF16; norms are always F32). Q8_0 / Q5_0 / "
                                "Q4_1 / Q4_0 / Q4_K are block quantizations gemma3 and llama.cpp both run as they "
                                "are; Q4_K needs rows of a multiple of 256 values, other matrices get Q5_0 (as "
                                "llama.cpp does)")
    convert_p.add_argument("--overwrite", action="store_true",
                           help="write into an existing OUT, replacing the files this command writes (others are "
                                "kept); never the source itself, a directory containing it, or the current directory")
    convert_p.add_argument("--quiet", action="store_true", help="no progress bars")
    convert_p.set_defaults(func=run_convert)
