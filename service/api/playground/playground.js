// The playground: plain DOM and fetch, no framework, no build step. Text from the user or the
// model is only ever set as textContent, a text node or an attribute value; never parsed as HTML.

const $ = (id) => document.getElementById(id);

// The API key lives in this variable only: never stored, sent only as the bearer header.
let apiKey = "";
// The model every panel asks for (the picker's choice); empty until /v1/models answers: the server's default.
let model = "";

// ----------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function call(path, body, signal) {
  const headers = {};
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const init = { method: "GET", headers, signal };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(model && body.model === undefined ? { model, ...body } : body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) {
    let message = `The server answered ${response.status} ${response.statusText}.`;
    try {
      const envelope = await response.json();
      if (typeof envelope?.error?.message === "string") message = envelope.error.message;
    } catch {
      // not the JSON error envelope: keep the status line
    }
    throw new ApiError(message, response.status);
  }
  return response;
}

async function callJson(path, body, signal) {
  return (await call(path, body, signal)).json();
}

// The `data` of each server-sent event, as text.
async function* eventData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ----------------------------------------------------------------------------- small helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(id, message, kind = "") {
  const node = $(id);
  node.textContent = message;
  node.dataset.kind = kind;
}

function showError(id, err) {
  if (err.name === "AbortError") return;
  setStatus(id, err instanceof ApiError ? err.message : `Unexpected error: ${err.message}`, "error");
  if (err.status === 401) $("api-key").classList.add("attention");
}

const percent = (p) => (p < 0.0001 ? "<0.01%" : `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`);
const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));

// Whitespace drawn visibly, with glyphs that common fonts have; other control characters in caret notation.
const GLYPHS = { " ": "␣", "\n": "⏎", "\t": "⇥", "\u00a0": "⍽" };
const NAMES = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return", "\ufffd": "unknown character" };

function visible(ch) {
  if (ch in GLYPHS) return GLYPHS[ch];
  const code = ch.codePointAt(0);
  if (code < 0x20) return `^${String.fromCodePoint(0x40 + code)}`;
  if (code === 0x7f) return "^?";
  return ch;
}

