"""gemma3.files in-process: what a command may write (and the targets it refuses even with --overwrite), temporary
files and their cleanup, the user cache directory, and inputs read with a cap. Each error is pinned as the one line
the user sees (what is wrong, where), and each cap at exactly the cap and one byte over.

Nothing here touches a path outside the test's tmp_path: the current directory and $HOME (hence Path.home() and
`~`) are moved into it first, and os.kill is only ever sent to processes this test started (or faked)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gemma3.files as files
from gemma3.errors import Gemma3Error
from gemma3.files import (CHAT_LINE_BYTES, PROMPT_BYTES, TEXT_BYTES, LineReader, LineTooLong, OutputError,
                          check_not_protected, check_output_dir, check_output_file, check_text, decode_utf8,
                          owned_and_private, read_capped, read_stdin, read_text_file, remove_stale_temp, replace_file,
                          temp_path, user_cache_dir)

MiB = 1 << 20


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """$HOME (so Path.home() and `~`) and the current directory, both fresh directories inside tmp_path."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(work)
    assert Path.home() == home and Path("~").expanduser() == home
    return home


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(OutputError) as e:
        call(*args, **kwargs)
    assert isinstance(e.value, Gemma3Error)
    return str(e.value)


def test_the_caps():
    """The constants the commands and their docs rely on."""
    assert PROMPT_BYTES == 8 * MiB and CHAT_LINE_BYTES == PROMPT_BYTES and TEXT_BYTES == 64 * MiB


