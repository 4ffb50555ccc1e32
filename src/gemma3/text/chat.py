r"""Chat prompts for Gemma 3 instruction-tuned models: messages → the text the model was trained on.

Two renderers, one output:

* the built-in Gemma 3 format in plain Python (spec §9), used when no template is given; it validates the
  conversation and says what is wrong;
* a checkpoint's own Jinja chat template, run in jinja2's `ImmutableSandboxedEnvironment` set up as
  transformers' `apply_chat_template` does (transformers/utils/chat_template_utils.py,
  `_cached_compile_jinja_template`): a template shipped with a downloaded model is untrusted code. The
  sandbox stops attribute escapes; time and memory are bounded by rendering in a child process
  (gemma3.text.template_worker) that is killed after `TEMPLATE_SECONDS` and limited to 512 MiB, with the output
  capped at `TEMPLATE_MAX_CHARS`. Errors name the file the template came from (`ChatTemplate.origin`).
  The official Gemma 3 template itself is rendered by the built-in renderer, which gives the same text.

The Gemma 3 format, for [system, user, assistant] and a generation prompt:

    <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{assistant}<end_of_turn>\n
    <start_of_turn>model\n

There is no system turn: a leading system message's text is prepended, unstripped, to the first user turn.
Turn texts are stripped, `assistant` is written `model`, and roles alternate user/model starting with user.
The `<bos>` is part of the prompt, so encode it without adding another (spec pitfall 19).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma3.text import template_worker as worker
from gemma3.text.tools import (START_RESPONSE, Tool, parse_tools, prepare_messages, render_call, render_declaration,
                               render_response)
from gemma3.errors import Gemma3Error
from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE


# Variables a template sees besides `messages` and `add_generation_prompt`: transformers passes the
# tokenizer's special_tokens_map; these are the official Gemma 3 IT tokenizer's.
TEMPLATE_TOKENS = {
    "bos_token": "<bos>",
    "eos_token": "<end_of_turn>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

GENERATION_PROMPT = "<start_of_turn>model\n"
_TURN_ROLE = {"user": "user", "assistant": "model", "model": "model"}


def render_chat(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
    template: str | ChatTemplate | None = None, tools: Sequence[Tool | Mapping] | None = None,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) as a Gemma 3 prompt string, starting with
    `<bos>`. `content` is a string or a list of {"type": "text", "text": ...} parts. With `template`, the
    checkpoint's Jinja chat template is rendered (sandboxed) instead of the built-in format.

    `tools` (`Tool`s or OpenAI's {"type": "function", "function": {...}} dicts) are passed to a template as
    transformers passes them; where there is no template, or it knows nothing of tools (the official Gemma 3
    one), a conversation with tools, tool calls or tool results is written in FunctionGemma's format
    (gemma3.text.tools). Messages may be OpenAI's: calls' arguments as JSON strings, results by tool_call_id."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise Gemma3Error("a conversation must be a non-empty list of messages")
    tools = [t if isinstance(t, Tool) else parse_tools([t])[0] for t in tools or ()]
    prepared = prepare_messages(messages)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in prepared)
    if template is not None and not (uses_tools and not _knows_tools(template)):
        return _render_template(template, prepared, add_generation_prompt, tools)
    if uses_tools:
        return _render_function_gemma(prepared, tools, add_generation_prompt)
    return _render_gemma3(messages, add_generation_prompt)


def _knows_tools(template: str | ChatTemplate) -> bool:
    """Whether a template renders tools itself (it reads `tools` or `tool_calls`); the official Gemma 3 one does not."""
    text = template.text if isinstance(template, ChatTemplate) else template
    return text != GEMMA3_CHAT_TEMPLATE and ("tools" in text or "tool_calls" in text)


# --- built-in format --------------------------------------------------------------------------------------------

def _render_gemma3(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise Gemma3Error(f"message {i} must have a 'role' and a 'content'")

    first_user_prefix, start = "", 0
    if messages[0]["role"] == "system":
        # The official template takes the system text as is (no strip) plus a blank line.
        first_user_prefix, start = "".join(_text_parts(messages[0]["content"], 0)) + "\n\n", 1
        if len(messages) == 1:
            raise Gemma3Error("a system message must be followed by a user message")

    out = ["<bos>"]
    for turn, (i, message) in enumerate(enumerate(messages[start:], start)):
        role = message["role"]
        if role == "system":
            raise Gemma3Error(f"message {i}: only the first message may have role 'system'")
        if role not in _TURN_ROLE:
            raise Gemma3Error(f"message {i}: unknown role {role!r} (expected system, user, assistant or model)")
        if _TURN_ROLE[role] != ("user" if turn % 2 == 0 else "model"):
            raise Gemma3Error(f"conversation roles must alternate user/model/user/model... (message {i} is {role!r})")
        text = "".join(part.strip() for part in _text_parts(message["content"], i))
        out.append(f"<start_of_turn>{_TURN_ROLE[role]}\n{first_user_prefix if turn == 0 else ''}{text}<end_of_turn>\n")
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


# --- FunctionGemma's format, for conversations with tools -----------------------------------------------------

def _render_function_gemma(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool],
                           add_generation_prompt: bool) -> str:
    """The official FunctionGemma template's text (gemma3.text.tools): a developer turn with the system text
    and the declarations; calls and their results inside the model's turn, which the answer then closes."""
    out = ["<bos>"]
    loop = list(enumerate(messages))
    if tools or messages[0].get("role") in ("system", "developer"):
        out.append("<start_of_turn>developer\n")
        if messages[0].get("role") in ("system", "developer"):
            out.append("".join(part.strip() for part in _text_parts(messages[0].get("content", ""), 0)))
            loop = loop[1:]
        out.extend(render_declaration(tool) for tool in tools)
        out.append("<end_of_turn>\n")
    previous = None  # what the last message ended with: "content", "tool_call" or "tool_response"
    for i, message in loop:
        role = message.get("role")
        if role == "tool":
            out.extend(_tool_results(message, i))
            previous = "tool_response"
        elif role in ("user", "assistant", "model", "system", "developer"):
            if previous != "tool_response":
                out.append(f"<start_of_turn>{'model' if role == 'assistant' else role}\n")
            previous = None
            if message.get("content") is not None:
                out.append("".join(part.strip() for part in _text_parts(message["content"], i)))
                previous = "content"
            if message.get("tool_calls"):
                if role not in ("assistant", "model"):
                    raise Gemma3Error(f"message {i}: only assistant messages may carry tool_calls")
                out.extend(render_call(c["function"]["name"], c["function"]["arguments"])
                           for c in message["tool_calls"])
                if i == len(messages) - 1:
                    out.append(START_RESPONSE)
                previous = "tool_call"
        else:
            raise Gemma3Error(f"message {i}: unknown role {role!r} (expected system, developer, user, assistant "
                              "or tool)")
        if previous not in ("tool_call", "tool_response"):
            out.append("<end_of_turn>\n")
    if add_generation_prompt and previous != "tool_response":
        out.append(GENERATION_PROMPT)
    return "".join(out)


