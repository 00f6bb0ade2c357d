// The chat page of `mlx-openelm serve`: streams /v1/chat/completions, keeps the conversation in
// localStorage. Model output is untrusted: it only ever reaches the page as text nodes.
"use strict";

const KEY = "mlx-openelm-chat";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop"), notice = $("notice");
const fields = { system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
                 apiKey: $("api-key") };

let state = load();
let model = null;       // the served model's id, from /v1/models
let controller = null;  // the running request's AbortController
let drawQueued = false;

function load() {
  const fresh = { messages: [], settings: { system: "", temperature: 0.7, maxTokens: 512, apiKey: "" } };
  try {
    const saved = JSON.parse(localStorage.getItem(KEY));
    if (!saved || !Array.isArray(saved.messages)) return fresh;
    for (const m of saved.messages) {
      if (m.pending) { delete m.pending; m.stopped = true; }  // the page was closed mid-reply
    }
    return { messages: saved.messages, settings: { ...fresh.settings, ...saved.settings } };
  } catch {
    return fresh;
  }
}

function save() {
  localStorage.setItem(KEY, JSON.stringify(state));
}

// ---- Markdown, built as DOM nodes: text goes in through text nodes only, never as HTML.

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s*(#{1,6})\s+(.*)$/;
const ITEM = /^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s*>\s?(.*)$/;
const blank = (line) => line.trim() === "";
const startsBlock = (line) => [FENCE, HEADING, ITEM, RULE, QUOTE].some((re) => re.test(line));

function renderMarkdown(text, into) {
  const lines = text.split("\n");
  let i = 0, m;
  while (i < lines.length) {
    const line = lines[i];
    if ((m = line.match(FENCE))) {  // an unclosed fence (a reply still streaming) runs to the end
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) code.push(lines[i]);
      i++;
      const pre = el("pre"), c = el("code", code.join("\n"));
      if (m[2]) c.className = "language-" + m[2];
      pre.append(c);
      into.append(pre);
    } else if (blank(line)) {
      i++;
    } else if ((m = line.match(HEADING))) {
      into.append(inline(el("h" + Math.min(m[1].length + 2, 6)), m[2]));
      i++;
    } else if (RULE.test(line)) {
      into.append(el("hr"));
      i++;
    } else if ((m = line.match(ITEM))) {
      const ordered = !m[1], list = el(ordered ? "ol" : "ul");
      if (ordered && m[2] !== "1") list.start = Number(m[2]);
      while (i < lines.length && (m = lines[i].match(ITEM)) && !m[1] === ordered) {
        list.append(inline(el("li"), m[3]));
        i++;
      }
      into.append(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) quoted.push(m[1]);
      const q = el("blockquote");
      renderMarkdown(quoted.join("\n"), q);
      into.append(q);
    } else {  // a paragraph: its lines kept as lines
      const p = el("p");
      for (let first = true; i < lines.length && !blank(lines[i]) && (first || !startsBlock(lines[i])); i++) {
        if (!first) p.append(el("br"));
        inline(p, lines[i]);
        first = false;
      }
      into.append(p);
    }
  }
  return into;
}

// `code`, **bold**, *italic*, [label](http...), and bare http(s) URLs.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
  /\*\*([^\s*](?:[\s\S]*?[^\s*])?)\*\*/.source,
  /\*([^\s*](?:[\s\S]*?[^\s*])?)\*/.source,
  /\[([^\]\n]+)\]\(([^)\s]+)\)/.source,
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source,
].join("|"), "g");

function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    parent.append(text.slice(last, m.index));  // a string becomes a text node
    if (m[1]) parent.append(el("code", m[2]));
    else if (m[3]) parent.append(inline(el("strong"), m[3]));
    else if (m[4]) parent.append(inline(el("em"), m[4]));
    else if (m[5]) parent.append(link(m[6], m[5]) ?? m[0]);
    else parent.append(link(m[7], m[7]));
    last = m.index + m[0].length;
  }
  parent.append(text.slice(last));
  return parent;
}