@pytest.mark.parametrize("n, text", [(8 * MiB, "8 MiB"), (64 * MiB, "64 MiB"), (72 * MiB, "72 MiB"),
                                     (3 * MiB // 2, "1.5 MiB"), (MiB // 4, "0.25 MiB")])
def test_mib(n, text):
    assert files._mib(n) == text


# ------------------------------------------------------------------------------------ check_not_protected
def test_not_protected_accepts_an_ordinary_target(home, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for out in (tmp_path / "out", Path("new"), tmp_path / "work" / "sub", home / "out", data / "sub"):
        assert check_not_protected(out, [str(data), None, tmp_path / "missing"], "-o") is None


@pytest.mark.parametrize("out", [".", "{work}", "sub/..", "{link}"])
def test_not_protected_refuses_the_current_directory(home, tmp_path, out):
    work = tmp_path / "work"
    (work / "sub").mkdir()
    (tmp_path / "link").symlink_to(work)
    out = out.format(work=work, link=tmp_path / "link")
    message = refused(check_not_protected, Path(out), [], "--out-dir")
    assert message == f"--out-dir {out}: is the current directory; name a new directory for the output"


def test_not_protected_refuses_home_and_root(home, tmp_path):
    assert refused(check_not_protected, home, [], "-o") == \
        f"-o {home}: refusing to write into {home}; name a new directory for the output"
    assert refused(check_not_protected, home / "x" / "..", [], "-o") == \
        f"-o {home}/x/..: refusing to write into {home}; name a new directory for the output"
    for out in ("/", "/tmp/..", f"{tmp_path}/../../../../../../../../../../.."):
        assert refused(check_not_protected, Path(out), [], "output") == \
            f"output {out}: refusing to write into /; name a new directory for the output"


def test_not_protected_the_current_directory_is_checked_first(home, monkeypatch):
    monkeypatch.chdir(home)
    assert refused(check_not_protected, home, [], "-o") == \
        f"-o {home}: is the current directory; name a new directory for the output"


def test_not_protected_refuses_the_source_itself(home, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "alias").symlink_to(model)
    for out, source in [(model, model), (model, str(model)), (tmp_path / "alias", model), (model, "../model"),
                        (tmp_path / "model.gguf", tmp_path / "model.gguf")]:
        assert refused(check_not_protected, out, [source], "-o") == \
            f"-o {out}: is the source itself; write the output somewhere else"


def test_not_protected_refuses_a_directory_that_contains_the_source(home, tmp_path):
    source = tmp_path / "a" / "b" / "data.txt"
    source.parent.mkdir(parents=True)
    source.write_text("x")
    for out in (tmp_path / "a" / "b", tmp_path / "a", tmp_path):
        assert refused(check_not_protected, out, [str(source)], "--out-dir") == \
            f"--out-dir {out}: contains the source {source}; write the output somewhere else"
    # the source as the user named it: relative to the current directory, or under ~
    assert refused(check_not_protected, tmp_path / "a", ["../a/b/data.txt"], "-o") == \
        f"-o {tmp_path / 'a'}: contains the source ../a/b/data.txt; write the output somewhere else"
    (home / "corpus").mkdir()
    (home / "corpus" / "t.txt").write_text("x")
    assert refused(check_not_protected, home / "corpus", ["~/corpus/t.txt"], "-o") == \
        f"-o {home / 'corpus'}: contains the source ~/corpus/t.txt; write the output somewhere else"
    assert refused(check_not_protected, home / "corpus", ["~/corpus"], "-o") == \
        f"-o {home / 'corpus'}: is the source itself; write the output somewhere else"


def test_not_protected_skips_missing_and_absent_sources(home, tmp_path):
    """None (an option not given) and paths that do not exist (hf: names, a model still to download) are no
    source; one after them still is."""
    source = tmp_path / "d" / "x.txt"
    source.parent.mkdir()
    source.write_text("x")
    out = tmp_path / "d"
    sources = [None, tmp_path / "nope", "hf:google/gemma", str(source)]
    assert refused(check_not_protected, out, sources, "-o") == \
        f"-o {out}: contains the source {source}; write the output somewhere else"
    assert check_not_protected(out, [None, tmp_path / "nope"], "-o") is None
    assert check_not_protected(out, (), "-o") is None


# --------------------------------------------------------------------------------------- check_output_dir
def test_output_dir_new_or_empty_is_returned_unchanged_on_disk(home, tmp_path):
    assert check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # nothing created here
    (tmp_path / "empty").mkdir()
    assert check_output_dir(str(tmp_path / "empty"), overwrite=False) == tmp_path / "empty"
    assert check_output_dir("~/out", overwrite=False) == home / "out"
    assert check_output_dir("rel", overwrite=False) == Path("rel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "home", "work"]


def test_output_dir_refuses_a_file(home, tmp_path):
    (tmp_path / "f").write_text("keep")
    for overwrite in (False, True):
        assert refused(check_output_dir, tmp_path / "f", overwrite=overwrite) == \
            f"output {tmp_path / 'f'}: exists and is not a directory"
    assert refused(check_output_dir, str(tmp_path / "f"), overwrite=True, flag="--out-dir") == \
        f"--out-dir {tmp_path / 'f'}: exists and is not a directory"
    assert (tmp_path / "f").read_text() == "keep"


def not_empty(flag: str, out, shown: str) -> str:
    return (f"{flag} {out}: already exists and is not empty ({shown}); choose a new directory, "
            "or pass --overwrite to replace the files this command writes there")


@pytest.mark.parametrize("names, shown", [
    (["a"], "a"),
    ([".hidden"], ".hidden"),
    (["c", "a", "b"], "a, b, c"),
    (["d", "c", "b", "a"], "a, b, c, ..."),
    (["e", "d", "c", "b", "a"], "a, b, c, ..."),
])
def test_output_dir_refuses_a_non_empty_directory_without_overwrite(home, tmp_path, names, shown):
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text(name)
    (out / names[0]).unlink()
    (out / names[0]).mkdir()  # a subdirectory counts as content too
    assert refused(check_output_dir, out, overwrite=False) == not_empty("output", out, shown)
    assert refused(check_output_dir, str(out), overwrite=False, flag="-o") == not_empty("-o", out, shown)
    assert check_output_dir(out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_output_dir_allowed_existing_names_do_not_count(home, tmp_path):
    """A training run's data/ (its token cache) may be there already; anything else still makes it non-empty."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    assert check_output_dir(out, overwrite=False, allowed_existing=("data",)) == out
    assert check_output_dir(out, overwrite=False, allowed_existing=iter(["data"])) == out
    assert refused(check_output_dir, out, overwrite=False) == not_empty("output", out, "data")
    (out / "metrics.jsonl").write_text("{}")
    assert refused(check_output_dir, out, overwrite=False, allowed_existing=("data",), flag="--out-dir") == \
        not_empty("--out-dir", out, "metrics.jsonl")


def test_output_dir_refuses_protected_targets_even_with_overwrite(home, tmp_path):
    source = tmp_path / "corpus" / "t.txt"
    source.parent.mkdir()
    source.write_text("x")
    for overwrite in (False, True):
        assert refused(check_output_dir, ".", overwrite=overwrite, flag="--out-dir") == \
            "--out-dir .: is the current directory; name a new directory for the output"
        assert refused(check_output_dir, "~", overwrite=overwrite) == \
            f"output {home}: refusing to write into {home}; name a new directory for the output"
        assert refused(check_output_dir, "/", overwrite=overwrite) == \
            "output /: refusing to write into /; name a new directory for the output"
        assert refused(check_output_dir, tmp_path / "corpus", overwrite=overwrite, sources=[None, str(source)],
                       flag="-o") == f"-o {tmp_path / 'corpus'}: contains the source {source}; write the output " \
                                     "somewhere else"
        assert refused(check_output_dir, "~/../corpus", overwrite=overwrite, sources=[source.parent]) == \
            f"output {home}/../corpus: is the source itself; write the output somewhere else"
    assert source.read_text() == "x"


def test_output_dir_protection_comes_before_the_file_and_emptiness_checks(home, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert refused(check_output_dir, gguf, overwrite=True, sources=[gguf], flag="--out") == \
        f"--out {gguf}: is the source itself; write the output somewhere else"


# -------------------------------------------------------------------------------------- check_output_file
def test_output_file_new_or_overwritten(home, tmp_path):
    assert check_output_file(tmp_path / "new.png", overwrite=False) == tmp_path / "new.png"
    assert check_output_file("~/loss.png", overwrite=False) == home / "loss.png"
    assert check_output_file(str(tmp_path / "new.png"), overwrite=True) == tmp_path / "new.png"
    assert not (tmp_path / "new.png").exists()
    (tmp_path / "old.png").write_bytes(b"png")
    assert check_output_file(tmp_path / "old.png", overwrite=True, sources=[None, tmp_path / "in.gguf"]) == \
        tmp_path / "old.png"
    assert (tmp_path / "old.png").read_bytes() == b"png"


def test_output_file_refuses_an_existing_file_without_overwrite(home, tmp_path):
    (tmp_path / "old.png").write_bytes(b"png")
    assert refused(check_output_file, tmp_path / "old.png", overwrite=False) == \
        f"output {tmp_path / 'old.png'}: already exists; choose a new name, or pass --overwrite to replace it"
    (home / "loss.png").write_bytes(b"png")
    assert refused(check_output_file, "~/loss.png", overwrite=False, flag="-o") == \
        f"-o {home / 'loss.png'}: already exists; choose a new name, or pass --overwrite to replace it"


def test_output_file_refuses_a_directory(home, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "dlink").symlink_to(tmp_path / "d")
    for overwrite in (False, True):
        assert refused(check_output_file, tmp_path / "d", overwrite=overwrite) == \
            f"output {tmp_path / 'd'}: is a directory"
        assert refused(check_output_file, str(tmp_path / "dlink"), overwrite=overwrite, flag="--out") == \
            f"--out {tmp_path / 'dlink'}: is a directory"


def test_output_file_refuses_the_source_even_with_overwrite(home, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "link.gguf").symlink_to(gguf)
    (home / "m.gguf").write_bytes(b"GGUF")
    for overwrite in (False, True):
        for out, sources in [(gguf, [gguf]), (str(gguf), [None, str(gguf)]), (tmp_path / "link.gguf", [gguf]),
                             (gguf, [tmp_path / "link.gguf"]), (gguf, [tmp_path / "x", "../model.gguf"]),
                             (home / "m.gguf", ["~/m.gguf"]), ("~/m.gguf", [home / "m.gguf"])]:
            assert refused(check_output_file, out, overwrite=overwrite, sources=sources, flag="--outfile") == \
                f"--outfile {Path(out).expanduser()}: is the source itself; write the output somewhere else"
    assert gguf.read_bytes() == b"GGUF"


def test_output_file_a_missing_source_is_no_source(home, tmp_path):
    """A source that does not exist (a hub name, say) is not compared, even with the same name."""
    assert check_output_file(tmp_path / "x.gguf", overwrite=False, sources=[tmp_path / "x.gguf"]) == \
        tmp_path / "x.gguf"
    (tmp_path / "x.gguf").write_bytes(b"")
    assert check_output_file(tmp_path / "x.gguf", overwrite=True, sources=[None, tmp_path / "y.gguf"]) == \
        tmp_path / "x.gguf"


# --------------------------------------------------------------------------------------------- user cache
def test_user_cache_dir(home, monkeypatch, tmp_path):
    monkeypatch.delenv("GEMMA3_X_CACHE", raising=False)
    assert user_cache_dir("kernels", "GEMMA3_X_CACHE") == home / ".cache" / "gemma3" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty is unset
    assert user_cache_dir("kernels", "GEMMA3_X_CACHE") == home / ".cache" / "gemma3" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("tokenizers", "GEMMA3_X_CACHE") == tmp_path / "xdg" / "gemma3" / "tokenizers"
    monkeypatch.setenv("GEMMA3_X_CACHE", "")  # empty is unset
    assert user_cache_dir("tokenizers", "GEMMA3_X_CACHE") == tmp_path / "xdg" / "gemma3" / "tokenizers"
    monkeypatch.setenv("GEMMA3_X_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir("tokenizers", "GEMMA3_X_CACHE") == tmp_path / "mine"
    monkeypatch.setenv("GEMMA3_X_CACHE", "~/k")
    assert user_cache_dir("kernels", "GEMMA3_X_CACHE") == home / "k"
    assert not (home / ".cache").exists() and not (tmp_path / "xdg").exists()  # nothing created


def test_owned_and_private(tmp_path, monkeypatch):
    path = tmp_path / "lib.so"
    path.write_bytes(b"")
    for mode, private in [(0o600, True), (0o644, True), (0o755, True), (0o751, True), (0o711, True), (0o000, True),
                          (0o664, False), (0o646, False), (0o666, False), (0o620, False), (0o602, False),
                          (0o777, False)]:
        path.chmod(mode)
        assert owned_and_private(path) is private, oct(mode)
    tmp_path.chmod(0o700)
    assert owned_and_private(tmp_path) is True
    tmp_path.chmod(0o1777)  # /tmp's mode: anyone may plant a file
    assert owned_and_private(tmp_path) is False
    tmp_path.chmod(0o700)
    path.chmod(0o600)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # someone else's file
    assert owned_and_private(path) is False
    with pytest.raises(FileNotFoundError):
        owned_and_private(tmp_path / "missing")


def test_owned_and_private_without_uids(tmp_path, monkeypatch):
    """Where there are no uids (Windows) there is nothing to check, not even that the path exists."""
    monkeypatch.delattr(os, "getuid")
    assert owned_and_private(tmp_path / "missing") is True


# ----------------------------------------------------------------------------------------- temporary files
def test_temp_path():
    pid = os.getpid()
    assert temp_path(Path("/a/b/model.safetensors")) == Path(f"/a/b/model.safetensors.tmp-{pid}")
    assert temp_path(Path("x.tokens")) == Path(f"x.tokens.tmp-{pid}")


def test_replace_file_writes_through_a_temporary_file(tmp_path):
    target = tmp_path / "model.gguf"
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert not target.exists()
        tmp.write_bytes(b"new")

    assert replace_file(target, write) is None
    assert seen == [tmp_path / f"model.gguf.tmp-{os.getpid()}"]
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_replace_file_replaces_an_existing_file_by_rename(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    inode = []

    def write(tmp: Path) -> None:
        assert target.read_bytes() == b"old"  # untouched until the new file is whole
        tmp.write_bytes(b"new")
        inode.append(tmp.stat().st_ino)

    replace_file(target, write)
    assert target.read_bytes() == b"new" and target.stat().st_ino == inode[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("started", [True, False], ids=["half-written", "before-writing"])
def test_replace_file_leaves_nothing_behind_on_an_error(tmp_path, started):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")

    def write(tmp: Path) -> None:
        if started:
            tmp.write_bytes(b"half")
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="^stop$"):
        replace_file(target, write)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    with pytest.raises(OSError, match="^disk full$"):
        replace_file(tmp_path / "new.gguf", write_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def write_then_fail(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError("disk full")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # reaped: the pid is free
    return child.pid


def fake_kill(monkeypatch, result):
    """os.kill answering `result` (an exception class or None), recording what it was asked."""
    calls = []

    def kill(pid, sig):
        calls.append((pid, sig))
        if result is not None:
            raise result()

    monkeypatch.setattr(os, "kill", kill)
    return calls


def test_alive_asks_with_signal_zero(monkeypatch):
    calls = fake_kill(monkeypatch, None)
    assert files._alive(12345) is True and calls == [(12345, 0)]
    calls = fake_kill(monkeypatch, ProcessLookupError)
    assert files._alive(12345) is False and calls == [(12345, 0)]
    calls = fake_kill(monkeypatch, PermissionError)  # someone else's process: running
    assert files._alive(12345) is True and calls == [(12345, 0)]


def test_alive_this_process_without_asking(monkeypatch):
    calls = fake_kill(monkeypatch, ProcessLookupError)
    assert files._alive(os.getpid()) is True and calls == []


def test_alive_real_processes():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert files._alive(child.pid) is True
        time.sleep(0.05)
        assert child.poll() is None  # asked, not signalled
    finally:
        child.stdin.close()
        child.wait()
    assert files._alive(child.pid) is False
    assert files._alive(os.getpid()) is True


def test_remove_stale_temp_removes_only_dead_processes_leftovers(tmp_path):
    dead, live = dead_pid(), os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = [f"c.tokens.tmp-{dead}", f"c.mask.tmp-{dead}", f"c.json.tmp-{live}", f"c.mask.tmp-{child.pid}",
                 "c.tokens", "c.json", f"c.tmp-{dead}.bak", f"c.tokens.tmp-{dead}x", "c.tokens.tmp-", "other.txt",
                 f"d.tokens.tmp-{dead}"]
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f"c.dir.tmp-{dead}").mkdir()  # not a file: left alone
        removed = remove_stale_temp(tmp_path, "c.*.tmp-*")
        assert sorted(removed) == [tmp_path / f"c.mask.tmp-{dead}", tmp_path / f"c.tokens.tmp-{dead}"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            set(names) - {f"c.tokens.tmp-{dead}", f"c.mask.tmp-{dead}"} | {f"c.dir.tmp-{dead}"})
        assert child.poll() is None
        assert remove_stale_temp(str(tmp_path), "*") == [tmp_path / f"d.tokens.tmp-{dead}"]
        assert remove_stale_temp(tmp_path, "*") == []
    finally:
        child.stdin.close()
        child.wait()


def test_remove_stale_temp_without_the_directory(tmp_path):
    assert remove_stale_temp(tmp_path / "missing", "*") == []
    file = tmp_path / f"f.tmp-{dead_pid()}"
    file.write_bytes(b"")
    assert remove_stale_temp(file, "*") == []  # a file, not a directory
    assert file.exists()


def test_remove_stale_temp_a_leftover_another_cleaner_took_first(tmp_path, monkeypatch):
    """Two runs sharing a cache may clean it at once: a leftover gone before our unlink is no error."""
    leftover = tmp_path / "c.tokens.tmp-999999999"
    leftover.write_bytes(b"x")

    def kill(pid, sig):
        leftover.unlink()  # the other run got there first
        raise ProcessLookupError

    monkeypatch.setattr(os, "kill", kill)
    assert remove_stale_temp(tmp_path, "*") == [leftover]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- inputs
def test_decode_utf8():
    assert decode_utf8(b"", "x") == ""
    assert decode_utf8("naïve 😀\n".encode(), "x") == "naïve 😀\n"
    for data, message in [
        (b"\xff", "in.txt: not UTF-8 text (invalid byte 0xff at byte 0, line 1)"),
        (b"ab\x80cd\n\n", "in.txt: not UTF-8 text (invalid byte 0x80 at byte 2, line 1)"),
        (b"\nab\nc\xe9d\nx\n", "in.txt: not UTF-8 text (invalid byte 0xe9 at byte 5, line 3)"),
        (b"\n\n\n\x0a\x00\xc3", "in.txt: not UTF-8 text (invalid byte 0xc3 at byte 5, line 5)"),
    ]:
        with pytest.raises(Gemma3Error) as e:
            decode_utf8(data, "in.txt")
        assert str(e.value) == message and e.value.__cause__ is None and e.value.__suppress_context__


class Trickle(io.RawIOBase):
    """A pipe: `data`, at most `step` bytes a read, recording each size asked for."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.asked = data, step, []

    def readable(self) -> bool:
        return True

    def read(self, n=-1) -> bytes:
        self.asked.append(n)
        chunk, self.data = self.data[:min(n, self.step)], self.data[min(n, self.step):]
        return chunk


@pytest.mark.parametrize("step", [1, 3, 4, 100])
def test_read_capped_at_the_cap_and_one_byte_over(step):
    assert read_capped(Trickle(b"abcdefghi", step), 9, "in") == "abcdefghi"
    assert read_capped(Trickle(b"abcdefgh", step), 9, "in") == "abcdefgh"
    stream = Trickle(b"abcdefghij" + b"k" * 100, step)
    with pytest.raises(Gemma3Error) as e:
        read_capped(stream, 9, "in")
    assert str(e.value) == "in: more than 8.58307e-06 MiB of text, more than this command reads"
    assert sum(stream.asked) >= 10 and len(stream.data) == 100  # read cap + 1 bytes, no more


def test_read_capped_asks_for_at_most_a_mebibyte_and_the_cap_plus_one():
    stream = Trickle(bytes(10 * MiB), 10 * MiB)
    with pytest.raises(Gemma3Error, match="^stdin: more than 3 MiB of text, more than this command reads$"):
        read_capped(stream, 3 * MiB, "stdin")
    assert stream.asked == [MiB, MiB, MiB, 1]
    stream = Trickle(b"x" * (3 * MiB), 10 * MiB)
    assert read_capped(stream, 3 * MiB, "stdin") == "x" * (3 * MiB)
    assert stream.asked == [MiB, MiB, MiB, 1]
    stream = Trickle(b"x" * 10, 4)
    assert read_capped(stream, 20, "stdin") == "x" * 10
    assert stream.asked == [21, 17, 13, 11]


def test_read_capped_zero_cap():
    assert read_capped(io.BytesIO(b""), 0, "in") == ""
    with pytest.raises(Gemma3Error, match=r"^in: more than 0 MiB of text, more than this command reads$"):
        read_capped(io.BytesIO(b"x"), 0, "in")


def test_read_capped_is_utf8_across_reads():
    text = "é😀" * 5
    assert read_capped(Trickle(text.encode(), 1), 100, "in") == text
    with pytest.raises(Gemma3Error) as e:
        read_capped(Trickle(b"ok\nok\n\xff", 2), 100, "prompt.txt")
    assert str(e.value) == "prompt.txt: not UTF-8 text (invalid byte 0xff at byte 6, line 3)"


def test_read_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("héllo\n".encode())
    assert read_text_file(path, 7) == "héllo\n"
    assert read_text_file(str(path), 7, "prompt") == "héllo\n"
    with pytest.raises(Gemma3Error) as e:
        read_text_file(path, 6)
    assert str(e.value) == f"{path}: more than 5.72205e-06 MiB of text, more than this command reads"
    path.write_bytes(b"ab\n\xc3(")
    with pytest.raises(Gemma3Error) as e:
        read_text_file(str(path), 100)
    assert str(e.value) == f"{path}: not UTF-8 text (invalid byte 0xc3 at byte 3, line 2)"


def test_read_text_file_devices():
    assert read_text_file("/dev/null", 10) == ""
    with pytest.raises(Gemma3Error) as e:
        read_text_file("/dev/zero", PROMPT_BYTES)
    assert str(e.value) == "/dev/zero: more than 8 MiB of text, more than this command reads"


def test_read_text_file_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(Gemma3Error) as e:
        read_text_file(tmp_path, 10)
    assert str(e.value) == f"{tmp_path}: is a directory, not a text file" and e.value.__cause__ is None
    with pytest.raises(Gemma3Error) as e:
        read_text_file(str(tmp_path), 10, "prompt")
    assert str(e.value) == f"{tmp_path}: is a directory, not a prompt file"
    with pytest.raises(Gemma3Error) as e:
        read_text_file(tmp_path / "missing.txt", 10)
    assert str(e.value) == f"{tmp_path / 'missing.txt'}: cannot read text: No such file or directory"
    with pytest.raises(Gemma3Error) as e:
        read_text_file(tmp_path / "missing" / "p.txt", 10, "prompt")
    assert str(e.value) == f"{tmp_path / 'missing' / 'p.txt'}: cannot read prompt: No such file or directory"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    (tmp_path / "f").write_text("x")
    with pytest.raises(Gemma3Error) as e:
        read_text_file(tmp_path / "f" / "p.txt", 10)
    assert str(e.value) == f"{tmp_path / 'f' / 'p.txt'}: cannot read text: Not a directory"

    class Failing(io.RawIOBase):  # a disk that fails mid-read, once with an errno and once without
        def __init__(self, error):
            self.error = error

        def readable(self):
            return True

        def read(self, n=-1):
            raise self.error

    for error, told in [(OSError(5, "Input/output error"), "Input/output error"),
                        (OSError("the device went away"), "the device went away")]:
        monkeypatch.setattr(files, "open", lambda *a, **k: Failing(error), raising=False)
        with pytest.raises(Gemma3Error) as e:
            read_text_file("/mnt/p.txt", 10, "prompt")
        assert str(e.value) == f"/mnt/p.txt: cannot read prompt: {told}"


def test_read_stdin_bytes(monkeypatch):
    """Piped stdin is read as bytes: the cap counts bytes, and the error says where the text is not UTF-8."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("éé".encode())))
    assert read_stdin(4) == "éé"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("éé".encode())))
    with pytest.raises(Gemma3Error) as e:
        read_stdin(3)
    assert str(e.value) == "stdin: more than 2.86102e-06 MiB of text, more than this command reads"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff")))
    with pytest.raises(Gemma3Error) as e:
        read_stdin(10, "prompt")
    assert str(e.value) == "stdin: not UTF-8 text (invalid byte 0xff at byte 3, line 2)"


def test_read_stdin_text_stream(monkeypatch):
    """A text stream in place of stdin (tests, embedding applications): the cap counts characters, and at
    most cap + 1 of them are read."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("éé😀"))
    assert read_stdin(3) == "éé😀"
    stdin = io.StringIO("abcd" + "e" * 100)
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(Gemma3Error) as e:
        read_stdin(3)
    assert str(e.value) == "stdin: more than 2.86102e-06 MiB of text, more than this command reads"
    assert stdin.tell() == 4
    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * (PROMPT_BYTES + 1)))
    with pytest.raises(Gemma3Error) as e:
        read_stdin(PROMPT_BYTES, "prompt")
    assert str(e.value) == "stdin: more than 8 MiB of prompt, more than this command reads"


def test_check_text():
    assert check_text("naïve 😀", "argument") == "naïve 😀"
    assert check_text("", "argument") == ""
    with pytest.raises(Gemma3Error) as e:
        check_text("ab\udcffc", "the prompt")
    assert str(e.value) == "the prompt: not UTF-8 text (invalid byte at character 2)"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(Gemma3Error) as e:
        check_text("\udcc3\udca9", "--system")
    assert str(e.value) == "--system: not UTF-8 text (invalid byte at character 0)"


# ----------------------------------------------------------------------------------------------- LineReader
def test_line_too_long():
    for fatal in (True, False):
        e = LineTooLong("stdin: too long", fatal=fatal)
        assert isinstance(e, Gemma3Error) and str(e) == "stdin: too long" and e.args == ("stdin: too long",)
        assert e.fatal is fatal


def lines(reader: LineReader, most: int = 100) -> list:
    """Everything the reader gives, errors as (message, fatal); after `most` items, "..." and no more (a reader
    that never stops fails here rather than running on)."""
    out = []
    while len(out) < most:
        try:
            line = reader.readline()
        except LineTooLong as e:
            out.append((str(e), e.fatal))
            if e.fatal:
                return out
            continue
        except Gemma3Error as e:
            out.append(str(e))
            continue
        if line is None:
            return out
        out.append(line)
    return [*out, "..."]


class Pipe(io.BytesIO):
    """Bytes read by readline, asked at most 100 times (a reader that loops at the end fails, not hangs)."""

    reads = 0

    def readline(self, n=-1) -> bytes:
        self.reads += 1
        assert self.reads <= 100, "read on without end"
        return super().readline(n)


def test_line_reader_lines():
    reader = LineReader(Pipe("héllo\r\nMAX\n\n  spaced \t\r\n\tlast ".encode()))
    assert reader.cap == CHAT_LINE_BYTES
    assert lines(reader) == ["héllo", "MAX", "", "  spaced \t", "\tlast "]  # only the line end is taken off
    assert reader.readline() is None
    assert LineReader(Pipe(b"")).readline() is None
    assert lines(LineReader(Pipe(b"\n\r\n"))) == ["", ""]


def test_line_reader_not_utf8_is_one_bad_line():
    assert lines(LineReader(Pipe(b"ok\nab\xff\nfine\n"))) == \
        ["ok", "stdin: not UTF-8 text (invalid byte 0xff at byte 2, line 1)", "fine"]


def test_line_reader_at_the_cap_and_one_byte_over():
    """cap 4: a line of 4 bytes is read with or without its newline; one of 5 is skipped, up to its newline."""
    data = b"abcd\nabcde\nok\nabcdefghijklmnop\r\nwxyz"
    out = lines(LineReader(Pipe(data), cap=4))
    skipped = ("stdin: a line longer than 3.8147e-06 MiB; skipped", False)
    assert out == ["abcd", skipped, "ok", skipped, "wxyz"]
    assert lines(LineReader(Pipe(b"abcde"), cap=4)) == [skipped]
    assert lines(LineReader(Pipe(b"abcd\r\n"), cap=4)) == [skipped]  # \r counts, \n is what ends it


class Line(io.RawIOBase):
    """A line of `length` bytes of "a" (endless if inf), then "\\n" and the lines `after`, made up as it is read
    (readline only, as LineReader reads): a pipe that never holds more than one read."""

    def __init__(self, length: float, after: bytes = b""):
        self.left, self.after, self.taken, self.reads = length, io.BytesIO(after), 0, 0

    def readline(self, n=-1) -> bytes:
        self.reads += 1
        assert self.reads <= 1000 and self.taken <= 256 * MiB, "read on without end"
        k = int(min(n, self.left)) if self.left > 0 else 0
        self.left -= k
        self.taken += k
        if self.left == 0 and n > k:
            self.left = -1
            return b"a" * k + b"\n"
        return b"a" * k if k else self.after.readline(n)


def test_line_reader_skips_a_long_line_whose_end_comes_within_64_mib_more():
    """An 8 MiB cap: the line is read 8 MiB + 1 at once, then dropped a MiB at a time for as long as up to
    64 MiB more have gone by; a newline within the next MiB still ends it."""
    skipped = ("stdin: a line longer than 8 MiB; skipped", False)
    assert lines(LineReader(Line(CHAT_LINE_BYTES + 1, b"next\n"))) == [skipped, "next"]
    assert lines(LineReader(Line(CHAT_LINE_BYTES, b"next\n"))) == ["a" * CHAT_LINE_BYTES, "next"]
    longest = CHAT_LINE_BYTES + 1 + TEXT_BYTES + MiB - 1  # its newline is the last byte of the 65th MiB
    stream = Line(longest, b"next\n")
    assert lines(LineReader(stream)) == [skipped, "next"]
    assert stream.taken == longest


def test_line_reader_stops_at_a_line_without_end():
    stopped = ("stdin: a line longer than 72 MiB with no end in sight; stopped reading", True)
    stream = Line(CHAT_LINE_BYTES + 1 + TEXT_BYTES + MiB, b"never\n")  # one byte too many: the newline is not seen
    assert lines(LineReader(stream)) == [stopped]
    assert stream.taken == CHAT_LINE_BYTES + 1 + TEXT_BYTES + MiB
    stream = Line(200 * MiB)
    assert lines(LineReader(stream)) == [stopped]
    assert stream.taken == CHAT_LINE_BYTES + 1 + TEXT_BYTES + MiB
    stream = Line(float("inf"))
    assert lines(LineReader(stream)) == [stopped]
    assert stream.taken == CHAT_LINE_BYTES + 1 + TEXT_BYTES + MiB  # then no further


def test_line_reader_small_cap_messages():
    """The cap given is the one reported, and the stop comes 64 MiB past it."""
    reader = LineReader(Pipe(b"x" * (MiB + 1) + b"\nok\n"), cap=MiB)
    assert lines(reader) == [("stdin: a line longer than 1 MiB; skipped", False), "ok"]
    stream = Line(float("inf"))
    assert lines(LineReader(stream, cap=MiB)) == \
        [("stdin: a line longer than 65 MiB with no end in sight; stopped reading", True)]
    assert stream.taken == MiB + 1 + TEXT_BYTES + MiB
