r"""Chat prompts for Gemma 3 instruction-tuned models: messages → the text the model was trained on.

Two renderers, one output:

* the built-in Gemma 3 format in plain Python (spec §9), used when no template is given; it validates the
  conversation and says what is wrong;
* a checkpoint's own Jinja chat template, run in jinja2's `ImmutableSandboxedEnvironment` set up as
  transformers' `apply_chat_template` does (transformers/utils/chat_template_utils.py,
  `_cached_compile_jinja_template`): a template shipped with a downloaded model is untrusted code.

The Gemma 3 format, for [system, user, assistant] and a generation prompt:

    <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{assistant}<end_of_turn>\n
    <start_of_turn>model\n

There is no system turn: a leading system message's text is prepended, unstripped, to the first user turn.
Turn texts are stripped, `assistant` is written `model`, and roles alternate user/model starting with user.
The `<bos>` is part of the prompt, so encode it without adding another (spec pitfall 19).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma3.errors import Gemma3Error

# The official Gemma 3 IT template, verbatim from google/gemma-3-*-it tokenizer_config.json ("chat_template"):
# what we write into exported checkpoints. `render_chat` without a template produces the same text.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

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
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, template: str | None = None
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) as a Gemma 3 prompt string, starting with
    `<bos>`. `content` is a string or a list of {"type": "text", "text": ...} parts. With `template`, the
    checkpoint's Jinja chat template is rendered (sandboxed) instead of the built-in format."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise Gemma3Error("a conversation must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise Gemma3Error(f"message {i} must be a dict, got {type(message).__name__}")
    if template is not None:
        return _render_template(template, messages, add_generation_prompt)
    return _render_gemma3(messages, add_generation_prompt)


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


# --- a checkpoint's Jinja template, sandboxed -------------------------------------------------------------------

def _render_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    # Like transformers: the template sees only plain JSON-like data, and message keys set to None are dropped
    # (OpenAI clients send content=None; many templates would print "None").
    chat = [{key: _plain(value) for key, value in message.items() if value is not None} for message in messages]
    try:
        return _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **TEMPLATE_TOKENS)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise Gemma3Error(f"chat template: {e}") from e


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


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile in the environment transformers uses, so templates written for it render the same here."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)  # the function, not the `dict` type
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: Jinja's own escapes HTML characters, which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()` minus underscore-prefixed names, which could shadow CPython internals."""

    def __init__(*args, **kwargs):  # noqa: N805 — Jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")
