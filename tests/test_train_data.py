"""Training data: token files, packing with BOS at document starts, chat targets, the held-out split, and
the one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma3.text.tokenizer import Tokenizer
from gemma3.train.data import (IGNORE_INDEX, DataError, PackedDataset, TokenFile, expand_sources,
                               global_batch_indices, read_documents, split_documents, tokenize_chat)
from test_train_support import TEXT, tiny_tokenizer_file, write_chat, write_corpus


@pytest.fixture
def tok(tmp_path):
    return Tokenizer.from_file(tiny_tokenizer_file(tmp_path))


def test_stream_packing_bos_at_document_starts_every_token_a_target_once(tmp_path, tok):
    corpus = write_corpus(tmp_path / "c", docs=3, repeat=1)
    tf = TokenFile.build([str(corpus)], tok, tmp_path / "cache", progress=False)
    assert tf.kind == "text" and tf.num_docs == 3
    for d in range(3):  # every document starts with <bos>, and <bos> is never a target
        assert tf.tokens[tf.offsets[d]] == tok.bos_id and tf.mask[tf.offsets[d]] == 0
    ds = PackedDataset(tf, np.arange(3), seq_len=16)
    seen = []
    for i in range(len(ds)):
        x, y, _ = ds[i]
        assert x.shape == (16,) and y.shape == (16,)
        if i:  # consecutive windows share one token: the last input of one is the first of the next
            assert x[0] == prev[-1]
        seen.append(x[1:] if i else x)
        prev = x
    stream = torch.cat(seen)
    np.testing.assert_array_equal(stream.numpy(), tf.tokens[:len(stream)])
    # a second build maps the same file instead of tokenizing again
    assert TokenFile.build([str(corpus)], tok, tmp_path / "cache", progress=False).prefix == tf.prefix


def test_chat_targets_are_model_turns_with_end_of_turn(official_tokenizer):
    from gemma3.text.chat import render_chat

    tok = Tokenizer.from_file(official_tokenizer / "tokenizer.json")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there"},
                {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
                {"role": "user", "content": "Say\tno."}, {"role": "assistant", "content": "No."}]
    ids, mask = tokenize_chat(messages, tok)
    assert ids == tok.encode(render_chat(messages, add_generation_prompt=False), add_bos=False)
    ids, mask = np.array(ids), np.array(mask, dtype=bool)
    # the targets are exactly the two answers, each with its <end_of_turn>, and nothing else
    spans = np.split(ids, np.flatnonzero(np.diff(mask.astype(int))) + 1)
    targets = [tok.decode(s) for s, m in zip(spans, np.split(mask, np.flatnonzero(np.diff(mask.astype(int))) + 1)) if m[0]]
    assert targets == ["Hello!\n\nHow can I help?<end_of_turn>", "No.<end_of_turn>"]


def test_chat_packing_keeps_conversations_whole(tmp_path, tok):
    data = write_chat(tmp_path / "chat.jsonl", n=6)
    tf = TokenFile.build([str(data)], tok, tmp_path / "cache", progress=False)
    assert tf.kind == "chat"
    ds = PackedDataset(tf, np.arange(tf.num_docs), seq_len=96)
    assert ds.mode == "whole"
    x, y, _ = ds[0]
    assert x[0] == tok.bos_id
    text = tok.decode(x[y != IGNORE_INDEX].tolist())
    assert "<end_of_turn>" in text and "What is" not in text  # answers only
    assert (x[y == IGNORE_INDEX] == tok.pad_id).any()  # the tail is padding, never a target
    with pytest.raises(DataError, match="longer than the sequence length 20"):
        PackedDataset(tf, np.arange(tf.num_docs), seq_len=20)


def test_held_out_split_is_disjoint_and_seeded():
    train, val = split_documents(20, 0.1, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == 20
    assert (split_documents(20, 0.1, seed=3)[1] == val).all()


def test_batches_are_a_pure_function_of_step_and_seed():
    a = global_batch_indices(7, 4, 10, seed=1)
    assert (a == global_batch_indices(7, 4, 10, seed=1)).all()
    epoch0 = np.concatenate([global_batch_indices(s, 5, 10, seed=1) for s in range(2)])
    assert sorted(epoch0) == list(range(10))  # one epoch visits every sequence once


def test_malformed_jsonl_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        TokenFile.build([str(bad)], tok, tmp_path / "cache", progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"content": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: expected a 'text' string"):
        TokenFile.build([str(wrong)], tok, tmp_path / "cache", progress=False)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 \(invalid byte 0xe9 at column 14\)"):
        TokenFile.build([str(latin1)], tok, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # a failed tokenization leaves no temporary files


def test_empty_dataset_is_an_error(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="dataset is empty"):
        TokenFile.build([str(tmp_path / "empty.txt")], tok, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="no such file"):
        TokenFile.build([str(tmp_path / "missing.txt")], tok, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing that looks like a finished token file


def test_hf_dataset_from_local_file(tmp_path, tok):
    pytest.importorskip("datasets")
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps({"body": TEXT[i:i + 40]}) for i in range(0, 120, 40)), encoding="utf-8")
    tf = TokenFile.build([f"hf:{path}"], tok, tmp_path / "cache", text_field="body", progress=False)
    assert tf.num_docs == 3 and tf.kind == "text"



def test_a_data_directory_is_walked_up_to_max_entries(capsys, tmp_path, monkeypatch):
    """files-and-untrusted-input.md: "a data directory is walked up to 200 000 entries" (so `gemma3 train /` is an
    error, not a walk over the file system). Entries at every depth count, directories too. The cap is lowered to
    50 here (200 001 real files took 2 s to over 2 minutes to make on the shared test machine); the figure the
    docs give is the cap's own. One entry over: one line, exit status 2, no run directory; at the cap: walked to
    the end (then there is simply no data file among them)."""
    from pathlib import Path

    from gemma3.cli import main
    from gemma3.train import data
    from test_no_data_loss import TRAIN_ARCH

    docs = (Path(__file__).parents[1] / "docs" / "files-and-untrusted-input.md").read_text(encoding="utf-8")
    assert f"a data directory is walked up to {data.MAX_DIRECTORY_ENTRIES:,} entries".replace(",", " ") in docs
    monkeypatch.setattr(data, "MAX_DIRECTORY_ENTRIES", 50)
    tok = tiny_tokenizer_file(tmp_path)
    big = tmp_path / "big"
    for d in range(10):  # 10 directories of 4 files: 50 entries
        (big / f"d{d}").mkdir(parents=True)
        for f in range(4):
            (big / f"d{d}" / f"{f}.bin").touch()
    monkeypatch.chdir(tmp_path)
    for extra, message in ((False, f"{big}: no .txt, .md or .jsonl files in this directory"),
                           (True, f"{big}: more than 50 entries below it; pass the data files")):
        if extra:
            (big / "d9" / "deep").mkdir()
        code = main(["train", str(big), "-o", "run", "--tokenizer", str(tok), *TRAIN_ARCH, "--steps", "1"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and captured.out == "", captured.err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big", tok.name]


def test_text_files_and_jsonl_lines_are_read_with_a_cap(tmp_path, tok, monkeypatch):
    """files-and-untrusted-input.md: a text file (one document) up to 1 GiB, a JSONL record up to 64 MiB, read
    with the cap (never the whole file first); at the cap it is read, one byte over is a one-line DataError. A
    device (/dev/zero) is refused before anything is read. The caps are lowered here."""
    from gemma3.train import data

    docs = " ".join((Path(__file__).parents[1] / "docs" / "files-and-untrusted-input.md").read_text("utf-8").split())
    assert "a training text file (one document) is read up to 1 GiB and a JSONL record up to 64 MiB" in docs
    assert data.MAX_TEXT_FILE_BYTES == 1 << 30 and data.MAX_JSONL_LINE_BYTES == 64 << 20
    monkeypatch.setattr(data, "MAX_TEXT_FILE_BYTES", 100)
    monkeypatch.setattr(data, "MAX_JSONL_LINE_BYTES", 100)
    at, over = tmp_path / "at.txt", tmp_path / "over.txt"
    at.write_bytes(b"a" * 100)
    over.write_bytes(b"a" * 101)
    assert [d.text for d in read_documents([str(at)])] == ["a" * 100]
    with pytest.raises(DataError, match=r"over.txt: over 100 bytes") as e:
        list(read_documents([str(over)]))
    assert "\n" not in str(e.value)
    record = json.dumps({"text": "b" * 87})  # 100 bytes with its newline
    assert len(record) + 1 == 100
    lines = tmp_path / "lines.jsonl"
    lines.write_text(record + "\n" + record + "\n", encoding="utf-8")
    assert len(list(read_documents([str(lines)]))) == 2
    lines.write_text(record + "\n" + json.dumps({"text": "b" * 88}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lines.jsonl:2: a line over 100 bytes"):
        list(read_documents([str(lines)]))
    if Path("/dev/zero").exists():
        with pytest.raises(DataError, match="not a regular file"):
            expand_sources(["/dev/zero"])
