"""Tool calling in FunctionGemma's format (gemma3.text.tools, gemma3.generation.tool_grammar): the rendering
equals Google's documented examples byte for byte and Google's own chat template (rendered by jinja2 and by
transformers) on documented and generated conversations; calls read back with their types, streamed or
whole; the grammar keeps calls to the declared schemas and each tool_choice to its meaning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3.errors import Gemma3Error
from gemma3.text.chat import ChatTemplate, render_chat
from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE
from gemma3.text.tools import (CONTROL_STRINGS, END_CALL, ESCAPE, START_CALL, START_RESPONSE, TRIGGER, ToolCallParser,
                               ToolChoice, parse_tool_calls, parse_tool_choice, parse_tools, prepare_messages,
                               render_call, render_declaration, render_response)

TEMPLATE_FILE = Path(__file__).parent / "fixtures" / "functiongemma_chat_template.jinja"
OFFICIAL = TEMPLATE_FILE.read_text(encoding="utf-8")  # google/functiongemma-270m-it chat_template.jinja

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Gets the current weather in a given location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": 'The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"'},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "The unit to return the temperature in."}},
        "required": ["location"]}}}

# Google's "FunctionGemma formatting and best practices", Weather Tool Flow, turns 1-5 verbatim
DOC_TURN1 = ("<start_of_turn>developer\nYou are a model that can do function calling with the following functions"
             "<start_function_declaration>declaration:get_current_weather{description:<escape>Gets the current "
             "weather in a given location.<escape>,parameters:{properties:{location:{description:<escape>The city "
             "and state, e.g. \"San Francisco, CA\" or \"Tokyo, JP\"<escape>,type:<escape>STRING<escape>},unit:"
             "{description:<escape>The unit to return the temperature in.<escape>,enum:[<escape>celsius<escape>,"
             "<escape>fahrenheit<escape>],type:<escape>STRING<escape>}},required:[<escape>location<escape>],type:"
             "<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>")
DOC_TURN2 = "<start_of_turn>user\nHey, what's the weather in Tokyo right now?<end_of_turn>"
DOC_TURN3 = ("<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}"
             "<end_function_call>")
DOC_TURN4 = ("<start_function_response>response:get_current_weather{temperature:15,weather:<escape>sunny<escape>}"
             "<end_function_response>")
DOC_TURN5 = "The current weather in Tokyo is sunny with a temperature of 15 degrees Celsius.<end_of_turn>"

DOC_MESSAGES = [
    {"role": "developer", "content": TRIGGER},
    {"role": "user", "content": "Hey, what's the weather in Tokyo right now?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_current_weather", "arguments": {"location": "Tokyo, Japan"}}}]},
    {"role": "tool", "content": [{"name": "get_current_weather", "response": {"temperature": 15, "weather": "sunny"}}]},
    {"role": "assistant", "content": "The current weather in Tokyo is sunny with a temperature of 15 degrees Celsius."},
]


# ------------------------------------------------------------------------------------ Google's documented text

def test_documented_weather_flow_byte_for_byte():
    first = render_chat(DOC_MESSAGES[:2], tools=[WEATHER])
    assert first == "<bos>" + DOC_TURN1 + "\n" + DOC_TURN2 + "\n<start_of_turn>model\n"
    # the model's call, the application's result and the answer continue the same model turn
    whole = render_chat(DOC_MESSAGES, add_generation_prompt=False, tools=[WEATHER])
    assert whole == ("<bos>" + DOC_TURN1 + "\n" + DOC_TURN2 + "\n<start_of_turn>model\n" + DOC_TURN3 + DOC_TURN4
                     + DOC_TURN5 + "\n")
    # after a result, the prompt ends there: the model answers inside its turn
    after_result = render_chat(DOC_MESSAGES[:4], tools=[WEATHER])
    assert after_result.endswith(DOC_TURN3 + DOC_TURN4)


def test_documented_pieces():
    assert render_call("get_current_weather", {"location": "Tokyo, Japan"}) == DOC_TURN3
    assert render_response("get_current_weather", {"temperature": 15, "weather": "sunny"}) == DOC_TURN4
    declaration = render_declaration(parse_tools([WEATHER])[0])
    assert DOC_TURN1.index(declaration) > 0
    # Scenario B of the page: the model's call, read back
    content, calls = parse_tool_calls("<start_function_call>call:get_current_temperature{location:<escape>Paris"
                                      "<escape>,unit:<escape>celsius<escape>}<end_function_call>")
    assert content == "" and [c.name for c in calls] == ["get_current_temperature"]
    assert json.loads(calls[0].arguments) == {"location": "Paris", "unit": "celsius"}


def test_documented_finetuning_notebook_render():
    search = [{"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "description": "query string"}},
        "required": ["query"]}}} for name, desc in [
        ("search_knowledge_base", "Search internal company documents, policies and project data."),
        ("search_google", "Search public information.")]]
    messages = [{"role": "developer", "content": TRIGGER},
                {"role": "user", "content": "What is the reimbursement limit for travel meals?"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                    "name": "search_knowledge_base",
                    "arguments": {"query": "travel meal reimbursement limit policy"}}}]}]
    expected = ("<bos><start_of_turn>developer\nYou are a model that can do function calling with the following "
                "functions<start_function_declaration>declaration:search_knowledge_base{description:<escape>Search "
                "internal company documents, policies and project data.<escape>,parameters:{properties:{query:"
                "{description:<escape>query string<escape>,type:<escape>STRING<escape>}},required:[<escape>query"
                "<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration><start_function_declaration>"
                "declaration:search_google{description:<escape>Search public information.<escape>,parameters:"
                "{properties:{query:{description:<escape>query string<escape>,type:<escape>STRING<escape>}},"
                "required:[<escape>query<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>"
                "<end_of_turn>\n<start_of_turn>user\nWhat is the reimbursement limit for travel meals?<end_of_turn>\n"
                "<start_of_turn>model\n<start_function_call>call:search_knowledge_base{query:<escape>travel meal "
                "reimbursement limit policy<escape>}<end_function_call><start_function_response>")
    assert render_chat(messages, add_generation_prompt=False, tools=search) == expected


# ------------------------------------------------------------------------------------ = Google's own template

def jinja_render(messages, tools, add_generation_prompt):
    """The official template as transformers runs it (ImmutableSandboxedEnvironment, trim/lstrip blocks)."""
    from gemma3.text import template_worker as worker

    env = worker.make_environment()
    return worker.render(env, OFFICIAL, messages, add_generation_prompt, {"tools": tools, "bos_token": "<bos>"},
                         1 << 22)


SCHEMA_TOOL = {"type": "function", "function": {"name": "update_config", "description": "Updates the config.",
    "parameters": {"type": "object", "properties": {
        "config": {"type": "object", "description": "A Config object", "properties": {
            "theme": {"type": "string"}, "font_size": {"type": "number"}}, "required": ["theme"]},
        "tags": {"type": "array", "description": "Tags", "items": {"type": "string", "enum": ["a", "b"]}},
        "points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"]}},
        "Zeta": {"type": "string"}, "alpha": {"type": "boolean", "default": False},
        "multi": {"type": ["string", "null"], "description": "union"},
        "level": {"type": "integer", "enum": [1, 2, 3]},
        "type": {"type": "string", "description": "a property named like a keyword (the template drops it)"}},
        "required": ["config", "type"]}}}
NOARGS = {"type": "function", "function": {"name": "now", "description": "The time."}}
EMPTY = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}

CONVERSATIONS = {
    "documented flow": (DOC_MESSAGES, [WEATHER]),
    "no developer message": (DOC_MESSAGES[1:2], [WEATHER]),
    "custom developer text": ([{"role": "system", "content": "  Be exact. \n"}, DOC_MESSAGES[1]], [WEATHER, NOARGS]),
    "schemas of every shape": ([{"role": "user", "content": "hi"}], [SCHEMA_TOOL, NOARGS, EMPTY]),
    "parallel calls, list of results": ([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}},
            {"type": "function", "function": {"name": "get_current_weather", "arguments": {"location": "Rome"}}}]},
        {"role": "tool", "content": [{"name": "get_current_weather", "response": {"t": 21.5, "ok": True}},
                                     {"name": "get_current_weather", "response": {"t": -3, "sky": "snow, {cold}"}}]},
        {"role": "assistant", "content": "21.5 and -3."},
        {"role": "user", "content": "Thanks"}], [WEATHER]),
    "string result with a name": ([
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "name": "now", "content": "12:00"}], [NOARGS]),
    "typed arguments": ([
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "update_config", "arguments": {
            "config": {"theme": "dark", "font_size": 12.5}, "tags": ["a", "b"], "points": [{"x": 1}, {"x": 2}],
            "alpha": False, "Zeta": "z", "level": 3}}}]}], [SCHEMA_TOOL]),
    "unicode and markup": ([
        {"role": "developer", "content": [{"type": "text", "text": " 日本語 "},
                                          {"type": "text", "text": "<b>x</b>"}]},
        {"role": "user", "content": "naïve {{ not jinja }} 👨‍👩‍👧"}], [WEATHER]),
    "result mapping with a message name": ([
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "ping", "arguments": {}}}]},
        {"role": "tool", "name": "ping", "content": {"latency_ms": 12, "hops": [1, 2]}},
        {"role": "assistant", "content": "12 ms"}], [EMPTY]),
    "system without tools": ([{"role": "system", "content": "sys"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                                  "name": "f", "arguments": {"a": 1}}}]}], []),
    "ends with a call": (DOC_MESSAGES[:3], [WEATHER]),
    "every role the template writes": ([
        {"role": "user", "content": [{"type": "text", "text": " time "}, {"type": "text", "text": "now?"}]},
        {"role": "model", "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "name": "now", "content": "no response yet"},
        {"role": "model", "content": "Unknown."},
        {"role": "system", "content": " Later system text "},
        {"role": "developer", "content": "Later developer text"},
        {"role": "user", "content": "ok"}], [NOARGS]),
    "system message without content": ([{"role": "system"}, {"role": "user", "content": "u"}], [WEATHER]),
    # the template reads only the text of a leading developer message
    "leading developer message with tool_calls": ([
        {"role": "developer", "content": "d", "tool_calls": [{"type": "function", "function": {
            "name": "now", "arguments": {}}}]},
        {"role": "user", "content": "u"}], []),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_renderer_equals_official_template(name, add_generation_prompt):
    messages, tools = CONVERSATIONS[name]
    expected = jinja_render(messages, tools or None, add_generation_prompt)
    assert render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools) == expected
    # the same template, run by our sandboxed renderer as a checkpoint's own
    assert render_chat(messages, add_generation_prompt, ChatTemplate(OFFICIAL, "test"), tools=tools) == expected


def test_openai_shapes_render_as_transformers_shapes():
    """OpenAI's arguments (a JSON string) and results (by tool_call_id) give the text of the dict shapes."""
    openai_style = [
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_current_weather", "arguments": '{"location": "Tokyo, Japan"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 15, "weather": "sunny"}'}]
    dict_style = [openai_style[0], DOC_MESSAGES[2], DOC_MESSAGES[3]]
    assert render_chat(openai_style, tools=[WEATHER]) == render_chat(dict_style, tools=[WEATHER])
    assert render_chat(openai_style, tools=[WEATHER]).endswith(DOC_TURN3 + DOC_TURN4)


# values the official template writes the same way (it prints null as Python's None, so null is left out)
json_scalars = st.one_of(st.booleans(), st.integers(-10**12, 10**12),
                         st.floats(allow_nan=False, allow_infinity=False, width=32),
                         st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=12))
