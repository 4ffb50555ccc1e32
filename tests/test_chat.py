"""Chat rendering: the built-in Gemma 3 format and the sandboxed official template both equal transformers'
`apply_chat_template` with the official tokenizer; invalid conversations fail in all three; the sandbox holds."""

from __future__ import annotations

import json

import jinja2
import pytest

from gemma3.text.chat import render_chat
from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE
from gemma3.errors import Gemma3Error

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "system is not stripped, turns are": [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "\n  Hi there  \n"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Arr, a pirate!"},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "ends with the model": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 "},
    ],
    "role model": [
        {"role": "user", "content": "Hello"},
        {"role": "model", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ],
    "unicode": [
        {"role": "user", "content": "日本語で答えて 👨‍👩‍👧 丣 naïve\ttab"},
        {"role": "assistant", "content": "はい 😀"},
        {"role": "user", "content": "Ünïcödé <b>tags</b> & \"quotes\" {{ not jinja }}"},
    ],
    "content parts": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in French. "}]},
        {"role": "user", "content": [{"type": "text", "text": " Hello "}, {"type": "text", "text": "world\n"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
        {"role": "user", "content": "Merci"},
    ],
    "extra keys": [{"role": "user", "content": "Hi", "name": "ann"}],
    "empty content": [{"role": "user", "content": ""}, {"role": "assistant", "content": "?"}],
}

INVALID_EVERYWHERE = {
    "two user turns": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "leading assistant": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
    "assistant after system": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    "bad role": [{"role": "robot", "content": "a"}],
    "bad role later": [{"role": "user", "content": "a"}, {"role": "model", "content": "b"},
                       {"role": "tool", "content": "c"}],
    "content not text": [{"role": "user", "content": 42}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(official_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(official_tokenizer))


# The official template plus a Jinja comment: the same text, but not recognised as the official template,
# so it goes through the sandboxed Jinja renderer (the official one itself takes the built-in renderer).
SANDBOXED = GEMMA3_CHAT_TEMPLATE + "{# rendered by Jinja #}"


def hf_render(hf_tokenizer, messages, add_generation_prompt):
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_constant_is_the_official_template(official_tokenizer):
    config = json.loads((official_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert GEMMA3_CHAT_TEMPLATE == config["chat_template"]


def test_spec_example():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_matches_transformers(hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_render(hf_tokenizer, messages, add_generation_prompt)
    assert render_chat(messages, add_generation_prompt) == expected
    assert render_chat(messages, add_generation_prompt, template=SANDBOXED) == expected


@pytest.mark.parametrize("name", INVALID_EVERYWHERE)
def test_invalid_conversations_fail_everywhere(hf_tokenizer, name):
    messages = INVALID_EVERYWHERE[name]
    with pytest.raises(jinja2.TemplateError):
        hf_render(hf_tokenizer, messages, True)
    with pytest.raises(Gemma3Error):
        render_chat(messages)
    with pytest.raises(Gemma3Error):
        render_chat(messages, template=SANDBOXED)


def test_alternation_error_message():
    with pytest.raises(Gemma3Error, match=r"roles must alternate user/model/user/model\.\.\. \(message 1 is 'user'\)"):
        render_chat(INVALID_EVERYWHERE["two user turns"])
    with pytest.raises(Gemma3Error, match="chat template: Conversation roles must alternate"):
        render_chat(INVALID_EVERYWHERE["two user turns"], template=SANDBOXED)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("Hi", "non-empty list"),
        (["Hi"], "message 0 must be a dict"),
        ([{"role": "user"}], "'role' and a 'content'"),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only the first message"),
        # The official template would render these two as "<start_of_turn>tool" and drop the image:
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "a tool message needs a tool_call_id"),
        ([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], "got 'image'"),
        ([{"role": "user", "content": None}], "content must be a string"),
    ],
)
def test_builtin_validation(messages, match):
    with pytest.raises(Gemma3Error, match=match):
        render_chat(messages)


# --- the sandbox ------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi <b>"}]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ messages.append(1) }}",  # immutable: the caller's data cannot be changed
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace(__class__=1) %}",
        "{% set ns = namespace(a=1) %}{% set ns._x = 2 %}",
    ],
)
def test_sandbox_blocks_escapes(template):
    with pytest.raises(Gemma3Error, match="chat template"):
        render_chat(MESSAGES, template=template)
    assert MESSAGES == [{"role": "user", "content": "Hi <b>"}]


def test_dunder_lookup_renders_nothing():
    assert render_chat(MESSAGES, template="[{{ ''.__class__ }}]") == "[]"


def test_template_environment_matches_transformers(hf_tokenizer):
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ bos_token }}{{ eos_token }}|{{ dict(a=1)['a'] }}{% endfor %}\n"
        "  {% if add_generation_prompt %}GEN{% endif %}\n"
        "{% set ns = namespace(n=0) %}{% set ns.n = 5 %}{{ ns.n }}"
    )
    messages = MESSAGES + [{"role": "assistant", "content": None}]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    assert render_chat(messages, template=template) == expected
    assert expected == '{"role": "user", "content": "Hi <b>"}|<bos><end_of_turn>|1GEN5'