function link(href, label) {
  if (!/^https?:\/\//i.test(href)) return null;  // javascript:, data: and the rest stay text
  const a = el("a", label);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

// ---- The conversation on screen.

function messageNode(msg) {
  const node = el("article");
  node.className = "msg " + msg.role;
  node.append(el("div", msg.role === "user" ? "You" : "Model"));
  node.firstChild.className = "who";
  const body = el("div");
  body.className = "body";
  if (msg.role === "user") body.textContent = msg.content;
  else renderMarkdown(msg.content, body);
  if (msg.pending && !msg.content) body.append(el("span", "…"));
  node.append(body);
  const facts = [];
  if (msg.stats) facts.push(msg.stats);
  if (msg.stopped) facts.push("stopped");
  if (msg.cut) facts.push("cut at max tokens");
  if (facts.length) {
    const s = el("div", facts.join(" · "));
    s.className = "stats";
    node.append(s);
  }
  return node;
}

function draw() {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.replaceChildren(...state.messages.map(messageNode));
  if (!state.messages.length) {
    const hint = el("p", "Ask something. Enter sends, Shift+Enter starts a new line.");
    hint.className = "muted empty";
    log.append(hint);
  }
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function drawSoon() {  // at most once a frame while tokens stream in
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    draw();
    save();
  });
}

function say(text) {
  notice.textContent = text || "";
  notice.hidden = !text;
}

function setBusy(busy) {
  send.hidden = busy;
  stop.hidden = !busy;
  input.setAttribute("aria-busy", String(busy));
}

// ---- Talking to the server.

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = state.settings.apiKey.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (response.status === 401) return "This server needs an API key: enter it under Settings.";
    return body.error?.message || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function findModel() {
  const r = await fetch("v1/models", { headers: headers() });
  if (!r.ok) {
    if (r.status === 401) $("settings").open = true;
    throw new Error(await errorText(r));
  }
  model = (await r.json()).data[0].id;
  $("model").textContent = model.replace(/\/+$/, "").split("/").pop();
}

async function connect() {
  try {
    await findModel();
    say("");
  } catch (e) {
    say(e.message);
    if (/loading/.test(e.message)) setTimeout(connect, 2000);
  }
}

function requestBody() {
  const s = state.settings;
  const messages = state.messages.filter((m) => !m.pending).map((m) => ({ role: m.role, content: m.content }));
  if (s.system.trim()) messages.unshift({ role: "system", content: s.system });
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(s.temperature), maxTokens = parseInt(s.maxTokens, 10);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function submit() {
  const text = input.value.trim();
  if (!text || controller) return;
  controller = new AbortController();
  setBusy(true);
  say("");
  const user = { role: "user", content: text };
  const reply = { role: "assistant", content: "", pending: true };
  state.messages.push(user);
  input.value = "";
  let first = null, last = null, chunks = 0, usage = null;
  try {
    if (!model) await findModel();
    const body = requestBody();
    state.messages.push(reply);
    draw();
    const r = await fetch("v1/chat/completions", { method: "POST", headers: headers(),
                                                   body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        if (chunk.choices?.[0]?.finish_reason === "length") reply.cut = true;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          last = performance.now();
          first ??= last;
          chunks++;
          reply.content += delta;
          drawSoon();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else {
      say(e.message);
      if (!reply.content) {  // nothing came back: give the message back to edit and resend
        state.messages = state.messages.filter((m) => m !== user && m !== reply);
        input.value = text;
      }
    }
  } finally {
    delete reply.pending;
    const tokens = usage?.completion_tokens ?? chunks;
    if (tokens && first !== null) {
      // Decode speed: the tokens after the first over the time after it (prefill excluded).
      const seconds = (last - first) / 1000;
      const speed = tokens > 1 && seconds > 0 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tok/s` : "";
      reply.stats = `${tokens} tokens${speed}`;
    }
    controller = null;
    setBusy(false);
    draw();
    save();
    input.focus();
  }
}

// ---- Wiring.

for (const [name, field] of Object.entries(fields)) {
  field.value = state.settings[name];
  field.addEventListener("input", () => {
    state.settings[name] = field.value;
    save();
  });
}
fields.apiKey.addEventListener("change", connect);

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submit();
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});
stop.addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  state.messages = [];
  save();
  draw();
  say("");
  input.focus();
});

draw();
connect();
input.focus();
