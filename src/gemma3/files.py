"""The user's files: what a command may write, and how much of an input it reads.

Two rules every command follows (docs/security.md, "Our own files"):

* **Never delete or overwrite what the command did not create.** An output directory that exists and holds
  anything is refused unless the user passes ``--overwrite`` (git's and ``cp -n``'s manners); a refused
  command changes nothing on disk. Some targets are refused even then, because no one means them: the
  current directory, the home directory, ``/``, the source being read, or a directory that contains it.
  With ``--overwrite`` a command replaces only the files it writes (each through a temporary file and a
  rename) and the few that would shadow them; every other file in the directory is left alone.
* **Read inputs with a cap.** ``-f /dev/zero`` or an endless pipe must end in a clear error, not an
  unbounded allocation; text must be UTF-8, and the error says where it is not.

Caches of our own (compiled kernels, derived tokenizer merges) live in a per-user directory, and only files that
are ours and writable by nobody else are trusted from there (`user_cache_dir`, `owned_and_private`).

Temporary files carry the writing process's id (``NAME.tmp-PID``), so a later run can tell the leftovers of
a killed process (whose pid is gone) from the files of one still running, and remove them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from gemma3.errors import Gemma3Error

# A prompt: more than any Gemma 3 context holds (131 072 tokens of at most 48 bytes, the longest piece of
# the vocabulary), so the cap never cuts a prompt that could run, yet `-f /dev/zero` stops at once.
PROMPT_BYTES = 8 << 20
# A text to score (perplexity) or one chat line: a book is ~1 MB; 64 MiB is ~16M tokens, days of CPU.
TEXT_BYTES = 64 << 20
CHAT_LINE_BYTES = PROMPT_BYTES


class OutputError(Gemma3Error):
    """An output path the command refuses, because writing there could destroy the user's files."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


# ---------------------------------------------------------------------------------------------- outputs
def check_not_protected(out: Path, sources: Iterable[str | os.PathLike | None], flag: str) -> None:
    """Targets refused even with --overwrite."""
    real = out.resolve()
    if real == Path.cwd().resolve():
        raise OutputError(f"{flag} {out}: is the current directory; name a new directory for the output")
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise OutputError(f"{flag} {out}: refusing to write into {real}; name a new directory for the output")
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if real == src:
            raise OutputError(f"{flag} {out}: is the source itself; write the output somewhere else")
        if real in src.parents:
            raise OutputError(f"{flag} {out}: contains the source {source}; write the output somewhere else")


def check_output_dir(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike | None] = (),
                     flag: str = "output", allowed_existing: Iterable[str] = ()) -> Path:
    """Check that writing the directory `out` destroys nothing the user did not ask for; return it.

    Refused: a path that exists and is not a directory; a non-empty directory without `overwrite`; and, even
    with it, the current directory, home, ``/``, one of `sources` or a directory that contains one. Names in
    `allowed_existing` may already be there without making the directory count as non-empty. Nothing is
    created or changed here: the caller writes only once every check has passed."""
    out = Path(out).expanduser()
    check_not_protected(out, sources, flag)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and not overwrite:
        allowed = set(allowed_existing)
        present = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise OutputError(f"{flag} {out}: already exists and is not empty ({shown}); choose a new directory, "
                              "or pass --overwrite to replace the files this command writes there")
    return out


def check_output_file(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike | None] = (),
                      flag: str = "output") -> Path:
    """Check that writing the file `out` destroys nothing the user did not ask for: an existing file is
    replaced only with `overwrite`, a directory never, and the source never."""
    out = Path(out).expanduser()
    for source in sources:
        if source is not None and Path(source).expanduser().exists() and out.exists() \
                and out.resolve() == Path(source).expanduser().resolve():
            raise OutputError(f"{flag} {out}: is the source itself; write the output somewhere else")
    if out.is_dir():
        raise OutputError(f"{flag} {out}: is a directory")
    if out.exists() and not overwrite:
        raise OutputError(f"{flag} {out}: already exists; choose a new name, or pass --overwrite to replace it")
    return out