def test_template_errors_become_gemma3_errors():
    with pytest.raises(Gemma3Error, match="chat template: boom"):
        render_chat(MESSAGES, template="{{ raise_exception('boom') }}")
    with pytest.raises(Gemma3Error, match="chat template"):
        render_chat(MESSAGES, template="{% if %}")
    with pytest.raises(Gemma3Error, match="only strings, numbers"):
        render_chat([{"role": "user", "content": object()}], template=SANDBOXED)


# --- bounds on a checkpoint's template (docs/security.md): time, memory, output ------------------------------------

def test_official_template_takes_the_builtin_renderer():
    messages = CONVERSATIONS[next(iter(CONVERSATIONS))]
    assert render_chat(messages, template=GEMMA3_CHAT_TEMPLATE) == render_chat(messages) == \
        render_chat(messages, template=SANDBOXED)


@pytest.mark.parametrize(("template", "match"), [
    # hours of nested loops: stopped by the time limit, and the worker is killed
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than"),
    # a string doubled 40 times (a terabyte): the worker's address space is limited
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "memory"),
    ("{{ 'x' * 10**10 }}", "memory"),
    ("{{ '%0999999999d' % 1 }}", "memory"),
    # many small pieces: the output cap
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "rendered more than"),
])
def test_runaway_templates_fail_fast_with_bounded_memory(template, match):
    import resource
    import time

    from gemma3.text.chat import TEMPLATE_SECONDS, ChatTemplate

    # The worker up before the clock starts: a cold interpreter's start (up to 30 s on a busy machine, allowed for
    # in _TemplateProcess._start) is not the rendering's time. The limit itself is wall time, a deadline on the
    # parent's clock, so wall time is what is bounded: the overrun stopped within a second of TEMPLATE_SECONDS
    # (measured on a 2-core machine under a load average of 6: at most TEMPLATE_SECONDS + 0.1 s).
    assert render_chat(MESSAGES, template="{{ messages[0]['content'] }}!") == "Hi <b>!"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(Gemma3Error, match=match) as info:
        render_chat(MESSAGES, template=ChatTemplate(template, "ckpt/tokenizer_config.json"))
    assert time.monotonic() - start < TEMPLATE_SECONDS + 1
    assert str(info.value).startswith("ckpt/tokenizer_config.json: chat template") and "\n" not in str(info.value)
    # this process never held the rendering: its peak RSS did not grow by more than a little
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB
    # and the worker comes back for the next rendering
    assert render_chat(MESSAGES, template="{{ messages[0]['content'] }}!") == "Hi <b>!"


def test_template_worker_memory_is_capped():
    """The child's own peak memory stays under its limit while failing a runaway template (measured in a fresh
    process, whose only child is the template worker)."""
    import subprocess
    import sys

    from gemma3.text import template_worker

    script = (
        "import resource\n"
        "from gemma3.text.chat import render_chat, _TEMPLATES\n"
        "from gemma3.errors import Gemma3Error\n"
        "try:\n"
        "    render_chat([{'role': 'user', 'content': 'Hi'}], template=\"{{ 'x' * 10**10 }}\")\n"
        "except Gemma3Error as e:\n"
        "    print(e)\n"
        "_TEMPLATES.close()\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert "used more than its 512 MiB of memory" in out[0]
    assert 0 < int(out[1]) < template_worker.MEMORY_BYTES


# --- every error is one exact line that names the message ------------------------------------------------------

@pytest.mark.parametrize(("messages", "message"), [
    (42, "a conversation must be a non-empty list of messages"),
    (iter([{"role": "user", "content": "Hi"}]), "a conversation must be a non-empty list of messages"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
     "message 1: unknown role 'robot' (expected system, user, assistant or model)"),
    # the index counts the system message too
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "conversation roles must alternate user/model/user/model... (message 2 is 'user')"),
    ([{"role": "system", "content": 42}, {"role": "user", "content": "a"}],
     "message 0: content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 4.5}],
     "message 1: content must be a string or a list of text parts, got float"),
    ([{"role": "user", "content": ["Hi"]}],
     "message 0: content parts must be {'type': 'text', 'text': ...}, got 'str'"),
    ([{"role": "user", "content": [{"type": "text", "text": 42}]}],
     "message 0: content parts must be {'type': 'text', 'text': ...}, got 'text'"),
])
def test_builtin_errors_are_exact(messages, message):
    with pytest.raises(Gemma3Error) as info:
        render_chat(messages)
    assert str(info.value) == message


