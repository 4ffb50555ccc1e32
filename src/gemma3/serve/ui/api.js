// Talking to `gemma3 serve`: JSON requests, server-sent event streams, OpenAI's error object.
//
// The API key is sent only as "Authorization: Bearer KEY" — never in a URL, where it would end up in logs and
// history — and is kept in sessionStorage at most: it is gone when the tab closes and never reaches
// localStorage, the conversations or an exported file.

const KEY_SLOT = "gemma3.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

/** An HTTP error with the message of OpenAI's error object when the server sent one. */
export class ApiError extends Error {
  constructor(status, message, error = null) {
    super(message);
    this.status = status;
    this.error = error;  // {message, type, param, code} or null
  }
}

function headers(json) {
  const h = { Accept: json ? "application/json" : "text/event-stream" };
  h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let error = null;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      error = body.error;
      message = body.error.message;
    }
  } catch {
    // not JSON: the status line says it
  }
  return new ApiError(response.status, message, error);
}

export async function getJSON(path, { signal } = {}) {
  const h = headers(true);
  delete h["Content-Type"];
  const response = await fetch(path, { headers: h, signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postJSON(path, body, { signal } = {}) {
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * POST `body` and yield each server-sent event's JSON until `data: [DONE]`. An error event of a stream that
 * failed midway (`data: {"error": {...}}`) is yielded like any other: the caller shows it.
 */
export async function* postStream(path, body, { signal } = {}) {
  const response = await fetch(path, { method: "POST", headers: headers(false), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        // an event's data is its "data:" lines joined; comments (":") and other fields are not ours
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // stopping early closes the connection: the server frees the row
  }
}