# ------------------------------------------------------------------------------------------------ caches
def user_cache_dir(name: str, env: str) -> Path:
    """Where gemma3 keeps its cache `name`: $`env` when set, else $XDG_CACHE_HOME/gemma3/`name`
    (~/.cache/gemma3/`name`)."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma3" / name


def owned_and_private(path: Path) -> bool:
    """Ours, and writable by nobody else: what a cache may trust (a library loaded from it runs as code in this
    process)."""
    if not hasattr(os, "getuid"):
        return True
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


# ---------------------------------------------------------------------------------------- temporary files
def temp_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place: a name that says which process wrote it."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file (temp_path) and a rename; on any error the temporary file is
    removed and `path` is left as it was."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_TEMP = re.compile(r"\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp(directory: Path, pattern: str) -> list[Path]:
    """Remove files matching `pattern` in `directory` whose name ends in ``.tmp-PID`` for a process that no
    longer runs: what a killed save or tokenization left behind. Returns what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for path in Path(directory).glob(pattern):
        match = _TEMP.search(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------ inputs
def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Gemma3Error(f"{where}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte {e.start}, "
                          f"line {line})") from None


def read_capped(stream: BinaryIO, cap: int, where: str) -> str:
    """All of `stream` as UTF-8 text, refusing more than `cap` bytes (read at most cap + 1)."""
    chunks, size = [], 0
    while size <= cap:
        chunk = stream.read(min(1 << 20, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > cap:
        raise Gemma3Error(f"{where}: more than {_mib(cap)} of text, more than this command reads")
    return decode_utf8(b"".join(chunks), where)


def read_text_file(path: str | os.PathLike, cap: int, what: str = "text") -> str:
    """A UTF-8 file (or device, or FIFO) read with a cap; errors name the file."""
    try:
        with open(path, "rb") as f:
            return read_capped(f, cap, str(path))
    except IsADirectoryError:
        raise Gemma3Error(f"{path}: is a directory, not a {what} file") from None
    except OSError as e:
        raise Gemma3Error(f"{path}: cannot read {what}: {e.strerror or e}") from None


def read_stdin(cap: int, what: str = "text") -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in place of stdin (tests, embedding applications)
        text = sys.stdin.read(cap + 1)
        if len(text) > cap:
            raise Gemma3Error(f"stdin: more than {_mib(cap)} of {what}, more than this command reads")
        return text
    return read_capped(stream, cap, "stdin")


def check_text(text: str, where: str) -> str:
    """Text from a command-line argument: Python hands undecodable bytes over as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Gemma3Error(f"{where}: not UTF-8 text (invalid byte at character {e.start})") from None
    return text


class LineTooLong(Gemma3Error):
    """A line over the reader's cap. `fatal` when its end was not found within a further `TEXT_BYTES` either
    (an endless stream such as /dev/zero): then no later line can be told apart and reading must stop."""

    def __init__(self, message: str, fatal: bool):
        super().__init__(message)
        self.fatal = fatal


class LineReader:
    """Lines of a byte stream (piped stdin), each at most `cap` bytes: a longer line is skipped up to its
    newline and reported, so one bad line neither stops a session nor reads without end."""

    def __init__(self, stream: BinaryIO, cap: int = CHAT_LINE_BYTES):
        self.stream, self.cap = stream, cap

    def readline(self) -> str | None:
        """The next line without its newline; None at the end of the stream. Raises Gemma3Error for a
        line that is not UTF-8 and LineTooLong for one over the cap (the line is consumed either way)."""
        line = self.stream.readline(self.cap + 1)
        if not line:
            return None
        if len(line) > self.cap and not line.endswith(b"\n"):
            skipped = 0
            while skipped <= TEXT_BYTES:  # drop the rest of the line, a block at a time, but not forever
                rest = self.stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    raise LineTooLong(f"stdin: a line longer than {_mib(self.cap)}; skipped", fatal=False)
                skipped += len(rest)
            raise LineTooLong(f"stdin: a line longer than {_mib(self.cap + TEXT_BYTES)} with no end in sight; "
                              "stopped reading", fatal=True)
        return decode_utf8(line, "stdin").rstrip("\r\n")
