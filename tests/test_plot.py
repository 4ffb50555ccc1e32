"""gemma3.eval.plot and `gemma3 plot`: the figures' numbers come from the model's own modules (attention weights
that respect the masks and sum to 1, the residual stream, the logit lens against the model's own logits,
KV-cache bytes), the modules are left as they were, and the command writes only what it may."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("matplotlib")

from gemma3.cli import main  # noqa: E402
from gemma3.config import GLOBAL, PRESETS, SLIDING  # noqa: E402
from gemma3.kv_cache import cache_bytes  # noqa: E402
from gemma3.eval.plot import (attention_figure, kv_cache_figure, logit_lens, logit_lens_figure, masks_figure,  # noqa: E402
                         residual_figure, rope_figure, trace)
from reference import random_model  # noqa: E402
from test_generate import LetterTokenizer, tiny  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(window=4), seed=2)


def test_traced_attention_respects_the_masks_and_leaves_the_model_as_it_was(model):
    ids = list(range(5, 25))
    before = model(torch.tensor([ids])).logits
    sliding, full = model.config.layer_types.index(SLIDING), model.config.layer_types.index(GLOBAL)
    out = trace(model, ids, (sliding, full))
    T, W = len(ids), model.config.sliding_window
    for layer in (sliding, full):
        p = out["probs"][layer]  # (K, G·T, T)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        p = p.reshape(p.shape[0], -1, T, T)
        q, k = torch.arange(T)[:, None], torch.arange(T)[None]
        allowed = (k <= q) & ((k > q - W) if layer == sliding else torch.ones_like(q, dtype=torch.bool))
        assert (p[..., ~allowed] == 0).all()
        assert (p[..., allowed] > 0).all()
    assert len(out["residual"]) == model.config.num_hidden_layers + 1
    for attn in (m.self_attn for m in model.layers):
        assert attn.implementation == "sdpa" and "attention_probs" not in attn.__dict__
    torch.testing.assert_close(model(torch.tensor([ids])).logits, before, rtol=0, atol=0)


def test_logit_lens_last_layer_is_the_models_prediction(model):
    ids = list(range(5, 17))
    top, prob = logit_lens(model, ids, positions=4)
    assert len(top) == model.config.num_hidden_layers + 1 and all(len(r) == 4 for r in top)
    logits = model(torch.tensor([ids])).logits[0, -4:]
    assert top[-1] == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(prob[-1]), logits.softmax(-1).max(-1).values, rtol=1e-5, atol=1e-6)


def test_figures_draw(model):
    tok = LetterTokenizer()
    ids = list(range(5, 30))
    for fig in (masks_figure(PRESETS["270m"]), rope_figure(PRESETS["4b"]), kv_cache_figure(),
                attention_figure(model, tok, ids), residual_figure(model, ids), logit_lens_figure(model, tok, ids)):
        assert fig.axes


def test_the_hybrid_cache_is_smaller_by_what_the_layer_counts_say():
    config = PRESETS["270m"]
    everyone_global = dataclasses.replace(config, layer_types=(GLOBAL,) * config.num_hidden_layers)
    L = 32768
    hybrid, full = cache_bytes(config, 1, L, torch.bfloat16), cache_bytes(everyone_global, 1, L, torch.bfloat16)
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    assert full - 8 * (L + 513) == 18 * L * per_token
    assert hybrid - 8 * (L + 513) == (3 * L + 15 * 512) * per_token


def test_cli_plot_writes_only_what_it_may(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["plot", "masks", "-o", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.write_bytes(b"mine")
    assert main(["plot", "rope", "-o", str(out), "--quiet"]) == 2
    assert out.read_bytes() == b"mine" and "already exists" in capsys.readouterr().err
    assert main(["plot", "rope", "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", "kv-cache", "-o", str(tmp_path / "k.svg"), "--quiet"]) == 0
    assert main(["plot", "masks", "-o", str(tmp_path / "x.jpg")]) == 2
    assert main(["plot", "masks", "-o", str(tmp_path)]) == 2
    assert main(["plot", "logit-lens", "--positions", "0", "-o", str(tmp_path / "l.png")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.svg", "m.png"]


def test_window_ablation_refuses_to_replace_its_outputs_without_overwrite(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "window_ablation.py"
    (tmp_path / "ablation_window.md").write_text("someone's notes\n")
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "ablation_window.md").read_text() == "someone's notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation_window.md"]
