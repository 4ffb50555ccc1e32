"""LoRA: our adapter files load in PEFT on transformers' Gemma3ForCausalLM with identical logits, merging
equals base + adapter, and LoRA fine-tuning of the real embedded 270M on a small chat set lowers the loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gemma3.model import Gemma3Model
from gemma3.train.lora import apply_lora, load_adapter_into, lora_modules, merged_state_dict
from gemma3.weights.lora import ALL_LINEAR, LoraSettings, write_adapter
from reference import hf_model_like, random_model
from test_train_support import tiny_config, tiny_tokenizer_file, write_chat

torch.set_num_threads(2)


def adapted(settings: LoraSettings, seed: int = 0):
    base = random_model(tiny_config(), seed=seed)
    model = random_model(tiny_config(), seed=seed)
    apply_lora(model, settings, torch.Generator().manual_seed(1))
    with torch.no_grad():  # B starts at zero; make the update non-trivial so the comparison means something
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    return base, model.eval()


@torch.no_grad()
def test_peft_loads_our_adapter_with_identical_logits(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    settings = LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    base, model = adapted(settings)
    write_adapter(tmp_path / "adapter", model.state_dict(), settings, base_model=None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    peft_model = PeftModel.from_pretrained(hf_model_like(base), str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 128, (2, 24))
    ours, theirs = model(ids).logits, peft_model(input_ids=ids).logits
    assert not torch.allclose(ours, base(ids).logits, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_merged_model_equals_base_plus_adapter_and_adapter_round_trips(tmp_path):
    settings = LoraSettings(r=2, alpha=4, targets=ALL_LINEAR)
    base, model = adapted(settings)
    merged = Gemma3Model(tiny_config())
    merged.load_state_dict(merged_state_dict(model))
    ids = torch.randint(0, 128, (2, 20))
    torch.testing.assert_close(merged.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # written and read back into a fresh copy of the base: the same model again
    write_adapter(tmp_path / "a", model.state_dict(), settings, None)
    reloaded = random_model(tiny_config(), seed=0)
    assert load_adapter_into(reloaded, tmp_path / "a") == settings
    torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits)


def test_merge_lora_command_writes_a_model_source(tmp_path):
    pytest.importorskip("gemma3.weights.hf")
    from gemma3.loading import load
    from gemma3.convert import merge_lora
    from gemma3.weights.hf import save_hf

    settings = LoraSettings(r=2, alpha=4, targets=("q_proj", "o_proj"))
    base, model = adapted(settings)
    save_hf(tmp_path / "base", base.config, base.state_dict(), torch.float32,
            tokenizer_json=tiny_tokenizer_file(tmp_path))
    write_adapter(tmp_path / "adapter", model.state_dict(), settings, str(tmp_path / "base"))
    merge_lora(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged, _, _ = load(str(tmp_path / "merged"), progress=False)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # applied at load time instead (--lora), and with the adapter itself as the source: the same weights
    for loaded in (load(str(tmp_path / "base"), lora=tmp_path / "adapter", progress=False)[0],
                   load(str(tmp_path / "adapter"), progress=False)[0]):
        for name, tensor in merged.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_lora_flag_on_generate_equals_the_merged_model(tmp_path, capsys):
    from gemma3.cli import main
    from gemma3.convert import merge_lora
    from gemma3.weights.hf import save_hf

    settings = LoraSettings(r=2, alpha=4, targets=("q_proj", "v_proj"))
    base, model = adapted(settings)
    save_hf(tmp_path / "base", base.config, base.state_dict(), torch.float32,
            tokenizer_json=tiny_tokenizer_file(tmp_path))
    write_adapter(tmp_path / "adapter", model.state_dict(), settings, str(tmp_path / "base"))
    merge_lora(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", progress=False)

    def greedy(*model_args):
        assert main(["generate", "Once upon a time", "-n", "12", "--temperature", "0", "--json", "--quiet",
                     *model_args]) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    merged = greedy("-m", str(tmp_path / "merged"))
    assert greedy("-m", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter")) == merged
    assert greedy("-m", str(tmp_path / "adapter")) == merged
    assert greedy("-m", str(tmp_path / "base")) != merged
    assert main(["generate", "Hi", "-m", str(tmp_path / "adapter"), "--lora", str(tmp_path / "adapter")]) == 2
    assert "is itself a LoRA adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_on_embedded_270m_chat_lowers_loss(tmp_path):
    """The real 270M, LoRA on the attention projections, a few steps of chat SFT on one repeated batch."""
    from gemma3.train import TrainConfig, train

    data = write_chat(tmp_path / "chat.jsonl", n=4)
    cfg = TrainConfig(data=[str(data)], out_dir=str(tmp_path / "lora"), lora=LoraSettings(r=4, alpha=8),
                      seq_len=64, batch_size=2, steps=4, lr=2e-3, warmup_steps=0, val_fraction=0.0,
                      eval_every=0, sample_every=0, save_every=4, progress=False, data_cache=str(tmp_path / "c"))
    result = train(cfg)
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files  # the frozen base is not copied into every checkpoint


def test_a_bf16_frozen_base_trains_like_fp32():
    """Mixed precision for LoRA (the trainer's default where bf16 matmuls are native): the frozen base weights
    held in bf16, matmuls under autocast, the adapters and their gradients fp32. On one batch its loss is within
    1 % of fp32's and every adapter gradient points the same way (cosine > 0.99; measured here: > 0.999 and
    ~0.2 % on the loss); outside autocast (the trainer's samples) a bf16 base reads fp32 activations."""
    from gemma3.train.lora import hold_frozen_in
    from gemma3.train.loss import use_fused_loss

    settings = LoraSettings(r=4, alpha=8, targets=ALL_LINEAR)
    _, fp32 = adapted(settings)
    mixed = copy.deepcopy(fp32)
    for m in (fp32, mixed):
        use_fused_loss(m).train()
    hold_frozen_in(mixed, torch.bfloat16)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
               for m in lora_modules(mixed).values())
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, tiny_config().vocab_size, (2, 48), generator=g)
    labels = torch.where(torch.rand(2, 48, generator=g) < 0.5, ids, -100)
    loss32 = fp32(ids, labels=labels).loss
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = mixed(ids, labels=labels).loss
    loss16.backward()
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=1e-2)
    a, b = lora_modules(fp32), lora_modules(mixed)
    for name in a:
        for part in ("lora_A", "lora_B"):
            g32, g16 = getattr(a[name], part).weight.grad, getattr(b[name], part).weight.grad
            assert g16.dtype == torch.float32
            assert float(torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)) > 0.99, name
    with torch.no_grad():  # no autocast: fp32 in, fp32 out, the bf16 product's rounding only
        x = torch.randn(3, 32, generator=g)
        layer = b["layers.0.mlp.up_proj"]
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, a["layers.0.mlp.up_proj"](x), rtol=2e-2, atol=2e-2)
