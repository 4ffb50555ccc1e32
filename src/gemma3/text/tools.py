r"""Tool calling in FunctionGemma's format: declaring tools, writing calls and results into a prompt, and
reading the calls back out of what the model wrote.

FunctionGemma (Google, December 2025) is Gemma 3 270M fine-tuned for function calling. Its format is plain
text between seven control strings (single tokens in its vocabulary, several ordinary tokens in Gemma 3's):

    <start_of_turn>developer\n{system text}<start_function_declaration>declaration:get_weather{description:
        <escape>Weather now.<escape>,parameters:{properties:{city:{description:<escape><escape>,type:<escape>
        STRING<escape>}},required:[<escape>city<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>
        <end_of_turn>\n
    <start_of_turn>user\nWeather in Paris?<end_of_turn>\n
    <start_of_turn>model\n<start_function_call>call:get_weather{city:<escape>Paris<escape>}<end_function_call>
        <start_function_response>response:get_weather{temp:15}<end_function_response>It is 15 degrees.<end_of_turn>\n

(wrapped here; the real text has no line breaks inside a turn). Values are written as in
`format_value`: every string between `<escape>` tokens, so `{ } , :` inside a string need no escaping;
numbers, `true`, `false` bare; objects `{key:value,...}` with bare keys in case-insensitive key order;
lists `[a,b]`. The model's turn stays open after its calls: the results follow inside it, then the answer.
`<start_function_response>` written by the model means "my calls are done, run them": a stop string.

The renderer here produces the bytes Google's own FunctionGemma chat template (chat_template.jinja of
google/functiongemma-270m-it) produces, for every input that template accepts (tests/test_tools.py renders
both), with two differences on purpose: JSON null is written `null` (the template prints Python's `None`),
and arguments given as a JSON string are parsed first (the template pastes the string in after 20 spaces).

Reading calls back (`ToolCallParser`) works on a stream of text deltas and translates each call's
arguments to JSON as they arrive, keeping their types: `<escape>15<escape>` is the string "15", a bare
`15` the number 15, `{a:[1,true,null]}` a nested object; so a streamed call and a whole one agree piece
for piece. Text outside calls is content; no control string ever reaches it.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma3.errors import Gemma3Error

START_DECLARATION, END_DECLARATION = "<start_function_declaration>", "<end_function_declaration>"
START_CALL, END_CALL = "<start_function_call>", "<end_function_call>"
START_RESPONSE, END_RESPONSE = "<start_function_response>", "<end_function_response>"
ESCAPE = "<escape>"
CONTROL_STRINGS = (START_DECLARATION, END_DECLARATION, START_CALL, END_CALL, START_RESPONSE, END_RESPONSE, ESCAPE)
# Google's docs: the system prompt that switches FunctionGemma into tool use (sent by the caller, not added here)
TRIGGER = "You are a model that can do function calling with the following functions"

# Bounds on what a request may declare (docs/security.md): a tool list is prompt text and grammar, both per request.
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 << 10
MAX_SCHEMA_DEPTH = 16
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
# A key is written bare between `{`/`,` and `:`; these characters would make it ambiguous
_KEY_FORBIDDEN = set(":,{}[]<>")


# --------------------------------------------------------------------------------------------- declared tools

@dataclass(frozen=True)
class Tool:
    """One declared function: what the model is told, and what its calls are checked against."""

    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of type object; None: the function takes no arguments

    def as_openai(self) -> dict:
        """The OpenAI / transformers shape, `{"type": "function", "function": {...}}`, for chat templates."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def parse_tools(tools: Any, where: str = "tools") -> list[Tool]:
    """OpenAI's `tools` list → `Tool`s, checked: the shape, names (OpenAI's `[A-Za-z0-9_-]{1,64}`, no
    duplicates), parameter schemas (objects; keys writable in the call format), and the size bounds."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise Gemma3Error(f"{where} must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise Gemma3Error(f"{where}: {len(tools)} tools, at most {MAX_TOOLS} are allowed")
    try:
        size = len(json.dumps(tools, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise Gemma3Error(f"{where} must be plain JSON: {e}") from None
    if size > MAX_TOOLS_BYTES:
        raise Gemma3Error(f"{where} is {size} bytes of JSON, over the {MAX_TOOLS_BYTES >> 10} KiB allowed")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, Mapping):
            raise Gemma3Error(f"{at} must be an object")
        if tool.get("type", "function") != "function":
            raise Gemma3Error(f"{at}.type must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise Gemma3Error(f"{at}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise Gemma3Error(f"{at}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if any(t.name == name for t in parsed):
            raise Gemma3Error(f"{at}.function.name: the tool name {name!r} is declared twice")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise Gemma3Error(f"{at}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            parameters = _check_parameters(parameters, f"{at}.function.parameters")
        parsed.append(Tool(name, description, parameters))
    return parsed


def _check_parameters(schema: Any, at: str) -> dict | None:
    if not isinstance(schema, Mapping):
        raise Gemma3Error(f"{at} must be a JSON schema object")
    schema = dict(schema)
    if not schema:
        return None
    kind = schema.get("type", "object")  # OpenAI sends type object; a schema with only properties means it too
    if kind != "object":
        raise Gemma3Error(f"{at}.type must be 'object' (a function takes named arguments), got {kind!r}")
    schema["type"] = "object"
    _check_keys(schema, at, 0)
    return schema


def _check_keys(schema: Any, at: str, depth: int) -> None:
    """Every property name must be writable as a bare key of the call format; the nesting is bounded."""
    if depth > MAX_SCHEMA_DEPTH:
        raise Gemma3Error(f"{at}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, Mapping):
        properties = schema.get("properties")
        if properties is not None and not isinstance(properties, Mapping):
            raise Gemma3Error(f"{at}.properties must be an object")
        for key, value in (properties or {}).items():
            if not key or _KEY_FORBIDDEN & set(key) or key != key.strip():
                raise Gemma3Error(f"{at}.properties: the name {key!r} cannot be written in the call format "
                                  "(empty, surrounding spaces, or one of : , {{ }} [ ] < >)")
            _check_keys(value, f"{at}.properties.{key}", depth + 1)
        for name, value in schema.items():
            if name != "properties" and isinstance(value, (Mapping, list)):
                _check_keys(value, f"{at}.{name}", depth + 1)
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_keys(item, f"{at}[{i}]", depth + 1)


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's `tool_choice`: "auto" (text or calls), "none" (text only), "required" (at least one call) or
    "function" (a call to `name`)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def allows_text(self) -> bool:
        return self.mode in ("auto", "none")


def parse_tool_choice(value: Any, tools: Sequence[Tool], where: str = "tool_choice") -> ToolChoice:
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise Gemma3Error(f"{where} must be 'auto', 'none', 'required' or a function, got {value!r}")
        if value == "required" and not tools:
            raise Gemma3Error(f"{where} is 'required' but no tools are declared")
        return ToolChoice(value)
    if isinstance(value, Mapping):
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if value.get("type") != "function" or not isinstance(name, str):
            raise Gemma3Error(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not any(t.name == name for t in tools):
            raise Gemma3Error(f"{where} names the function {name!r}, which is not among the declared tools")
        return ToolChoice("function", name)
    raise Gemma3Error(f"{where} must be a string or an object, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------- writing values

def _dictsort(mapping: Mapping) -> list[tuple[Any, Any]]:
    """Jinja's `dictsort`, which the official template uses: by key, case-insensitively, stable."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _scalar_text(value: Any) -> str:
    """How the template prints a value that is not a string, bool, mapping or list (Python's str), with
    null as JSON's `null`."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        raise Gemma3Error(f"{value} cannot be written in a tool call (not a JSON number)")
    return str(value)


def format_value(value: Any, escape_keys: bool = True) -> str:
    """One value in the call format (the official template's `format_argument`)."""
    if isinstance(value, str):
        return ESCAPE + value + ESCAPE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = ",".join(f"{ESCAPE + str(k) + ESCAPE if escape_keys else k}:{format_value(v, escape_keys)}"
                         for k, v in _dictsort(value))
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, escape_keys) for v in value) + "]"
    return _scalar_text(value)


