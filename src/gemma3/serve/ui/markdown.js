// A small Markdown renderer that builds DOM nodes, for text a model wrote.
//
// Whatever a model writes is attacker-controlled (a prompt injection makes it write <script>, <img onerror=...>
// or javascript: links), so this file never parses HTML: text reaches the page only through createTextNode and
// textContent, and the only elements made are the fixed ones below. A tag the model writes is shown as the
// characters it is. Links are shown, never followed: [text](url) becomes a <span class="md-link"> holding the
// text, with the URL in its title (no href, so no URL of any scheme runs or navigates); an image becomes the
// text "[image: alt]" the same way, never an <img>.
//
// What it knows: paragraphs (a single newline is kept as a line break: a base model's text is line-oriented),
// ATX headings, fenced code blocks (``` or ~~~; an unclosed fence runs to the end, as in a reply still
// streaming), block quotes, ordered and unordered lists (nested by indentation), pipe tables, thematic breaks;
// inline code, bold, italic, strikethrough, links and backslash escapes. Nesting is bounded (MAX_DEPTH), so a
// reply of ten thousand ">" or "*" renders as text instead of overflowing the stack.

import { el } from "./dom.js";

const MAX_DEPTH = 12;

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

/** Render `text` as a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
  return fragment;
}

// ------------------------------------------------------------------------------------------------ blocks

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function renderBlocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    if (depth >= MAX_DEPTH) {  // too deep to nest further: the rest is shown as it was written
      const p = el("p");
      appendLines(lines.slice(i), p, depth);
      parent.appendChild(p);
      return;
    }
    let m;
    if ((m = FENCE.exec(line))) {
      i = codeBlock(lines, i, m, parent);
    } else if ((m = HEADING.exec(line))) {
      const h = el(`h${m[1].length}`);
      renderInline(m[2] || "", h, depth);
      parent.appendChild(h);
      i++;
    } else if (RULE.test(line)) {
      parent.appendChild(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        inner.push(m[1]);
        i++;
      }
      const quote = el("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.appendChild(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent, depth);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])
               && lines[i + 1].includes("-")) {
      i = table(lines, i, parent, depth);
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) {
        para.push(lines[i]);
        i++;
      }
      const p = el("p");
      appendLines(para, p, depth);
      parent.appendChild(p);
    }
  }
}

function appendLines(lines, parent, depth) {
  lines.forEach((line, k) => {
    if (k) parent.appendChild(el("br"));
    renderInline(line.trim(), parent, depth);
  });
}

function codeBlock(lines, i, match, parent) {
  const fence = match[1];
  const body = [];
  i++;
  while (i < lines.length) {
    const close = lines[i].trim();
    if (/^(`+|~+)$/.test(close) && close[0] === fence[0] && close.length >= fence.length) {
      i++;
      break;
    }
    body.push(lines[i]);
    i++;
  }
  const pre = el("pre", "md-code");
  if (match[2]) {
    const label = el("span", "md-lang");
    label.textContent = match[2];
    pre.appendChild(label);
  }
  const code = el("code");
  code.textContent = body.join("\n");
  pre.appendChild(code);
  parent.appendChild(pre);
  return i;
}

function list(lines, i, parent, depth) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    // the item: its first line, then the lines indented past its marker (a nested list, a second
    // paragraph) or continuing its text directly below
    const body = [m[3] || ""];
    const inner = indent + m[2].length + 1;
    i++;
    while (i < lines.length) {
      const line = lines[i];
      const lead = line.length - line.trimStart().length;
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() && next.length - next.trimStart().length >= inner) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      if (lead >= inner || (!ITEM.test(line) && !startsBlock(line) && lead > indent)) {
        body.push(line.slice(Math.min(lead, inner)));
        i++;
        continue;
      }
      if (lead > indent && ITEM.test(line)) {  // a nested list indented less than the text
        body.push(line.slice(indent + 1));
        i++;
        continue;
      }
      break;
    }
    const li = el("li");
    renderBlocks(body, li, depth + 1);
    // a tight item (one paragraph) shows its text without the paragraph's margins
    if (li.childNodes.length === 1 && li.firstChild.nodeName === "P") {
      const p = li.firstChild;
      while (p.firstChild) li.appendChild(p.firstChild);
      li.removeChild(p);
    }
    node.appendChild(li);
  }
  parent.appendChild(node);
  return i;
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((c) => c.trim());
}

function table(lines, i, parent, depth) {
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
  const node = el("table", "md-table");
  const thead = el("thead");
  const tr = el("tr");
  head.forEach((c, k) => tr.appendChild(cell("th", c, align[k], depth)));
  thead.appendChild(tr);
  node.appendChild(thead);
  const tbody = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
    const row = el("tr");
    const values = cells(lines[i]);
    head.forEach((_, k) => row.appendChild(cell("td", values[k] || "", align[k], depth)));
    tbody.appendChild(row);
    i++;
  }
  node.appendChild(tbody);
  const wrap = el("div", "md-table-wrap");  // wide tables scroll inside the message
  wrap.appendChild(node);
  parent.appendChild(wrap);
  return i;
}

function cell(tag, text, align, depth) {
  const c = el(tag);
  if (align) c.classList.add(`md-${align}`);  // a class, not a style attribute: the CSP allows no inline style
  renderInline(text, c, depth + 1);
  return c;
}

// ------------------------------------------------------------------------------------------------ inline

const PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const LINK = /^(!?)\[((?:[^\[\]\\\n]|\\.){0,500})\]\(\s*(<[^<>\n]*>|(?:[^\s()\\]|\\.|\([^\s()]*\))*)(?:\s+("[^"\n]*"|'[^'\n]*'))?\s*\)/;
const DELIMITERS = [["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"]];

/** Append the inline content of `text` to `parent`. */
export function renderInline(text, parent, depth = 0) {
  let plain = "";
  const flush = () => {
    if (plain) parent.appendChild(document.createTextNode(plain));
    plain = "";
  };
  // a delimiter with no closer after some point has none after any later point either: remembering that keeps
  // a line of a thousand unmatched "*" linear instead of quadratic
  const unmatched = new Set();
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && PUNCTUATION.includes(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      let run = 1;
      while (text[i + run] === "`") run++;
      const fence = "`".repeat(run);
      const end = unmatched.has(fence) ? -1 : text.indexOf(fence, i + run);
      if (end < 0 || text[end + run] === "`") {
        if (end < 0) unmatched.add(fence);
        plain += fence;
        i += run;
        continue;
      }
      flush();
      const code = el("code");
      code.textContent = text.slice(i + run, end).replace(/^ (.*) $/, "$1");
      parent.appendChild(code);
      i = end + run;
      continue;
    }
    if ((c === "[" || (c === "!" && text[i + 1] === "[")) && depth < MAX_DEPTH) {
      const m = LINK.exec(text.slice(i, i + 4096));
      if (m) {
        flush();
        parent.appendChild(link(m, depth));
        i += m[0].length;
        continue;
      }
    }
    if (depth < MAX_DEPTH) {
      const hit = emphasis(text, i, unmatched);
      if (hit) {
        flush();
        const node = el(hit.tag);
        renderInline(text.slice(i + hit.open.length, hit.end), node, depth + 1);
        parent.appendChild(node);
        i = hit.end + hit.open.length;
        continue;
      }
    }
    plain += c;
    i++;
  }
  flush();
}

