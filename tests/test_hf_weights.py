"""HF checkpoint directories: loading (single, sharded, multimodal prefixes), export, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import CheckpointError, ConfigError
from gemma3.weights.hf import load_hf, save_hf
from gemma3.weights.names import expected_shapes

TINY = Gemma3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    layer_types=hybrid_layer_types(2), max_position_embeddings=128, eos_token_id=(1, 106))


def tiny_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in expected_shapes(TINY).items()}


def write_dir(path, tensors: dict[str, torch.Tensor], config: Gemma3Config = TINY):
    path.mkdir(exist_ok=True)
    config.save_hf(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_round_trip(tmp_path, dtype):
    state = tiny_state()
    save_hf(tmp_path / "out", TINY, state, dtype=dtype)
    config, loaded = load_hf(tmp_path / "out", dtype=dtype)
    assert config == TINY
    for name, value in state.items():
        assert loaded[name].dtype == dtype
        torch.testing.assert_close(loaded[name], value.to(dtype))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106] and generation["bos_token_id"] == 2 and generation["pad_token_id"] == 0
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_multimodal_prefix_and_ignored_towers(tmp_path):
    tensors = {f"language_model.model.{k}": v for k, v in tiny_state().items()}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(2, 2)
    tensors["lm_head.weight"] = tiny_state()["embed_tokens.weight"]
    config, loaded = load_hf(write_dir(tmp_path / "mm", tensors))
    assert set(loaded) == set(expected_shapes(TINY))


def test_sharded_checkpoint(tmp_path):
    state = {f"model.{k}": v for k, v in tiny_state().items()}
    names = sorted(state)
    directory = tmp_path / "sharded"
    directory.mkdir()
    TINY.save_hf(directory)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, loaded = load_hf(directory)
    torch.testing.assert_close(loaded["norm.weight"], state["model.norm.weight"])
    assert len(loaded) == len(state)


def test_index_cannot_point_outside_the_directory(tmp_path):
    directory = tmp_path / "escape"
    directory.mkdir()
    TINY.save_hf(directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"invalid shard file name '\.\./x\.safetensors'"):
        load_hf(directory)


@pytest.mark.parametrize("change, message", [
    ("missing", "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [64, 32])"),
    ("unexpected", "unexpected tensor model.layers.2.mlp.up_proj.weight"),
    ("misshaped", "tensor model.layers.0.mlp.up_proj.weight has shape [65, 32], expected [64, 32] for this config"),
    ("int", "tensor model.norm.weight has dtype I64"),
])
def test_wrong_tensors_are_named(tmp_path, change, message):
    tensors = {f"model.{k}": v for k, v in tiny_state().items()}
    if change == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif change == "unexpected":
        tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 32)
    elif change == "misshaped":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    else:
        tensors["model.norm.weight"] = torch.zeros(32, dtype=torch.int64)
    directory = write_dir(tmp_path / "bad", tensors)
    with pytest.raises(CheckpointError) as info:
        load_hf(directory)
    assert message in str(info.value) and str(directory) in str(info.value) and "\n" not in str(info.value)


def test_config_that_does_not_match_the_weights(tmp_path):
    directory = write_dir(tmp_path / "cfg", {f"model.{k}": v for k, v in tiny_state().items()},
                          TINY.replace(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"has shape \[64, 32\], expected \[96, 32\] for this config"):
        load_hf(directory)


_SHORT = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'  # 16 bytes declared, none present


@pytest.mark.parametrize("garbage", [b"", b"\x08\0\0\0\0\0\0\0{not json", b"\xff" * 8 + b"{}",
                                     len(_SHORT).to_bytes(8, "little") + _SHORT])
def test_corrupt_safetensors_header(tmp_path, garbage):
    directory = tmp_path / "corrupt"
    directory.mkdir()
    TINY.save_hf(directory)
    (directory / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError) as info:
        load_hf(directory)
    text = str(info.value)
    assert text.startswith(str(directory / "model.safetensors")) and "not a valid safetensors file" in text
    assert "\n" not in text


def test_missing_weights_and_bad_config(tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    TINY.save_hf(directory)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: cannot read config"):
        load_hf(directory)


def test_export_tokenizer_files_and_chat_template(tmp_path, official_tokenizer):
    from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE

    official = json.loads((official_tokenizer / "tokenizer_config.json").read_text())
    assert GEMMA3_CHAT_TEMPLATE == official["chat_template"]
    out = save_hf(tmp_path / "tok", TINY, tiny_state(), tokenizer_json=official_tokenizer / "tokenizer.json")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["chat_template"] == official["chat_template"]
    assert (out / "tokenizer.json").read_bytes() == (official_tokenizer / "tokenizer.json").read_bytes()