def format_arguments(arguments: Mapping) -> str:
    """A call's or a result's mapping, without its braces: `key:value,...`, bare keys in template order."""
    return ",".join(f"{k}:{format_value(v, escape_keys=False)}" for k, v in _dictsort(arguments))


def _jinja_text(schema: Any, key: str) -> str:
    """`{{ value[key] }}` in the template: "" where the key is missing (or the schema is not a mapping)."""
    if not isinstance(schema, Mapping) or key not in schema:
        return ""
    value = schema[key]
    return "None" if value is None else str(value)


def _upper_type(schema: Any) -> str:
    return _jinja_text(schema, "type").upper()


_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _format_parameters(properties: Mapping) -> str:
    """The template's `format_parameters`: each property as name:{description:...,[enum|properties|items],type:...}.
    Like the template, properties named after the schema's own keywords are left out."""
    out = []
    for key, value in _dictsort(properties):
        if key in _STANDARD_KEYS:
            continue
        kind = _upper_type(value)
        piece = f"{key}:{{description:{ESCAPE}{_jinja_text(value, 'description')}{ESCAPE}"
        if isinstance(value, Mapping):
            if kind == "STRING":
                if value.get("enum"):
                    piece += ",enum:" + format_value(value["enum"])
            elif kind == "OBJECT":
                inner = value.get("properties")
                piece += ",properties:{" + _format_parameters(inner if isinstance(inner, Mapping) else value) + "}"
                if value.get("required"):
                    piece += ",required:[" + ",".join(f"{ESCAPE}{r}{ESCAPE}" for r in value["required"]) + "]"
            elif kind == "ARRAY":
                items = value.get("items")
                if isinstance(items, Mapping) and items:
                    piece += ",items:{" + _format_items(items) + "}"
        piece += f",type:{ESCAPE}{kind}{ESCAPE}}}"
        out.append(piece)
    return ",".join(out)