function describe(ch) {
  const code = `U+${ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  return ch in NAMES ? `${NAMES[ch]} (${code})` : `“${visible(ch)}” (${code})`;
}

// Texts separated by a line holding only --- (three or more dashes); blank texts are dropped.
function splitTexts(value) {
  const texts = [[]];
  for (const line of value.split("\n")) {
    if (/^-{3,}\s*$/.test(line)) texts.push([]);
    else texts[texts.length - 1].push(line);
  }
  return texts.map((lines) => lines.join("\n")).filter((text) => text.trim() !== "");
}

// A number field: its number, or `empty` when blank (the server then applies its default or "off").
function numberField(id, empty = undefined) {
  const raw = $(id).value.trim();
  return raw === "" ? empty : Number(raw);
}

function unescapeStop(value) {
  const map = { n: "\n", t: "\t", r: "\r", "\\": "\\" };
  return value.replace(/\\([ntr\\])/g, (_, ch) => map[ch]);
}

// Horizontal bars: label, bar and value per row. `rows`: {glyph, name, value, data, top}.
function renderBars(list, rows) {
  list.replaceChildren(
    ...rows.map((row) => {
      const item = el("li", row.top ? "bar top" : "bar");
      Object.assign(item.dataset, row.data);
      const label = el("span", "bar-label", row.glyph);
      label.setAttribute("aria-hidden", "true");
      label.title = row.name;
      const track = el("span", "bar-track");
      const fill = el("span", "bar-fill");
      fill.style.width = `${Math.max(0, Math.min(1, row.value)) * 100}%`;
      track.append(fill);
      item.append(label, el("span", "sr-only", `${row.name}: `), track, el("span", "bar-value", percent(row.value)));
      return item;
    }),
  );
}

function submitOnCtrlEnter(textarea, form) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}

// ----------------------------------------------------------------------------- generate

let generation = null; // the AbortController of the running stream

function generateRequest() {
  const body = {
    prompt: $("gen-prompt").value,
    max_tokens: numberField("gen-max-tokens"),
    temperature: numberField("gen-temperature"),
    top_k: numberField("gen-top-k", null),
    top_p: numberField("gen-top-p"),
    seed: numberField("gen-seed", null),
    stop: $("gen-stop-text").value === "" ? null : unescapeStop($("gen-stop-text").value),
    stream: true,
  };
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

function setGenerating(running) {
  $("gen-start").disabled = running;
  $("gen-stop").disabled = !running;
  $("gen-output").setAttribute("aria-busy", String(running));
}

async function generate(event) {
  event.preventDefault();
  if (generation) return;
  const body = generateRequest();
  const output = $("gen-output");
  const completion = document.createTextNode("");
  output.querySelector(".prompt").textContent = body.prompt;
  output.querySelector(".completion").replaceChildren(completion);
  output.dataset.state = "streaming";
  delete output.dataset.finishReason;
  const controller = new AbortController();
  generation = controller;
  setGenerating(true);
  setStatus("gen-status", "Generating…");
  let finish = null;
  let usage = null;
  try {
    const response = await call("/v1/generate", body, controller.signal);
    for await (const data of eventData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      for (const choice of chunk.choices) {
        completion.appendData(choice.text);
        finish = choice.finish_reason ?? finish;
      }
      usage = chunk.usage ?? usage;
      output.scrollTop = output.scrollHeight;
    }
    output.dataset.state = "done";
    output.dataset.finishReason = finish ?? "";
    const count = usage ? usage.completion_tokens : completion.length;
    setStatus("gen-status", `Done: ${count} characters (finish reason: ${finish}).`, "ok");
  } catch (err) {
    if (controller.signal.aborted) {
      output.dataset.state = "stopped";
      setStatus("gen-status", `Stopped after ${completion.length} characters.`);
    } else {
      output.dataset.state = "error";
      showError("gen-status", err);
    }
  } finally {
    generation = null;
    setGenerating(false);
  }
}

function stopGeneration() {
  generation?.abort(); // closes the connection; the server stops generating before its next step
}

// ----------------------------------------------------------------------------- chat

const scene = []; // the conversation: {role, name, content}; in this page only

function chatLine(name, text, kind) {
  const item = el("li", `speech ${kind}`);
  const words = el("p", "words", text);
  item.append(el("strong", "speaker", name), words);
  $("chat-log").append(item);
  return words;
}

async function speak(event) {
  event.preventDefault();
  const text = $("chat-text").value.trim();
  if (!text || $("chat-send").disabled) return;
  const user = $("chat-user").value.trim() || "HORATIO";
  const assistant = $("chat-assistant").value.trim() || "HAMLET";
  scene.push({ role: "user", name: user, content: text });
  chatLine(user.toUpperCase(), text, "user");
  $("chat-text").value = "";
  const words = chatLine(assistant.toUpperCase(), "", "assistant");
  const reply = document.createTextNode("");
  words.append(reply);
  $("chat-send").disabled = true;
  setStatus("chat-status", "The model is speaking…");
  try {
    const body = { messages: withSpeaker(scene, assistant), stream: true, max_tokens: 400, temperature: 0.8 };
    const response = await call("/v1/chat/completions", body);
    let finish = null;
    for await (const data of eventData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      for (const choice of chunk.choices) {
        reply.appendData(choice.delta.content ?? "");
        finish = choice.finish_reason ?? finish;
      }
    }
    scene.push({ role: "assistant", name: assistant, content: reply.data });
    const ended = finish === "stop" ? "ended the speech" : `stopped (finish reason: ${finish})`;
    setStatus("chat-status", `${assistant.toUpperCase()} ${ended}.`, "ok");
  } catch (err) {
    scene.pop(); // the line was not answered: it is not part of the scene
    words.parentElement.remove();
    showError("chat-status", err);
  } finally {
    $("chat-send").disabled = false;
  }
}

// The reply is spoken by the last assistant message's speaker, so every line of the model's is sent under
// the name in "The model speaks as": renaming it recasts the whole part.
function withSpeaker(messages, assistant) {
  return messages.map((m) => (m.role === "assistant" ? { ...m, name: assistant } : m));
}

function newScene() {
  scene.length = 0;
  $("chat-log").replaceChildren();
  setStatus("chat-status", "");
}

// ----------------------------------------------------------------------------- next character

let nextTimer = 0;
let nextController = null;

function scheduleNext() {
  clearTimeout(nextTimer);
  nextTimer = setTimeout(predictNext, 250);
}

async function predictNext() {
  nextController?.abort(); // a stale answer is never drawn
  const controller = new AbortController();
  nextController = controller;
  const text = $("next-text").value;
  const bars = $("next-bars");
  try {
    const body = await callJson("/v1/next-token", { text, top_k: numberField("next-top-k", 10) }, controller.signal);
    const rows = body.candidates.map((c, i) => ({
      glyph: visible(c.token),
      name: describe(c.token),
      value: c.prob,
      top: i === 0,
      data: { token: c.token, prob: String(c.prob) },
    }));
    renderBars(bars, rows);
    bars.dataset.text = text; // the context these bars answer
    setStatus("next-status", `Entropy of the next character: ${body.entropy_bits.toFixed(3)} bits.`);
  } catch (err) {
    if (controller.signal.aborted) return;
    bars.replaceChildren();
    delete bars.dataset.text;
    showError("next-status", err);
  } finally {
    if (nextController === controller) nextController = null;
  }
}

// ----------------------------------------------------------------------------- score and classify

// The texts of the score or classify form, its results cleared; null, with a message, when there are none.
function startTexts(panel, noun, busy) {
  const texts = splitTexts($(`${panel}-text`).value);
  const results = $(`${panel}-results`);
  results.replaceChildren();
  results.dataset.state = texts.length ? "loading" : "error";
  if (texts.length) setStatus(`${panel}-status`, busy);
  else setStatus(`${panel}-status`, `Enter ${noun} to ${panel}.`, "error");
  return texts.length ? texts : null;
}

function endTexts(panel, err = null) {
  $(`${panel}-results`).dataset.state = err ? "error" : "done";
  if (err) showError(`${panel}-status`, err);
  else setStatus(`${panel}-status`, "");
}

// Surprisal bins in bits; a bin's colour comes from the style sheet (.b0 to .b7).
const EDGES = [1, 2, 3, 4, 6, 8, 11];
const CHARS_PER_FRAME = 2000;
let scoreRun = 0; // a new score request makes older renders stop

function binOf(bits) {
  let i = 0;
  while (i < EDGES.length && bits >= EDGES[i]) i += 1;
  return i;
}

function renderLegend() {
  const bounds = [0, ...EDGES];
  $("score-legend").replaceChildren(
    ...bounds.map((low, i) => {
      const item = el("li", `swatch b${i}`, i < EDGES.length ? `${low}–${EDGES[i]}` : `${low}+`);
      item.title = i < EDGES.length ? `${low} to ${EDGES[i]} bits` : `${low} bits or more`;
      return item;
    }),
    el("li", "unit", "bits"),
  );
}

function bitsOf(logprob) {
  return -logprob / Math.LN2;
}

function charSpan(token, index) {
  const bits = bitsOf(token.logprob);
  const span = el("span", `c b${binOf(bits)}`, token.token === "\n" ? "⏎\n" : token.token);
  span.dataset.i = String(index);
  span.dataset.logprob = String(token.logprob);
  return span;
}

function explain(span) {
  const logprob = Number(span.dataset.logprob);
  const ch = span.textContent === "⏎\n" ? "\n" : span.textContent;
  return `${describe(ch)} at ${span.dataset.i}: ${bitsOf(logprob).toFixed(3)} bits (p = ${Math.exp(logprob).toPrecision(3)})`;
}

function inspect(span) {
  if (!span?.classList?.contains("c")) return;
  const text = explain(span);
  span.title = text; // the exact value on hover, filled in when first needed
  $("score-readout").textContent = text;
}

async function fillHeatmap(container, tokens, run) {
  for (let start = 0; start < tokens.length; start += CHARS_PER_FRAME) {
    await nextFrame(); // one batch per frame: input and painting run in between
    if (run !== scoreRun) return false;
    const batch = document.createDocumentFragment();
    const end = Math.min(tokens.length, start + CHARS_PER_FRAME);
    for (let i = start; i < end; i += 1) batch.append(charSpan(tokens[i], i));
    container.append(batch);
  }
  return true;
}

function moveCursor(container, key) {
  const spans = container.children;
  if (!spans.length) return;
  const current = container.querySelector(".c.cursor");
  const at = current ? Number(current.dataset.i) : -1;
  const target = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: spans.length - 1 }[key];
  const index = Math.max(0, Math.min(spans.length - 1, target));
  current?.classList.remove("cursor");
  spans[index].classList.add("cursor");
  spans[index].scrollIntoView({ block: "nearest" });
  inspect(spans[index]);
}

function heatmapFor(result, index) {
  const article = el("article", "scored");
  const heading = el("h3", "", `Text ${index + 1}`);
  const stats = el(
    "p",
    "stats",
    `${result.n_chars} characters · ${result.bits_per_char.toFixed(3)} bits/char · perplexity ${result.perplexity.toFixed(2)}`,
  );
  const map = el("div", "heatmap");
  map.tabIndex = 0;
  map.setAttribute("role", "group");
  map.setAttribute("aria-label", `Text ${index + 1} by surprisal; arrow keys read each character`);
  map.addEventListener("mouseover", (event) => inspect(event.target));
  map.addEventListener("keydown", (event) => {
    if (!["ArrowRight", "ArrowLeft", "Home", "End"].includes(event.key)) return;
    event.preventDefault();
    moveCursor(map, event.key);
  });
  article.append(heading, stats, map);
  return { article, map };
}

async function score(event) {
  event.preventDefault();
  const run = ++scoreRun;
  $("score-summary").textContent = "";
  $("score-readout").textContent = "";
  const texts = startTexts("score", "a text", "Scoring…");
  if (!texts) return;
  const results = $("score-results");
  try {
    const body = await callJson("/v1/score", { texts, include_tokens: true });
    if (run !== scoreRun) return;
    const chars = body.results.reduce((sum, r) => sum + r.n_chars, 0);
    const logprob = body.results.reduce((sum, r) => sum + r.logprob, 0);
    const bpc = -logprob / chars / Math.LN2;
    const ppl = Math.exp(-logprob / chars);
    const summary = $("score-summary");
    summary.textContent = `${chars} characters in ${texts.length} ${texts.length === 1 ? "text" : "texts"}: `;
    summary.append(el("strong", "", `${bpc.toFixed(3)} bits/char`), `, perplexity ${ppl.toFixed(2)}`);
    summary.dataset.bitsPerChar = String(bpc);
    summary.dataset.perplexity = String(ppl);
    const maps = body.results.map((result, i) => ({ result, ...heatmapFor(result, i) }));
    results.append(...maps.map((m) => m.article));
    for (const { result, map } of maps) {
      if (!(await fillHeatmap(map, result.tokens, run))) return;
    }
    endTexts("score");
  } catch (err) {
    if (run === scoreRun) endTexts("score", err);
  }
}

// ----------------------------------------------------------------------------- classify

async function classify(event) {
  event.preventDefault();
  const texts = startTexts("classify", "a passage", "Classifying…");
  if (!texts) return;
  const results = $("classify-results");
  try {
    const body = await callJson("/v1/classify", { texts });
    results.append(
      ...body.results.map((result, i) => {
        const article = el("article", "classified");
        const heading = el("h3", "", `Passage ${i + 1}: `);
        heading.append(el("strong", "label", result.label));
        const excerpt = el("p", "excerpt", texts[i].length > 140 ? `${texts[i].slice(0, 140)}…` : texts[i]);
        const bars = el("ol", "bars");
        bars.setAttribute("aria-label", `Genre probabilities of passage ${i + 1}`);
        const rows = Object.entries(result.probabilities)
          .sort((a, b) => b[1] - a[1])
          .map(([label, prob]) => ({
            glyph: label,
            name: label,
            value: prob,
            top: label === result.label,
            data: { label, prob: String(prob) },
          }));
        renderBars(bars, rows);
        article.append(heading, excerpt, bars);
        return article;
      }),
    );
    endTexts("classify");
  } catch (err) {
    endTexts("classify", err);
  }
}

// ----------------------------------------------------------------------------- models

function metricRows(metrics) {
  const rows = [];
  for (const [name, value] of Object.entries(metrics ?? {})) {
    if (value === null || value === undefined) continue;
    const shown =
      typeof value === "object"
        ? Object.entries(value)
            .map(([k, v]) => `${k.replaceAll("_", " ")} ${typeof v === "number" ? v.toFixed(3) : v}`)
            .join(", ")
        : typeof value === "number"
          ? value.toFixed(3)
          : String(value);
    rows.push([`held-out ${name.replaceAll("_", " ")}`, shown]);
  }
  return rows;
}

function facts(card) {
  const lm = card.lm;
  const rows = [
    ["status", [card.serving ? "serving" : "pinned requests only", card.default ? "default" : ""].filter(Boolean).join(", ")],
    ["language model", `${lm.parameters.toLocaleString("en-US")} parameters, ${lm.vocab_size} characters`],
  ];
  if (card.corpus) rows.push(["trained on", card.corpus]);
  const parts = Object.entries(lm.architecture).map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`);
  rows.push(["architecture", parts.join(", ")], ...metricRows(lm.metrics));
  if (card.classifier) {
    rows.push(["classifier", `${card.classifier.parameters.toLocaleString("en-US")} parameters`]);
    rows.push(["labels", card.classifier.labels.join(", ")], ...metricRows(card.classifier.metrics));
  } else {
    rows.push(["classifier", "none"]);
  }
  rows.push(["memory", `${(card.memory_bytes / 2 ** 20).toFixed(1)} MiB per worker`]);
  rows.push(["manifest sha256", `${card.manifest_sha256.slice(0, 16)}…`]);
  return rows;
}

