"""The playground page that `gemma3 serve` serves at `/`, in a real browser: headless Chromium driven by Selenium,
against a real server on the embedded 270M that requires an API key.

What must hold (issue #30): replies stream in and can be stopped, regenerated, edited and resent; a JSON-schema
reply parses and validates; a tool call shows as a card and a typed result continues the chat; the inside view
opens on a token with probabilities that make sense; whatever the model writes is inert (no script runs, no
link navigates, no <script>/<img> reaches the DOM), whether it comes from an imported file or from the live model;
a conversation exported and imported back is unchanged; without the key the page says so; the page paints in
under a second; the CSP is sent and the browser reports no violation of it.

Greedy and short wherever possible: the whole file takes about two minutes on two cores. With
GEMMA3_SCREENSHOTS=DIR set, it saves the README's pictures there (a chat, a tool call, the inside view).

Skipped with the reason where Selenium, Chromium or chromedriver is missing; CI installs them (.ci/run) and
fails without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from test_serve import KEY, Server  # noqa: E402  (the same server harness)

UI = Path(__file__).resolve().parents[1] / "src" / "gemma3" / "serve" / "ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
EVIL = "<script>alert(1)</script><img src=x onerror=alert(1)>[x](javascript:alert(1))"
WAIT = 90  # seconds for a reply on a busy 2-core machine; the tests are greedy and short, most take 1-3 s

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None


def browser_missing() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not os.path.exists(path):
            return f"{what} is not installed (apt-get install chromium chromium-driver)"
    return None


# ------------------------------------------------------------------------------------------------ static checks
# (no browser needed: what the page's files must never contain)

def test_the_page_has_no_inline_script_handler_or_style():
    html = (UI / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", html, flags=re.I), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", html, flags=re.I), "an inline style attribute"
    assert not re.search(r"(src|href)\s*=\s*\"(https?:)?//", html), "something loaded from elsewhere"


def test_the_scripts_never_write_html():
    """Model text reaches the page through textContent and createElement only."""
    for path in UI.glob("*.js"):
        # the code without its comments (which may name what it avoids)
        code = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
        code = "\n".join(line for line in code.splitlines() if not line.strip().startswith("//"))
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "setAttribute(\"style\"", "setAttribute(\"href\"", ".href =", "DOMParser", "createContextualFragment"):
            if sink == ".href =" and path.name == "app.js":  # the export's own blob: URL, never model text
                assert code.count(sink) == 1 and "a.href = url;" in code
                continue
            assert sink not in code, f"{path.name} uses {sink}"


# ------------------------------------------------------------------------------------------------ browser harness

@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-batch", "2", "--context", "1024", "--quiet")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    reason = browser_missing()
    if reason and os.environ.get("CI"):  # CI installs them (.ci/run): missing there is a failure, not a skip
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield d
    d.quit()


@pytest.fixture(autouse=True)
def no_csp_violation_or_script_error(request):
    """After each browser test: the console holds no CSP violation and no uncaught error."""
    yield
    if "page" not in request.fixturenames:
        return
    d = request.getfixturevalue("driver")
    bad = [e["message"] for e in d.get_log("browser")
           if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
           or "Uncaught" in e["message"]]
    assert not bad, bad


class Page:
    """The playground in the browser, with the few moves the tests make."""

    def __init__(self, driver, url):
        self.d, self.url = driver, url

    def open(self, key: str | None = KEY):
        """A fresh page: no conversations, no settings, the key (or none) in this tab's session storage."""
        self.d.get(self.url + "/")
        self.d.execute_script("localStorage.clear(); sessionStorage.clear();"
                              + (f"sessionStorage.setItem('gemma3.apiKey', {json.dumps(key)});" if key else ""))
        self.d.get(self.url + "/")
        if key:
            self.wait(lambda d: self.id("model-name").text == "gemma-3-270m", "the model's name")
        return self

    def wait(self, condition, what: str, timeout: float = WAIT):
        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(condition, f"waiting for {what}")

    def id(self, name):
        return self.d.find_element(By.ID, name)

    def css(self, selector, root=None):
        return (root or self.d).find_elements(By.CSS_SELECTOR, selector)

    def set(self, **fields):
        """Sampling fields by their input ids (the panel is open by default)."""
        for name, value in fields.items():
            box = self.id(name)
            box.clear()
            box.send_keys(str(value))

    def open_panel(self, panel_id):
        panel = self.id(panel_id)
        if not panel.get_attribute("open"):
            panel.find_element(By.TAG_NAME, "summary").click()

    def send(self, text):
        self.id("prompt").send_keys(text, Keys.ENTER)

    def replies(self):
        return self.css("article.msg-assistant")

    def wait_replies(self, count):
        self.wait(lambda d: len(self.replies()) == count and not self.css("article.streaming")
                  and self.id("send").is_enabled(), f"{count} finished replies")
        return self.replies()

    def conversation(self) -> dict:
        """The current conversation as the page stored it."""
        state = json.loads(self.d.execute_script("return localStorage.getItem('gemma3.playground.conversations')"))
        return next(c for c in state["conversations"] if c["id"] == state["current"])

    def shot(self, name):
        folder = os.environ.get("GEMMA3_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.d.save_screenshot(str(Path(folder) / name))


@pytest.fixture
def page(driver, server):
    return Page(driver, server.url).open()


def assert_inert(page, article):
    """No element a reply could run code with, no dialog, and a click on its link goes nowhere."""
    assert not page.css("script, img, iframe, object, embed, a[href], [onerror], [onclick]", article)
    links = page.css(".md-link", article)
    assert links and links[0].get_attribute("title") == "javascript:alert(1)"
    before = page.d.current_url
    links[0].click()
    time.sleep(0.3)  # a dialog or a navigation would have happened by now; the checks below are the test
    with pytest.raises(NoAlertPresentException):
        page.d.switch_to.alert
    assert page.d.current_url == before
    assert "<script>alert(1)</script>" in article.text


# ------------------------------------------------------------------------------------------------ the page itself

def test_served_with_the_csp_and_first_paint_under_a_second(driver, server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    js = httpx.get(server.url + "/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401  # the API still needs it
    driver.get(server.url + "/")
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return performance.getEntriesByType('paint').some(e => e.name === 'first-contentful-paint')"))
    fcp = driver.execute_script("return performance.getEntriesByType('paint')"
                                ".find(e => e.name === 'first-contentful-paint').startTime")
    assert fcp < 1000, f"first contentful paint after {fcp:.0f} ms"
    bad = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not bad, bad


def test_without_the_key_the_page_asks_for_it(driver, server):
    page = Page(driver, server.url).open(key=None)
    banner = page.id("banner")
    page.wait(lambda d: banner.is_displayed() and "API key" in banner.text, "the 401 message")
    key = page.id("api-key")
    assert key.get_attribute("type") == "password"
    key.send_keys(KEY, Keys.TAB)  # a change event: the page asks again, with the key
    page.wait(lambda d: not banner.is_displayed() and page.id("model-name").text == "gemma-3-270m", "the model")
    assert KEY not in driver.execute_script("return JSON.stringify(localStorage)")
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not any(KEY in u for u in urls)
    messages = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m or "Uncaught" in m]


# ------------------------------------------------------------------------------------------------ chat

def test_streams_a_reply_with_its_speed(page):
    page.set(temperature=0, max_tokens=40)
    # record the reply's text length at every change while it streams
    page.d.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const body = document.querySelector('article.msg-assistant.streaming .msg-body');
          if (body) window.lengths.push(body.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    prompt = page.id("prompt")
    prompt.send_keys("Write one sentence about the sea.")
    ActionChains(page.d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    prompt.send_keys("Then stop.")
    assert prompt.get_attribute("value") == "Write one sentence about the sea.\nThen stop."  # Shift+Enter: a line
    assert not page.replies()
    prompt.send_keys(Keys.ENTER)
    reply = page.wait_replies(1)[0]
    lengths = [n for n in page.d.execute_script("return window.lengths") if n]
    assert len(set(lengths)) >= 3, lengths  # the text grew while it streamed, not all at once
    assert lengths == sorted(lengths)
    assert page.css("article.msg-user .msg-body")[0].text == "Write one sentence about the sea.\nThen stop."
    message = page.conversation()["messages"][1]
    assert message["content"].strip() and message["finish_reason"] in ("stop", "length")
    timings = message["timings"]  # the server's, shown under the reply
    assert timings["prompt_n"] == len(message["prompt_token_ids"])
    assert timings["predicted_n"] == len(message["token_ids"]) - 1
    speed = reply.find_element(By.CSS_SELECTOR, ".speed").text
    assert re.search(r"prefill [\d.]+ tok/s .* decode [\d.]+ tok/s", speed), speed
    assert len(page.css(".chip", reply)) == len(message["token_ids"])


def test_stop_keeps_the_partial_reply(page, server):
    page.set(temperature=0, max_tokens=400)
    page.send("Tell me a long story about a lighthouse keeper.")
    page.wait(lambda d: page.css("article.streaming") and len(page.css("article.streaming .msg-body")[0].text) > 20,
              "some streamed text")
    page.id("stop").click()
    reply = page.wait_replies(1)[0]
    message = page.conversation()["messages"][1]
    assert message["stopped"] is True and message["content"].strip()
    assert len(message["token_ids"]) < 400
    assert "stopped by you" in reply.text
    # the browser closed the stream, and the server freed the row
    WebDriverWait(page.d, 10, poll_frequency=0.2).until(
        lambda d: httpx.get(server.url + "/health").json()["active"] == 0, "the server to free the row")


def test_regenerate_replaces_the_reply(page):
    page.set(temperature=0, max_tokens=6)
    page.send("The capital of France is")
    first = page.wait_replies(1)[0]
    first_ids = page.conversation()["messages"][1]["token_ids"]
    assert len(first_ids) <= 6
    page.set(max_tokens=12)
    first.find_element(By.CSS_SELECTOR, "button.regenerate").click()
    page.wait(lambda d: len(page.conversation()["messages"][-1].get("token_ids", [])) > len(first_ids)
              and not page.css("article.streaming"), "the new reply")
    messages = page.conversation()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["token_ids"][:len(first_ids)] == first_ids  # greedy: the longer reply starts the same
    assert len(page.replies()) == 1


def test_edit_and_resend(page):
    page.set(temperature=0, max_tokens=6)
    page.send("Name a colour.")
    page.wait_replies(1)
    before = page.conversation()["messages"][1]["prompt_token_ids"]
    page.css("article.msg-user button.edit")[0].click()
    editor = page.css("form.editor textarea")[0]
    editor.clear()
    editor.send_keys("Name a fruit.", Keys.ENTER)
    page.wait(lambda d: page.conversation()["messages"][-1].get("prompt_token_ids") not in (None, before)
              and not page.css("article.streaming"), "the reply to the edited message")
    messages = page.conversation()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Name a fruit."
    assert page.css("article.msg-user .msg-body")[0].text == "Name a fruit."
    assert len(page.replies()) == 1


def test_completion_mode(page):
    page.id("mode-completion").click()
    page.set(temperature=0, max_tokens=40)
    page.send("The capital of France is")
    reply = page.wait_replies(1)[0]
    message = page.conversation()["messages"][1]
    assert page.conversation()["mode"] == "completion"
    assert len(message["prompt_token_ids"]) == 6  # <bos> + 5 tokens: the plain prompt, no chat template
    assert "The capital of France is" + message["content"] in reply.find_element(By.CSS_SELECTOR, ".msg-body").text
    page.shot("playground-chat.png")  # the base model at what it does well (the README's quick start text)


def test_json_schema_reply_validates(page):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    page.set(temperature=0, max_tokens=60)
    page.open_panel("schema-panel")
    page.id("schema-on").click()
    page.d.execute_script("const s = document.getElementById('schema'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", json.dumps(schema))
    page.send("The capital of France, as JSON.")
    page.wait_replies(1)
    reply = json.loads(page.conversation()["messages"][1]["content"])
    jsonschema.validate(reply, schema)


def test_tool_call_card_and_a_typed_result(page):
    page.set(temperature=0, max_tokens=64)
    page.open_panel("tools-panel")
    page.id("tools-on").click()
    if page.id("parallel-calls").is_selected():  # one call a turn: the base model would go on to a second
        page.id("parallel-calls").click()
    Select(page.id("tool-choice")).select_by_value("required")
    page.send("What is the weather in Tokyo?")
    reply = page.wait_replies(1)[0]
    card = page.css("details.tool-card", reply)
    assert len(card) == 1 and card[0].tag_name == "details" and card[0].get_attribute("open")
    assert card[0].find_element(By.CSS_SELECTOR, "summary .tool-name").text == "get_weather"
    call = page.conversation()["messages"][1]["tool_calls"][0]
    assert "city" in json.loads(call["function"]["arguments"])
    page.shot("playground-tools.png")
    # the result, typed in the card; then the chat goes on (tool_choice none: a text answer)
    Select(page.id("tool-choice")).select_by_value("none")
    page.set(max_tokens=16)
    card[0].find_element(By.CSS_SELECTOR, "form.tool-result textarea").send_keys('{"temp_c": 15}', Keys.ENTER)
    page.wait_replies(2)
    messages = page.conversation()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_call_id"] == call["id"] and messages[2]["content"] == '{"temp_c": 15}'
    assert messages[3]["content"]
    assert "answered" in page.css("details.tool-card summary")[0].text


def test_a_reply_cut_short_does_not_break_the_next_turn(page, tmp_path):
    """A reply stopped before its first token, and one stopped inside a tool call, are sent back as turns the
    server takes (turns alternate; no half-written call), so the chat goes on."""
    cut = {"role": "assistant", "content": "", "stopped": True,
           "tool_calls": [{"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]}
    conversation = {"id": "cut", "title": "cut", "created": "2026-01-01T00:00:00.000Z", "mode": "chat", "system": "",
                    "messages": [{"role": "user", "content": "Weather in Paris?"}, cut,
                                 {"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "", "stopped": True}]}
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(conversation))
    page.id("import-file").send_keys(str(path))
    page.wait_replies(2)
    assert "cut short" in page.css("details.tool-card")[0].text and not page.css("form.tool-result")
    page.set(temperature=0, max_tokens=4)
    page.send("Are you there?")
    page.wait_replies(3)
    last = page.conversation()["messages"][-1]
    assert "error" not in last and last["token_ids"], last


def test_a_settings_mistake_changes_nothing(page, tmp_path):
    """Settings the page cannot send (here a schema that is not JSON) are said before the conversation is
    touched: a regenerate, an edit or a new message keeps what was there."""
    conversation = {"id": "keep", "title": "keep", "created": "2026-01-01T00:00:00.000Z", "mode": "chat",
                    "system": "", "messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}]}
    path = tmp_path / "keep.json"
    path.write_text(json.dumps(conversation))
    page.id("import-file").send_keys(str(path))
    page.wait_replies(1)
    page.open_panel("schema-panel")
    page.id("schema-on").click()
    page.d.execute_script("const s = document.getElementById('schema'); s.value = '{not json';"
                          "s.dispatchEvent(new Event('input'));")
    page.css("button.regenerate")[0].click()
    page.css("button.edit")[0].click()
    page.css("form.editor textarea")[0].send_keys(" there", Keys.ENTER)
    page.send("Another")
    banner = page.id("banner")
    assert banner.is_displayed() and "JSON schema: not valid JSON" in banner.text
    assert page.conversation() == conversation
    assert page.id("prompt").get_attribute("value") == "Another"


# ------------------------------------------------------------------------------------------------ inside view

def test_inside_view_of_a_greedy_token(page):
    page.set(temperature=0, max_tokens=8)
    page.send("The capital of France is")
    reply = page.wait_replies(1)[0]
    message = page.conversation()["messages"][1]
    chips = page.css(".chip", reply)
    assert len(chips) == len(message["token_ids"]) >= 3
    chips[2].click()
    page.wait(lambda d: page.css("#inside .prob-row"), "the inside view")
    rows = page.css("#inside .prob-row")
    probs = [float(r.get_attribute("data-prob")) for r in rows]
    assert 0 < sum(probs) <= 1 + 1e-6 and probs == sorted(probs, reverse=True)
    # greedy: the token the reply holds is the step's top candidate
    assert int(rows[0].get_attribute("data-id")) == message["token_ids"][2] == int(chips[2].get_attribute("data-id"))
    assert "actual" in rows[0].get_attribute("class")
    info = httpx.get(page.url + "/v1/inside/model", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert len(page.css("#inside .lens-table tbody tr")) == len(info["layer_types"]) + 1
    maps = page.css("#inside .attention-map")
    position = len(message["prompt_token_ids"]) + 2
    assert len(maps) == 2
    kinds = [Select(page.css("select", m)[0]).first_selected_option.text for m in maps]
    assert "sliding" in kinds[0] and "global" in kinds[1]
    for m in maps:
        assert len(page.css(".att:not(.query)", m)) == position  # the query's weight over every earlier token
    assert not page.css(".chip.unknown", reply)  # the answer's pieces label every chip
    page.shot("playground-inside.png")
    # another layer for the sliding map: asked again, drawn again
    Select(page.css("select", maps[0])[0]).select_by_value("1")
    page.wait(lambda d: len(page.css("#inside .attention-map")) == 2 and "layer 1"
              in Select(page.css("#inside .attention-map select")[0]).first_selected_option.text, "layer 1")


# ------------------------------------------------------------------------------------------------ model output is inert

def test_an_imported_reply_is_inert(page, tmp_path):
    conversation = {"id": "evil", "title": "evil", "created": "2026-01-01T00:00:00.000Z", "mode": "chat",
                    "system": "", "messages": [{"role": "user", "content": "<b>hi</b>"},
                                               {"role": "assistant", "content": f"{EVIL}\n\n**bold** `<i>x</i>`"}]}
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"format": "gemma3-playground-conversation", "version": 1,
                                "conversation": conversation}))
    page.id("import-file").send_keys(str(path))
    reply = page.wait_replies(1)[0]
    assert page.css("strong", reply) and page.css("code", reply)[0].text == "<i>x</i>"
    assert page.css("article.msg-user .msg-body")[0].text == "<b>hi</b>"
    assert_inert(page, page.css("#messages")[0])


def test_a_live_reply_is_inert(page):
    """The model itself writes the markup: a schema whose only valid value is that string."""
    page.set(temperature=0, max_tokens=80)
    page.open_panel("schema-panel")
    page.id("schema-on").click()
    page.d.execute_script("const s = document.getElementById('schema'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", json.dumps({"type": "string", "const": EVIL}))
    page.send("Say it.")
    reply = page.wait_replies(1)[0]
    assert json.loads(page.conversation()["messages"][1]["content"]) == EVIL
    assert_inert(page, reply)


# ------------------------------------------------------------------------------------------------ conversations

def exported(page, downloads: Path) -> dict:
    for f in downloads.iterdir():
        f.unlink()
    page.id("export").click()
    WebDriverWait(page.d, 10, poll_frequency=0.1).until(
        lambda d: [f for f in downloads.iterdir() if f.suffix == ".json"], "the exported file")
    (path,) = [f for f in downloads.iterdir() if f.suffix == ".json"]
    return json.loads(path.read_text()), path


def test_export_clear_import_round_trip(page, downloads):
    page.set(temperature=0, max_tokens=5)
    page.send("The capital of France is")
    page.wait_replies(1)
    before, path = exported(page, downloads)
    assert before["conversation"] == page.conversation()
    shown = page.replies()[0].text
    delete = page.id("delete-conversation")
    delete.click()
    delete.click()  # two clicks: a slip does not lose a conversation
    page.wait(lambda d: not page.replies(), "the conversation to go")
    assert before["conversation"]["id"] not in page.d.execute_script(
        "return localStorage.getItem('gemma3.playground.conversations')")
    page.id("import-file").send_keys(str(path))
    page.wait(lambda d: page.replies(), "the imported conversation")
    assert page.replies()[0].text == shown
    after, _ = exported(page, downloads)
    assert after == before