keys = st.text("abcdefghijXYZ_0123456789", min_size=1, max_size=6)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(keys, inner, max_size=3), max_leaves=8)
prop_schemas = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean"])},
                          optional={"description": st.text(max_size=10),
                                    "enum": st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=3)}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(keys, inner,
                                                                                                   max_size=3)})
    | st.fixed_dictionaries({"type": st.just("array"), "items": inner}), max_leaves=6)
tool_lists = st.lists(st.builds(
    lambda name, desc, props, req: {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": props, "required": [k for k in props if req]}}},
    st.text("abcxyz_-0123", min_size=1, max_size=8), st.text(max_size=20),
    st.dictionaries(keys, prop_schemas, max_size=4), st.booleans()),
    max_size=3, unique_by=lambda t: t["function"]["name"])


@settings(max_examples=60, deadline=None)
@given(tools=tool_lists, args=st.lists(st.dictionaries(keys, json_values, max_size=4), min_size=1, max_size=3),
       result=st.dictionaries(keys, json_values, max_size=4), system=st.sampled_from([None, TRIGGER, " x \n"]),
       user=st.text(max_size=20), answer=st.text(max_size=20))
def test_builtin_renderer_equals_official_template_generated(tools, args, result, system, user, answer):
    messages = ([{"role": "developer", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": a}}
                                             for a in args]},
        {"role": "tool", "content": [{"name": "f", "response": result}]},
        {"role": "assistant", "content": answer}]
    for cut in (2, 3, 4, 5):
        part = messages[:cut + (system is not None)]
        assert render_chat(part, tools=tools) == jinja_render(part, tools or None, True)


def test_a_template_renders_tools_itself_only_if_it_reads_them():
    user = [{"role": "user", "content": "Hi"}]
    calling = user + [DOC_MESSAGES[2]]
    # it reads `tools` (the declared ones, OpenAI's shape) or `tool_calls`: it is rendered
    assert render_chat(user, template="{{ tools[0].function.name }}", tools=[WEATHER]) == "get_current_weather"
    assert render_chat(calling, template=ChatTemplate("{{ messages[1].tool_calls[0].function.name }}")) == \
        "get_current_weather"
    # it reads neither, or it is the official Gemma 3 one: FunctionGemma's format instead
    function_gemma = render_chat(user, tools=[WEATHER])
    assert function_gemma.startswith("<bos><start_of_turn>developer\n<start_function_declaration>")
    assert render_chat(user, template="{{ messages | length }}", tools=[WEATHER]) == function_gemma
    assert render_chat(user, template=GEMMA3_CHAT_TEMPLATE, tools=[WEATHER]) == function_gemma
    # `Tool`s are taken as they are
    assert render_chat(user, tools=parse_tools([WEATHER])) == function_gemma
    # a tool result alone (no tools declared, no call in view: a history cut to fit) is FunctionGemma's too
    result_only = user + [{"role": "tool", "name": "now", "content": "12:00"}]
    assert render_chat(result_only) == render_chat(result_only, template=GEMMA3_CHAT_TEMPLATE) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_function_response>response:now{value:<escape>12:00<escape>}"
        "<end_function_response>")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "u"}, DOC_MESSAGES[2], {"role": "tool", "name": "now", "content": 42}],
     "message 2: a tool result must be a string or an object"),
    ([{"role": "user", "content": "u", "tool_calls": DOC_MESSAGES[2]["tool_calls"]}],
     "message 0: only assistant messages may carry tool_calls"),
    ([{"role": "user", "content": "u"}, {"role": "robot", "content": "r"}, DOC_MESSAGES[2]],
     "message 1: unknown role 'robot' (expected system, developer, user, assistant or tool)"),
    ([{"role": "developer", "content": 42}, {"role": "user", "content": "u"}],
     "message 0: content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": 42}],
     "message 1: content must be a string or a list of text parts, got int"),
])
def test_tool_conversation_errors_are_exact(messages, message):
    with pytest.raises(Gemma3Error) as info:
        render_chat(messages, tools=[WEATHER])
    assert str(info.value) == message