// The model picker: each model (its serving version) and each loaded version; every panel sends its choice.
function fillPicker(cards) {
  const picker = $("model-picker");
  const previous = model;
  picker.replaceChildren(
    ...cards.map((card) => {
      const label = card.id.includes("@")
        ? `${card.id}${card.serving ? " (serving)" : ""}`
        : `${card.id} (version ${card.version}${card.default ? ", default" : ""})`;
      const option = el("option", "", label);
      option.value = card.id;
      return option;
    }),
  );
  const fallback = cards.find((card) => card.default && !card.id.includes("@"));
  model = cards.some((card) => card.id === previous) ? previous : (fallback?.id ?? "");
  picker.value = model;
  picker.disabled = !cards.length;
}

// Speaker names from the chosen model's training text, as suggestions for the Chat panel.
function fillSpeakers(cards) {
  const card = cards.find((c) => c.id === model) ?? cards[0];
  $("chat-speakers").replaceChildren(
    ...(card?.speakers ?? []).map((name) => {
      const option = el("option");
      option.value = name;
      return option;
    }),
  );
}

async function loadModels() {
  const list = $("models-list");
  try {
    const body = await callJson("/v1/models");
    const versions = body.data.filter((card) => card.id.includes("@"));
    list.replaceChildren(
      ...versions.map((card) => {
        const article = el("article", "card");
        article.dataset.id = card.id;
        article.dataset.parameters = String(card.lm.parameters);
        const terms = el("dl");
        for (const [term, value] of facts(card)) terms.append(el("dt", "", term), el("dd", "", value));
        article.append(el("h3", "", card.id), terms);
        return article;
      }),
    );
    list.dataset.state = "done";
    setStatus("models-status", "");
    fillPicker(body.data);
    fillSpeakers(body.data);
    const chosen = versions.find((card) => card.default);
    const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
    const summary = [`${body.data.filter((card) => !card.id.includes("@")).length} models`];
    if (chosen) {
      summary.push(`default ${chosen.id} (${compact.format(chosen.lm.parameters)} parameters)`);
      if (chosen.lm.metrics?.test_bpc) summary.push(`${chosen.lm.metrics.test_bpc.toFixed(3)} bits/char held out`);
    }
    setStatus("model-summary", summary.join(" · "));
    $("api-key").classList.remove("attention");
  } catch (err) {
    list.replaceChildren();
    list.dataset.state = "error";
    showError("models-status", err);
    showError("model-summary", err);
  }
}

// ----------------------------------------------------------------------------- wiring

function start() {
  renderLegend();
  $("api-key").addEventListener("input", (event) => {
    apiKey = event.target.value.trim();
  });
  $("api-key").addEventListener("change", loadModels);
  $("model-picker").addEventListener("change", (event) => {
    model = event.target.value;
    scheduleNext();
  });
  $("gen-form").addEventListener("submit", generate);
  $("gen-stop").addEventListener("click", stopGeneration);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && generation) stopGeneration();
  });
  $("next-text").addEventListener("input", scheduleNext);
  $("next-top-k").addEventListener("input", scheduleNext);
  $("score-form").addEventListener("submit", score);
  $("classify-form").addEventListener("submit", classify);
  $("chat-form").addEventListener("submit", speak);
  $("chat-clear").addEventListener("click", newScene);
  for (const [form, textarea] of [
    ["gen-form", "gen-prompt"],
    ["score-form", "score-text"],
    ["classify-form", "classify-text"],
    ["chat-form", "chat-text"],
  ]) {
    submitOnCtrlEnter($(textarea), $(form));
  }
  loadModels();
  document.body.dataset.ready = "true";
}

start();
