"""The bounded GGUF reader, dequantisers, metadata -> config translation and writer.

Bad-input tests use tiny hand-crafted files (docs/security.md): each must fail with one CheckpointError
line naming the file and the problem, without allocating more than the file's size.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import CheckpointError
from gemma3.weights.gguf.dequantize import DEQUANTISERS
from gemma3.weights.gguf.reader import GGML_TYPE_IDS, GGML_TYPES, GGUFFile, _parse, read_gguf_metadata
from gemma3.weights.gguf.translate import config_from_gguf, load_gguf
from gemma3.text.gguf_metadata import tokenizer_metadata_from_json
from gemma3.weights.gguf.writer import write_gguf
from gemma3.weights.names import expected_shapes

U32, F32, STR, ARR, U64 = 4, 6, 8, 9, 10


# ---------------------------------------------------------------------- hand-crafted files
def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)


def gguf_bytes(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def valid_kvs() -> list[bytes]:
    return [
        kv("general.architecture", STR, s("gemma3")),
        kv("answer", U32, struct.pack("<I", 42)),
        kv("floats", ARR, struct.pack("<IQ", F32, 3) + struct.pack("<3f", 1, 2, 3)),
        kv("words", ARR, struct.pack("<IQ", STR, 2) + s("a") + s("▁b")),
    ]


def valid_file() -> bytes:
    data = np.arange(8, dtype="<f4").tobytes() + b"\0" * 32 + b"\x00\x3c" + bytes(range(32))  # F32 [2,4], Q8_0
    tensors = [tensor("a", [4, 2], 0, 0), tensor("b", [32], 8, 64)]
    return gguf_bytes(valid_kvs(), tensors, data)


def write(tmp_path: Path, data: bytes, name: str = "x.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_hand_crafted_file(tmp_path):
    g = GGUFFile.open(write(tmp_path, valid_file()))
    assert g.version == 3
    assert g.metadata["general.architecture"] == "gemma3" and g.metadata["answer"] == 42
    np.testing.assert_array_equal(g.metadata["floats"], [1, 2, 3])
    assert g.metadata["words"] == ["a", "▁b"]
    assert g.tensors["a"].shape == (2, 4) and g.tensors["b"].type_name == "Q8_0"
    torch.testing.assert_close(g.dequantize("a"), torch.arange(8.0).reshape(2, 4))
    torch.testing.assert_close(g.dequantize("b"), torch.arange(32.0))  # scale 1.0 (f16 0x3c00)
    assert read_gguf_metadata(tmp_path / "x.gguf")["words"] == ["a", "▁b"]


def _u64(v):
    return struct.pack("<Q", v)


BAD_FILES = {
    "wrong magic": (gguf_bytes(valid_kvs(), [], magic=b"GGML"), "not a GGUF file"),
    "version 1": (gguf_bytes(valid_kvs(), [], version=1), "unsupported GGUF version 1"),
    "version 4": (gguf_bytes(valid_kvs(), [], version=4), "unsupported GGUF version 4"),
    "big endian": (gguf_bytes(valid_kvs(), [], version=3 << 24), "big-endian"),
    "absurd kv count": (gguf_bytes([], [], n_kv=1 << 60), "metadata entries (limit"),
    "absurd tensor count": (gguf_bytes([], [], n_tensors=1 << 62), "tensors (limit"),
    "kv count past end": (gguf_bytes(valid_kvs(), [], n_kv=5), "truncated"),
    "huge string": (gguf_bytes([s("k")[:8] + b"k" + struct.pack("<I", STR) + _u64(1 << 40)], []), "limit"),
    "string past end": (gguf_bytes([kv("k", STR, _u64(1000) + b"abc")], []), "truncated"),
    "huge key": (gguf_bytes([_u64(1 << 50)], []), "limit"),
    "huge array": (gguf_bytes([kv("k", ARR, struct.pack("<IQ", U32, 1 << 40))], []), "elements (limit"),
    "array past end": (gguf_bytes([kv("k", ARR, struct.pack("<IQ", U64, 1000))], []), "truncated"),
    "string array past end": (gguf_bytes([kv("k", ARR, struct.pack("<IQ", STR, 100000))], []), "truncated"),
    "nested arrays": (gguf_bytes([kv("k", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", ARR, 1)
                                     + struct.pack("<IQ", U32, 0))], []), "nests arrays"),
    "unknown value type": (gguf_bytes([kv("k", 13, b"")], []), "unknown value type id 13"),
    "unknown element type": (gguf_bytes([kv("k", ARR, struct.pack("<IQ", 99, 1))], []), "unknown element type"),
    "invalid utf-8": (gguf_bytes([kv("k", STR, s(b"\xff\xfe"))], []), "not valid UTF-8"),
    "duplicate key": (gguf_bytes([kv("k", U32, b"\0" * 4), kv("k", U32, b"\0" * 4)], []), "duplicate metadata key"),
    "bad alignment": (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 24))], []), "power of two"),
    "zero dims": (gguf_bytes([], [tensor("t", [], 0, 0)]), "0 dimensions"),
    "five dims": (gguf_bytes([], [tensor("t", [1] * 5, 0, 0)]), "5 dimensions"),
    "zero dim": (gguf_bytes([], [tensor("t", [4, 0], 0, 0)]), "zero dimension"),
    "unknown tensor type": (gguf_bytes([], [tensor("t", [4], 99, 0)], b"\0" * 16), "unknown type id 99"),
    "row not whole blocks": (gguf_bytes([], [tensor("t", [31], 8, 0)], b"\0" * 64), "not a multiple"),
    "misaligned offset": (gguf_bytes([], [tensor("t", [4], 0, 4)], b"\0" * 64), "alignment"),
    "tensor past end": (gguf_bytes([], [tensor("t", [4, 4], 0, 0)], b"\0" * 32), "extends past the end"),
    "huge dims": (gguf_bytes([], [tensor("t", [1 << 62, 1 << 62, 1 << 62, 1 << 62], 0, 0)]), "extends past"),
    "offset past end": (gguf_bytes([], [tensor("t", [4], 0, 1 << 63)], b"\0" * 16), "extends past the end"),
    "overlap": (gguf_bytes([], [tensor("a", [8], 0, 0), tensor("b", [8], 0, 0)], b"\0" * 32), "overlap"),
    "duplicate tensor": (gguf_bytes([], [tensor("a", [8], 0, 0), tensor("a", [8], 0, 32)], b"\0" * 64),
                         "duplicate tensor name"),
    "empty file": (b"", "too short"),
    "tiny file": (b"GGUF\3\0\0\0", "too short"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_fail_with_one_line(tmp_path, case):
    data, message = BAD_FILES[case]
    path = write(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            GGUFFile.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text
    assert peak < 64 * 1024 + 10 * len(data)  # nothing sized by the file's claims


@pytest.mark.parametrize("cut", [4, 8, 20, 30, 60, 100, 150, 200, -10])
def test_truncated_files(tmp_path, cut):
    data = valid_file()
    path = write(tmp_path, data[:cut])
    with pytest.raises(CheckpointError, match="truncated|too short|extends past"):
        GGUFFile.open(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="cannot open"):
        GGUFFile.open(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="not a regular file"):
        GGUFFile.open(tmp_path)


# ---------------------------------------------------------------------- fuzzing the header reader
@settings(suppress_health_check=[HealthCheck.too_slow])  # the profile's examples (tests/conftest.py)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _parse_only_checkpoint_errors(b"GGUF" + data)
    _parse_only_checkpoint_errors(data)


@settings(max_examples=max(500, settings.default.max_examples), suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_header(draw):
    data = bytearray(valid_file())
    for _ in range(draw.draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw.draw(st.integers(0, len(data) - 1))
        kind = draw.draw(st.sampled_from(["byte", "u64", "cut"]))
        if kind == "byte":
            data[pos] = draw.draw(st.integers(0, 255))
        elif kind == "u64":
            value = draw.draw(st.sampled_from([0, 1, 2, 7, 255, 1 << 31, 1 << 32, 1 << 40, (1 << 64) - 1]))
            data[pos:pos + 8] = struct.pack("<Q", value)
        else:
            del data[pos:]
    _parse_only_checkpoint_errors(bytes(data))


def _parse_only_checkpoint_errors(data: bytes) -> None:
    try:
        _parse(memoryview(data), "fuzz.gguf")
    except CheckpointError as e:
        assert str(e).startswith("fuzz.gguf: ") and "\n" not in str(e)


# ---------------------------------------------------------------------- dequantisation
@pytest.mark.parametrize("type_name", sorted(DEQUANTISERS))
def test_dequantisers_match_gguf_py_on_random_blocks(type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGML_TYPES[GGML_TYPE_IDS[type_name]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, 4 * kind.block_bytes if kind.block_elements == 1 else kind.block_bytes),
                       dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # random scale bytes include NaN / inf halves
        ours = DEQUANTISERS[type_name](raw.reshape(-1, kind.block_bytes)).reshape(64, -1)
        reference = dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(ours, reference)


def test_header_and_dequantisers_match_gguf_py_on_the_real_file(gguf_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ours = GGUFFile.open(gguf_path)
    reader = GGUFReader(gguf_path)
    assert [(t.name, tuple(int(n) for n in reversed(t.shape)), int(t.tensor_type), int(t.data_offset))
            for t in reader.tensors] == [(t.name, t.shape, t.ggml_type, t.offset) for t in ours.tensors.values()]
    assert set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(ours.metadata)
    smallest: dict[str, object] = {}
    for t in reader.tensors:
        best = smallest.get(t.tensor_type.name)
        if best is None or t.n_elements < best.n_elements:
            smallest[t.tensor_type.name] = t
    assert set(smallest) == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    for t in smallest.values():
        np.testing.assert_array_equal(ours.dequantize(t.name).numpy(), dequantize(t.data, t.tensor_type), t.name)


# ---------------------------------------------------------------------- the real file's metadata
def test_real_file_header_and_config(gguf_path):
    g = GGUFFile.open(gguf_path)
    assert len(g.tensors) == 13 * 18 + 2
    meta = g.metadata
    assert meta["general.architecture"] == "gemma3"
    assert len(meta["tokenizer.ggml.tokens"]) == 262_144 and meta["tokenizer.ggml.tokens"][106] == "<end_of_turn>"
    assert meta["tokenizer.ggml.scores"].dtype == np.float32 and meta["tokenizer.ggml.token_type"].dtype == np.int32
    config = config_from_gguf(g)
    assert config == Gemma3Config(rms_norm_eps=meta["gemma3.attention.layer_norm_rms_epsilon"])  # the 270M preset


def test_load_subtracts_one_from_norms(gguf_path):
    config, state, g = load_gguf(gguf_path)
    torch.testing.assert_close(state["norm.weight"], g.dequantize("output_norm.weight") - 1)
    assert state["norm.weight"][:5].tolist() == [6.125, 8.5625, 46.0, 144.0, 282.0]  # spec section 7
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(config)


# ---------------------------------------------------------------------- config inference and the writer
TINY = Gemma3Config(vocab_size=128, eos_token_id=(1,), hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    layer_types=hybrid_layer_types(6), max_position_embeddings=128)


def tiny_state(config: Gemma3Config = TINY) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in expected_shapes(config).items()}


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0"])
def test_write_then_read_round_trip(tmp_path, tensor_type):
    state = tiny_state()
    path = write_gguf(tmp_path / "tiny.gguf", TINY, state, {}, tensor_type)
    config, loaded, _ = load_gguf(path)
    assert config.rms_norm_eps == pytest.approx(1e-6) and config.replace(rms_norm_eps=1e-6) == TINY  # f32 in GGUF
    tolerance = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-3, "Q8_0": 2e-3}[tensor_type]  # F32: only the norms' ±1 rounds
    for name, value in state.items():
        torch.testing.assert_close(loaded[name], value, atol=tolerance, rtol=0 if tensor_type == "F32" else 1e-2)
    assert not (tmp_path / "tiny.gguf.tmp").exists()


def test_scaling_and_27b_attention_scale_are_inferred(tmp_path):
    big = TINY.replace(num_hidden_layers=62, rope_scaling_factor=8.0, query_pre_attn_scalar=16)
    state = tiny_state(big)
    path = write_gguf(tmp_path / "deep.gguf", big, state, {}, "F16")
    config = config_from_gguf(GGUFFile.open(path))
    assert config.rope_scaling_factor == 8.0 and config.query_pre_attn_scalar == 16  # d/H = 32/2 on 62 layers


@pytest.mark.parametrize("change, message", [
    ("missing", "missing tensor blk.5.ffn_up.weight"),
    ("unexpected", "unexpected tensor blk.6.ffn_up.weight"),
    ("misshaped", "tensor blk.0.ffn_up.weight has shape [65, 32], expected [64, 32]"),
])
def test_wrong_tensors_are_named(tmp_path, change, message):
    state = tiny_state()
    if change == "missing":
        del state["layers.5.mlp.up_proj.weight"]
    elif change == "unexpected":
        state["layers.6.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"]
    else:
        state["layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    path = write_gguf(tmp_path / "bad.gguf", TINY, state, {}, "F32")
    with pytest.raises(CheckpointError) as info:
        load_gguf(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")


def test_other_architecture_is_rejected(tmp_path):
    path = write(tmp_path, gguf_bytes([kv("general.architecture", STR, s("llama"))], []))
    with pytest.raises(CheckpointError, match=r"x\.gguf: general.architecture is 'llama', not 'gemma3'"):
        load_gguf(path)


def test_missing_metadata_is_named(tmp_path):
    path = write(tmp_path, gguf_bytes([kv("general.architecture", STR, s("gemma3"))], []))
    with pytest.raises(CheckpointError, match="gemma3.embedding_length is missing"):
        load_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = write(tmp_path, gguf_bytes([], [tensor("t", [32], 9, 0)], b"\0" * 40))  # Q8_1: neither we nor gguf-py read it
    with pytest.raises(CheckpointError, match="tensor t has type Q8_1, which gemma3 cannot dequantise"):
        GGUFFile.open(path).dequantize("t")


def test_tokenizer_arrays_rebuilt_from_tokenizer_json(gguf_path, official_tokenizer):
    rebuilt = tokenizer_metadata_from_json(official_tokenizer / "tokenizer.json")
    meta = read_gguf_metadata(gguf_path)
    assert rebuilt["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    np.testing.assert_array_equal(rebuilt["tokenizer.ggml.token_type"], meta["tokenizer.ggml.token_type"])
    scores, real = rebuilt["tokenizer.ggml.scores"], meta["tokenizer.ggml.scores"]
    np.testing.assert_array_equal(np.argsort(-scores, kind="stable"), np.argsort(-real, kind="stable"))


def _resident_bytes(address: int) -> int | None:
    """Rss of the mapping holding `address`, from /proc/self/smaps (None where there is no such file)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    return None


