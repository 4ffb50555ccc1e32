// The playground page of `gemma3 serve`: chat or plain completion against this server, streamed; conversations
// kept in the browser; a look inside the model at any token of a reply (inside.js).
//
// Every string the model wrote reaches the page through textContent or markdown.js (which builds nodes, never
// HTML), and so does every string from the server or an imported file: nothing here assigns innerHTML.

import * as api from "./api.js";
import { el } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { InsidePanel, visiblePiece } from "./inside.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);

const state = {
  ...store.loadConversations(),  // {current: id, conversations: [...]}
  settings: store.loadSettings(),
  model: null,                   // the /v1/models entry, once known
  busy: null,                    // the generation running: {controller, conversation, message}
  pieces: new Map(),             // token id -> its vocabulary piece, learnt from the inside view's answers
};

const inside = new InsidePanel({
  root: $("inside"), body: $("inside-body"),
  onPieces: (ids, pieces) => {
    ids.forEach((id, k) => state.pieces.set(id, pieces[k]));
    relabelChips();
  },
  onClose: () => document.querySelectorAll(".chip.selected").forEach((c) => c.classList.remove("selected")),
  onError: (error) => { if (error.status === 401) askForKey(); },
});

// ------------------------------------------------------------------------------------------------ helpers

function button(label, className, onClick, title) {
  const b = el("button", className, label);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function current() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function save() {
  const problem = store.saveConversations({ current: state.current, conversations: state.conversations });
  if (problem) showBanner(problem);
}

function showBanner(text, kind = "error") {
  $("banner-text").textContent = text;
  $("banner").dataset.kind = kind;
  $("banner").hidden = false;
}

function hideBanner(kind) {
  if (!kind || $("banner").dataset.kind === kind) $("banner").hidden = true;
}

function askForKey() {
  showBanner("This server needs an API key: type it in the sidebar under \"API key\". It is sent only in the "
             + "Authorization header.", "key");
  $("key-panel").open = true;
  $("api-key").focus();
}

/** What a failed request tells the user (a 401 also opens the key field). */
function explain(error) {
  if (error instanceof api.ApiError) {
    if (error.status === 401) askForKey();
    return `${error.status}: ${error.message}`;
  }
  return `cannot reach the server: ${error.message}`;
}

// ------------------------------------------------------------------------------------------------ model

async function connect() {
  try {
    const models = await api.getJSON("/v1/models");
    state.model = models.data && models.data[0];
    hideBanner("key");
    hideBanner("connect");
  } catch (error) {
    state.model = null;
    const text = explain(error);
    if (!(error instanceof api.ApiError && error.status === 401)) showBanner(text, "connect");
  }
  renderHeader();
}

function modelName() {
  return state.model ? state.model.id : "the model";
}

function renderHeader() {
  $("model-name").textContent = state.model ? state.model.id : "model unknown";
  if (state.model) $("model-name").title = `context ${state.model.max_model_len} tokens`;
  const notice = $("model-notice");
  const name = state.model ? state.model.id : "";
  // Gemma checkpoints say "-it" when instruction-tuned; the embedded 270M is the pretrained base
  const conv = current();
  const chat = !conv || conv.mode === "chat";
  if (name && !/(^|[-_])it($|[-_.])|instruct/i.test(name)) {
    notice.textContent = `${name} is a pretrained base model, not instruction-tuned: it continues text rather `
      + "than following instructions" + (chat ? ", so chat replies wander. Completion mode suits it best; for "
      + "chat, serve an instruction-tuned checkpoint (gemma3 serve -m google/gemma-3-270m-it)." : ", as here.");
    notice.hidden = false;
  } else {
    notice.hidden = true;
  }
  $("mode-chat").setAttribute("aria-checked", String(chat));
  $("mode-completion").setAttribute("aria-checked", String(!chat));
  $("prompt").placeholder = chat ? "Write a message (Enter sends, Shift+Enter for a new line)"
    : "Write the start of a text for the model to continue (Enter sends, Shift+Enter for a new line)";
}

// ------------------------------------------------------------------------------------------------ sidebar

function renderSidebar() {
  const list = $("conversation-list");
  list.replaceChildren();
  const sorted = [...state.conversations].sort((a, b) => (b.created || "").localeCompare(a.created || ""));
  for (const conv of sorted) {
    const li = el("li");
    const b = button(conv.title || "New conversation", "conversation", () => switchTo(conv.id));
    b.dataset.id = conv.id;
    b.appendChild(el("span", "conversation-mode", conv.mode === "chat" ? "chat" : "completion"));
    if (conv.id === state.current) {
      b.classList.add("active");
      b.setAttribute("aria-current", "true");
    }
    li.appendChild(b);
    list.appendChild(li);
  }
  const conv = current();
  $("system-prompt").value = conv ? conv.system || "" : "";
  $("system-prompt").disabled = !conv || conv.mode !== "chat";
}

function switchTo(id) {
  // a conversation left empty (nothing sent, no system prompt) is not worth a line in the list
  state.conversations = state.conversations.filter((c) => c.id === id || c.messages.length || (c.system || "").trim()
                                                   || (state.busy && state.busy.conversation === c));
  state.current = id;
  save();
  inside.close();
  renderAll();
}

function newConversation(mode) {
  const conv = store.newConversation(mode);
  state.conversations.push(conv);
  switchTo(conv.id);
  $("prompt").focus();
}

function setMode(mode) {
  const conv = current();
  if (conv.mode === mode) return;
  if (conv.messages.length === 0) {
    conv.mode = mode;
    save();
    renderAll();
  } else {
    newConversation(mode);  // a conversation keeps the mode it was written in
  }
}

let deleteArmed = null;

function deleteConversation() {
  const b = $("delete-conversation");
  if (!deleteArmed) {  // two clicks, so a slip does not lose a conversation (and no dialog is needed)
    b.textContent = "Delete? Click again";
    deleteArmed = setTimeout(() => { deleteArmed = null; b.textContent = "Delete"; }, 4000);
    return;
  }
  clearTimeout(deleteArmed);
  deleteArmed = null;
  b.textContent = "Delete";
  if (state.busy && state.busy.conversation.id === state.current) state.busy.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== state.current);
  if (!state.conversations.length) state.conversations.push(store.newConversation("chat"));
  switchTo(state.conversations[state.conversations.length - 1].id);
}

