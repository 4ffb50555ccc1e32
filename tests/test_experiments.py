"""The ablation scripts in experiments/: what they compare is what they say, and they write only what they may."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, table", [("kv_cache_ablation", "ablation_kv_cache.md"),
                                           ("shakespeare_ablation", "ablation_shakespeare.md")])
def test_ablations_refuse_to_replace_their_outputs_without_overwrite(tmp_path, script, table):
    (tmp_path / table).write_text("someone's notes\n")
    r = subprocess.run([sys.executable, str(EXPERIMENTS / f"{script}.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / table).read_text() == "someone's notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [table]


def test_full_cache_gives_the_hybrid_caches_logits():
    """The KV-cache ablation's full cache keeps every position on every layer but masks the sliding layers the
    same way: prefill and decode past the window give the hybrid cache's logits."""
    from gemma3.config import Gemma3Config, hybrid_layer_types
    from gemma3.kv_cache import KVCache
    from reference import random_model

    abl = load_script("kv_cache_ablation")
    config = Gemma3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                          num_attention_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                          layer_types=hybrid_layer_types(6), max_position_embeddings=64, eos_token_id=(1,))
    model = random_model(config)
    ids = torch.randint(3, 64, (1, 13), generator=torch.Generator().manual_seed(0))
    hybrid, full = KVCache(config, 1, 40), abl.FullKVCache(config, 1, 40)
    assert full.nbytes() > 2 * hybrid.nbytes()
    a, b = abl.prefill(model, ids[0].tolist(), hybrid, chunk=5), abl.prefill(model, ids[0].tolist(), full, chunk=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ta, la, _ = abl.decode(model, hybrid, a, 12)
    tb, lb, _ = abl.decode(model, full, b, 12)
    assert ta == tb
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    # and the window matters here: the full cache with global masks everywhere would differ
    with torch.inference_mode():
        no_window = model(ids).logits[0, -1]
        wide = type(model)(config.replace(sliding_window=64))
        wide.load_state_dict(model.state_dict())
        assert not torch.allclose(no_window, wide.eval()(ids).logits[0, -1], atol=1e-4)


def test_shakespeare_ablation_trains_every_variant_on_a_small_corpus(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"play{i}.txt").write_text(("To be, or not to be, that is the question. " * 40) + f"Act {i}.\n")
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "shakespeare_ablation.py"), "--texts", str(texts),
                        "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--window", "8", "--eval-every", "1",
                        "--eval-batches", "1", "--final-batches", "2", "--out", str(tmp_path / "out"), "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "out" / "ablation_shakespeare.md").read_text()
    for name in load_script("shakespeare_ablation").VARIANTS:
        assert f"| {name} |" in table
    assert (tmp_path / "out" / "img" / "ablation_shakespeare.png").stat().st_size > 10_000


def test_shakespeare_variants_differ_in_one_thing_only():
    abl = load_script("shakespeare_ablation")
    models = {name: abl.build_model(50, pattern, qk, 64, 8, seed=0) for name, (pattern, qk) in abl.VARIANTS.items()}
    base = models["hybrid 5:1 (SSSSSG)"]
    for name, model in models.items():
        own = dict(model.named_parameters())
        for key, p in base.named_parameters():
            if key in own:
                assert torch.equal(own[key], p), (name, key)  # the same initial weights
    assert [l.layer_type for l in models["all sliding (SSSSSS)"].layers] == ["sliding_attention"] * 6
    assert [l.layer_type for l in models["all global (GGGGGG)"].layers] == ["full_attention"] * 6
    assert isinstance(models["hybrid, no QK-norm"].layers[0].self_attn.q_norm, torch.nn.Identity)
    assert not isinstance(base.layers[0].self_attn.q_norm, torch.nn.Identity)