def test_a_tool_result_needs_a_name_even_unprepared():
    from gemma3.text.chat import _tool_results

    with pytest.raises(Gemma3Error) as info:
        _tool_results({"role": "tool", "content": "12:00"}, 3)
    assert str(info.value) == "message 3: a tool result needs the name of the tool it answers"


def test_differences_from_the_template_are_the_documented_ones():
    # null is written null (the template prints Python's None); JSON-string arguments are parsed first
    assert render_call("f", {"a": None}) == f"{START_CALL}call:f{{a:null}}{END_CALL}"
    as_string = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"b": 2, "a": "s"}'}}]}]
    assert render_chat(as_string, add_generation_prompt=False).endswith(
        "call:f{a:<escape>s<escape>,b:2}<end_function_call><start_function_response>")


def test_checkpoint_template_equals_transformers(tmp_path, official_tokenizer):
    """A FunctionGemma-style checkpoint: its template (tokenizer_config.json) renders tools the way
    transformers' apply_chat_template(..., tools=...) does."""
    from transformers import AutoTokenizer

    from gemma3.loading import chat_template_of
    from gemma3.weights.sources import ResolvedSource

    shutil.copy(official_tokenizer / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((official_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = OFFICIAL
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    template = chat_template_of(ResolvedSource("hf", tmp_path, str(tmp_path)))
    assert template is not None and template.text == OFFICIAL
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(CONVERSATIONS) >= 10
    for name, (messages, tools) in CONVERSATIONS.items():
        for add in (True, False):
            expected = hf.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=add)
            assert render_chat(messages, add, template, tools=tools) == expected, name


# ------------------------------------------------------------------------------------ reading calls back

@settings(max_examples=150, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(["f", "get_x", "a-b"]), st.dictionaries(keys, json_values,
                                                                                        max_size=4)), max_size=3),
       before=st.text(st.characters(blacklist_categories=("Cs",)), max_size=15), split=st.integers(1, 7))