function exportConversation() {
  const conv = current();
  const blob = new Blob([store.exportText(conv)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const a = el("a");
  const slug = (conv.title || "conversation").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "")
    .slice(0, 40) || "conversation";
  a.href = url;
  a.download = `gemma3-${slug}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function importConversation(file) {
  try {
    const conv = store.parseImport(await file.text());
    const existing = state.conversations.find((c) => c.id === conv.id);
    if (existing && JSON.stringify(existing) !== JSON.stringify(conv)) {
      conv.id = store.newId();  // a different conversation under a known id: keep both
      showBanner("A different conversation with this id exists already: the import got a new id.", "info");
    }
    if (!existing || conv.id !== existing.id) state.conversations.push(conv);
    switchTo(conv.id);
  } catch (error) {
    showBanner(`Import failed: ${error.message}`);
  }
}

// ------------------------------------------------------------------------------------------------ settings

const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"];
const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "seed"]);

function bindSettings() {
  const s = state.settings;
  const persist = () => store.saveSettings(s);
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    input.value = s[name];
    input.addEventListener("input", () => { s[name] = input.value; persist(); });
  }
  for (const name of ["schema", "tools"]) {
    $(name).value = s[name];
    $(name).addEventListener("input", () => { s[name] = $(name).value; persist(); });
  }
  const checks = { "schema-on": "schemaOn", "tools-on": "toolsOn", "parallel-calls": "parallelCalls",
                   "show-tokens": "showTokens" };
  for (const [id, name] of Object.entries(checks)) {
    $(id).checked = Boolean(s[name]);
    $(id).addEventListener("change", () => {
      s[name] = $(id).checked;
      persist();
      if (name === "showTokens") renderMessages();
    });
  }
  $("schema-panel").open = s.schemaOn;
  $("tools-panel").open = s.toolsOn;
  $("tool-choice").value = s.tool_choice;
  $("tool-choice").addEventListener("change", () => { s.tool_choice = $("tool-choice").value; persist(); });

  $("api-key").value = api.getKey();
  $("api-key").addEventListener("input", () => api.setKey($("api-key").value.trim()));
  $("api-key").addEventListener("change", connect);

  $("system-prompt").addEventListener("input", () => {
    const conv = current();
    if (conv) {
      conv.system = $("system-prompt").value;
      save();
    }
  });
}

/** The request fields the settings add; throws an Error that names the field at fault. */
function requestFields(mode) {
  const s = state.settings;
  const out = {};
  for (const name of NUMBER_FIELDS) {
    const raw = String(s[name] ?? "").trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || (INTEGER_FIELDS.has(name) && !Number.isInteger(value))) {
      throw new Error(`${name}: ${JSON.stringify(raw)} is not a${INTEGER_FIELDS.has(name) ? "n integer" : " number"}`);
    }
    out[name] = value;
  }
  if (s.schemaOn) {
    let schema;
    try {
      schema = JSON.parse(s.schema);
    } catch (e) {
      throw new Error(`JSON schema: not valid JSON (${e.message})`);
    }
    out.response_format = { type: "json_schema", json_schema: { name: "response", schema } };
  }
  if (s.toolsOn && mode === "chat") {
    if (s.schemaOn) throw new Error("A reply is either kept to a JSON schema or may call tools: turn one off.");
    let tools;
    try {
      tools = JSON.parse(s.tools);
    } catch (e) {
      throw new Error(`Tools: not valid JSON (${e.message})`);
    }
    if (!Array.isArray(tools)) throw new Error("Tools: OpenAI's tools are a JSON array of {type, function}");
    out.tools = tools;
    out.tool_choice = s.tool_choice;
    out.parallel_tool_calls = Boolean(s.parallelCalls);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ messages

function renderAll() {
  renderSidebar();
  renderHeader();
  renderMessages();
}

function renderMessages() {
  const box = $("messages");
  const conv = current();
  box.replaceChildren();
  if (!conv.messages.length) {
    const empty = el("div", "empty");
    empty.appendChild(el("p", null, conv.mode === "chat"
      ? "Chat with the served model. Replies stream in; click a token under a reply to look inside the model."
      : "Completion mode: the model continues the text you write (POST /v1/completions)."));
    box.appendChild(empty);
  }
  const answered = answeredCalls(conv);
  conv.messages.forEach((message, index) => {
    if (message.role === "tool" && answered.has(message.tool_call_id)) return;  // shown in its call's card
    box.appendChild(messageElement(conv, message, index));
  });
  box.scrollTop = box.scrollHeight;
}

/** tool_call_id -> the tool message that answers it. */
function answeredCalls(conv) {
  const known = new Set();
  const answered = new Map();
  for (const m of conv.messages) {
    if (m.role === "assistant") (m.tool_calls || []).forEach((c) => known.add(c.id));
    if (m.role === "tool" && known.has(m.tool_call_id)) answered.set(m.tool_call_id, m);
  }
  return answered;
}

function messageElement(conv, message, index) {
  const article = el("article", `msg msg-${message.role}`);
  article.dataset.index = String(index);
  if (state.busy && state.busy.message === message) article.classList.add("streaming");
  if (message.role === "user") {
    const head = el("div", "msg-head");
    head.appendChild(el("div", "msg-role", conv.mode === "chat" ? "You" : "Prompt"));
    const body = el("div", "msg-body plain", message.content);
    const actions = el("div", "msg-actions");
    actions.appendChild(button("Edit", "link-button edit", () => editMessage(conv, index, article, body),
                               "Change this message and send it again (the turns after it are dropped)"));
    head.appendChild(actions);
    article.appendChild(head);
    article.appendChild(body);
  } else if (message.role === "tool") {
    article.appendChild(el("div", "msg-role", `Tool result${message.name ? ` · ${message.name}` : ""}`));
    article.appendChild(el("pre", "msg-body tool-output", message.content ?? ""));
  } else if (message.role === "system") {
    article.appendChild(el("div", "msg-role", "System"));
    article.appendChild(el("div", "msg-body plain", message.content ?? ""));
  } else {
    article.appendChild(el("div", "msg-role", modelName()));
    const body = el("div", "msg-body");
    article.appendChild(body);
    fillAssistantBody(conv, message, index, body);
    if (message.tool_calls && message.tool_calls.length) article.appendChild(toolCards(conv, message, index));
    if (message.error) article.appendChild(el("div", "msg-error", message.error));
    article.appendChild(metaLine(conv, message, index));
    if (state.settings.showTokens && message.token_ids && message.token_ids.length) {
      article.appendChild(tokenChips(conv, message, index));
    }
  }
  return article;
}

function fillAssistantBody(conv, message, index, body) {
  body.replaceChildren();
  if (conv.mode === "completion") {
    // a continuation is plain text that goes on from the prompt: shown after it, as written
    body.className = "msg-body plain";
    const prompt = conv.messages[index - 1];
    if (prompt && prompt.role === "user") body.appendChild(el("span", "prompt-echo", prompt.content));
    body.appendChild(el("span", "continuation", message.content || ""));
  } else {
    body.className = "msg-body markdown";
    body.appendChild(renderMarkdown(message.content || ""));
  }
}

function metaLine(conv, message, index) {
  const meta = el("div", "msg-meta");
  const speed = speedText(message);
  if (speed) meta.appendChild(el("span", "speed", speed));
  const finish = message.stopped ? "stopped" : message.finish_reason;
  if (finish) meta.appendChild(el("span", "finish", finish === "stopped" ? "stopped by you" : `finish: ${finish}`));
  const actions = el("span", "msg-actions");
  actions.appendChild(button("Regenerate", "link-button regenerate", () => regenerate(conv, index),
                             "Drop this reply (and what follows) and ask again"));
  meta.appendChild(actions);
  return meta;
}

function speedText(message) {
  const t = message.timings;
  const rate = (x) => (x === null || x === undefined || !Number.isFinite(x) ? "–" : x.toFixed(1));
  const ms = (x) => (x >= 1000 ? `${(x / 1000).toFixed(2)} s` : `${Math.round(x)} ms`);
  if (t) {
    let text = `prefill ${rate(t.prompt_per_second)} tok/s (${t.prompt_n} tokens, ${ms(t.prompt_ms)})`;
    if (t.predicted_n > 0) text += ` · decode ${rate(t.predicted_per_second)} tok/s (${t.predicted_n} tokens, ${ms(t.predicted_ms)})`;
    return text;
  }
  const c = message.client_timings;  // the server sent none (an older server, or a stopped stream)
  if (c && c.first_ms !== null) {
    let text = `first token after ${ms(c.first_ms)}`;
    if (c.tokens > 1 && c.decode_ms > 0) text += ` · decode ${rate((c.tokens - 1) / (c.decode_ms / 1000))} tok/s`;
    return `${text} (measured in the browser)`;
  }
  return "";
}

// ------------------------------------------------------------------------------------------------ tools

function toolCards(conv, message, index) {
  const box = el("div", "tool-calls");
  const answered = answeredCalls(conv);
  const latest = index === lastAssistantIndex(conv);
  for (const call of message.tool_calls) {
    const fn = call.function || {};
    const result = answered.get(call.id);
    const streaming = state.busy && state.busy.message === message;
    const whole = isWhole(call);
    const card = el("details", "tool-card");
    card.open = !result || latest;
    const summary = el("summary");
    summary.appendChild(el("span", "tool-label", "Tool call "));
    summary.appendChild(el("code", "tool-name", fn.name || "?"));
    summary.appendChild(el("span", "tool-state", result ? " · answered" : streaming ? " · being written"
      : whole ? " · waiting for its result" : " · cut short"));
    card.appendChild(summary);
    let args = fn.arguments ?? "";
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // incomplete arguments (a stopped stream, max_tokens): shown as they came
    }
    card.appendChild(el("pre", "tool-arguments", args));
    card.appendChild(el("div", "tool-id", `id ${call.id}`));
    if (result) {
      card.appendChild(el("div", "tool-result-label", "Result"));
      card.appendChild(el("pre", "tool-output", result.content ?? ""));
    } else if (!whole && !streaming) {  // it cannot be answered, nor sent back (chatMessages leaves it out)
      card.appendChild(el("div", "tool-cut", "The call was cut short (stopped, or max tokens): regenerate the reply."));
    } else if (latest && !state.busy) {
      const form = el("form", "tool-result");
      const input = el("textarea");
      input.rows = 2;
      input.placeholder = `The result of ${fn.name || "this call"}, e.g. {"temp_c": 15}`;
      input.setAttribute("aria-label", `Result of ${fn.name || "the call"}`);
      form.appendChild(input);
      const send = el("button", "primary", "Send result");
      send.type = "submit";
      form.appendChild(send);
      const submit = (event) => {
        event.preventDefault();
        if (state.busy) return;
        const answer = () => conv.messages.push({ role: "tool", tool_call_id: call.id, name: fn.name,
                                                  content: input.value });
        // the conversation goes on once every call of the turn has its result
        const others = message.tool_calls.filter((c) => c.id !== call.id && !answeredCalls(conv).has(c.id));
        if (others.length === 0) {
          generate(conv, answer);
        } else {
          answer();
          save();
          renderMessages();
        }
      };
      form.addEventListener("submit", submit);
      input.addEventListener("keydown", (e) => enterSends(e, () => submit(e)));
      card.appendChild(form);
    }
    box.appendChild(card);
  }
  return box;
}

function lastAssistantIndex(conv) {
  for (let i = conv.messages.length - 1; i >= 0; i--) if (conv.messages[i].role === "assistant") return i;
  return -1;
}

function mergeToolCall(message, piece) {
  message.tool_calls ??= [];
  let call = message.tool_calls.find((c) => c._index === piece.index);
  if (!call) {
    // a call's first delta carries its index, id, type and name; its arguments follow in pieces
    call = { _index: piece.index, id: piece.id, type: piece.type || "function",
             function: { name: (piece.function && piece.function.name) || "", arguments: "" } };
    message.tool_calls.push(call);
  }
  if (piece.function && piece.function.arguments) call.function.arguments += piece.function.arguments;
}

// ------------------------------------------------------------------------------------------------ tokens

function tokenChips(conv, message, index) {
  const box = el("div", "tokens");
  box.setAttribute("aria-label", "The reply's tokens: click one to look inside the model");
  message.token_ids.forEach((id, k) => {
    const chip = button("", "chip", () => openInside(conv, message, k, chip));
    chip.dataset.id = String(id);
    chip.dataset.k = String(k);
    labelChip(chip, message, k);
    box.appendChild(chip);
  });
  return box;
}

function labelChip(chip, message, k) {
  const id = message.token_ids[k];
  const piece = state.pieces.get(id);
  // the server's piece once the inside view has said it; until then the text the stream gave this token
  const text = piece !== undefined ? piece : (message.token_text || [])[k] ?? "";
  chip.textContent = visiblePiece(text);
  // a token whose text the stream gave together with the next one's (or held back): its own piece comes with
  // the first look inside
  chip.classList.toggle("unknown", text === "");
  chip.title = `token ${id}`;
}

function relabelChips() {
  const conv = current();
  document.querySelectorAll("article.msg-assistant").forEach((article) => {
    const message = conv.messages[Number(article.dataset.index)];
    if (!message || !message.token_ids) return;
    article.querySelectorAll(".chip").forEach((chip) => labelChip(chip, message, Number(chip.dataset.k)));
  });
}

function openInside(conv, message, k, chip) {
  document.querySelectorAll(".chip.selected").forEach((c) => c.classList.remove("selected"));
  chip.classList.add("selected");
  const prompt = message.prompt_token_ids || [];
  inside.open({
    tokens: prompt.concat(message.token_ids),
    position: prompt.length + k,
    label: chip.textContent,
  });
}

// ------------------------------------------------------------------------------------------------ generating

function send() {
  const text = $("prompt").value;
  const conv = current();
  if (!text.trim() || state.busy) return;
  generate(conv, () => {
    conv.messages.push({ role: "user", content: text });
    if (!conv.title) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
    $("prompt").value = "";
    renderSidebar();
  });
}

function regenerate(conv, index) {
  generate(conv, () => conv.messages.splice(index));
}

function editMessage(conv, index, article, body) {
  if (state.busy) return;
  const editor = el("form", "editor");
  const input = el("textarea");
  input.value = conv.messages[index].content;
  input.rows = Math.min(12, Math.max(2, input.value.split("\n").length));
  input.setAttribute("aria-label", "Edit the message");
  editor.appendChild(input);
  const buttons = el("div", "editor-buttons");
  const resend = el("button", "primary", "Send");
  resend.type = "submit";
  buttons.appendChild(resend);
  buttons.appendChild(button("Cancel", "", () => renderMessages()));
  editor.appendChild(buttons);
  const submit = (event) => {
    event.preventDefault();
    if (!input.value.trim() || state.busy) return;
    generate(conv, () => {
      conv.messages.splice(index);  // the turns after it answered the old text: they go
      conv.messages.push({ role: "user", content: input.value });
      if (index === 0) conv.title = input.value.trim().replace(/\s+/g, " ").slice(0, 48);
      renderSidebar();
    });
  };
  editor.addEventListener("submit", submit);
  input.addEventListener("keydown", (e) => enterSends(e, () => submit(e)));
  body.replaceWith(editor);
  article.querySelector(".msg-actions").hidden = true;
  input.focus();
}

/** The chat messages sent for `conv`: the system prompt, then every turn in OpenAI's shape. */
function chatMessages(conv) {
  const out = [];
  const sent = new Set();  // the ids of the calls sent, which the tool results must answer
  if (conv.system && conv.system.trim()) out.push({ role: "system", content: conv.system });
  for (const m of conv.messages) {
    if (m.role === "assistant") {
      // a call cut short (stopped, or max_tokens) has arguments that are not a JSON object: the server would
      // refuse the whole history, so it is left out, with its result
      const calls = (m.tool_calls || []).filter(isWhole).map((c) => ({
        id: c.id, type: c.type || "function", function: { name: c.function.name, arguments: c.function.arguments } }));
      calls.forEach((c) => sent.add(c.id));
      // a reply stopped (or failed) before it said anything still takes its turn: turns must alternate
      out.push(calls.length ? { role: "assistant", content: m.content || null, tool_calls: calls }
                            : { role: "assistant", content: m.content || "" });
    } else if (m.role === "tool") {
      if (!sent.has(m.tool_call_id)) continue;
      out.push({ role: "tool", tool_call_id: m.tool_call_id, ...(m.name ? { name: m.name } : {}),
                 content: m.content ?? "" });
    } else {
      out.push({ role: m.role, content: m.content ?? "" });
    }
  }
  return out;
}

function isWhole(call) {
  if (!call || !call.function || typeof call.function.name !== "string") return false;
  try {
    const args = JSON.parse(call.function.arguments);
    return args !== null && typeof args === "object" && !Array.isArray(args);
  } catch {
    return false;
  }
}

/**
 * Make `change` to the conversation (a new message, a reply dropped, ...) and generate the next reply; the
 * settings are checked first, so a mistake there changes nothing.
 */
async function generate(conv, change) {
  if (state.busy) return;
  let fields;
  try {
    fields = requestFields(conv.mode);
  } catch (error) {
    showBanner(error.message, "settings");
    return;
  }
  hideBanner("settings");
  change();
  save();
  const chat = conv.mode === "chat";
  const body = { ...fields, stream: true, stream_options: { include_usage: true }, return_token_ids: true };
  if (chat) {
    body.messages = chatMessages(conv);
  } else {
    const prompt = conv.messages[conv.messages.length - 1];
    body.prompt = prompt.content;
  }
  const message = { role: "assistant", content: "" };
  conv.messages.push(message);
  const controller = new AbortController();
  state.busy = { controller, conversation: conv, message };
  setBusy(true);
  renderMessages();

  const clock = { start: performance.now(), first: null, tokens: 0 };
  let frame = null;
  const paint = () => {  // at most one repaint a frame, whatever the rate of chunks
    frame = null;
    const article = document.querySelector(`article.msg-assistant[data-index="${conv.messages.indexOf(message)}"]`);
    if (!article || current() !== conv) return;
    const index = conv.messages.indexOf(message);
    fillAssistantBody(conv, message, index, article.querySelector(".msg-body"));
    if (message.tool_calls) {  // calls stream too: their cards grow as the arguments arrive
      const cards = toolCards(conv, message, index);
      const old = article.querySelector(".tool-calls");
      if (old) old.replaceWith(cards);
      else article.querySelector(".msg-body").after(cards);
    }
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  };
  try {
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    for await (const chunk of api.postStream(path, body, { signal: controller.signal })) {
      if (chunk.error) {  // the stream failed midway: what came so far is kept
        message.error = `error: ${chunk.error.message}`;
        break;
      }
      applyChunk(message, chunk, chat, clock);
      if (frame === null) frame = requestAnimationFrame(paint);
    }
  } catch (error) {
    if (error.name === "AbortError") message.stopped = true;
    else message.error = explain(error);
  } finally {
    if (frame !== null) cancelAnimationFrame(frame);
    const end = performance.now();
    message.client_timings = { first_ms: clock.first === null ? null : clock.first - clock.start,
                               decode_ms: clock.first === null ? 0 : end - clock.first, tokens: clock.tokens };
    (message.tool_calls || []).forEach((c) => delete c._index);
    await labelSilentTokens(message);
    state.busy = null;
    setBusy(false);
    save();
    if (current() === conv) renderMessages();
  }
}

/**
 * Tokens the stream gave no text of their own (text held back while it might become a tool call or a stop
 * string, or released together with the next token's): each is decoded alone (POST /detokenize), so that every
 * chip says which token it is. A reply has few such distinct tokens; the number asked is bounded anyway.
 */
async function labelSilentTokens(message) {
  if (!message.token_ids) return;
  const silent = [...new Set(message.token_ids.filter((_, k) => !message.token_text[k]))].slice(0, 64);
  const texts = await Promise.all(silent.map((id) => api.postJSON("/detokenize", { tokens: [id] })
    .then((r) => r.content, () => "")));
  const decoded = new Map(silent.map((id, k) => [id, texts[k]]));
  message.token_text = message.token_ids.map((id, k) => message.token_text[k] || decoded.get(id) || "");
}

function applyChunk(message, chunk, chat, clock) {
  if (Array.isArray(chunk.prompt_token_ids)) message.prompt_token_ids = chunk.prompt_token_ids;
  if (chunk.usage) message.usage = chunk.usage;
  if (chunk.timings) message.timings = chunk.timings;
  const choice = (chunk.choices || []).find((c) => c.index === 0);
  if (!choice) return;
  let text = "";  // the text these tokens wrote (a tool call's pieces are the parser's, not the tokens')
  let calls = 0;
  if (chat) {
    const delta = choice.delta || {};
    if (delta.content) text += delta.content;
    message.content += delta.content || "";
    for (const piece of delta.tool_calls || []) {
      mergeToolCall(message, piece);
      calls++;
    }
  } else if (choice.text) {
    text = choice.text;
    message.content += choice.text;
  }
  const ids = Array.isArray(choice.token_ids) ? choice.token_ids : [];
  if (ids.length) {
    message.token_ids ??= [];
    message.token_text ??= [];
    message.token_ids.push(...ids);
    // the chunk's text came from these ids together: it labels the last one until the inside view gives each
    // id its exact piece
    ids.forEach((_, k) => message.token_text.push(k === ids.length - 1 ? text : ""));
  }
  if (text || calls || ids.length) {
    if (clock.first === null) clock.first = performance.now();
    clock.tokens += Math.max(ids.length, text || calls ? 1 : 0);
  }
  if (choice.finish_reason) message.finish_reason = choice.finish_reason;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

/** Enter sends, Shift+Enter makes a new line (not while an input method is composing a character). */
function enterSends(event, action) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    action();
  }
}

// ------------------------------------------------------------------------------------------------ start

function start() {
  if (!current()) {
    if (!state.conversations.length) state.conversations.push(store.newConversation("chat"));
    state.current = state.conversations[state.conversations.length - 1].id;
  }
  bindSettings();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => enterSends(e, send));
  $("stop").addEventListener("click", () => state.busy && state.busy.controller.abort());
  $("new-conversation").addEventListener("click", () => newConversation(current().mode));
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-completion").addEventListener("click", () => setMode("completion"));
  $("delete-conversation").addEventListener("click", deleteConversation);
  $("export").addEventListener("click", exportConversation);
  $("import-file").addEventListener("change", () => {
    const file = $("import-file").files[0];
    $("import-file").value = "";  // the same file can be imported again
    if (file) importConversation(file);
  });
  $("banner-close").addEventListener("click", () => { $("banner").hidden = true; });
  $("inside-close").addEventListener("click", () => inside.close());
  // another tab changed the conversations: follow it rather than overwrite it later
  window.addEventListener("storage", (e) => {
    if (e.key && e.key.startsWith("gemma3.playground.conversations") && !state.busy) {
      Object.assign(state, store.loadConversations());
      if (!current() && state.conversations.length) state.current = state.conversations[0].id;
      if (current()) renderAll();
    }
  });
  renderAll();
  connect();
}

start();
