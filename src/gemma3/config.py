"""Gemma 3 text-model configuration: one typed dataclass, five named presets, and the HF `config.json` edge.

Field names follow HF's `Gemma3TextConfig` so that anyone who has read a Gemma 3 `config.json` recognises
them, and so the translation to and from HF stays a short, checkable function. Every generation of HF keys
seen in the wild is read here and nowhere else (style principle 2: translation at the edge):

* v4 keys: `rope_theta` (global base), `rope_local_base_freq`, `rope_scaling` (global layers only),
  `sliding_window_pattern`;
* v5 keys: `rope_parameters = {"sliding_attention": {...}, "full_attention": {...}}`, `layer_types`;
* the multimodal 4B/12B/27B checkpoints, whose `config.json` nests a sparse `text_config` and relies on
  `Gemma3TextConfig`'s defaults for everything it leaves out (vocab 262 208, thetas, eps, pattern 6 ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma3.errors import ConfigError

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
LAYER_TYPES = (SLIDING, GLOBAL)


# Bounds on a config's sizes, far past any real model (the 27B: 62 layers, d 5376, 131 072 positions), so
# that a hostile config.json or flag is an error rather than a tuple of 2^40 layer names or an int overflow.
MAX_LAYERS = 10_000
MAX_SIZE = 2**31 - 1


def hybrid_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's 5 : 1 hybrid: layer i is global iff (i + 1) % pattern == 0 (first global is layer 5)."""
    if isinstance(num_layers, int) and num_layers > MAX_LAYERS:
        raise ConfigError(f"num_hidden_layers must be at most {MAX_LAYERS:,}, got {num_layers:,}")
    return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclass(frozen=True)
