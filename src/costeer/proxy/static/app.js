// costeer proxy chat page: plain JS, no framework, no build step, nothing loaded from elsewhere.
// The key lives in sessionStorage (this tab) and goes only into the Authorization header of
// same-origin requests; the conversation lives in localStorage, so a reload or a proxy restart
// loses nothing (an interrupted answer keeps its text and offers a retry).
"use strict";

const KEY_STORE = "costeer.key";
const CHAT_STORE = "costeer.chat.v1";
const PREFS_STORE = "costeer.prefs.v1";
const CLOUD_ALONE = "llm";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  turns: loadTurns(),      // [{role: "user", content} | {role: "assistant", answers: [Answer]}]
  prefs: loadJSON(PREFS_STORE, {method: "costeer", compare: false}),
  running: new Set(),       // AbortControllers of the answers streaming now
};

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch { return fallback; }
}

function loadTurns() {
  const turns = loadJSON(CHAT_STORE, []);
  for (const turn of turns) {  // answers that were streaming when the page went away
    for (const a of turn.answers || []) {
      if (a.status === "streaming") {
        a.status = "error";
        a.error = "This answer was interrupted (the page was closed or reloaded). Its text so far is kept.";
      }
    }
  }
  return turns;
}

let saveTimer = null;
function save(now = false) {
  clearTimeout(saveTimer);
  const write = () => {
    try {
      localStorage.setItem(CHAT_STORE, JSON.stringify(state.turns));
    } catch {  // over the quota: keep the words, drop the per-token details
      const lean = state.turns.map((t) => t.answers ? {...t, answers: t.answers.map((a) => ({...a, steps: null, wire: null}))} : t);
      try { localStorage.setItem(CHAT_STORE, JSON.stringify(lean)); } catch { /* nothing more to drop */ }
    }
  };
  if (now) write(); else saveTimer = setTimeout(write, 150);
}

function savePrefs() { localStorage.setItem(PREFS_STORE, JSON.stringify(state.prefs)); }

// --- talking to the proxy ------------------------------------------------------------------

class ProxyError extends Error {
  constructor(message, status, code) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {...options, headers: {...(options.headers || {}), Authorization: `Bearer ${state.key}`}});
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ProxyError("Cannot reach the proxy: it stopped, or the network failed. Nothing is lost; retry when it is back.", 0, "network");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const message = body && body.error && body.error.message;
  const code = body && body.error && body.error.code;
  if (response.status === 401) return new ProxyError("The proxy refused the key (401). Enter its key again.", 401, code);
  if (response.status === 429) {
    return new ProxyError("The proxy is busy: its queue is full (429). Retry in a moment.", 429, code);
  }
  return new ProxyError(message || `The proxy answered ${response.status}.`, response.status, code);
}

// One streamed chat completion: calls onText(piece) as it comes, returns the `costeer` field
// of the final chunk (with steps and the wire record, asked for with the costeer option).
async function streamChat(messages, method, signal, onText) {
  const body = {model: method, messages, stream: true, stream_options: {include_usage: true},
                costeer: {steps: true, wire: true}};
  const response = await api("/v1/chat/completions", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal});
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "", extension = null, usage = null;
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += decoder.decode(value, {stream: true});
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const event = pending.slice(0, end);
        pending = pending.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return {extension, usage};
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ProxyError(chunk.error.message, 500, chunk.error.code);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) onText(choice.delta.content);
          if (chunk.costeer) extension = chunk.costeer;
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError" || err instanceof ProxyError) throw err;
    throw new ProxyError("The connection to the proxy broke off mid-answer (did it restart?). The text so far is kept.", 0, "network");
  }
  throw new ProxyError("The answer ended before the proxy finished it (did it restart?). The text so far is kept.", 0, "network");
}

// --- key, methods, private context --------------------------------------------------------