def _tool_results(message: Mapping[str, Any], index: int) -> list[str]:
    content, name = message.get("content"), message.get("name")
    if not content:
        return []
    items = content if isinstance(content, list) else [content]
    out = []
    for item in items:
        if isinstance(item, Mapping) and "name" in item and "response" in item:
            out.append(render_response(str(item["name"]), item["response"]))
        elif not isinstance(name, str):
            raise Gemma3Error(f"message {index}: a tool result needs the name of the tool it answers")
        elif isinstance(item, (Mapping, str)):
            out.append(render_response(name, item))
        else:
            raise Gemma3Error(f"message {index}: a tool result must be a string or an object")
    return out


def _text_parts(content: Any, index: int) -> list[str]:
    """The texts of a message's content: a string, or a list of {"type": "text", "text": str} parts. Other
    part types (images) are refused rather than silently dropped: these are text-only models."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise Gemma3Error(f"message {index}: content must be a string or a list of text parts, "
                          f"got {type(content).__name__}")
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise Gemma3Error(f"message {index}: content parts must be {{'type': 'text', 'text': ...}}, got {kind!r}")
        texts.append(part["text"])
    return texts


# --- a checkpoint's Jinja template, sandboxed and bounded ------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and where it came from (the file named in every error about it)."""

    text: str
    origin: str | None = None  # e.g. "DIR/tokenizer_config.json"; None for a template passed as a string

    @property
    def where(self) -> str:
        return "chat template" if self.origin is None else f"{self.origin}: chat template"


# Bounds on one rendering of a checkpoint's template (docs/security.md): a chat prompt is a few KB.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 4 << 20


