"""`gemma3 generate / chat / perplexity` as a user runs them: real output on the embedded model, and bad
input answered with one line on stderr, exit status 2 and no traceback."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from gemma3.cli import main
from gemma3.text.tokenizer import Tokenizer


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_dir(tiny_hf_dir):
    return tiny_hf_dir


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--min-p", "1.5"], "min_p must be in [0, 1]"),
    (["-n", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_bad_sampling_flags(capsys, flags, message):
    code, out, err = run(capsys, "generate", "Hello", *flags)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_prompt_and_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "")
    assert code == 2 and "the prompt is empty" in err
    code, _, err = run(capsys, "generate", "-f", str(tmp_path / "nope.txt"))
    assert code == 2 and "nope.txt: cannot read prompt" in err
    code, _, err = run(capsys, "generate", "-m", str(tmp_path / "missing.gguf"), "Hi")
    assert code == 2 and "missing.gguf" in err and len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "word " * 100)
    assert code == 2 and "but the model's context is 64 tokens" in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [[], ["--kv-cache-dtype", "float32"]])
def test_generate_json_on_embedded_model(capsys, flags):
    code, out, err = run(capsys, "generate", "The capital of France is", "-n", "12", "--temperature", "0",
                         "--json", "--quiet", *flags)
    assert code == 0
    result = json.loads(out)
    assert result["prompt_tokens"] == 6 and len(result["token_ids"]) == 12
    assert result["finish_reason"] == "length"
    # Greedy on the embedded Q4_K_M model is deterministic: the same 12 tokens on every run, with --threads 1 and 2,
    # and with either KV-cache dtype (checked when this was pinned); the first words of README's quick start.
    assert result["text"] == " the capital of the country of France. It is the largest"
    assert result["token_ids"] == [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488]
    assert result["timings"]["decode_tok_s"] > 0 and result["timings"]["load_s"] > 0


def test_generate_streams_with_stop_string(capsys, tiny_dir):
    code, out, _ = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "Once upon a time", "-n", "20",
                       "--temperature", "0", "--json")
    full = json.loads(out)["text"]
    stop = full[3:6]
    code, out, _ = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "Once upon a time", "-n", "20",
                       "--temperature", "0", "--stop", stop)
    assert code == 0 and out == full[:full.index(stop)] + "\n"


def test_chat_from_piped_stdin(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nSecond message\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "5", "--temperature", "0", "--context", "64")
    assert code == 0
    assert len(out.splitlines()) == 2  # two replies, one line each
    assert "(conversation reset)" in err


def test_chat_message_longer_than_context_keeps_session(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 80 + "\nshort one\n"))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "4", "--temperature", "0", "--context", "64",
                         "--quiet")
    # the session goes on after the failed turn; with piped input the exit status then says a turn failed
    assert code == 2 and "error: this message needs" in err and len(out.splitlines()) == 1


def reference_windows(n_ids: int, context: int, stride: int) -> list[tuple[int, int]]:
    """HF's strided perplexity, written out: window k covers tokens [k * stride, k * stride + context - 1) (one slot
    is kept for the <bos> put in front of every window but the first) and scores the tokens after the previous
    window's end, until the last token is scored."""
    spans, scored_to, k = [], 1, 0
    while scored_to < n_ids:
        begin = k * stride
        end = min(begin + context - 1, n_ids)
        spans.append((begin, end))
        scored_to, k = end, k + 1
    return spans


@torch.inference_mode()
def reference_nll(model, ids: list[int], context: int, stride: int) -> float:
    """Mean NLL of ids[1:] from the model's own logits: a plain forward per window, log_softmax, each token
    scored once, by the window that first reaches it."""
    total, count, scored_to = 0.0, 0, 1
    for begin, end in reference_windows(len(ids), context, stride):
        window = ids[begin:end] if begin == 0 else [ids[0], *ids[begin:end]]  # ids[0] is <bos>
        logp = model(torch.tensor([window])).logits[0].double().log_softmax(-1)
        for t in range(scored_to, end):  # token t, predicted at the position before it
            at = t - begin + (0 if begin == 0 else 1)
            total -= float(logp[at - 1, ids[t]])
            count += 1
        scored_to = end
    assert count == len(ids) - 1
    return total / count


def test_perplexity(capsys, tmp_path, tiny_dir):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, _ = run(capsys, "perplexity", str(text), "-m", str(tiny_dir), "--context", "32", "--stride", "16",
                       "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    n_ids = len(Tokenizer.from_dir(tiny_dir).encode(text.read_text()))
    assert result["tokens"] == n_ids - 1  # every token but <bos> scored exactly once
    assert (result["windows"], result["context"], result["stride"]) == (len(reference_windows(n_ids, 32, 16)), 32, 16)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "perplexity", str(empty), "-m", str(tiny_dir))
    assert code == 2 and "the file is empty" in err