function askForKey(message = "") {
  const dialog = $("key-dialog");
  $("key-error").hidden = !message;
  $("key-error").textContent = message;
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function connect() {
  const models = await (await api("/v1/models")).json();
  setConnection(true, "Connected");
  const select = $("method");
  select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
  const names = models.data.map((m) => m.id);
  select.value = names.includes(state.prefs.method) ? state.prefs.method : names.includes("costeer") ? "costeer" : names[0];
  state.prefs.method = select.value;
  const compare = $("compare");
  compare.disabled = !names.includes(CLOUD_ALONE);
  compare.checked = state.prefs.compare && !compare.disabled;
  loadContext();
}

async function loadContext() {
  const list = $("context-files");
  try {
    const context = await (await api("/v1/costeer/context")).json();
    if (!context.sources.length) {
      list.replaceChildren(el("li", {class: "muted"}, "No private context: answers are the cloud model's own."));
    } else {
      list.replaceChildren(...context.sources.map((s) => el("li", {},
        el("span", {class: "name", title: s.name}, s.name.split("/").pop()),  // the full path on hover
        el("span", {class: "size"}, `${formatBytes(s.bytes)} · ${s.tokens.toLocaleString()} tok`))));
    }
    $("context-total").textContent = context.sources.length > 1
      ? `${context.sources.length} sources, ${formatBytes(context.bytes)}, ${context.tokens.toLocaleString()} tokens in all` : "";
  } catch (err) {
    if (err.name !== "AbortError") list.replaceChildren(el("li", {class: "muted"}, err.message));
  }
}

function setConnection(ok, text) {
  $("conn").textContent = text;
  $("conn-dot").className = `dot ${ok ? "on" : "off"}`;
}

async function start() {
  if (!state.key) { askForKey(); return; }
  try {
    await connect();
  } catch (err) {
    setConnection(false, err.message);
    if (err.status === 401) askForKey(err.message);
  }
}

// --- the conversation ---------------------------------------------------------------------

// The public conversation up to turn `upTo` (not included): the user's messages and the
// answers of the chosen method (the cloud-alone comparison is not part of the conversation).
function history(upTo) {
  const messages = [];
  for (const turn of state.turns.slice(0, upTo)) {
    if (turn.role === "user") messages.push({role: "user", content: turn.content});
    else if (turn.answers[0].text) messages.push({role: "assistant", content: turn.answers[0].text});
  }
  return messages;
}

function send(prompt) {
  const method = $("method").value || "costeer";
  const answers = [newAnswer(method, "steered")];
  if ($("compare").checked && method !== CLOUD_ALONE) answers.push(newAnswer(CLOUD_ALONE, "cloud-alone"));
  state.turns.push({role: "user", content: prompt}, {role: "assistant", answers});
  save(true);
  render();
  const index = state.turns.length - 1;
  answers.forEach((answer) => run(index, answer));
}

function newAnswer(method, kind) {
  return {method, kind, text: "", status: "streaming", error: null, steps: null, wire: null, stats: null, view: "text"};
}

async function run(index, answer) {
  const controller = new AbortController();
  state.running.add(controller);
  updateBusy();
  Object.assign(answer, {text: "", status: "streaming", error: null, steps: null, wire: null, stats: null});
  renderAnswer(answer);
  try {
    const {extension, usage} = await streamChat(history(index), answer.method, controller.signal, (piece) => {
      answer.text += piece;
      renderText(answer);
      save();
    });
    answer.status = "done";
    if (extension) {
      answer.steps = extension.steps || null;
      answer.wire = extension.wire || null;
      answer.stats = {tokens: usage ? usage.completion_tokens : null, tps: extension.tokens_per_second,
                      seconds: extension.elapsed_s};
    }
  } catch (err) {
    if (err.name === "AbortError") {
      answer.status = "stopped";
      answer.error = "Stopped. The proxy stopped generating this answer.";
    } else {
      answer.status = "error";
      answer.error = err.message;
      if (err.status === 401) askForKey(err.message);
      if (err.code === "network") setConnection(false, "Cannot reach the proxy");
    }
  } finally {
    state.running.delete(controller);
    updateBusy();
    save(true);
    renderAnswer(answer);
  }
}

function stopAll() { for (const controller of state.running) controller.abort(); }

function retry(answer) {
  const index = state.turns.findIndex((t) => t.answers && t.answers.includes(answer));
  if (index >= 0) run(index, answer);
}

function updateBusy() {
  const busy = state.running.size > 0;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// --- rendering ----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const answerNodes = new WeakMap();  // answer -> its card

function render() {
  const box = $("messages");
  $("empty").hidden = state.turns.length > 0;
  box.querySelectorAll(".turn").forEach((n) => n.remove());
  for (const turn of state.turns) {
    if (turn.role === "user") {
      box.append(el("div", {class: "turn msg-user"}, el("div", {class: "bubble"}, turn.content)));
    } else {
      const grid = el("div", {class: `answers${turn.answers.length > 1 ? " two" : ""}`});
      for (const answer of turn.answers) {
        const card = el("div", {class: `answer ${answer.kind}`, "data-method": answer.method});
        answerNodes.set(answer, card);
        fillAnswer(answer, card);
        grid.append(card);
      }
      box.append(el("div", {class: "turn msg-assistant"}, grid));
    }
  }
  scrollToEnd();
}

function renderAnswer(answer) {
  const card = answerNodes.get(answer);
  if (card) fillAnswer(answer, card);
}

// [view, label, short label for narrow screens]
const VIEWS = [["text", "Answer", "Answer"], ["tint", "Where the context moved it", "Context"],
               ["wire", "What the cloud saw", "Cloud saw"]];

function fillAnswer(answer, card) {
  const done = answer.status !== "streaming";
  card.dataset.status = answer.status;  // streaming, done, stopped or error
  const seg = el("div", {class: "seg", role: "tablist"}, ...VIEWS.map(([view, label, short]) => el("button", {
    type: "button", role: "tab", "data-view": view, "aria-selected": String(answer.view === view),
    "aria-label": label, disabled: view !== "text" && !done,
    onclick: () => { answer.view = view; fillAnswer(answer, card); save(); },
  }, el("span", {class: "long"}, label), el("span", {class: "short"}, short))));
  const role = answer.kind === "steered" ? "steered by your context" : "cloud model alone";
  const head = el("div", {class: "answer-head"}, el("span", {class: "badge"}, answer.method),
    el("span", {class: "role"}, role), seg);
  const body = el("div", {class: "view"});
  if (answer.view === "tint" && done) body.append(tintView(answer));
  else if (answer.view === "wire" && done) body.append(wireView(answer));
  else body.append(el("div", {class: `text${answer.status === "streaming" ? " streaming" : ""}`}, ...markdown(answer.text)));
  if (answer.status === "streaming" && !answer.text) body.firstChild.classList.add("thinking");
  const stats = answer.stats ? `${answer.stats.tokens ?? "?"} tokens · ${answer.stats.tps} tok/s` : "";
  const foot = el("div", {class: "answer-foot"}, el("span", {class: "stats"}, stats),
    el("button", {type: "button", class: "icon-btn copy", title: "Copy the answer", disabled: !answer.text,
                  onclick: (e) => copy(answer.text, e.currentTarget)}, "Copy"));
  const error = answer.error ? el("div", {class: "error-box", role: "alert"}, el("span", {}, answer.error),
    el("button", {type: "button", class: "btn retry", onclick: () => retry(answer)}, "Retry"),
    answer.status === "error" && /key/.test(answer.error)
      ? el("button", {type: "button", class: "btn", onclick: () => askForKey()}, "Enter key") : null) : null;
  card.replaceChildren(...[head, body, error, foot].filter(Boolean));
}

function renderText(answer) {
  const card = answerNodes.get(answer);
  const text = card && card.querySelector(".text");
  if (!text) return;
  text.replaceChildren(...markdown(answer.text));
  text.classList.remove("thinking");
  scrollToEnd();
}

// A small Markdown subset as DOM nodes (never innerHTML, so model text cannot inject markup):
// fenced code, headings, bullet and numbered lists, paragraphs; inline code, bold, italics.
function markdown(text) {
  const blocks = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      blocks.push(el("pre", {class: "code"}, el("code", {}, code.join("\n"))));
    } else if (/^#{1,4} /.test(line)) {
      blocks.push(el(`h${Math.min(6, line.indexOf(" ") + 2)}`, {class: "md-h"}, ...inline(line.replace(/^#+ /, ""))));
    } else if (/^\s*([-*+]|\d+[.)]) /.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const items = [];
      for (; i < lines.length && /^\s*([-*+]|\d+[.)]) /.test(lines[i]); i++) {
        items.push(el("li", {}, ...inline(lines[i].replace(/^\s*([-*+]|\d+[.)]) /, ""))));
      }
      i--;
      blocks.push(el(ordered ? "ol" : "ul", {}, ...items));
    } else if (line.trim()) {
      const para = [line];
      while (i + 1 < lines.length && lines[i + 1].trim() && !/^(```|#{1,4} |\s*([-*+]|\d+[.)]) )/.test(lines[i + 1])) {
        para.push(lines[++i]);
      }
      blocks.push(el("p", {}, ...inline(para.join("\n"))));
    }
  }
  return blocks;
}

function inline(text) {
  const parts = [];
  const pattern = /`([^`]+)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_/g;
  let last = 0, match;
  while ((match = pattern.exec(text))) {
    parts.push(text.slice(last, match.index));
    const [, code, bold, em, em2] = match;
    parts.push(code ? el("code", {}, code) : bold ? el("strong", {}, bold) : el("em", {}, em || em2));
    last = pattern.lastIndex;
  }
  parts.push(text.slice(last));
  return parts.filter((p) => p !== "");
}

function scrollToEnd() {
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 240) box.scrollTop = box.scrollHeight;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard permission (http, some browsers): select a hidden copy
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

// Where the context moved the answer: every token tinted by the steering term at it;
// changed picks underlined; hover, focus or tap shows the cloud's own choice.
function tintView(answer) {
  const steps = answer.steps;
  if (!steps) return el("p", {class: "muted"}, "No per-token record for this answer (it was stopped or failed).");
  if (!steps.some((s) => s.steering !== null)) {
    return el("p", {class: "muted"}, `${answer.method} does not steer: every token is the model's own pick.`);
  }
  const scale = Math.max(0.5, ...steps.map((s) => Math.abs(s.steering || 0)));
  const changed = steps.filter((s) => s.changed).length;
  const tokens = el("div", {class: "tokens"}, ...steps.map((step, i) => {
    const strength = Math.min(1, Math.abs(step.steering || 0) / scale);
    const color = (step.steering || 0) >= 0 ? "124, 58, 237" : "234, 88, 12";
    const special = step.text === "";
    const node = el("span", {
      class: `tok${step.changed ? " changed" : ""}${special ? " special" : ""}`, tabindex: "0",
      "data-index": String(i), "data-token-id": String(step.token_id), "data-changed": String(step.changed),
    }, special ? "⟨end⟩" : step.text);
    // through the CSSOM: the Content-Security-Policy refuses style attributes
    node.style.backgroundColor = `rgba(${color}, ${(0.04 + 0.5 * strength).toFixed(3)})`;
    const show = () => showTip(node, step);
    node.addEventListener("mouseenter", show);
    node.addEventListener("focus", show);
    node.addEventListener("click", show);
    node.addEventListener("mouseleave", hideTip);
    node.addEventListener("blur", hideTip);
    return node;
  }));
  return el("div", {},
    el("div", {class: "legend"},
      el("span", {}, el("span", {class: "swatch"}), "context pushed toward it"),
      el("span", {}, el("span", {class: "swatch neg"}), "against it"),
      el("span", {}, el("span", {class: "changed-mark"}, "underlined"), ` changed pick (${changed} of ${steps.length})`)),
    tokens);
}

function percent(p) {
  if (p === null || p === undefined) return "not in its top-k";
  return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : p >= 1e-7 ? `${(100 * p).toPrecision(2)}%` : "< 0.00001%";
}

function signed(x) {
  const text = Math.abs(x).toFixed(2);
  return text === "0.00" ? text : `${x > 0 ? "+" : "−"}${text}`;
}

function quoted(text) { return text === "" ? "⟨end⟩" : JSON.stringify(text); }

function showTip(node, step) {
  const tip = $("tooltip");
  const row = (label, value) => el("div", {class: "row"}, el("span", {}, label), el("span", {}, value));
  tip.replaceChildren(
    el("div", {}, el("b", {}, step.changed ? "The context changed this pick" : "The cloud's own pick too")),
    row("picked", quoted(step.text)),
    row("cloud alone would pick", step.cloud_text === null ? "—" : quoted(step.cloud_text)),
    row("its probability (cloud)", percent(step.cloud_probability)),
    row("picked token (cloud)", percent(step.token_cloud_probability)),
    row("picked token (steered)", percent(step.fused_probability) + (step.exact ? "" : " ≤")),
    row("steering", step.steering === null ? "—" : `${signed(step.steering)} nats`));
  tip.hidden = false;
  const box = node.getBoundingClientRect();
  const width = tip.offsetWidth, height = tip.offsetHeight;
  const left = Math.max(8, Math.min(window.innerWidth - width - 8, box.left + box.width / 2 - width / 2));
  // below the token, where the text already read is; above it near the bottom of the window
  const top = box.bottom + height + 8 < window.innerHeight ? box.bottom + 8 : Math.max(8, box.top - height - 8);
  tip.style.left = `${left}px`;
  tip.style.top = `${top}px`;
}

function hideTip() { $("tooltip").hidden = true; }

// What the cloud saw: the record the wire client keeps (split mode), or what it would have
// sent (embedded), as the proxy built it; never re-derived here from the answer's text.
function wireView(answer) {
  const wire = answer.wire;
  if (!wire) return el("p", {class: "muted"}, "No record for this answer (it was stopped or failed).");
  const summary = el("div", {class: "wire-summary"},
    el("span", {class: "pill"}, `${wire.round_trips} round trip${wire.round_trips === 1 ? "" : "s"}`),
    el("span", {class: "pill"}, `${formatBytes(wire.bytes_to_cloud)} to the cloud`),
    wire.bytes_from_cloud === null ? null : el("span", {class: "pill"}, `${formatBytes(wire.bytes_from_cloud)} back`),
    el("span", {class: "pill"}, wire.mode === "split" ? "split: crossed the network" : "embedded: would have crossed"));
  const list = el("ul", {class: "exchanges"}, ...wire.exchanges.map((e) => e.direction === "device->cloud"
    ? el("li", {class: "exchange"},
        el("div", {class: "head"}, el("span", {}, `→ ${e.method} ${e.path}`), el("span", {class: "bytes"}, formatBytes(e.bytes))),
        e.json ? el("pre", {}, e.json) : null)
    : el("li", {class: "exchange reply"},
        el("div", {class: "head"}, el("span", {}, `← ${e.status} ${e.path}`), el("span", {class: "bytes"}, formatBytes(e.bytes))))));
  return el("div", {class: "wire"}, summary,
    el("p", {class: `wire-note${wire.mode === "embedded" ? " embedded" : ""}`}, wire.note), list);
}

function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

// --- wiring -------------------------------------------------------------------------------

function autosize() {
  const area = $("prompt");
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight, 200)}px`;
}

function submit() {
  const area = $("prompt");
  const prompt = area.value.trim();
  if (!prompt || state.running.size) return;
  if (!state.key) { askForKey(); return; }
  area.value = "";
  autosize();
  send(prompt);
}

function setPanel(open) { $("app").classList.toggle("panel-open", open); $("scrim").hidden = !open; }

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  $("prompt").addEventListener("input", autosize);
  $("stop").addEventListener("click", stopAll);
  $("method").addEventListener("change", (e) => { state.prefs.method = e.target.value; savePrefs(); });
  $("compare").addEventListener("change", (e) => { state.prefs.compare = e.target.checked; savePrefs(); });
  $("new-chat").addEventListener("click", () => {
    stopAll();
    state.turns = [];
    save(true);
    render();
    setPanel(false);
  });
  $("change-key").addEventListener("click", () => askForKey());
  $("menu").addEventListener("click", () => setPanel(true));
  $("scrim").addEventListener("click", () => setPanel(false));
  $("messages").addEventListener("scroll", hideTip);
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    try {
      await connect();
      sessionStorage.setItem(KEY_STORE, state.key);
      $("key-dialog").close();
      $("prompt").focus();
    } catch (err) {
      $("key-error").hidden = false;
      $("key-error").textContent = err.message;
    }
  });
  render();
  start();
});