def test_calls_read_back_with_their_types_streamed_or_whole(calls, before, split):
    before = before.replace("<", "")  # no control string in the content
    text = before + "".join(render_call(name, args) for name, args in calls) + START_RESPONSE
    ids = iter(range(1000))
    content, parsed = parse_tool_calls(text, make_id=lambda: f"id{next(ids)}")
    assert content == before
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(n, a) for n, a in calls]
    assert all(c.complete for c in parsed)
    # streamed in pieces of `split` characters: the same content and the same argument text
    parser, streamed, pieces = ToolCallParser(make_id=lambda: "x"), "", {}
    names = {}
    for delta in [parser.push(text[i:i + split]) for i in range(0, len(text), split)] + [parser.finish()]:
        streamed += delta.content
        for index, call_id, name, arguments in delta.calls:
            if call_id is not None:
                assert index not in names and arguments == ""
                names[index] = name
            pieces[index] = pieces.get(index, "") + arguments
    assert streamed == content
    assert [pieces[i] for i in range(len(parsed))] == [c.arguments for c in parsed]
    assert [names[i] for i in range(len(parsed))] == [c.name for c in parsed]


def test_values_keep_their_types():
    _, [call] = parse_tool_calls("<start_function_call>call:f{a:<escape>15<escape>,b:15,c:1.5e3,d:true,e:null,"
                                 "g:None,h:[],i:{},j:{k:[<escape>x, y<escape>,-2]}}<end_function_call>")
    assert json.loads(call.arguments) == {"a": "15", "b": 15, "c": 1500.0, "d": True, "e": None, "g": None, "h": [],
                                          "i": {}, "j": {"k": ["x, y", -2]}}


