"""Build transformers' Gemma3ForCausalLM (the reference) with exactly our weights, copied by HF tensor name."""

from __future__ import annotations

import torch

from gemma3.config import Gemma3Config
from gemma3.model import Gemma3Model


def hf_config(config: Gemma3Config, attn: str = "eager"):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "dtype")})
    cfg._attn_implementation = attn
    return cfg


def hf_model_like(ours: Gemma3Model, attn: str = "eager"):
    """A reference model holding our weights (state dict keys differ only by the `model.` prefix)."""
    from transformers import Gemma3ForCausalLM

    ref = Gemma3ForCausalLM(hf_config(ours.config, attn))
    # RoPE's inverse frequencies are buffers computed in fp32, and from_pretrained(dtype=torch.bfloat16) keeps them
    # fp32 (so it does on the real 270M GGUF); a plain .to(bfloat16) would round them, and every angle with them.
    rope = {name: buffer.clone() for name, buffer in ref.model.rotary_emb.named_buffers()}
    ref.to(next(ours.parameters()).dtype)
    for name, buffer in rope.items():
        setattr(ref.model.rotary_emb, name, buffer)
    missing, unexpected = ref.load_state_dict({f"model.{k}": v for k, v in ours.state_dict().items()}, strict=False)
    assert unexpected == [], unexpected
    assert missing in ([], ["lm_head.weight"]), missing  # tied to embed_tokens
    ref.tie_weights()
    return ref.eval()


def random_model(config: Gemma3Config, seed: int = 0, dtype=torch.float32, norm_scale: float = 0.5) -> Gemma3Model:
    """Our model with random weights, norms included (zero norms would hide a wrong (1 + w) convention)."""
    g = torch.Generator().manual_seed(seed)
    model = Gemma3Model(config)
    model.init_weights(g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * norm_scale)
    return model.to(dtype).eval()


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| elementwise, counted in bf16 ulps of `want` (an ulp is 2^(e - 7) for |want| in [2^e, 2^(e+1))).

    A value below its last-axis RMS counts at that RMS: an ulp shrinks without bound towards zero, while the
    rounding errors that reach a logit come from the sum h·e that makes it, whose terms are at the row's scale."""
    want = want.float()
    scale = torch.maximum(want.abs(), want.pow(2).mean(dim=-1, keepdim=True).sqrt())
    ulp = torch.pow(2.0, torch.floor(torch.log2(scale.clamp(min=2.0**-126))) - 7)
    return (got.float() - want).abs() / ulp


def set_attention_implementation(model: Gemma3Model, name: str) -> None:
    """Every layer's attention on "sdpa" (the fused kernel) or "eager" (the same computation spelled out)."""
    for layer in model.layers:
        layer.self_attn.implementation = name


def native_model(model: Gemma3Model) -> Gemma3Model:
    """`model` with every inference module gemma3.accel swaps in (the CPU attention paths, the native modules)."""
    from gemma3.accel import accelerate

    return accelerate(model, native=True).model


def unpack_model(model: Gemma3Model) -> Gemma3Model:
    """The model's own modules back in place of what gemma3.accel swapped in, holding the same Parameters."""
    from torch import nn

    from gemma3.accel.attention import CPUAttention
    from gemma3.accel.native import NativeEmbedding, NativeRMSNorm, PackedLinear
    from gemma3.accel.swap import swap_modules
    from gemma3.model import GroupedQueryAttention, RMSNorm, TiedEmbedding

    def plain(m):
        if isinstance(m, PackedLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        elif isinstance(m, NativeEmbedding):
            new = TiedEmbedding(m.num_embeddings, m.embedding_dim, device="meta")
        elif isinstance(m, NativeRMSNorm):
            new = RMSNorm(m.weight.shape[0], m.eps)
        elif isinstance(m, CPUAttention):
            new = GroupedQueryAttention.__new__(GroupedQueryAttention)
            nn.Module.__init__(new)
            for name in ("num_heads", "num_kv_heads", "head_dim", "scale", "softcap", "implementation"):
                setattr(new, name, getattr(m, name))
            for name, child in m.named_children():
                setattr(new, name, child)
            return new
        else:
            return None
        new.weight = m.weight
        return new

    swap_modules(model, plain)
    return model


def require_llama_cpp():
    """The llama_cpp module, or a skip where llama-cpp-python is not installed (it builds for 10-25 min, so CI
    leaves it out). Under GEMMA3_PEERS=1, the peers command of docs/development.md, a failure instead: that
    run must not pass by skipping everything it is for."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        if os.environ.get("GEMMA3_PEERS") == "1":
            pytest.fail("GEMMA3_PEERS=1 but llama-cpp-python is not installed (docs/development.md: the peers run)")
        pytest.skip("llama-cpp-python is not installed (it builds for 10-25 min, so CI leaves it out; "
                    "docs/development.md has the peers command)")


def llama_cpp_model(path, **kwargs):
    """llama-cpp-python's Llama on `path` with its plain CPU kernels (llama_cpp_plain_kernels: the interop these
    tests check does not depend on the others), or a skip where it is not installed (require_llama_cpp)."""
    llama_cpp = require_llama_cpp()
    from llama_peer import llama_cpp_plain_kernels

    with llama_cpp_plain_kernels():
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


def random_checkpoint(directory, official_tokenizer, **shape):
    """A random 2-layer Gemma 3 of `shape` (the 5 : 1 pattern, so GGUF can hold it, and a 64-token context) with
    the real tokenizer, saved in fp32 as an HF directory at `directory`."""
    from gemma3.config import Gemma3Config, hybrid_layer_types
    from gemma3.weights.hf import save_hf

    config = Gemma3Config(num_hidden_layers=2, sliding_window=8, layer_types=hybrid_layer_types(2),
                          max_position_embeddings=64, **shape)
    save_hf(directory, config, random_model(config).state_dict(), dtype=torch.float32,
            tokenizer_json=official_tokenizer / "tokenizer.json")
    return directory
