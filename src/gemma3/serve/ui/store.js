// Conversations and settings, kept in this browser's localStorage (the server keeps nothing).
//
// A conversation is plain JSON, exported and imported as it is:
//   {id, title, created, mode: "chat" | "completion", system, messages: [...]}
// a message is OpenAI's shape plus what the page measured or needs to look inside it:
//   {role: "user", content}
//   {role: "assistant", content, tool_calls?, finish_reason?, error?, stopped?,
//    prompt_token_ids?, token_ids?, token_text?, timings?, client_timings?, usage?}
//   (token_ids: the reply's tokens, as the server streamed them; token_text: what each showed, the labels of
//   its chips; prompt_token_ids + token_ids is what the inside view reads)
//   {role: "tool", tool_call_id, name?, content}
// The API key is never stored here (api.js keeps it in sessionStorage).

const CONVERSATIONS = "gemma3.playground.conversations";
const SETTINGS = "gemma3.playground.settings";
export const EXPORT_FORMAT = "gemma3-playground-conversation";

export const DEFAULT_SETTINGS = {
  temperature: "", top_p: "", top_k: "", min_p: "", max_tokens: "256", seed: "",
  schemaOn: false,
  schema: JSON.stringify({
    type: "object",
    properties: { city: { type: "string", maxLength: 40 }, country: { type: "string", maxLength: 40 } },
    required: ["city", "country"], additionalProperties: false,
  }, null, 2),
  toolsOn: false,
  tools: JSON.stringify([{
    type: "function",
    function: {
      name: "get_weather", description: "Current weather in a city.",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  }], null, 2),
  tool_choice: "auto",
  parallelCalls: true,
  showTokens: true,
};

function read(slot, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(slot));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

/** {current, conversations}; what localStorage holds, or an empty list. */
export function loadConversations() {
  const state = read(CONVERSATIONS, null);
  if (!state || !Array.isArray(state.conversations)) return { current: null, conversations: [] };
  state.conversations = state.conversations.filter(isConversation);
  return state;
}

/** Save; returns an error message when the browser refuses (storage full), else null. */
export function saveConversations(state) {
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(state));
    return null;
  } catch (e) {
    return `could not save the conversations in this browser (${e.name}): export the ones you want to keep`;
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  try {
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  } catch {
    // settings are a convenience; losing them is not worth a message
  }
}

export function newConversation(mode) {
  const now = new Date().toISOString();
  return { id: newId(), title: "", created: now, mode, system: "", messages: [] };
}

export function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

// ------------------------------------------------------------------------------------------------ files

/** The file an export writes: the conversation unchanged, inside a small envelope that names the format. */
export function exportText(conversation) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversation }, null, 2);
}

/** The conversation of an exported file, checked; throws an Error saying what is wrong. */
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error(`not a JSON file: ${e.message}`);
  }
  const conversation = data && data.format === EXPORT_FORMAT ? data.conversation : data;
  if (!isConversation(conversation)) {
    throw new Error("not a conversation exported from this page (it needs an id, a mode and a list of messages)");
  }
  return conversation;
}

const ROLES = new Set(["user", "assistant", "tool", "system"]);

function isConversation(c) {
  return c !== null && typeof c === "object" && typeof c.id === "string" && c.id.length > 0
    && (c.mode === "chat" || c.mode === "completion") && Array.isArray(c.messages)
    && c.messages.every((m) => m !== null && typeof m === "object" && ROLES.has(m.role)
      && (m.content === undefined || m.content === null || typeof m.content === "string")
      && (m.tool_calls === undefined || Array.isArray(m.tool_calls))
      && (m.token_ids === undefined || (Array.isArray(m.token_ids) && m.token_ids.every(Number.isInteger)))
      && (m.prompt_token_ids === undefined
          || (Array.isArray(m.prompt_token_ids) && m.prompt_token_ids.every(Number.isInteger))));
}