def test_perplexity_is_the_mean_nll_of_the_models_own_logits(capsys, tmp_path, real_270m):
    """The real 270M in fp32 (--quantize none), so the windows matter: a random model predicts nearly uniformly
    whatever its history, and its NLL hardly moves when a window loses a token of history or its <bos>."""
    model, tokenizer = real_270m
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    code, out, _ = run(capsys, "perplexity", str(text), "--quantize", "none", "--context", "32", "--stride", "16",
                       "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    ids = tokenizer.encode(text.read_text(), add_bos=True)
    nll = reference_nll(model, ids, 32, 16)
    assert result["tokens"] == len(ids) - 1 and result["windows"] == len(reference_windows(len(ids), 32, 16))
    # The reference is the plain model (torch attention, full logits, log_softmax in fp64); the command runs
    # accelerate()'s attention path and the chunked fp32 loss: the same products summed in another order, so
    # fp32 rounding only. Measured: 2.1e-5 nats apart over these 101 tokens. The bound, 5e-4, is 25 times that and
    # under a seventieth of what one token less of history in every window moves the mean here (measured +0.037
    # for context 31, +0.049 for stride 15); a window without its <bos> moves it far more.
    assert result["nll"] == pytest.approx(nll, abs=5e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)


# ------------------------------------------------------------------- inputs that ended in a traceback before
def one_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], err


def test_invalid_utf8_prompt_everywhere(capsys, monkeypatch, tiny_dir, tmp_path):
    surrogate = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python hands over such argv bytes
    one_line(*run(capsys, "generate", "-m", str(tiny_dir), surrogate, "--quiet")[::2], "not UTF-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\ncaf\xe9\n")
    one_line(*run(capsys, "generate", "-m", str(tiny_dir), "-f", str(bad), "--quiet")[::2],
             "bad.txt: not UTF-8 text (invalid byte 0xe9 at byte 12, line 2)")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    one_line(*run(capsys, "generate", "-m", str(tiny_dir), "--quiet")[::2], "stdin: not UTF-8")