def test_the_header_pages_do_not_stay_in_memory(gguf_path):
    """The parser reads the header through the map (6 MB for the 270M: the tokenizer's pieces, scores and types)
    and copies what it keeps; its pages are then dropped, so opening the file leaves none of it resident."""
    f = GGUFFile.open(gguf_path)
    resident = _resident_bytes(f._data.ctypes.data)
    if resident is None:
        pytest.skip("no /proc/self/smaps here")
    header = min(t.offset for t in f.tensors.values())
    assert header > 6 << 20 and resident < 64 << 10, resident  # at most the last, shared page or so
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144  # what was read stays (a copy)
    assert f.raw("token_embd.weight")[:4].tolist() == list(GGUFFile.open(gguf_path).raw("token_embd.weight")[:4])


def test_a_name_with_a_newline_stays_on_one_line_in_the_error():
    """Found by test_fuzz_mutated_header: a key read from the file is quoted in the error, control
    characters escaped."""
    data = bytearray(valid_file())
    at = data.index(b"answer")
    data[at] = ord("\n")
    data[at + 6:at + 10] = struct.pack("<I", 260)  # the key's value type: no such type
    with pytest.raises(CheckpointError) as e:
        _parse(memoryview(bytes(data)), "bad.gguf")
    assert str(e.value) == "bad.gguf: \\nnswer has unknown value type id 260"


