"""Shared helpers for the training tests: a tiny character-level tokenizer with Gemma 3's special tokens and
a tiny model config, so loop tests run in seconds instead of paying for the 262k-token vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from gemma3.config import Gemma3Config, hybrid_layer_types

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

TINY_ARCH = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=256)

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


def tiny_tokenizer_file(directory: Path) -> Path:
    """A tokenizer.json: one token per printable ASCII character plus newline, and the Gemma 3 control tokens
    (<pad>=0, <eos>=1, <bos>=2, <start_of_turn>=4, <end_of_turn>=5). ~100 tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    path = Path(directory) / "tiny_tokenizer.json"
    tok.save(str(path))
    return path


def tiny_config() -> Gemma3Config:
    return Gemma3Config(**TINY_ARCH, query_pre_attn_scalar=16, layer_types=hybrid_layer_types(2, 2))


def write_corpus(directory: Path, docs: int = 6, repeat: int = 4) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (directory / f"doc{i}.txt").write_text(f"Document {i}.\n" + TEXT * repeat, encoding="utf-8")
    return directory


def write_chat(path: Path, n: int = 8) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tiny_tokenizer_round_trip(tmp_path):
    from gemma3.text.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_tokenizer_file(tmp_path))
    ids = tok.encode("Hi there\n<start_of_turn>x")
    assert ids[0] == tok.bos_id and tok.start_of_turn_id in ids
    assert tok.decode(ids[1:]) == "Hi there\n<start_of_turn>x"
    assert max(ids) < TINY_ARCH["vocab_size"]