class CountingStream:
    """A binary stream over another that counts the bytes the reader took, and ends (as if at end of file) once
    it has handed out `limit`: an uncapped reader then stops, and fails the count instead of hanging. Stands in
    for a file opened with open(path, "rb") and for sys.stdin (its `buffer` is itself)."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.count = inner, limit, 0
        self.buffer = self

    def read(self, n: int = -1) -> bytes:
        n = self.limit - self.count if n is None or n < 0 else min(n, self.limit - self.count)
        data = self.inner.read(n) if n > 0 else b""
        self.count += len(data)
        return data

    def isatty(self) -> bool:
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_unbounded_prompt_is_read_with_a_cap(capsys, monkeypatch, tiny_dir, source):
    """/dev/zero as the prompt: the command reads at most the cap and one byte more (the work is counted, not
    timed), then says so in one line."""
    import builtins

    import gemma3.files
    from gemma3.files import PROMPT_BYTES

    readers = []

    def counting(stream):
        readers.append(CountingStream(stream, 4 * PROMPT_BYTES))
        return readers[-1]

    with open("/dev/zero", "rb") as zero:
        if source == "stdin":
            monkeypatch.setattr("sys.stdin", counting(zero))
            code, _, err = run(capsys, "generate", "-m", str(tiny_dir), "--quiet")
        else:
            real_open = builtins.open
            monkeypatch.setattr(gemma3.files, "open", lambda path, *a, **k: counting(real_open(path, *a, **k))
                                if str(path) == "/dev/zero" else real_open(path, *a, **k), raising=False)
            code, _, err = run(capsys, "generate", "-m", str(tiny_dir), "-f", "/dev/zero", "--quiet")
    one_line(code, err, "more than 8 MiB of text")
    assert len(readers) == 1 and readers[0].count <= PROMPT_BYTES + 1, [r.count for r in readers]


@pytest.mark.parametrize("seed", ["-1", str(2**64), "99999999999999999999999"])
def test_seed_out_of_range(capsys, seed):
    one_line(*run(capsys, "generate", "Hi", "--seed", seed)[::2], "--seed must be in [0, 2**64 - 1]")


def test_whitespace_only_prompt_is_rejected(capsys):
    one_line(*run(capsys, "generate", " \n\t ")[::2], "the prompt is only whitespace")


def test_non_finite_weights_give_a_clear_error(capsys, tmp_path, official_tokenizer):
    from gemma3.config import Gemma3Config, hybrid_layer_types
    from gemma3.weights.hf import save_hf
    from reference import random_model

    config = Gemma3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          head_dim=8, sliding_window=8, layer_types=hybrid_layer_types(2), max_position_embeddings=64)
    state = random_model(config).state_dict()
    state["layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_hf(tmp_path / "nan", config, state, dtype=torch.float32, tokenizer_json=official_tokenizer / "tokenizer.json")
    for flags in (["--temperature", "0"], ["--temperature", "0.8"]):
        code, out, err = run(capsys, "generate", "-m", str(tmp_path / "nan"), "Hi", "-n", "4", "--quiet", *flags)
        one_line(code, err, "non-finite logits (NaN or inf)")


def test_kv_cache_is_checked_against_memory_before_allocating(capsys, tmp_path, official_tokenizer):
    """An absurd context_length times -n: the cache would need 64 GiB; an error, not an out-of-memory kill."""
    from gemma3.config import GLOBAL, SLIDING, Gemma3Config
    from gemma3.weights.hf import save_hf
    from reference import random_model

    config = Gemma3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          head_dim=8, sliding_window=8, layer_types=(SLIDING, GLOBAL), max_position_embeddings=2**30)
    save_hf(tmp_path / "huge", config, random_model(config).state_dict(), dtype=torch.float32,
            tokenizer_json=official_tokenizer / "tokenizer.json")
    code, _, err = run(capsys, "generate", "-m", str(tmp_path / "huge"), "Hi", "-n", str(2**30), "--quiet")
    one_line(code, err, "KV cache for 1 x 1,073,741,824 tokens needs")


@pytest.fixture
def restore_threads():
    """The commands run in this process and set its torch thread count: put it back for the tests after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_above_the_cores_are_capped(capsys, tiny_dir, restore_threads):
    """--help: "at most the cores available". More is a warning naming both numbers, and the run uses exactly the
    cores this process may run on; a value within them is used as given; below 1 is a one-line error."""
    from gemma3.cli.common import available_cores

    cores = available_cores()
    torch.set_num_threads(cores + 1 if cores > 1 else 2)  # neither value the command should leave behind
    code, out, err = run(capsys, "generate", "-m", str(tiny_dir), "Hi", "-n", "2", "-t", "4096", "--quiet")
    assert code == 0
    assert err == f"warning: --threads 4096 is more than the {cores} cores available; using {cores}\n"
    assert torch.get_num_threads() == cores
    torch.set_num_threads(cores + 1)
    code, out, err = run(capsys, "generate", "-m", str(tiny_dir), "Hi", "-n", "2", "-t", "1", "--quiet")
    assert code == 0 and err == "" and torch.get_num_threads() == 1
    for bad in ("0", "-3"):
        torch.set_num_threads(1)
        one_line(*run(capsys, "generate", "-m", str(tiny_dir), "Hi", "-n", "2", "-t", bad, "--quiet")[::2],
                 f"gemma3 generate: error: --threads must be >= 1, got {bad}")
        assert torch.get_num_threads() == 1


def test_chat_goes_on_after_a_bad_line_and_says_so_in_its_status(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello\ncaf\xe9\nAgain\n")))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "3", "--temperature", "0", "--context", "64",
                         "--quiet")
    assert code == 2 and len(out.splitlines()) == 2 and "error: stdin: not UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["[1, 2]", "{}", "\"text\"", "null"])
def test_config_json_must_be_a_non_empty_object(capsys, tmp_path, tiny_dir, content):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(content)
    code, _, err = run(capsys, "info", "-m", str(tmp_path / "m"))
    one_line(code, err, "config.json")
    assert "expected a JSON object" in err or "the config is empty" in err


def test_device_flag(capsys, tiny_dir):
    one_line(*run(capsys, "generate", "-m", str(tiny_dir), "Hi", "--device", "tpu:3")[::2], "--device")
    one_line(*run(capsys, "generate", "-m", str(tiny_dir), "Hi", "--device", "nonsense")[::2], "not a device")
    if not torch.cuda.is_available():
        one_line(*run(capsys, "generate", "-m", str(tiny_dir), "Hi", "--device", "cuda")[::2], "CUDA is not available")
    code, _, _ = run(capsys, "generate", "-m", str(tiny_dir), "Hi", "-n", "2", "--device", "cpu", "--quiet")
    assert code == 0


def test_chat_banner_says_the_embedded_model_is_the_base(capsys):
    from gemma3.cli import build_parser

    help_text = [a for a in build_parser()._subparsers._group_actions[0].choices["chat"].format_help().split("\n")]
    assert "pretrained base model" in " ".join(help_text) and "gemma-3-270m-it" in " ".join(help_text)