def test_system_text_parts_are_joined_as_written():
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_objects_in_messages_are_refused_by_type():
    with pytest.raises(Gemma3Error) as info:
        render_chat([{"role": "user", "content": "Hi", "meta": object()}], template=SANDBOXED)
    assert str(info.value) == "chat messages may hold only strings, numbers, lists and dicts, got object"


def test_a_template_sees_documents_none_and_no_tools_as_none():
    assert render_chat(MESSAGES, template="{{ documents }}|{{ tools }}|{{ image_token }}") == \
        "None|None|<image_soft_token>"


def test_a_lone_surrogate_is_refused_in_one_line():
    with pytest.raises(Gemma3Error) as info:
        render_chat([{"role": "user", "content": "a\ud800b"}], template="{{ messages[0]['content'] }}")
    assert str(info.value) == "chat template: the template or the messages are not valid Unicode (a lone surrogate)"
    assert render_chat(MESSAGES, template="{{ messages[0]['content'] }}") == "Hi <b>"


def test_a_long_rendering_comes_back_whole():
    # far more than a pipe holds (64 KiB) and than one read takes (1 MiB): the reply arrives in pieces
    assert render_chat(MESSAGES, template="{{ 'ab' * 700000 }}") == "ab" * 700000


# --- the worker process: its start, its end, the protocol's checks -------------------------------------------------

def test_a_worker_ends_by_itself_when_closed_and_keeps_no_stderr_or_parent_fds():
    import os
    from pathlib import Path

    from gemma3.text.chat import ChatTemplate, _TemplateProcess

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc")
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    renderer = _TemplateProcess()
    renderer.close()  # never started: nothing to do
    try:
        assert renderer.render(ChatTemplate("{{ messages[0] }}"), ["x"], True, {}) == "x"
        proc = renderer.proc
        # a crash's traceback never lands in a chat REPL's terminal; the parent's open files stay the parent's
        assert os.readlink(f"/proc/{proc.pid}/fd/2") == os.devnull
        assert str(inherited) not in os.listdir(f"/proc/{proc.pid}/fd")
    finally:
        os.close(inherited)
    renderer.close()
    assert renderer.proc is None and proc.returncode == 0  # it exited at the end of its input, not killed
    assert renderer.render(ChatTemplate("{{ messages[1] }}"), ["x", "y"], True, {}) == "y"  # and starts afresh
    renderer.close()


FAKE_WORKER = """
import json, os, struct, sys, time
HEADER = struct.Struct(">Q")
def send(message, pad=0):
    data = json.dumps(message).encode() + b" " * pad
    sys.stdout.buffer.write(HEADER.pack(len(data)) + data)
    sys.stdout.buffer.flush()
def receive():
    header = sys.stdin.buffer.read(HEADER.size)
    return json.loads(sys.stdin.buffer.read(HEADER.unpack(header)[0])) if header else None
"""


@pytest.fixture()
def fake_worker(monkeypatch, tmp_path):
    """A _TemplateProcess whose worker is the given script (FAKE_WORKER's helpers, then `body`)."""
    from gemma3.text import chat

    renderers = []

    def make(body: str):
        script = tmp_path / f"worker{len(renderers)}.py"
        script.write_text(FAKE_WORKER + body, encoding="utf-8")
        monkeypatch.setattr(chat.worker, "__file__", str(script))
        renderers.append(chat._TemplateProcess())
        return renderers[-1]

    yield make
    for renderer in renderers:
        renderer.close()


def render_with(renderer):
    from gemma3.text.chat import ChatTemplate

    return renderer.render(ChatTemplate("t", "ckpt/tokenizer_config.json"), [], True, {})


@pytest.mark.parametrize(("body", "message"), [
    ("send({'ready': False})", "worker did not start"),
    ("send({'ready': True})\nreceive()", "stopped the renderer (it used more than 512 MiB of memory, or crashed)"),
    # it stops reading: the request cannot be written
    ("os.close(0)\nsend({'ready': True})\ntime.sleep(30)", "renderer stopped unexpectedly"),
])
def test_a_worker_that_fails_is_reported_in_one_line(fake_worker, body, message):
    with pytest.raises(Gemma3Error) as info:
        render_with(fake_worker(body))
    assert str(info.value) == f"ckpt/tokenizer_config.json: chat template {message}"


