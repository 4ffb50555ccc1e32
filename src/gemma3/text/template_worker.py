"""Renders checkpoint chat templates (Jinja programs from untrusted files) in a process of their own.

Why a process: jinja2's sandbox stops attribute escapes, not cost. A template is a program, and
``{% for i in range(100000) %}{% for j in range(100000) %}`` runs for hours, while a few lines that
double a string render gigabytes (docs/generation.md, "Chat"). Neither can be stopped from inside the
process that runs it: a thread cannot be killed, a single C-level string operation cannot be interrupted,
and a memory limit (RLIMIT_AS) applies to the whole process, model included. So the template runs in a
small child process (this file, run as a script: the standard library and jinja2 only, no torch), which

* limits its own address space (`MEMORY_BYTES`), so a runaway template gets MemoryError, not the machine;
* stops rendering once the output passes the caller's cap;
* is killed by the parent when a render takes longer than the time limit, and started afresh for the next.

The environment is the one transformers' `apply_chat_template` uses (an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, `strftime_now`), so templates
written for transformers render the same here. Protocol on stdin/stdout: each message is an 8-byte
big-endian length and that many bytes of JSON; the child first sends ``{"ready": true}``, then answers each
request ``{"template", "messages", "add_generation_prompt", "variables", "max_output"}`` with ``{"text"}``
or ``{"error"}``.

This module imports nothing from gemma3, so it can run as a plain script; `gemma3.text.chat` imports
`make_environment` and `render` from it to run the same code in-process where no child can be started.
"""

from __future__ import annotations

import json
import struct
import sys
from datetime import datetime

MEMORY_BYTES = 512 << 20
_HEADER = struct.Struct(">Q")


class OutputTooLarge(Exception):
    pass


def make_environment():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' `tojson`: Jinja's own escapes HTML characters, which would change the prompt
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """Jinja's `namespace()` minus underscore-prefixed names, which could shadow CPython internals."""

        def __init__(*args, **kwargs):  # noqa: N805 (Jinja's signature trick, so namespace(self=...) works)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)  # the function, not the `dict` type
    env.globals["namespace"] = Namespace
    return env


_compiled: dict[str, object] = {}


def render(env, template: str, messages, add_generation_prompt: bool, variables: dict, max_output: int) -> str:
    """Render, stopping with OutputTooLarge once the text passes `max_output` characters."""
    compiled = _compiled.get(template)
    if compiled is None:
        if len(_compiled) >= 8:
            _compiled.clear()
        compiled = _compiled[template] = env.from_string(template)
    pieces, size = [], 0
    for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
        size += len(piece)
        if size > max_output:
            raise OutputTooLarge(f"rendered more than {max_output:,} characters")
        pieces.append(piece)
    return "".join(pieces)


def describe(error: BaseException) -> str:
    import jinja2

    if isinstance(error, OutputTooLarge):
        return str(error)
    if isinstance(error, MemoryError):
        return f"used more than its {MEMORY_BYTES >> 20} MiB of memory"
    if isinstance(error, RecursionError):
        return "recursed too deeply"
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"syntax error at line {error.lineno}: {error.message}"
    return " ".join(str(error).split()) or type(error).__name__


def _read(stream) -> dict | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(header)
    return json.loads(stream.read(n).decode("utf-8"))


def _write(stream, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=False).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def main() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent (a chat REPL goes on)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # the parent's time limit still applies
    env = make_environment()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _write(stdout, {"ready": True})
    while True:
        request = _read(stdin)
        if request is None:  # the parent closed the pipe (or died): nothing more to do
            return
        try:
            text = render(env, request["template"], request["messages"], request["add_generation_prompt"],
                          request["variables"], request["max_output"])
            reply = {"text": text}
        except BaseException as e:  # everything goes back as a message; the loop goes on
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            reply = {"error": describe(e)}
        try:
            _write(stdout, reply)
        except MemoryError:
            _write(stdout, {"error": describe(MemoryError())})


if __name__ == "__main__":
    main()