def test_content_never_shows_control_strings():
    content, calls = parse_tool_calls("Sure.<escape> <end_function_call>ok<start_function_response>")
    assert content == "Sure. ok" and calls == []
    content, calls = parse_tool_calls("a < b <start_of_turn> <start_fun")  # not control strings: kept
    assert content == "a < b <start_of_turn> <start_fun" and calls == []
    content, calls = parse_tool_calls("<start_function_call>call:f{}<end_function_call><start_fun")  # cut off
    assert content == "" and [c.name for c in calls] == ["f"]


def test_a_call_cut_off_stays_incomplete():
    _, [call] = parse_tool_calls("<start_function_call>call:f{a:<escape>par")
    assert not call.complete and call.arguments == '{"a": "par'


# ------------------------------------------------------------------------------------ checking requests

@pytest.mark.parametrize("tools, message", [
    ([WEATHER, WEATHER], "declared twice"),
    ([{"type": "function", "function": {"name": "bad name"}}], "letters, digits"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "letters, digits"),
    ([{"type": "retrieval"}], "must be 'function'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "must be 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a:b": {"type": "string"}}}}}], "cannot be written"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "at most 128"),
    ([{"type": "function", "function": {"name": "f", "description": "x" * 300_000}}], "KiB"),
    ({"type": "function"}, "must be a list"),
])
def test_bad_tools_are_refused_with_the_reason(tools, message):
    with pytest.raises(Gemma3Error, match=message):
        parse_tools(tools)


def test_tool_choice():
    tools = parse_tools([WEATHER])
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice(None, []) == ToolChoice("none")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_current_weather"}}, tools) == \
        ToolChoice("function", "get_current_weather")
    for bad, message in [("always", "must be"), ({"type": "function", "function": {"name": "nope"}}, "not among"),
                         ({"type": "function"}, "must be")]:
        with pytest.raises(Gemma3Error, match=message):
            parse_tool_choice(bad, tools)
    with pytest.raises(Gemma3Error, match="no tools"):
        parse_tool_choice("required", [])


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "tool_call_id": "nope", "content": "1"}], "matches no tool call"),
    ([{"role": "tool", "content": "1"}], "needs a tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}], "not JSON"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": '{"a": NaN}'}}]}], "not JSON"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}], "must be a JSON object"),
])
def test_bad_history_is_refused_with_the_reason(messages, message):
    with pytest.raises(Gemma3Error, match=message):
        prepare_messages([{"role": "user", "content": "u"}] + messages)


# ------------------------------------------------------------------------------------ the grammar

pytest.importorskip("llguidance")

GRAMMAR_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}, "detailed": {"type": "boolean"},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                  "required": ["lat", "lon"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
        "required": ["location", "days"], "additionalProperties": False}}},
    NOARGS,
]


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from gemma3.text.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


def accepts(grammar, tokenizer, text: str) -> bool:
    matcher = grammar.matcher(tokenizer, (1, 106))
    try:
        for token in tokenizer.encode(text, add_bos=False):
            matcher.advance(token)
    except Gemma3Error:
        return False
    return matcher._m.is_accepting()


GOOD = render_call("get_weather", {"location": "Paris", "days": 3})
FULL_ARGS = {"location": "Paris, FR", "days": 14, "unit": "celsius", "detailed": True,
             "where": {"lat": 48.85, "lon": 2.35}, "tags": ["a", "b{c}"]}
FULL = render_call("get_weather", FULL_ARGS)