def _render_template(template: str | ChatTemplate, messages: Sequence[Mapping[str, Any]],
                     add_generation_prompt: bool, tools: Sequence[Tool] = ()) -> str:
    if not isinstance(template, ChatTemplate):
        template = ChatTemplate(template)
    if template.text == GEMMA3_CHAT_TEMPLATE:  # the official template: the built-in renderer is the same text
        return _render_gemma3(messages, add_generation_prompt)
    # Like transformers: the template sees only plain JSON-like data, and message keys set to None are dropped
    # (OpenAI clients send content=None; many templates would print "None").
    chat = [{key: _plain(value) for key, value in message.items() if value is not None} for message in messages]
    variables = {"tools": [tool.as_openai() for tool in tools] or None, "documents": None, **TEMPLATE_TOKENS}
    return _TEMPLATES.render(template, chat, add_generation_prompt, variables)


def _plain(value: Any) -> Any:
    """A copy of `value` made of str/int/float/bool/None/list/dict only: objects reaching the sandbox could
    expose methods that the sandbox does not know to be dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    raise Gemma3Error(f"chat messages may hold only strings, numbers, lists and dicts, got {type(value).__name__}")


class _TemplateProcess:
    """The parent's side of gemma3.text.template_worker: one child process, started on first use, killed and
    restarted when a rendering overruns `TEMPLATE_SECONDS`. One rendering at a time (a lock), so a server's
    threads can share it. Where no child can be started (no `resource` module or no fork: not Linux/macOS),
    templates render in-process with the output cap but no time or memory bound."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def render(self, template: ChatTemplate, messages: list, add_generation_prompt: bool, variables: dict) -> str:
        request = {"template": template.text, "messages": messages, "add_generation_prompt": add_generation_prompt,
                   "variables": variables, "max_output": TEMPLATE_MAX_CHARS}
        with self.lock:
            if not _CAN_FORK:
                return self._in_process(template, request)
            try:
                reply = self._ask(request)
            except _Overrun as e:
                self._stop()
                raise Gemma3Error(f"{template.where} {e}") from None
            except UnicodeEncodeError:  # the request as UTF-8: what a JSON "\ud800" or argv's undecodable bytes make
                raise Gemma3Error(f"{template.where}: the template or the messages are not valid Unicode "
                                  "(a lone surrogate)") from None
        if "error" in reply:
            raise Gemma3Error(f"{template.where}: {reply['error']}")
        return reply["text"]

    def _start(self) -> None:
        # The worker runs as a plain script, with the parent's interpreter and import path, minus the
        # directory it starts in (sys.path[0]), so nothing there can shadow what it imports.
        code = "import runpy, sys; sys.path.pop(0); runpy.run_path(sys.argv[1], run_name='__main__')"
        self.proc = subprocess.Popen([sys.executable, "-c", code, worker.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        ready = self._receive(deadline=time.monotonic() + 30)  # a cold interpreter on a busy machine
        if ready != {"ready": True}:
            raise _Overrun("worker did not start")

    def _ask(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        data = json.dumps(request, ensure_ascii=False).encode("utf-8")
        try:
            self.proc.stdin.write(worker._HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Overrun("renderer stopped unexpectedly") from None
        return self._receive(deadline=time.monotonic() + TEMPLATE_SECONDS)

    def _receive(self, deadline: float) -> dict:
        header = self._read_exactly(worker._HEADER.size, deadline)
        (n,) = worker._HEADER.unpack(header)
        if n > 8 * TEMPLATE_MAX_CHARS + 4096:  # JSON of the longest text allowed, escapes included
            raise _Overrun("sent an oversized reply")
        return json.loads(self._read_exactly(n, deadline).decode("utf-8"))

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        fd, out = self.proc.stdout.fileno(), bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Overrun(f"took longer than {TEMPLATE_SECONDS:g} s to render (a loop without end?); stopped")
            chunk = os.read(fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise _Overrun(f"stopped the renderer (it used more than {worker.MEMORY_BYTES >> 20} MiB of "
                               "memory, or crashed)")
            out += chunk
        return bytes(out)

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:  # a request the worker never read is still buffered, and closing flushes it
                    pass
            self.proc = None

    def close(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.stdin.close()  # the worker exits at the end of its input
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            self._stop()

    @staticmethod
    def _in_process(template: ChatTemplate, request: dict) -> str:
        global _ENV
        if _ENV is None:
            _ENV = worker.make_environment()
        try:
            return worker.render(_ENV, request["template"], request["messages"], request["add_generation_prompt"],
                                 request["variables"], request["max_output"])
        except Exception as e:
            raise Gemma3Error(f"{template.where}: {worker.describe(e)}") from None


class _Overrun(Exception):
    pass


_CAN_FORK = hasattr(os, "fork") and importlib.util.find_spec("resource") is not None
_ENV = None
_TEMPLATES = _TemplateProcess()
atexit.register(_TEMPLATES.close)