def test_a_reply_longer_than_the_longest_rendering_is_refused(fake_worker, monkeypatch):
    from gemma3.text import chat

    monkeypatch.setattr(chat, "TEMPLATE_MAX_CHARS", 10)
    longest = 8 * 10 + 4096  # JSON of 10 characters, each escaped, and the rest of the reply
    renderer = fake_worker("send({'ready': True})\n"
                           f"receive(); send({{'text': 'ok'}}, pad={longest} - len(json.dumps({{'text': 'ok'}})))\n"
                           f"receive(); sys.stdout.buffer.write(HEADER.pack({longest + 1})); sys.stdout.flush()\n"
                           "time.sleep(30)")
    assert render_with(renderer) == "ok"
    with pytest.raises(Gemma3Error) as info:
        render_with(renderer)
    assert str(info.value) == "ckpt/tokenizer_config.json: chat template sent an oversized reply"


def test_a_reply_is_read_by_its_length_even_in_pieces(fake_worker):
    """The first reply arrives in two pieces, its second piece together with the next reply: each request gets its
    own reply, read to its length and no further."""
    renderer = fake_worker("send({'ready': True})\n"
                           "one, two = json.dumps({'text': 'one'}).encode(), json.dumps({'text': 'two'}).encode()\n"
                           "receive(); sys.stdout.buffer.write(HEADER.pack(len(one)) + one[:5]); sys.stdout.flush()\n"
                           "time.sleep(0.2)\n"
                           "sys.stdout.buffer.write(one[5:] + HEADER.pack(len(two)) + two); sys.stdout.flush()\n"
                           "receive(); receive()")
    assert render_with(renderer) == "one"
    assert render_with(renderer) == "two"


@pytest.mark.parametrize(("later", "starts"), [(29.0, True), (30.01, False)])
def test_a_worker_has_thirty_seconds_to_start(fake_worker, monkeypatch, later, starts):
    """A clock that jumps `later` seconds once the start's deadline is set: within 30 s the worker is taken."""
    import time

    from gemma3.text import chat

    class Clock:
        calls = 0

        def monotonic(self):
            self.calls += 1
            return time.monotonic() + (later if self.calls > 1 else 0)

    renderer = fake_worker("send({'ready': True})\nreceive()\nsend({'text': 'ok'})\nreceive()")
    monkeypatch.setattr(chat, "time", Clock())
    if starts:
        assert render_with(renderer) == "ok"
    else:
        with pytest.raises(Gemma3Error, match="took longer than 2 s"):
            render_with(renderer)


def test_a_worker_that_ignores_the_end_of_its_input_is_killed_two_seconds_after_close(fake_worker):
    import time

    renderer = fake_worker("send({'ready': True})\nreceive()\nsend({'text': 'ok'})\ntime.sleep(30)")
    assert render_with(renderer) == "ok"
    proc, start = renderer.proc, time.monotonic()
    renderer.close()
    assert 2 <= time.monotonic() - start < 2.8 and proc.returncode < 0


def test_a_rendering_has_the_whole_time_limit(monkeypatch):
    """A quick rendering under a limit of half a second: the whole limit is the rendering's, to its last moment."""
    from gemma3.text import chat

    assert render_chat(MESSAGES, template="{{ messages[0]['content'] }}?") == "Hi <b>?"  # the worker is up
    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.5)
    assert render_chat(MESSAGES, template="{{ messages[0]['content'] }}.") == "Hi <b>."


def test_the_output_cap_is_the_callers(monkeypatch):
    from gemma3.text import chat

    monkeypatch.setattr(chat, "TEMPLATE_MAX_CHARS", 5)
    assert render_chat(MESSAGES, template="{{ 'x' * 5 }}") == "xxxxx"
    with pytest.raises(Gemma3Error) as info:
        render_chat(MESSAGES, template="{{ 'x' * 6 }}")
    assert str(info.value) == "chat template: rendered more than 5 characters"


def test_without_fork_templates_render_in_process_with_the_output_cap(monkeypatch):
    from gemma3.text import chat
    from gemma3.text.chat import ChatTemplate

    monkeypatch.setattr(chat, "_CAN_FORK", False)
    monkeypatch.setattr(chat, "_ENV", None)
    monkeypatch.setattr(chat.worker, "_compiled", {})  # nothing compiled before
    monkeypatch.setattr(chat, "TEMPLATE_MAX_CHARS", 20)
    template = "{{ messages[0]['content'] }}|{{ add_generation_prompt }}|{{ bos_token }}"
    assert render_chat(MESSAGES, add_generation_prompt=False, template=template) == "Hi <b>|False|<bos>"
    environment = chat._ENV
    assert environment is not None
    with pytest.raises(Gemma3Error) as info:
        render_chat(MESSAGES, template="{{ 'x' * 21 }}")
    assert str(info.value) == "chat template: rendered more than 20 characters"
    with pytest.raises(Gemma3Error) as info:
        render_chat(MESSAGES, template=ChatTemplate("{{ raise_exception('boom') }}", "ckpt/tokenizer_config.json"))
    assert str(info.value) == "ckpt/tokenizer_config.json: chat template: boom"
    assert chat._ENV is environment  # made once