# ---------------------------------------------------------------------- hostile metadata in a well-formed file
def hostile_gguf(monkeypatch, path: Path, set_keys=(), drop_keys=(), tensors=(), tokenizer=None) -> Path:
    """The tiny model written by our writer (gguf-py's GGUFWriter underneath), then given hostile metadata just
    before the header is written: `set_keys` as (key, value, GGUFValueType[, element type]), `drop_keys` removed,
    `tensors` added as (GGUF name, array)."""
    import gguf as gguf_py

    plain = gguf_py.GGUFWriter

    class Hostile(plain):
        def write_header_to_file(self, *args, **kwargs):
            for key in drop_keys:
                del self.kv_data[0][key]
            for key, value, vtype, *sub in set_keys:
                self.kv_data[0][key] = gguf_py.GGUFValue(value=value, type=vtype, sub_type=sub[0] if sub else None)
            for name, array in tensors:
                self.add_tensor(name, array)
            return super().write_header_to_file(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gguf_py, "GGUFWriter", Hostile)
        return write_gguf(path, TINY, tiny_state(), tokenizer or {}, "F32")


def _hostile_cases():
    from gguf import GGUFValueType as T

    A = "gemma3."
    return {
        # what llama.cpp would read as a separate output head: Gemma 3 ties it (and we would silently drop it)
        "untied output": (dict(tensors=[("output.weight", np.zeros((128, 32), np.float32))]),
                          ["untied output.weight"]),
        "more tokens than rows": (dict(tokenizer={"tokenizer.ggml.tokens": [f"t{i}" for i in range(129)]}),
                                  ["tokenizer.ggml.tokens lists 129 tokens", "token_embd.weight has 128 rows"]),
        "tokens not strings": (dict(set_keys=[("tokenizer.ggml.tokens", [1, 2, 3], T.ARRAY, T.INT32)]),
                               ["tokenizer.ggml.tokens must be an array of strings", "int32"]),
        "value_length != key_length": (dict(set_keys=[(A + "attention.value_length", 8, T.UINT32)]),
                                       ["gemma3.attention.value_length is 8", "key_length is 16"]),
        "no layers": (dict(set_keys=[(A + "block_count", 0, T.UINT32)]), ["gemma3.block_count", "got 0"]),
        "no heads": (dict(set_keys=[(A + "attention.head_count", 0, T.UINT32)]),
                     ["gemma3.attention.head_count", "got 0"]),
        "no kv heads": (dict(set_keys=[(A + "attention.head_count_kv", 0, T.UINT32)]),
                        ["gemma3.attention.head_count_kv", "got 0"]),
        "no window": (dict(set_keys=[(A + "attention.sliding_window", 0, T.UINT32)]),
                      ["gemma3.attention.sliding_window", "got 0"]),
        "10 000 layers": (dict(set_keys=[(A + "block_count", 10_000, T.UINT32)]),  # allowed: then its tensors lack
                          ["missing tensor blk.6."]),
        "10 001 layers": (dict(set_keys=[(A + "block_count", 10_001, T.UINT32)]),
                          ["gemma3.block_count is 10,001", "10,000"]),
        "2**64 - 1 layers": (dict(set_keys=[(A + "block_count", 2**64 - 1, T.UINT64)]),
                             ["gemma3.block_count is 18,446,744,073,709,551,615"]),
        "huge context": (dict(set_keys=[(A + "context_length", 2**64 - 1, T.UINT64)]),
                         ["gemma3.context_length is 18,446,744,073,709,551,615"]),
        "huge width": (dict(set_keys=[(A + "embedding_length", 2**63, T.UINT64)]),
                       ["gemma3.embedding_length is 9,223,372,036,854,775,808"]),
        "huge heads": (dict(set_keys=[(A + "attention.head_count", 2**31 - 1, T.UINT32)]),  # a valid config
                       ["tensor blk.0.attn_q.weight has shape [32, 32]"]),
        "block_count an array": (dict(set_keys=[(A + "block_count", [6], T.ARRAY, T.UINT32)]),
                                 ["gemma3.block_count must be a positive int, got an array of uint32"]),
        "NaN rope base": (dict(set_keys=[(A + "rope.freq_base", float("nan"), T.FLOAT32)]),
                          ["gemma3.rope.freq_base", "got nan"]),
        "infinite rope base": (dict(set_keys=[(A + "rope.freq_base", float("inf"), T.FLOAT32)]),
                               ["gemma3.rope.freq_base", "got inf"]),
        "softcap a string": (dict(set_keys=[(A + "final_logit_softcapping", "x", T.STRING)]),
                             ["gemma3.final_logit_softcapping", "got 'x'"]),
        "infinite softcap": (dict(set_keys=[(A + "final_logit_softcapping", float("inf"), T.FLOAT32)]),
                             ["gemma3.final_logit_softcapping", "got inf"]),
        "eos beyond the vocabulary": (dict(set_keys=[("tokenizer.ggml.eos_token_id", 2**32 - 1, T.UINT32)]),
                                      ["tokenizer.ggml.eos_token_id is 4,294,967,295", "128 rows"]),
        "negative bos": (dict(set_keys=[("tokenizer.ggml.bos_token_id", -1, T.INT32)]),
                         ["tokenizer.ggml.bos_token_id is -1"]),
        "no architecture": (dict(drop_keys=["general.architecture"]), ["general.architecture is missing"]),
    }


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_metadata_is_one_line_naming_the_key_and_value(monkeypatch, capsys, tmp_path, case):
    """docs/security.md: metadata is checked against the Gemma 3 schema. A well-formed file with each hostile value
    fails in load_gguf with one CheckpointError line that names the file, the key and the value, without allocating
    by its claims; and `gemma3 generate -m` on it says that line and exits 2."""
    from gemma3.cli import main

    changes, needles = HOSTILE[case]
    path = hostile_gguf(monkeypatch, tmp_path / "hostile.gguf", **changes)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            load_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and all(n in text for n in needles), text
    assert peak < 32 << 20  # 10 000 layers' expected tensor names and shapes: ~15 MB
    assert main(["generate", "-m", str(path), "Hi", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"gemma3 generate: error: {text}\n"
