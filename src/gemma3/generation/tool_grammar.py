r"""Constrained tool calls: a grammar (llguidance's Lark dialect) that lets the model write only what a
request's `tool_choice` allows, with every call's arguments valid against its tool's JSON schema.

    tool_choice    what the grammar allows
    "none"         text with no control string: no call can start
    "auto"         text, or text then calls; once `<start_function_call>` is written the call must be well
                   formed, name a declared tool and match its schema
    "required"     one or more calls (one with parallel_tool_calls=false), no text
    a function     calls to that function only

After the calls, `<start_function_response>` (a stop string) or a stop token ends the turn.

At most `MAX_CALLS` calls are allowed in a turn: a small model given the choice repeats its call until
max_tokens cuts one in half.

Each tool's `parameters` schema becomes grammar rules over FunctionGemma's value format
(gemma3.text.tools): a string is `<escape>` text `<escape>` (with its enum / const / length / pattern), with
no `<` inside (as llama.cpp's grammar for this format): a `<` can only begin the closing `<escape>`, so a
model that reaches for markup closes the string instead of writing on until max_tokens; an
object `{key:value,...}` with its properties in the order the template sorts them (required ones always,
optional ones maybe), arrays with their item schema and bounds, numbers and integers through llguidance's
own JSON-schema number rules (ranges included), anyOf / oneOf / type lists as alternatives, local `$ref`s
as (possibly recursive) rules. Keywords the grammar cannot enforce (`not`, `if`, `uniqueItems`,
`patternProperties`, ...) are refused with an error naming them, rather than silently not enforced; pure
annotations (`title`, `description`, `default`, `examples`, `format`, ...) are ignored.

The control strings are text in Gemma 3's vocabulary (several tokens each, written as string literals) but
single added tokens in FunctionGemma's (ids 46-52): llguidance never matches an added token against a literal's
text, so a control string the tokenizer writes as one token is referenced by its id (`<[48]>`), and is kept out
of terminals (text then a call, `<escape>` ... `<escape>`: rules around the token).

The grammar text depends on the tools, the choice, `parallel_tool_calls` and those token ids only, so it is
compiled once and cached; a matcher per generated row costs ~60 µs a token to mask (benchmarks/bench_tools.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gemma3.errors import Gemma3Error
from gemma3.generation.structured import Grammar, _llguidance
from gemma3.text.tools import (CONTROL_STRINGS, END_CALL, ESCAPE, START_CALL, START_RESPONSE, Tool, ToolChoice,
                               format_value)

_ANNOTATIONS = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "additionalProperties", "strict",
                "$defs", "definitions"}
_HANDLED = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required", "items",
            "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
            "exclusiveMaximum", "multipleOf", "nullable"}
# keywords that constrain nothing with these values (pydantic writes some of them)
_NO_OP = {"uniqueItems": lambda v: v is False, "minProperties": lambda v: v == 0,
          "additionalItems": lambda v: v is True, "unevaluatedProperties": lambda v: v is True}
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
MAX_REPEAT = 256  # the largest minItems / maxItems / length bound written out in the grammar
MAX_NUMBER_TOKENS = 12  # the digits of one number (one token each): -1234.5678901 fits
MAX_CALLS = 3  # calls in one turn: a small model left free repeats its call until max_tokens cuts one


def _lit(text: str) -> str:
    """A Lark string literal for `text` (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


_CONTROL = "(?:" + "|".join(re.escape(c) for c in CONTROL_STRINGS) + ")"


# (control string, the one token id it is written as or None), in CONTROL_STRINGS order
ControlTokens = tuple[tuple[str, int | None], ...]


def control_tokens(tokenizer) -> ControlTokens:
    """Each control string and the one token id `tokenizer` writes it as, or None where it takes several tokens
    (Gemma 3's own vocabulary); all None without a tokenizer."""
    ids = [tokenizer.encode(c, add_bos=False) if tokenizer is not None else [] for c in CONTROL_STRINGS]
    return tuple((c, i[0] if len(i) == 1 else None) for c, i in zip(CONTROL_STRINGS, ids))


class _Builder:
    """Turns schemas into rules; `rules` maps a name to its body. `controls`: the control strings written as
    one token each, by id."""

    def __init__(self, root: Mapping | None, controls: Mapping[str, int]):
        self.controls = controls
        self._split = re.compile("(" + "|".join(re.escape(c) for c in controls) + ")") if controls else None
        self.rules: dict[str, str] = {}
        self.terminals: dict[str, str] = {}
        self.root = root or {}
        self._refs: dict[str, str] = {}
        self._strings: dict[str, str] = {}  # a string body's regex → its terminal, shared
        self._numbers: dict[str, str] = {}
        self._any = False

    def _fresh(self, prefix: str) -> str:
        return f"{prefix}{len(self.rules) + len(self.terminals)}"

    def _new(self, prefix: str, body: str, terminal: bool = False) -> str:
        name = self._fresh(prefix)
        (self.terminals if terminal else self.rules)[name] = body
        return name

    def spell(self, text: str) -> str:
        """Grammar for exactly `text`: a literal, with each control string that is one token as `<[id]>`."""
        if self._split is None:
            return _lit(text)
        parts = self._split.split(text)  # odd places: the control strings
        return " ".join(f"<[{self.controls[p]}]>" if i % 2 else _lit(p) for i, p in enumerate(parts) if p)

    def delimited(self, name: str, body: str) -> str:
        """`<escape>` body `<escape>` as the terminal `name`, or as a rule where `<escape>` is one token (a token
        cannot sit inside a terminal)."""
        escape = self.spell(ESCAPE)
        if ESCAPE in self.controls:
            name = name.lower()
            self.rules[name] = f"{escape} {body} {escape}"
        else:
            self.terminals[name] = f"{escape} {body} {escape}"
        return name

    # ------------------------------------------------------------------ values
    def value(self, schema: Any, at: str) -> str:
        if schema is True or schema == {} or schema is None:
            return self.any_value()
        if schema is False:
            raise Gemma3Error(f"{at}: the schema `false` allows no value")
        if not isinstance(schema, Mapping):
            raise Gemma3Error(f"{at}: a schema must be an object or a boolean")
        unknown = sorted(k for k in set(schema) - _HANDLED - _ANNOTATIONS
                         if not (k in _NO_OP and _NO_OP[k](schema[k])))
        if unknown:
            raise Gemma3Error(f"{at}: the keyword {unknown[0]!r} cannot be enforced in tool calls")
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return f"({self.value(rest, at)} | \"null\")"
        if "$ref" in schema:
            return self.ref(schema["$ref"], at)
        if "const" in schema:
            return self.spell(format_value(schema["const"], escape_keys=False))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise Gemma3Error(f"{at}.enum must be a non-empty list")
            return "(" + " | ".join(self.spell(format_value(v, escape_keys=False)) for v in values) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise Gemma3Error(f"{at}.{key} must be a non-empty list")
                base = {k: v for k, v in schema.items() if k != key}
                return "(" + " | ".join(self.value({**base, **o} if isinstance(o, Mapping) else o, f"{at}.{key}[{i}]")
                                        for i, o in enumerate(options)) + ")"
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(schema["allOf"] if isinstance(schema["allOf"], list) else [None]):
                if not isinstance(part, Mapping) or set(part) & set(merged) - {"description", "title"}:
                    raise Gemma3Error(f"{at}.allOf[{i}]: only allOf parts with keywords of their own can be enforced")
                merged.update(part)
            return self.value(merged, at)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise Gemma3Error(f"{at}.type must not be an empty list")
            return "(" + " | ".join(self.value({**schema, "type": k}, at) for k in kind) + ")"
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema:
                kind = "array"
            else:
                return self.any_value()
        if kind == "string":
            return self.string(schema, at)
        if kind in ("integer", "number"):
            return self.number({"type": kind, **{k: schema[k] for k in _NUMBER_KEYS if k in schema}})
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "object":
            return self.object(schema, at)
        if kind == "array":
            return self.array(schema, at)
        raise Gemma3Error(f"{at}.type: unknown type {kind!r}")

    def number(self, schema: dict) -> str:
        """llguidance's JSON number rules (ranges included), held to `MAX_NUMBER_TOKENS` tokens: Gemma writes
        a digit a token, and a small model can write digits until max_tokens cuts the call in half."""
        text = json.dumps(schema)
        if text not in self._numbers:
            name = f"num{len(self._numbers)}"
            self.rules[f"{name}[max_tokens={MAX_NUMBER_TOKENS}]"] = "%json " + text
            self._numbers[text] = name
        return self._numbers[text]

    def ref(self, ref: Any, at: str) -> str:
        if not isinstance(ref, str) or not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", ref):
            raise Gemma3Error(f"{at}.$ref: only local references (#/$defs/NAME) can be enforced, got {ref!r}")
        if ref not in self._refs:
            _, section, name = ref.split("/", 2)
            target = self.root.get(section, {}).get(name) if isinstance(self.root.get(section), Mapping) else None
            if target is None:
                raise Gemma3Error(f"{at}.$ref: {ref!r} is not defined in the schema")
            rule = self._refs[ref] = self._new("ref", "")  # named first: a definition may refer to itself
            self.rules[rule] = self.value(target, ref)
        return self._refs[ref]

    def string(self, schema: Mapping, at: str) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        for name, bound in (("minLength", low), ("maxLength", high)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
                raise Gemma3Error(f"{at}.{name} must be a non-negative integer")
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            length = "*" if low <= MAX_REPEAT else None
            if length is None:
                raise Gemma3Error(f"{at}.minLength is over {MAX_REPEAT}")
            high = None
        body = "[^<]" + ("*" if (low, high) == (0, None) else f"{{{low},{'' if high is None else high}}}")
        terms = [_regex(body)]
        pattern = schema.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise Gemma3Error(f"{at}.pattern must be a string")
            inner = pattern[1:] if pattern.startswith("^") else "(?s:.*)" + pattern
            inner = inner[:-1] if inner.endswith("$") and not inner.endswith("\\$") else inner + "(?s:.*)"
            terms.append(_regex(inner))
        body = " & ".join(terms)
        if body not in self._strings:
            body_name = self._new("STRBODY", body, terminal=True)
            self._strings[body] = self.delimited(self._fresh("STR"), body_name)
        return self._strings[body]

    def object(self, schema: Mapping, at: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise Gemma3Error(f"{at}.required must be a list of property names")
        extra = schema.get("additionalProperties", True)
        if not properties and not required and extra is not False:
            return self.any_object(extra if isinstance(extra, Mapping) else True)
        names = list(properties) + [r for r in required if r not in properties]
        names = sorted(dict.fromkeys(names), key=str.lower)  # the template's order (dictsort)
        members = [(f"{_lit(name + ':')} {self.value(properties.get(name, True), f'{at}.properties.{name}')}",
                    name in required) for name in names]
        # Back to front: more[k] = members k.. after one was written (each needs its comma), first[k] = members
        # k.. with none written yet; an optional member is taken or skipped. Linear in the number of members.
        more, first = "", ""
        for text, needed in reversed(members):
            take = f'"," {text} {more}'.strip()
            begin = f"{text} {more}".strip()
            more = self._new("more", take if needed else f"{take} | {more}" if more else f"({take})?")
            first = self._new("first", begin if needed else f"{begin} | {first}" if first else f"({begin})?")
        return f'"{{" {first} "}}"' if first else '"{}"'

    def array(self, schema: Mapping, at: str) -> str:
        if "prefixItems" in schema:
            raise Gemma3Error(f"{at}: the keyword 'prefixItems' cannot be enforced in tool calls")
        item = self.value(schema.get("items", True), f"{at}.items")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        for name, bound in (("minItems", low), ("maxItems", high)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
                raise Gemma3Error(f"{at}.{name} must be a non-negative integer")
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            raise Gemma3Error(f"{at}: minItems / maxItems over {MAX_REPEAT} cannot be enforced")
        if high is not None and high < low:
            raise Gemma3Error(f"{at}: maxItems is below minItems")
        if high == 0:
            return '"[]"'
        item_rule = self._new("item", item)
        more_high = "" if high is None else str(high - 1)
        more = f'("," {item_rule}){{{max(low - 1, 0)},{more_high}}}'
        body = f"{item_rule} {more}"
        return f'"[" {body} "]"' if low >= 1 else f'"[" ({body})? "]"'

    # ------------------------------------------------------------------ values of any shape
    def any_value(self) -> str:
        if not self._any:
            self._any = True
            string = self.delimited("ANYSTR", "ANYBODY")
            self.terminals["ANYBODY"] = "/[^<]*/"
            self.terminals["ANYKEY"] = r"/[A-Za-z_][A-Za-z0-9_\-]*/"
            number = self.number({"type": "number"})
            self.rules["anyvalue"] = f'{string} | {number} | "true" | "false" | "null" | anyobject | anyarray'
            self.rules["anyobject"] = '"{" (ANYKEY ":" anyvalue ("," ANYKEY ":" anyvalue)*)? "}"'
            self.rules["anyarray"] = '"[" (anyvalue ("," anyvalue)*)? "]"'
        return "anyvalue"

    def any_object(self, values: Any) -> str:
        value = self.value(values, "additionalProperties") if values is not True else self.any_value()
        self.any_value()
        return f'"{{" (ANYKEY ":" {value} ("," ANYKEY ":" {value})*)? "}}"'


def _call_rule(builder: _Builder, tool: Tool) -> str:
    params = tool.parameters
    builder.root = params or {}
    body = builder.object(params, f"tool {tool.name!r}: parameters") if params else '"{}"'
    return f"{_lit('call:' + tool.name)} {body}"


class ToolCallGrammar(Grammar):
    """The grammar for one request's tools and tool choice (see the module docstring)."""

    @classmethod
    def build(cls, tools: Sequence[Tool], choice: ToolChoice, parallel: bool = True,
              tokenizer=None) -> "ToolCallGrammar":
        """`tokenizer`: the one the grammar will run over (None: the control strings are text, as in Gemma 3's
        own vocabulary)."""
        key = (json.dumps([t.as_openai() for t in tools], sort_keys=True), choice, parallel,
               control_tokens(tokenizer))
        return _compiled(*key)


@functools.lru_cache(maxsize=64)
def _compiled(tools_json: str, choice: ToolChoice, parallel: bool, controls: ControlTokens) -> ToolCallGrammar:
    from gemma3.text.tools import parse_tools

    tools = parse_tools(json.loads(tools_json))
    text = _grammar_text(tools, choice, parallel, {c: i for c, i in controls if i is not None})
    llg = _llguidance()
    try:
        grammar = llg.grammar_from("lark", text)
        error = llg.LLMatcher.validate_grammar(grammar)
    except (ValueError, RuntimeError) as e:
        error = str(e)
    if error:
        raise Gemma3Error(f"the tools' schemas do not compile into a grammar: {error.splitlines()[0][:300]}")
    return ToolCallGrammar(grammar, f"tools ({choice.mode})")


def _grammar_text(tools: Sequence[Tool], choice: ToolChoice, parallel: bool, controls: Mapping[str, int]) -> str:
    builder = _Builder(None, controls)
    control = _regex(f"(?s:.*){_CONTROL}(?s:.*)")
    lines = ["%llguidance {}"]
    builder.terminals["TEXT"] = f"/(?s:.*)/ & ~{control}"
    if choice.mode == "none":
        start = "TEXT"
    else:
        chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
        if not chosen:
            raise Gemma3Error("tool_choice allows no declared tool")
        bodies = []
        for tool in chosen:
            try:
                bodies.append(builder._new("call", _call_rule(builder, tool)))
            except RecursionError:
                raise Gemma3Error(f"tool {tool.name!r}: the schema nests too deeply") from None
        builder.rules["callbody"] = " | ".join(bodies)
        call, end_call = builder.spell(START_CALL), builder.spell(END_CALL)
        # Text then a call: as text, `<start_function_call>` must share one terminal with the text before it (the
        # greedy TEXT would end at `<start_function_call` and leave `>` to match nothing); a token cannot sit in one
        text_call = f"TEXT {call}"
        if START_CALL not in controls:
            builder.terminals["TEXTCALL"], text_call = text_call, "TEXTCALL"
        end = f"({builder.spell(START_RESPONSE)})?"
        more = f"({call} callbody {end_call}){{0,{MAX_CALLS - 1}}}" if parallel else ""
        first_call = f"callbody {end_call} {more}".strip()
        if choice.mode == "auto":
            start = f"TEXT | {text_call} {first_call} {end}"
        else:
            start = f"{call} {first_call} {end}"
    lines.append(f"start: {start}")
    lines += [f"{name}: {body}" for name, body in builder.rules.items()]
    lines += [f"{name}: {body}" for name, body in builder.terminals.items()]
    return "\n".join(lines) + "\n"


def tool_constraint(tools: Sequence[Tool], choice: ToolChoice, parallel: bool, tokenizer,
                    stop_strings: Sequence[str] = ()) -> tuple[ToolCallGrammar, tuple[str, ...]]:
    """The grammar for a turn that may call `tools`, and `stop_strings` with the one that ends such a turn:
    after its calls the model writes `<start_function_response>` and waits for the results."""
    grammar = ToolCallGrammar.build(tools, choice, parallel, tokenizer)
    return grammar, tuple(stop_strings) + ((START_RESPONSE,) if START_RESPONSE not in stop_strings else ())


def with_tools(config, tools: Sequence[Tool], choice: ToolChoice, parallel: bool = True, tokenizer=None):
    """A copy of a GenerationConfig that generates under the tool grammar (`tool_constraint`; `tokenizer`: the
    generator's); `config` itself where there are no tools."""
    if not tools:
        return config
    grammar, stops = tool_constraint(tools, choice, parallel, tokenizer, config.stop_strings)
    return dataclasses.replace(config, grammar=grammar, stop_strings=stops)