function emphasis(text, i, unmatched) {
  for (const [open, tag] of DELIMITERS) {
    if (!text.startsWith(open, i) || unmatched.has(open)) continue;
    const after = text[i + open.length];
    if (after === undefined || /\s/.test(after) || after === open[0]) continue;
    // "_" inside a word (snake_case) is not emphasis
    if (open[0] === "_" && i > 0 && /[\p{L}\p{N}]/u.test(text[i - 1])) continue;
    let from = i + open.length + 1;
    for (;;) {
      const end = text.indexOf(open, from);
      if (end < 0) {
        unmatched.add(open);
        break;
      }
      const before = text[end - 1];
      const next = text[end + open.length];
      const wordAfter = open[0] === "_" && next !== undefined && /[\p{L}\p{N}]/u.test(next);
      if (!/\s/.test(before) && before !== "\\" && !wordAfter && !(open.length === 1 && next === open)) {
        return { open, tag, end };
      }
      from = end + 1;
    }
  }
  return null;
}

function link(match, depth) {
  const [, bang, label, rawUrl] = match;
  const url = rawUrl.replace(/^<(.*)>$/, "$1");
  const node = el("span", "md-link");
  // shown, not followed: the URL is only text in a tooltip, whatever its scheme
  node.title = url;
  if (bang) {
    node.classList.add("md-image");
    node.textContent = `[image: ${label}]`;
  } else {
    renderInline(label, node, depth + 1);
    if (!node.textContent) node.textContent = url;
  }
  return node;
}