def _format_items(items: Mapping) -> str:
    out = []
    for key, value in _dictsort(items):
        if value is None:
            continue
        if key == "properties":
            out.append("properties:{" + (_format_parameters(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            out.append("required:[" + ",".join(f"{ESCAPE}{r}{ESCAPE}" for r in value) + "]")
        elif key == "type":
            out.append("type:" + format_value(value.upper() if isinstance(value, str)
                                              else [str(v).upper() for v in value]))
        else:
            out.append(f"{key}:{format_value(value)}")
    return ",".join(out)


def render_declaration(tool: Tool) -> str:
    """`<start_function_declaration>declaration:NAME{description:...,parameters:{...}}<end_function_declaration>`."""
    text = f"declaration:{tool.name}{{description:{ESCAPE}{tool.description or ''}{ESCAPE}"
    params = tool.parameters
    if params:
        text += ",parameters:{"
        if params.get("properties"):
            text += "properties:{" + _format_parameters(params["properties"]) + "},"
        if params.get("required"):
            text += "required:[" + ",".join(f"{ESCAPE}{r}{ESCAPE}" for r in params["required"]) + "],"
        text += f"type:{ESCAPE}{_upper_type(params)}{ESCAPE}}}"
    return START_DECLARATION + text.strip() + "}" + END_DECLARATION


def render_call(name: str, arguments: Mapping) -> str:
    return f"{START_CALL}call:{name}{{{format_arguments(arguments)}}}{END_CALL}"


def render_response(name: str, response: Any) -> str:
    """A tool's result: a mapping's keys, or `value:` for anything else (the template's string form)."""
    body = format_arguments(response) if isinstance(response, Mapping) else f"value:{format_value(response, False)}"
    return f"{START_RESPONSE}response:{name.strip()}{{{body}}}{END_RESPONSE}"


# --------------------------------------------------------------------------------------------- conversations

def new_call_id() -> str:
    """OpenAI-style tool call ids: "call_" and 24 random letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def _json_loads(text: str) -> Any:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages → the shape chat templates expect (transformers' convention, which FunctionGemma's
    template is written for): each call's `arguments` a dict (OpenAI sends a JSON string), each `tool`
    message carrying the `name` of the call it answers (found by `tool_call_id`) and, where its content is a
    JSON object, that object as `{"name", "response"}`. Errors name the message."""
    calls: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise Gemma3Error(f"message {i} must be a dict, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role in ("assistant", "model") and message.get("tool_calls"):
            message["tool_calls"] = [_prepare_call(call, f"messages[{i}].tool_calls[{j}]", calls)
                                     for j, call in enumerate(_as_list(message["tool_calls"],
                                                                       f"messages[{i}].tool_calls"))]
        elif role == "tool":
            message = _prepare_result(message, f"messages[{i}]", calls)
        out.append(message)
    return out


def _as_list(value: Any, at: str) -> list:
    if not isinstance(value, list):
        raise Gemma3Error(f"{at} must be a list")
    return value


def _prepare_call(call: Any, at: str, calls: dict[str, str]) -> dict:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise Gemma3Error(f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise Gemma3Error(f"{at}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = _json_loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            raise Gemma3Error(f"{at}.function.arguments is not JSON: {e}") from None
    if not isinstance(arguments, Mapping):
        raise Gemma3Error(f"{at}.function.arguments must be a JSON object, got {type(arguments).__name__}")
    call_id = call.get("id")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise Gemma3Error(f"{at}.id must be a string")
        calls[call_id] = name
    prepared = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if call_id is not None:
        prepared["id"] = call_id
    return prepared


def _prepare_result(message: dict, at: str, calls: dict[str, str]) -> dict:
    call_id = message.get("tool_call_id")
    name = message.get("name")
    if call_id is not None:
        if call_id not in calls:
            raise Gemma3Error(f"{at}.tool_call_id {call_id!r} matches no tool call earlier in the conversation")
        name = calls[call_id]
    content = message.get("content", "")
    if name is None and _names_itself(content):  # transformers' shape: {"name", "response"} (or a list of them)
        return message
    if not isinstance(name, str) or not name:
        raise Gemma3Error(f"{at}: a tool message needs a tool_call_id (or a name) saying which call it answers")
    if isinstance(content, list):  # OpenAI's text parts
        if all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
    if isinstance(content, str):
        try:
            value = _json_loads(content)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            content = {"name": name, "response": value}
    message = dict(message, name=name, content=content)
    return message


def _names_itself(content: Any) -> bool:
    items = content if isinstance(content, list) else [content]
    return bool(items) and all(isinstance(i, Mapping) and "name" in i and "response" in i for i in items)


# --------------------------------------------------------------------------------------------- reading calls

@dataclass
class ToolCall:
    """A call the model made, as OpenAI returns it: `arguments` is JSON text."""

    id: str
    name: str
    arguments: str = ""
    complete: bool = False  # its <end_function_call> was seen

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolDelta:
    """What one piece of model output adds: `content` text, and for calls, `(index, id, name, arguments)`
    pieces: a call's first piece has its id and name, the next ones more of its arguments."""

    content: str = ""
    calls: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


class ToolCallParser:
    """Splits model output, fed as text deltas, into content and tool calls.

    `push(text)` returns a `ToolDelta` with what is now certain; `finish()` what was held back. Text that may
    be the start of a control string is held back until it is certain; control strings outside a call
    (a stray `<escape>`, a `<start_function_response>`) are dropped from the content. A call's arguments are
    translated to JSON as they arrive, so the pieces of a stream concatenate to the whole call's `arguments`.
    """

    def __init__(self, make_id=new_call_id):
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._make_id = make_id
        self._buffer = ""
        self._in_call = False
        self._header = ""  # "call:NAME{" as it arrives
        self._json: _DialectToJson | None = None

    def push(self, text: str) -> ToolDelta:
        self._buffer += text
        delta = ToolDelta()
        self._run(delta, final=False)
        return delta

    def finish(self) -> ToolDelta:
        delta = ToolDelta()
        self._run(delta, final=True)
        if self._in_call and self._json is not None:
            self._emit_args(delta, self._json.finish())
        return delta

    @property
    def text(self) -> str:
        return "".join(self.content)

    def _add_content(self, delta: ToolDelta, text: str) -> None:
        if text:
            self.content.append(text)
            delta.content += text

    def _emit_args(self, delta: ToolDelta, piece: str) -> None:
        if piece:
            call = self.calls[-1]
            call.arguments += piece
            delta.calls.append((len(self.calls) - 1, None, None, piece))

    def _run(self, delta: ToolDelta, final: bool) -> None:
        while self._buffer:
            if not self._in_call:
                if not self._text_step(delta, final):
                    return
            elif self._json is None:
                if not self._header_step(delta, final):
                    return
            elif not self._args_step(delta, final):
                return

    def _text_step(self, delta: ToolDelta, final: bool) -> bool:
        buf = self._buffer
        at = buf.find("<")
        while at >= 0:
            rest = buf[at:]
            control = next((c for c in CONTROL_STRINGS if rest.startswith(c)), None)
            if control is not None:
                self._add_content(delta, buf[:at])
                self._buffer = buf[at + len(control):]
                if control == START_CALL:
                    self._in_call, self._header = True, ""
                return True
            if any(c.startswith(rest) for c in CONTROL_STRINGS):
                self._add_content(delta, buf[:at])  # may become a control string: wait for more
                self._buffer = "" if final else rest
                if final and not self.calls:  # at the end it is text; after calls, half a control string cut off
                    self._add_content(delta, rest)
                return False
            at = buf.find("<", at + 1)
        self._add_content(delta, buf)
        self._buffer = ""
        return False

    def _header_step(self, delta: ToolDelta, final: bool) -> bool:
        brace = self._buffer.find("{")
        header = self._header + (self._buffer if brace < 0 else self._buffer[:brace])
        malformed = not "call:".startswith(header[:5]) or any(c in header for c in "<}")
        if malformed or (final and brace < 0):
            # not a call after all: its text is content, without the control string
            self._in_call, self._buffer = False, header + ("" if brace < 0 else self._buffer[brace:])
            return True
        if brace < 0:
            self._header, self._buffer = header, ""
            return False
        name = header[5:].strip()
        self._buffer = self._buffer[brace + 1:]
        self.calls.append(ToolCall(self._make_id(), name))
        delta.calls.append((len(self.calls) - 1, self.calls[-1].id, name, ""))
        self._json = _DialectToJson()
        self._emit_args(delta, self._json.open())
        return True

    def _args_step(self, delta: ToolDelta, final: bool) -> bool:
        consumed, piece, done = self._json.feed(self._buffer, final)
        self._buffer = self._buffer[consumed:]
        self._emit_args(delta, piece)
        if not done:
            return bool(consumed) and bool(self._buffer)
        # the arguments closed: <end_function_call> should follow
        if self._buffer.startswith(END_CALL):
            self._buffer = self._buffer[len(END_CALL):]
        elif not final and END_CALL.startswith(self._buffer):
            return False
        self.calls[-1].complete = True
        self._in_call, self._json = False, None
        return True


class _DialectToJson:
    """The call format's `{k:v,...}` → JSON text, incrementally. The JSON uses `json.dumps`' separators
    (", " and ": "). Bare words that are not JSON literals or numbers become strings; `None` is null."""

    def __init__(self):
        self.stack: list[str] = []  # "{" or "["
        self.state = "key_or_end"  # key_or_end | key | value | value_or_end | after_value | string
        self.token = ""

    def open(self) -> str:
        self.stack.append("{")
        self.state = "key_or_end"
        return "{"

    def finish(self) -> str:
        """What is held back when the text ends mid-call (the arguments stay incomplete JSON)."""
        if self.state == "string":
            return json.dumps(self.token)[1:-1]
        return ""

    def feed(self, text: str, final: bool) -> tuple[int, str, bool]:
        """Consume from `text`: (characters consumed, JSON produced, whether the top-level object closed)."""
        out, i = [], 0
        while i < len(text):
            ch = text[i]
            if self.state == "string":
                end = text.find(ESCAPE, i)
                if end < 0:
                    # hold back what may be the start of the closing <escape>
                    keep = 0 if final else next((n for n in range(min(len(ESCAPE) - 1, len(text) - i), 0, -1)
                                                 if ESCAPE.startswith(text[len(text) - n:])), 0)
                    piece = text[i:len(text) - keep]
                    out.append(json.dumps(piece, ensure_ascii=False)[1:-1])
                    return len(text) - keep, "".join(out), False
                out.append(json.dumps(text[i:end], ensure_ascii=False)[1:-1] + '"')
                i = end + len(ESCAPE)
                self.state = "after_value"
                continue
            if self.state in ("key_or_end", "key"):
                if ch == "}" and self.state == "key_or_end":
                    out.append("}")
                    i += 1
                    if self._close():
                        return i, "".join(out), True
                    continue
                colon = text.find(":", i)
                if colon < 0:
                    if final:
                        return len(text), "".join(out), False
                    return i, "".join(out), False
                key = text[i:colon]
                if key.startswith(ESCAPE) and key.endswith(ESCAPE) and len(key) >= 2 * len(ESCAPE):
                    key = key[len(ESCAPE):-len(ESCAPE)]
                out.append(json.dumps(key, ensure_ascii=False) + ": ")
                i = colon + 1
                self.state = "value"
                continue
            if self.state == "value":
                if text.startswith(ESCAPE, i):
                    out.append('"')
                    i += len(ESCAPE)
                    self.state, self.token = "string", ""
                    continue
                if not final and ESCAPE.startswith(text[i:]) and ch == "<":
                    return i, "".join(out), False
                if ch in "{[":
                    out.append(ch)
                    self.stack.append(ch)
                    i += 1
                    self.state = "key_or_end" if ch == "{" else "value_or_end"
                    continue
                # a bare scalar: up to , } ]
                end = next((j for j in range(i, len(text)) if text[j] in ",}]"), -1)
                if end < 0:
                    if not final:
                        self.token += text[i:]
                        return len(text), "".join(out), False
                    end = len(text)
                word = self.token + text[i:end]
                self.token = ""
                out.append(_bare_to_json(word))
                i = end
                self.state = "after_value"
                continue
            if self.state == "value_or_end":
                if ch == "]":
                    out.append("]")
                    i += 1
                    self._close()
                    continue
                self.state = "value"
                continue
            if self.state == "after_value":
                if ch == ",":
                    out.append(", ")
                    i += 1
                    self.state = "key" if self.stack[-1] == "{" else "value"
                    continue
                if ch in "}]":
                    out.append("}" if self.stack[-1] == "{" else "]")
                    i += 1
                    if self._close():
                        return i, "".join(out), True
                    continue
                # anything else here is out of format: end the arguments where they are
                while self.stack:
                    out.append("}" if self.stack.pop() == "{" else "]")
                return i, "".join(out), True
        return i, "".join(out), False

    def _close(self) -> bool:
        """Pop one level; True when the call's top-level object closed."""
        self.stack.pop()
        self.state = "after_value"
        return not self.stack


_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _bare_to_json(word: str) -> str:
    w = word.strip()
    if w in ("true", "false", "null"):
        return w
    if w == "None":
        return "null"
    if _NUMBER.fullmatch(w):
        return w
    try:
        number = float(w)
    except ValueError:
        return json.dumps(w, ensure_ascii=False)
    return repr(number) if math.isfinite(number) else json.dumps(w)


def finish_reason(reason: str | None, calls: Sequence[ToolCall]) -> str | None:
    """OpenAI's "tool_calls" where a reply stopped after complete calls; `reason` otherwise."""
    return "tool_calls" if reason == "stop" and calls and all(c.complete for c in calls) else reason


def parse_tool_calls(text: str, make_id=new_call_id) -> tuple[str, list[ToolCall]]:
    """Whole model output → (content, calls)."""
    parser = ToolCallParser(make_id)
    parser.push(text)
    parser.finish()
    return parser.text, parser.calls
