// The inside view: what the model computed at one token of a reply, from POST /v1/inside.
//
// For the token at position p of a conversation, the server reads tokens[:p] and answers with the prediction
// made at position p - 1 (the step that produced this token): the top candidates with their probabilities,
// the logit lens (the next token read off the residual stream after each layer), and the attention of that
// step's query over every earlier token in two layers, one sliding-window and one global, averaged over heads.
// Pieces and probabilities are drawn as text and bar widths only.

import * as api from "./api.js";
import { el } from "./dom.js";

const TOP_K = 10;

/** A vocabulary piece as shown on a chip: spaces, newlines and tabs made visible, never an empty box. */
export function visiblePiece(piece, { spaces = true } = {}) {
  const text = String(piece).replace(/\u2581/g, " ").replace(/<0x0A>/g, "\n").replace(/<0x09>/g, "\t");
  if (!text) return "∅";
  return (spaces ? text.replace(/ /g, "·") : text).replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

const percent = (p) => (p === null || p === undefined ? "–" : p >= 0.001 ? `${(p * 100).toFixed(1)} %`
  : p > 0 ? `${(p * 100).toExponential(1)} %` : "0 %");

/** A labelled horizontal bar for a probability in [0, 1] (its width is set through the CSSOM, which the CSP allows). */
function bar(p, className = "") {
  const track = el("span", `bar ${className}`);
  const fill = el("span", "bar-fill");
  fill.style.width = `${Math.max(0, Math.min(1, p || 0)) * 100}%`;
  track.appendChild(fill);
  return track;
}

export class InsidePanel {
  constructor({ root, body, onPieces, onClose, onError }) {
    Object.assign(this, { root, body, onPieces, onClose, onError });
    this.info = null;        // GET /v1/inside/model
    this.target = null;      // {tokens, position, label}
    this.layers = null;      // [sliding layer, global layer] the user picked, null = the server's defaults
    this.logScale = true;
    this.controller = null;
  }

  close() {
    if (this.controller) this.controller.abort();
    this.root.hidden = true;
    document.body.classList.remove("inside-open");
    this.target = null;
    this.onClose();
  }

  async open(target) {
    this.target = target;
    this.root.hidden = false;
    document.body.classList.add("inside-open");
    await this.load();
  }

  message(text, kind = "") {
    this.body.replaceChildren(el("p", `inside-message ${kind}`, text));
  }

  async load() {
    const target = this.target;
    if (this.controller) this.controller.abort();
    const controller = (this.controller = new AbortController());
    this.message(`Reading position ${target.position}…`, "loading");
    try {
      if (!this.info) this.info = await api.getJSON("/v1/inside/model", { signal: controller.signal });
      const bound = this.info.max_tokens;
      if (target.position > bound) {
        this.message(`This token is at position ${target.position}; the inside view reads at most ${bound} `
                     + "tokens (the server's bound).", "error");
        return;
      }
      if (target.position < 1) {
        this.message("The first token of a conversation has nothing before it to predict it.", "error");
        return;
      }
      // every token up to the bound (p <= bound), so that the answer's pieces label the whole reply
      const request = { tokens: target.tokens.slice(0, bound),
                        position: target.position,
                        top_k: Math.min(TOP_K, this.info.max_top_k || TOP_K) };
      if (this.layers) request.layers = this.layers;
      const answer = await api.postJSON("/v1/inside", request, { signal: controller.signal });
      if (this.target !== target) return;
      this.onPieces(request.tokens, answer.pieces);
      this.render(answer);
    } catch (error) {
      if (error.name === "AbortError") return;
      this.onError(error);
      const status = error instanceof api.ApiError ? error.status : null;
      if (status === 429) {
        this.message("Another inside request is running: click the token again in a moment.", "error");
      } else if (status === 404) {
        this.message("This server has no inside view (POST /v1/inside).", "error");
      } else {
        this.message(status ? `${status}: ${error.message}` : `cannot reach the server: ${error.message}`, "error");
      }
    }
  }

  render(answer) {
    const body = this.body;
    body.replaceChildren();
    const token = answer.token;
    // ---- the token
    const head = el("section", "inside-token");
    head.appendChild(el("span", "chip big", visiblePiece(token ? token.piece : this.target.label)));
    const facts = el("div", "facts");
    facts.appendChild(el("div", null, `position ${answer.position}${token ? ` · token ${token.id}` : ""}`));
    if (token) facts.appendChild(el("div", null, `probability ${percent(token.prob)} at this step`));
    facts.appendChild(el("div", "muted", `${answer.elapsed_ms.toFixed(0)} ms on the server`));
    head.appendChild(facts);
    body.appendChild(head);

    // ---- top candidates
    const top = el("section", "inside-section candidates");
    top.appendChild(el("h3", null, "Top candidates at this step"));
    const rows = el("ol", "prob-rows");
    for (const c of answer.candidates) {
      const row = el("li", "prob-row");
      row.dataset.id = String(c.id);  // the numbers as sent, for whoever reads the page (and its tests)
      row.dataset.prob = String(c.prob);
      if (token && c.id === token.id) row.classList.add("actual");
      row.title = `token ${c.id} · logprob ${c.logprob.toFixed(3)}`;
      row.appendChild(el("span", "piece", visiblePiece(c.piece)));
      row.appendChild(bar(c.prob));
      row.appendChild(el("span", "prob", percent(c.prob)));
      rows.appendChild(row);
    }
    top.appendChild(rows);
    body.appendChild(top);

    // ---- logit lens
    const lens = el("section", "inside-section lens");
    lens.appendChild(el("h3", null, "Logit lens"));
    lens.appendChild(el("p", "hint", "The next token read off the residual stream after each layer (final norm "
      + "and the tied head applied early)" + (token ? `; the last column is the probability of ${JSON.stringify(visiblePiece(token.piece))} there.` : ".")));
    const table = el("table", "lens-table");
    const headRow = el("tr");
    ["layer", "top token", "", "p(top)", token ? "p(token)" : ""].forEach((t) => headRow.appendChild(el("th", null, t)));
    const thead = el("thead");
    thead.appendChild(headRow);
    table.appendChild(thead);
    const tbody = el("tbody");
    for (const row of answer.lens) {
      const tr = el("tr");
      const kind = typeof row.layer === "number" ? (this.info.layer_types || [])[row.layer] : null;
      if (kind) tr.classList.add(kind);
      if (token && row.id === token.id) tr.classList.add("actual");
      tr.appendChild(el("td", "layer", row.layer === "embedding" ? "emb" : `${row.layer}${kind === "global" ? " G" : ""}`));
      tr.appendChild(el("td", "piece", visiblePiece(row.piece)));
      const cell = el("td");
      cell.appendChild(bar(row.prob));
      tr.appendChild(cell);
      tr.appendChild(el("td", "prob", percent(row.prob)));
      tr.appendChild(el("td", "prob", token ? percent(row.token_prob) : ""));
      tbody.appendChild(tr);
    }
    table.appendChild(tbody);
    lens.appendChild(table);

    // ---- attention
    const att = el("section", "inside-section attention");
    att.appendChild(el("h3", null, "Attention"));
    att.appendChild(el("p", "hint", `Where the query of position ${answer.position - 1} (the step that chose this `
      + "token) looked, mean over heads; darker is more weight."));
    const scale = el("label", "check");
    const box = el("input");
    box.type = "checkbox";
    box.checked = this.logScale;
    box.addEventListener("change", () => { this.logScale = box.checked; this.render(answer); });
    scale.appendChild(box);
    scale.appendChild(document.createTextNode(" log scale (10⁻⁴ … 1)"));
    att.appendChild(scale);
    answer.attention.forEach((entry, k) => att.appendChild(this.attentionMap(answer, entry, k)));
    // what it chose, where it looked, how the choice formed over the layers
    body.appendChild(att);
    body.appendChild(lens);
  }

  attentionMap(answer, entry, k) {
    const wrap = el("div", "attention-map");
    const head = el("div", "attention-head");
    const picker = el("select");
    picker.setAttribute("aria-label", `Layer of attention map ${k + 1}`);
    (this.info.layer_types || []).forEach((kind, i) => {
      const option = el("option", null, `layer ${i} · ${kind}`);
      option.value = String(i);
      picker.appendChild(option);
    });
    picker.value = String(entry.layer);
    picker.addEventListener("change", () => {
      this.layers = answer.attention.map((e) => e.layer);
      this.layers[k] = Number(picker.value);
      this.load();
    });
    head.appendChild(picker);
    head.appendChild(el("span", "muted", entry.kind === "sliding" && entry.window
      ? ` sliding window: the last ${entry.window} tokens` : " global: every earlier token"));
    wrap.appendChild(head);

    const weights = entry.weights;
    const max = Math.max(...weights, 1e-12);
    const text = el("div", "attention-text");
    weights.forEach((w, j) => {
      const span = el("span", "att", visiblePiece(answer.pieces[j] ?? "", { spaces: false }));
      // shade: log scale maps 1e-4..1 onto 0..1, so the many small weights beside a large one still show
      const shade = w <= 0 ? 0 : this.logScale ? Math.max(0, Math.min(1, 1 + Math.log10(w) / 4)) : w / max;
      span.style.setProperty("--w", shade.toFixed(3));
      if (w <= 0) span.classList.add("outside");
      span.title = `position ${j} · ${percent(w)}`;
      if (answer.pieces[j] !== undefined && /\n|<0x0A>/.test(answer.pieces[j])) {
        text.appendChild(span);
        text.appendChild(el("br"));
        return;
      }
      text.appendChild(span);
    });
    const query = el("span", "att query", `→ ${visiblePiece(answer.token ? answer.token.piece : this.target.label)}`);
    query.title = "the token this step produced";
    text.appendChild(query);
    wrap.appendChild(text);
    return wrap;
  }
}