# ------------------------------------------------------------------- the checkpoint's own chat template
@pytest.mark.parametrize("marker", ["FROM-CONFIG", "FROM-JINJA", "FROM-GGUF"])
def test_chat_prompts_the_model_with_the_checkpoints_own_template(capsys, monkeypatch, template_sources, tiny_dir,
                                                                  marker):
    """generation.md, "Chat": `chat` renders the checkpoint's own template. The prompt ids the model is given
    are the tokens of that template's rendering, written out here, for each place a template comes from."""
    from gemma3.generation import generator

    prompts = []

    class Recording(generator._Run):
        def __init__(self, gen, prompt_ids, *args, **kwargs):
            prompts.append([list(p) for p in prompt_ids])
            super().__init__(gen, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generator, "_Run", Recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    code, out, err = run(capsys, "chat", "-m", str(template_sources[marker]), "-n", "2", "--temperature", "0",
                         "--context", "64", "--quiet")
    assert code == 0, err
    expected = Tokenizer.from_dir(tiny_dir).encode(f"<bos>{marker} <user> Hello", add_bos=False)
    assert prompts == [[expected]]


# ------------------------------------------------------------------- input caps (files-and-untrusted-input.md)
class Zeros(io.RawIOBase):
    """`size` NUL bytes and then the end: /dev/zero that cannot keep a broken reader busy forever. `taken` counts
    what was read."""

    def __init__(self, size: int):
        self.left, self.taken = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left, self.taken = self.left - n, self.taken + n
        return n


def test_chat_on_endless_zeros_stops_with_one_line(capsys, monkeypatch, tmp_path, tiny_dir):
    """`gemma3 chat < /dev/zero`: chat lines are read up to 8 MiB each, and a line whose end does not come within
    64 MiB more is the end of the session: one line, exit status 2, nothing said, nothing written; the
    stream is read that far and no further (it is 256 MiB long here, so an unbounded reader would take it all)."""
    from gemma3.files import CHAT_LINE_BYTES, TEXT_BYTES

    zeros = Zeros(256 << 20)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(zeros)))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "2", "--context", "64", "--quiet")
    one_line(code, err, "error: stdin: a line longer than 72 MiB with no end in sight; stopped reading")
    assert out == "" and list(tmp_path.iterdir()) == []
    assert CHAT_LINE_BYTES + TEXT_BYTES < zeros.taken <= CHAT_LINE_BYTES + TEXT_BYTES + (2 << 20)


def test_perplexity_reads_at_most_64_mib(capsys, monkeypatch, tmp_path, tiny_dir):
    """A text to score is read up to 64 MiB: a file of exactly that is read whole (this one is only spaces, so
    the answer is that it is empty), one byte more is refused before the model is loaded; one line, exit status
    2, nothing on stdout, nothing written."""
    text = tmp_path / "text.txt"
    text.write_bytes(b" " * (64 << 20))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "perplexity", str(text), "-m", str(tiny_dir), "--quiet")
    one_line(code, err, f"{text}: the file is empty")
    with text.open("ab") as f:
        f.write(b" ")
    code, out, err = run(capsys, "perplexity", str(text), "-m", str(tmp_path / "never-loaded"), "--quiet")
    one_line(code, err, f"{text}: more than 64 MiB of text, more than this command reads")
    assert out == "" and [p.name for p in tmp_path.iterdir()] == ["text.txt"]


# ------------------------------------------------------------------- -n past any context
@pytest.mark.parametrize("n, context, message", [
    (str(2**63), "64", f"-n {2**63} leaves no room for a message in --context 64; lower -n or raise --context"),
    ("64", "64", "-n 64 leaves no room for a message in --context 64"),
    ("100", "8192", "-n 100 leaves no room for a message in the model's 64-token context; lower -n"),
], ids=["2**63", "the whole context", "past the model's context"])
def test_chat_refuses_a_max_new_tokens_that_fills_the_context(capsys, monkeypatch, tiny_dir, n, context, message):
    """Each chat turn keeps -n tokens of the context for its reply, so -n at or past the context leaves no room
    for any message. Before, every turn failed saying "only -9223372036854775744 fit" (a negative count) and
    the session went on; now the command stops at once: one line, exit status 2."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", n, "--context", context, "--quiet")
    one_line(code, err, message)
    assert out == ""


def test_generate_with_a_max_new_tokens_past_int64_stops_at_the_context(capsys, tiny_dir):
    """generate -n 2**63: no overflow, no cache sized by -n; it generates until the 64-token context is full."""
    code, out, err = run(capsys, "generate", "-m", str(tiny_dir), "Hi", "-n", str(2**63), "--temperature", "0",
                         "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "context" and result["prompt_tokens"] + len(result["token_ids"]) == 64
