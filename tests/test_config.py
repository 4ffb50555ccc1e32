"""Gemma3Config: presets, validation, and every form of HF config.json found in the wild."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gemma3.config import GLOBAL, PRESETS, SLIDING, Gemma3Config, get_preset, hybrid_layer_types
from gemma3.errors import ConfigError


def same_architecture(a: Gemma3Config, b: Gemma3Config) -> bool:
    """Equal up to the stop-token list, which checkpoints state differently (1, or [1, 106])."""
    return dataclasses.replace(a, eos_token_id=(1,)) == dataclasses.replace(b, eos_token_id=(1,))


def test_layer_pattern_five_local_one_global():
    assert [i for i, t in enumerate(get_preset("270m").layer_types) if t == GLOBAL] == [5, 11, 17]
    assert [i for i, t in enumerate(get_preset("1b").layer_types) if t == GLOBAL] == [5, 11, 17, 23]
    assert get_preset("1b").layer_types[-2:] == (SLIDING, SLIDING)
    assert get_preset("27b").layer_types[-2:] == (SLIDING, SLIDING)
    assert get_preset("12b").layer_types[-1] == GLOBAL


def test_preset_facts():
    p = PRESETS
    assert (p["27b"].head_dim, p["27b"].query_pre_attn_scalar) == (128, 168)
    assert [p[k].rope_scaling_factor for k in ("270m", "1b", "4b", "12b", "27b")] == [1, 1, 8, 8, 8]
    assert [p[k].sliding_window for k in ("270m", "1b", "4b", "12b", "27b")] == [512, 512, 1024, 1024, 1024]
    assert all(c.rope_theta == 1e6 and c.rope_local_base_freq == 1e4 for c in p.values())
    assert get_preset("gemma-3-270m") is p["270m"]


# Real config.json files as published, in each generation of keys.
HF_270M_V4 = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "initializer_range": 0.02, "intermediate_size": 2048, "layer_types": list(hybrid_layer_types(18)),
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
}
HF_1B_V4_PATTERN = {  # older form: no layer_types, the integer pattern instead
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
HF_4B_MULTIMODAL = {  # sparse text_config relying on Gemma3TextConfig defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
HF_12B_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
    "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                    "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
}
HF_27B_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
    "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
                    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
                    "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
}
HF_4B_TEXT_V5 = {  # transformers 5 form: rope_parameters per layer type and explicit layer_types
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024, "layer_types": list(hybrid_layer_types(34)),
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize("data, preset", [
    (HF_270M_V4, "270m"), (HF_1B_V4_PATTERN, "1b"), (HF_4B_MULTIMODAL, "4b"), (HF_12B_MULTIMODAL, "12b"),
    (HF_27B_MULTIMODAL, "27b"), (HF_4B_TEXT_V5, "4b"),
])
def test_every_hf_form_parses_to_the_preset(data, preset):
    assert same_architecture(Gemma3Config.from_hf_dict(data), get_preset(preset))


def test_eos_from_checkpoint():
    assert Gemma3Config.from_hf_dict(HF_270M_V4).eos_token_id == (1,)
    assert Gemma3Config.from_hf_dict(HF_4B_MULTIMODAL).eos_token_id == (1, 106)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_through_transformers(tmp_path, preset):
    """ours -> config.json -> transformers loads it -> same hyperparameters -> back to ours unchanged."""
    from transformers import AutoConfig

    ours = get_preset(preset)
    ours.save_hf(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "gemma3_text"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                "max_position_embeddings", "rms_norm_eps"):
        assert getattr(hf, key) == getattr(ours, key), key
    assert tuple(hf.layer_types) == ours.layer_types
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == ours.rope_local_base_freq
    assert hf.rope_parameters["full_attention"]["rope_theta"] == ours.rope_theta
    assert hf.rope_parameters["full_attention"].get("factor", 1.0) == ours.rope_scaling_factor
    # transformers' own serialisation of it parses back to the same config
    hf.save_pretrained(tmp_path / "again")
    assert Gemma3Config.from_json_file(tmp_path / "again" / "config.json") == ours


def test_own_json_round_trip(tmp_path):
    cfg = get_preset("4b").replace(num_hidden_layers=7, sliding_window=64)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert Gemma3Config.from_json_file(path) == cfg
    assert cfg.layer_types == hybrid_layer_types(7)


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(layer_types=("sliding_attention",) * 17 + ("chunked_attention",)), r"layer_types\[17\]"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-4), "sliding_window"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=255), "head_dim"),
    (dict(layer_types=("sliding_attention",) * 3), "layer_types"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(bos_token_id=10**7), "bos_token_id"),
    (dict(final_logit_softcapping=float("inf")), "final_logit_softcapping"),  # tanh(x / inf) * inf: NaN logits
    (dict(attn_logit_softcapping=float("nan")), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=True), "final_logit_softcapping"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        Gemma3Config(**changes)


def test_invalid_hf_files_name_file_and_field(tmp_path):
    bad = dict(HF_270M_V4, num_key_value_heads=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config.json.*num_key_value_heads"):
        Gemma3Config.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        Gemma3Config.from_json_file(path)
    path.write_text(json.dumps(dict(HF_270M_V4, model_type="llama")))
    with pytest.raises(ConfigError, match="not a Gemma 3 model"):
        Gemma3Config.from_json_file(path)
    path.write_text(json.dumps({"hidden_size": 64, "bogus_key": 1}))
    with pytest.raises(ConfigError, match="unknown config field.*bogus_key"):
        Gemma3Config.from_json_file(path)