@pytest.mark.parametrize("mode, text, ok", [
    ("required", GOOD, True),
    ("required", FULL + render_call("now", {}) + START_RESPONSE, True),
    ("required", "Sure. " + GOOD, False),  # required: no text
    ("required", "", False),
    ("required", render_call("get_weather", {"location": "Paris"}), False),  # a required key missing
    ("required", render_call("get_weather", {"location": "Paris", "days": 15}), False),  # out of range
    ("required", render_call("get_weather", {"location": "Paris", "days": 1.5}), False),  # not an integer
    ("required", render_call("get_weather", {"location": "Paris", "days": 2, "unit": "kelvin"}), False),
    ("required", render_call("get_weather", {"location": "x" * 21, "days": 2}), False),  # maxLength
    ("required", render_call("get_weather", {"location": "P", "days": 2, "tags": ["a", "b", "c"]}), False),
    ("required", render_call("get_weather", {"location": "P", "days": 2, "extra": 1}), False),
    ("required", render_call("get_weather", {"location": "P", "days": 2, "where": {"lat": 1}}), False),
    ("required", render_call("launch", {}), False),  # not a declared tool
    ("required", GOOD * 5, False),  # more calls than MAX_CALLS
    ("auto", "Just text, no call.", True),
    ("auto", "Let me check. " + GOOD + START_RESPONSE, True),
    ("auto", "", True),
    ("auto", GOOD + "and text after", False),
    ("auto", f"text {ESCAPE} with a control string", False),
    ("none", "Only text.", True),
    ("none", GOOD, False),
    ("named", render_call("now", {}), True),
    ("named", GOOD, False),
    ("single", GOOD, True),
    ("single", GOOD + render_call("now", {}), False),  # parallel_tool_calls: false
])
def test_grammar_keeps_each_choice_to_its_meaning(tokenizer, mode, text, ok):
    from gemma3.generation.tool_grammar import ToolCallGrammar

    tools = parse_tools(GRAMMAR_TOOLS)
    choice = {"named": ToolChoice("function", "now"), "single": ToolChoice("required")}.get(mode, ToolChoice(mode))
    grammar = ToolCallGrammar.build(tools, choice, parallel=mode != "single")
    assert accepts(grammar, tokenizer, text) == ok


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not' cannot be enforced"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems'"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "only local references"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "unknown type"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}, "do not compile"),
])
def test_schemas_the_grammar_cannot_enforce_are_refused(schema, message):
    from gemma3.generation.tool_grammar import ToolCallGrammar

    tools = parse_tools([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    with pytest.raises(Gemma3Error, match=message):
        ToolCallGrammar.build(tools, ToolChoice("required"))


def test_recursive_refs_and_anyof(tokenizer):
    from gemma3.generation.tool_grammar import ToolCallGrammar

    schema = {"type": "object", "properties": {"tree": {"$ref": "#/$defs/node"},
                                               "v": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
              "required": ["tree"],
              "$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                                                                           "items": {"$ref": "#/$defs/node"}}}}}}
    tools = parse_tools([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    grammar = ToolCallGrammar.build(tools, ToolChoice("required"))
    assert accepts(grammar, tokenizer, render_call("f", {"tree": {"kids": [{"kids": []}, {}]}, "v": 3}))
    assert accepts(grammar, tokenizer, render_call("f", {"tree": {}, "v": "x"}))
    assert not accepts(grammar, tokenizer, render_call("f", {"tree": {"kids": [1]}}))
    assert not accepts(grammar, tokenizer, render_call("f", {"tree": {}, "v": True}))


# ------------------------------------------------------------------------------------ Python API and CLI

def test_generator_chat_and_session_call_tools(real_270m):
    jsonschema = pytest.importorskip("jsonschema")
    from gemma3.generation import ChatSession, GenerationConfig, Generator, SamplingParams

    model, tokenizer = real_270m
    gen = Generator(model, tokenizer)
    messages = [{"role": "system", "content": TRIGGER}, {"role": "user", "content": "Weather in Paris for 3 days?"}]
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in GRAMMAR_TOOLS}
    for seed, choice in [(0, "required"), (1, "required"), (2, {"type": "function", "function": {"name": "now"}})]:
        config = GenerationConfig(max_new_tokens=160, sampling=SamplingParams(temperature=1.0), seed=seed)
        reply = gen.chat(messages, tools=GRAMMAR_TOOLS, tool_choice=choice, config=config)
        assert reply.tool_calls and reply.finish_reason == "tool_calls" and reply.content == ""
        for call in reply.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        if isinstance(choice, dict):
            assert {c.name for c in reply.tool_calls} == {"now"}
    none = gen.chat(messages, tools=GRAMMAR_TOOLS, tool_choice="none", config=GenerationConfig(max_new_tokens=12))
    assert none.tool_calls == [] and none.content

    session = ChatSession(gen, system=TRIGGER, tools=GRAMMAR_TOOLS, tool_choice="required",
                          parallel_tool_calls=False, config=GenerationConfig(max_new_tokens=120,
                                                                             sampling=SamplingParams(temperature=0)))
    assert "".join(session.send("Weather in Paris for 3 days?")) == ""
    [call] = session.pending_calls
    with pytest.raises(Gemma3Error, match="no pending tool call"):
        list(session.send_tool_results({"call_nope": 1}))
    answer = "".join(session.send_tool_results({call.id: {"temp_c": 18}}, tool_choice="none"))
    assert answer and session.pending_calls == []
    rendered = render_chat(session.messages, tools=GRAMMAR_TOOLS)
    assert render_call(call.name, json.loads(call.arguments)) + render_response(call.name, {"temp_c": 18}) in rendered


def test_cli_chat_with_tools(capsys, monkeypatch, tmp_path, tiny_hf_dir):
    import io

    from gemma3.cli import main

    tools_file, mock_file = tmp_path / "tools.json", tmp_path / "results.json"
    tools_file.write_text(json.dumps(GRAMMAR_TOOLS))
    mock_file.write_text(json.dumps({"get_weather": {"temp_c": 18}, "now": "12:00"}))
    monkeypatch.setattr("sys.stdin", io.StringIO("Weather in Paris?\n"))
    code = main(["chat", "--tools", str(tools_file), "--tool-choice", "required", "--no-parallel-tool-calls",
                 "--tool-results", str(mock_file), "-n", "60", "--temperature", "0", "--context", "1024", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[call " in err and "[result " in err
    # bad tool files: one line, exit 2
    for content, flag, message in [("{not json", "--tools", "not valid JSON"),
                                   (json.dumps([GRAMMAR_TOOLS[0]] * 2), "--tools", "declared twice")]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        code = main(["chat", "-m", str(tiny_hf_dir), flag, str(bad), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code = main(["chat", "-m", str(tiny_hf_dir), "--tools", str(tools_file), "--tool-choice", "launch", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not among the declared tools" in err


schema_keywords = st.recursive(
    st.one_of(st.booleans(), st.integers(-3, 300), st.text(max_size=4), st.none(),
              st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "#/$defs/a"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf",
                         "$ref", "$defs", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum",
                         "maximum", "nullable", "additionalProperties", "a", "b", "description"]),
        inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(schema=schema_keywords)
def test_any_schema_builds_or_is_refused_with_a_reason(schema):
    """Whatever a client sends as `parameters`: a grammar, or a Gemma3Error (a 400), never another exception."""
    from gemma3.generation.tool_grammar import ToolCallGrammar

    for parameters in (schema, {"type": "object", "properties": {"p": schema, "q": {"type": "string"}},
                                "required": ["p"], "$defs": {"a": schema}}):
        try:
            tools = parse_tools([{"type": "function", "function": {"name": "f", "parameters": parameters}}])
            ToolCallGrammar.build(tools, ToolChoice("required"))
        except Gemma3Error:
            pass


def test_a_functiongemma_vocabulary_has_the_control_strings_as_single_tokens(functiongemma_tokenizer):
    """FunctionGemma names Gemma 3's <unused40>..<unused46> (ids 46-52, added tokens that are not special) after
    its control strings: a prompt then encodes each one as its single id and decodes back to the same text."""
    tokenizer = functiongemma_tokenizer
    names = dict(zip(range(46, 53), CONTROL_STRINGS))
    text = render_chat(DOC_MESSAGES, add_generation_prompt=False, tools=[WEATHER])
    ids = tokenizer.encode(text, add_bos=False)
    for token_id, name in names.items():
        assert ids.count(token_id) == text.count(name) > 0 or name not in text, name
    assert tokenizer.decode(ids) == text
    call = GOOD + START_RESPONSE
    assert tokenizer.encode(call, add_bos=False)[0] == 48
    _, [parsed] = parse_tool_calls(tokenizer.decode(tokenizer.encode(call, add_bos=False)))
    assert json.loads(parsed.arguments) == {"location": "Paris", "days": 3}


def choice_of(mode: str) -> ToolChoice:
    return {"named": ToolChoice("function", "now"), "single": ToolChoice("required")}.get(mode, ToolChoice(mode))


# values of any shape, and a constant, each with strings inside (<escape> tokens in a rule, not a terminal)
SHAPES = {"type": "function", "function": {"name": "shapes", "parameters": {"type": "object", "properties": {
    "any": {}, "map": {"type": "object", "additionalProperties": {"type": "string", "enum": ["q", "r"]}},
    "fixed": {"const": {"k": ["a", 1]}}}, "required": ["fixed"]}}}
SHAPES_ARGS = {"any": {"x": ["s", 2, None, {"y": "z"}]}, "map": {"m": "q"}, "fixed": {"k": ["a", 1]}}

# per choice: model outputs the grammar accepts, each with what it reads back into (content, [(name, arguments)]),
# and outputs it refuses
CONTROL_TOKEN_CASES = {
    "none": ([("Only text.", ("Only text.", []))],
             [GOOD]),  # a call
    "auto": ([("Let me check. " + FULL + START_RESPONSE, ("Let me check. ", [("get_weather", FULL_ARGS)])),
              ("Just text.", ("Just text.", []))],
             ["Let me check. " + render_call("launch", {}),  # not a declared tool
              f"text {ESCAPE} outside a call"]),
    "required": ([(FULL + render_call("now", {}) + START_RESPONSE, ("", [("get_weather", FULL_ARGS), ("now", {})])),
                  (render_call("get_weather", {"location": "", "days": 1}),  # two <escape> tokens in a row
                   ("", [("get_weather", {"location": "", "days": 1})])),
                  (render_call("shapes", SHAPES_ARGS), ("", [("shapes", SHAPES_ARGS)]))],
                 ["Sure. " + GOOD,  # text
                  render_call("get_weather", {"location": "Paris", "days": 2, "unit": "kelvin"}),  # enum
                  render_call("shapes", {**SHAPES_ARGS, "fixed": {"k": ["b", 1]}}),  # not the constant
                  render_call("shapes", {**SHAPES_ARGS, "map": {"m": "s"}})]),  # enum
    "named": ([(render_call("now", {}), ("", [("now", {})]))],
              [GOOD]),
    "single": ([(GOOD, ("", [("get_weather", {"location": "Paris", "days": 3})]))],
               [GOOD + render_call("now", {})]),  # parallel_tool_calls: false
}


def drive(grammar, tokenizer, text: str) -> ToolCallParser | None:
    """Feed `text`'s tokens to a matcher and, decoded one by one, to a parser; the parser, or None where the
    grammar refuses the text."""
    ids = tokenizer.encode(text, add_bos=False)
    matcher, parser = grammar.matcher(tokenizer, (1, 106)), ToolCallParser()
    try:
        for token in ids:
            matcher.advance(token)
            parser.push(tokenizer.decode([token]))
    except Gemma3Error:
        return None
    parser.finish()
    return parser if matcher._m.is_accepting() else None


@pytest.mark.parametrize("mode", list(CONTROL_TOKEN_CASES))
def test_grammar_takes_single_token_control_strings_by_id(functiongemma_tokenizer, mode):
    """Where each control string is one token (llguidance never matches such a token against a literal's text),
    the grammar still keeps each choice to its meaning, and what it accepts, fed token by token, reads back into
    the same typed calls."""
    from gemma3.generation.tool_grammar import ToolCallGrammar

    tokenizer = functiongemma_tokenizer
    grammar = ToolCallGrammar.build(parse_tools(GRAMMAR_TOOLS + [SHAPES]), choice_of(mode),
                                    parallel=mode != "single", tokenizer=tokenizer)
    accepted, refused = CONTROL_TOKEN_CASES[mode]
    for text, (content, calls) in accepted:
        ids = tokenizer.encode(text, add_bos=False)
        assert sum(46 <= i <= 52 for i in ids) == sum(text.count(c) for c in CONTROL_STRINGS)  # one token each
        parser = drive(grammar, tokenizer, text)
        assert parser is not None, text
        assert parser.text == content
        # compared as JSON text: 14 and 14.0, or true and 1, would be equal as Python values
        assert [(c.name, json.dumps(json.loads(c.arguments), sort_keys=True)) for c in parser.calls] == \
            [(name, json.dumps(args, sort_keys=True)) for name, args in calls]
    for text in refused:
        assert drive(grammar, tokenizer, text) is None, text


def test_the_grammar_cache_keys_on_the_control_token_ids(tokenizer, functiongemma_tokenizer):
    """Gemma 3's vocabulary (control strings as text) gets the grammar built without a tokenizer, the very same
    cached one; FunctionGemma's gets its own, with the control tokens by id."""
    from gemma3.generation.tool_grammar import ToolCallGrammar

    tools, choice = parse_tools(GRAMMAR_TOOLS), ToolChoice("auto")
    as_text = ToolCallGrammar.build(tools, choice)
    assert ToolCallGrammar.build(tools, choice, tokenizer=tokenizer) is as_text
    by_id = ToolCallGrammar.build(tools, choice, tokenizer=functiongemma_tokenizer)
    assert "<[48]>" in by_id.grammar and "<[48]>" not in as_text.grammar


# strings bounded: a random model almost never picks the one token that closes a string
BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["location", "days"]}}},
    NOARGS,
]


def test_generator_chat_writes_calls_with_the_control_tokens(tiny_functiongemma):
    """A random model over the FunctionGemma-style vocabulary, told tool_choice="required", writes its calls with
    the single control tokens, and they read back into calls that validate against their schemas."""
    jsonschema = pytest.importorskip("jsonschema")
    from gemma3.generation import GenerationConfig, Generator, SamplingParams

    model, tokenizer = tiny_functiongemma
    gen = Generator(model, tokenizer)
    messages = [{"role": "system", "content": TRIGGER}, {"role": "user", "content": "Weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in BOUNDED_TOOLS}
    for seed, parallel in [(0, True), (1, False)]:
        config = GenerationConfig(max_new_tokens=200, sampling=SamplingParams(temperature=1.0), seed=seed)
        reply = gen.chat(messages, tools=BOUNDED_TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                         config=config)
        assert reply.tool_calls and reply.finish_reason == "tool_calls" and reply.content == ""
        ids = reply.result.token_ids
        assert ids[0] == 48 and ids.count(48) == ids.count(49) == len(reply.tool_calls) <= (3 if parallel else 1)
        for call in reply.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