class Gemma3Config:
    """Hyperparameters of a Gemma 3 text decoder. Defaults are the 270M model."""

    vocab_size: int = 262_144
    hidden_size: int = 640  # d
    intermediate_size: int = 2048  # F, width of the gated MLP
    num_hidden_layers: int = 18  # L
    num_attention_heads: int = 4  # H
    num_key_value_heads: int = 1  # K (1 = multi-query attention)
    head_dim: int = 256  # hd; H * hd != d for every Gemma 3 size
    query_pre_attn_scalar: float = 256  # scores are scaled by this ** -0.5 (168 = d/H for 27B, not hd)
    sliding_window: int = 512  # W: a local query at i sees keys i - W < j <= i
    layer_types: tuple[str, ...] = field(default_factory=lambda: hybrid_layer_types(18))
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers, never scaled
    rope_scaling_factor: float = 1.0  # linear scaling (positions / factor) on global layers only
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None  # None in every Gemma 3 release (Gemma 2 used 30)
    attn_logit_softcapping: float | None = None  # None in every Gemma 3 release (Gemma 2 used 50)
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1, 106)  # <eos> and <end_of_turn>
    bos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        # Accept lists from JSON / callers, keep tuples so the config stays hashable and immutable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive_ints = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > (MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE):
                raise ConfigError(f"{name} must be at most {MAX_LAYERS if name == 'num_hidden_layers' else MAX_SIZE:,}, "
                                  f"got {value:,}")
        for name in ("query_pre_attn_scalar", "rope_theta", "rope_local_base_freq", "rope_scaling_factor",
                     "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):  # inf: tanh(x / inf) * inf is NaN
                raise ConfigError(f"{name} must be None or a positive finite number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")
        for value in self.eos_token_id:
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"eos_token_id must hold token ids in [0, {self.vocab_size}), got {value!r}")

    # ------------------------------------------------------------------ derived facts
    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (GQA). 1 = multi-head, H = multi-query."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_global_layers(self) -> int:
        return sum(t == GLOBAL for t in self.layer_types)

    @property
    def num_sliding_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Exact parameter count (the output head is tied to the embedding, so it adds nothing)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 4 * d + 2 * hd
        total = self.num_hidden_layers * per_layer + d
        return total + (self.vocab_size * d if include_embedding else 0)

    def replace(self, **changes: Any) -> "Gemma3Config":
        """A copy with some fields changed (re-validated). Changing the depth re-derives the layer pattern."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = hybrid_layer_types(changes["num_hidden_layers"])
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ plain dict / JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Gemma3Config":
        """Our own flat form (what `to_dict` writes). Unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if "num_hidden_layers" in data and "layer_types" not in data:
            data = {**data, "layer_types": hybrid_layer_types(data["num_hidden_layers"])}
        return cls(**data)

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A transformers-5 `Gemma3ForCausalLM` config.json (model_type gemma3_text, v5 rope_parameters);
        `dtype` is what the weights beside it are stored in."""
        full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full_rope = {"rope_type": "linear", "factor": self.rope_scaling_factor, "rope_theta": self.rope_theta}
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
                GLOBAL: full_rope,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            "use_cache": True,
            "dtype": dtype,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> "Gemma3Config":
        """Parse any HF Gemma 3 config.json form (see module docstring). `where` names the file in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        top = data
        if "text_config" in data:  # multimodal Gemma3ForConditionalGeneration (4B / 12B / 27B)
            data = data["text_config"] or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: text_config must be a JSON object")
        model_type = data.get("model_type", top.get("model_type"))
        if model_type not in (None, "gemma3", "gemma3_text"):
            raise ConfigError(f"{where}: model_type is {model_type!r}, not a Gemma 3 model")
        if data.get("use_bidirectional_attention"):
            raise ConfigError(f"{where}: use_bidirectional_attention (EmbeddingGemma) is not a causal LM")
        act = data.get("hidden_activation", data.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh", None):
            raise ConfigError(f"{where}: hidden_activation {act!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
        if data.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not a Gemma 3 architecture")
        if data.get("tie_word_embeddings", top.get("tie_word_embeddings", True)) is False:
            raise ConfigError(f"{where}: tie_word_embeddings=false is not supported (Gemma 3 ties its output head)")

        # Defaults are those of HF's Gemma3TextConfig, which sparse multimodal text_configs rely on.
        def get(key: str, default: Any) -> Any:
            value = data.get(key)
            return default if value is None else value

        num_layers = get("num_hidden_layers", 26)
        layer_types = data.get("layer_types")
        if layer_types is None:
            pattern = get("sliding_window_pattern", get("_sliding_window_pattern", 6))
            if not isinstance(pattern, int) or pattern <= 0:
                raise ConfigError(f"{where}: sliding_window_pattern must be a positive integer, got {pattern!r}")
            if not isinstance(num_layers, int) or num_layers <= 0:
                raise ConfigError(f"{where}: num_hidden_layers must be a positive integer, got {num_layers!r}")
            layer_types = hybrid_layer_types(num_layers, pattern)

        # RoPE: v5 `rope_parameters` per layer type, or v4 flat keys with `rope_scaling` for global layers.
        global_theta = get("rope_theta", 1_000_000.0)
        local_theta = get("rope_local_base_freq", 10_000.0)
        scaling = data.get("rope_scaling")
        rope_params = data.get("rope_parameters")
        if isinstance(rope_params, dict) and (SLIDING in rope_params or GLOBAL in rope_params):
            local = rope_params.get(SLIDING) or {}
            full = rope_params.get(GLOBAL) or {}
            local_theta = local.get("rope_theta", local_theta)
            global_theta = full.get("rope_theta", global_theta)
            if local.get("rope_type", "default") != "default":
                raise ConfigError(f"{where}: rope_parameters.{SLIDING}.rope_type must be 'default'")
            scaling = full
        elif isinstance(rope_params, dict):  # a single (global) rope dict, as some v5 exports write
            global_theta = rope_params.get("rope_theta", global_theta)
            scaling = rope_params
        factor = 1.0
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type == "linear":
                factor = float(scaling.get("factor", 1.0))
            elif rope_type != "default":
                raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported (Gemma 3 uses linear)")

        eos = get("eos_token_id", top.get("eos_token_id", 1))
        try:
            return cls(
                vocab_size=get("vocab_size", 262_208),
                hidden_size=get("hidden_size", 2304),
                intermediate_size=get("intermediate_size", 9216),
                num_hidden_layers=num_layers,
                num_attention_heads=get("num_attention_heads", 8),
                num_key_value_heads=get("num_key_value_heads", 4),
                head_dim=get("head_dim", 256),
                query_pre_attn_scalar=get("query_pre_attn_scalar", 256),
                sliding_window=get("sliding_window", 4096),
                layer_types=tuple(layer_types),
                rope_theta=float(global_theta),
                rope_local_base_freq=float(local_theta),
                rope_scaling_factor=factor,
                max_position_embeddings=get("max_position_embeddings", 131_072),
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                final_logit_softcapping=data.get("final_logit_softcapping"),
                attn_logit_softcapping=data.get("attn_logit_softcapping"),
                pad_token_id=get("pad_token_id", 0),
                eos_token_id=eos,
                bos_token_id=get("bos_token_id", 2),
                initializer_range=get("initializer_range", 0.02),
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Gemma3Config":
        """Read an HF config.json (any form) or our own flat JSON."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
        if not data:
            raise ConfigError(f"{path}: the config is empty (an empty object would silently mean the 270M)")
        if "model_type" in data or "text_config" in data or "architectures" in data:
            return cls.from_hf_dict(data, where=str(path))
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save_hf(self, directory: str | Path, dtype: str = "bfloat16") -> Path:
        """Write config.json into `directory`; `dtype` names the weights' dtype (config.json's "dtype")."""
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(dtype), indent=2) + "\n", encoding="utf-8")
        return path


# ---------------------------------------------------------------------- presets
# Values from the official configs (google/gemma-3-{270m,1b-pt,4b-pt,12b-pt,27b-pt} config.json, with the
# multimodal ones' text_config completed by Gemma3TextConfig defaults); see the spec, section 5.
PRESETS: dict[str, Gemma3Config] = {
    "270m": Gemma3Config(),
    "1b": Gemma3Config(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, layer_types=hybrid_layer_types(26),
    ),
    "4b": Gemma3Config(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, sliding_window=1024, layer_types=hybrid_layer_types(34),
        rope_scaling_factor=8.0, max_position_embeddings=131_072,
    ),
    "12b": Gemma3Config(
        vocab_size=262_208, hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, sliding_window=1024, layer_types=hybrid_layer_types(48),
        rope_scaling_factor=8.0, max_position_embeddings=131_072,
    ),
    "27b": Gemma3Config(
        vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
        sliding_window=1024, layer_types=hybrid_layer_types(62), rope_scaling_factor=8.0,
        max_position_embeddings=131_072,
    ),
}


def get_preset(name: str) -> Gemma3Config:
    key = name.lower().replace("gemma-3-", "").replace("gemma3-", "")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
