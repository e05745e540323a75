// The playground: one model, or two side by side, through the completions or chat route, streamed.
import { api, stream } from "./api.js";
import { byId, h, showError } from "./dom.js";

let started = false;
let running = null; // the AbortController of the run in progress
const chats = { 1: [], 2: [] }; // per column: the conversation so far, as chat messages

export function init() {
  if (started) return;
  started = true;
  byId("playground-form").addEventListener("submit", onRun);
  byId("stop").addEventListener("click", () => running?.abort());
  byId("compare").addEventListener("change", layout);
  byId("endpoint").addEventListener("change", layout);
  byId("clear-chat").addEventListener("click", clearChat);
  document.addEventListener("adapters-changed", loadModels);
  layout();
}

export function show() {
  loadModels();
}

async function loadModels() {
  try {
    const listing = await api("/v1/models");
    const ids = (listing.data || []).map((model) => model.id);
    byId("model-names").replaceChildren(...ids.map((id) => h("option", { value: id })));
    const model = byId("model");
    if (!model.value && ids.length) model.value = ids[0];
    showError(byId("output-error-1"), "");
  } catch (failure) {
    showError(byId("output-error-1"), failure);
  }
}

function chatMode() {
  return byId("endpoint").value === "chat";
}

function layout() {
  const compare = byId("compare").checked;
  byId("second-model-field").hidden = !compare;
  byId("second-output-card").hidden = !compare;
  byId("outputs").classList.toggle("two", compare);
  byId("system-field").hidden = !chatMode();
  byId("clear-chat").hidden = !chatMode();
  for (const column of [1, 2]) byId(`transcript-${column}`).hidden = !chatMode();
}

function clearChat() {
  for (const column of [1, 2]) {
    chats[column] = [];
    byId(`transcript-${column}`).replaceChildren();
    byId(`output-${column}`).textContent = "";
    byId(`output-stats-${column}`).textContent = "";
  }
}

async function onRun(event) {
  event.preventDefault();
  const columns = [[1, byId("model").value.trim()]];
  if (byId("compare").checked && byId("second-model").value.trim()) columns.push([2, byId("second-model").value.trim()]);
  const settings = {
    max_tokens: Number(byId("max-tokens").value),
    temperature: Number(byId("temperature").value),
  };
  const prompt = byId("prompt").value;
  running = new AbortController();
  byId("run").disabled = true;
  byId("stop").disabled = false;
  try {
    await Promise.all(columns.map(([column, model]) => runOne(column, model, prompt, settings, running.signal)));
  } finally {
    running = null;
    byId("run").disabled = false;
    byId("stop").disabled = true;
  }
}

async function runOne(column, model, prompt, settings, signal) {
  const output = byId(`output-${column}`);
  const stats = byId(`output-stats-${column}`);
  const error = byId(`output-error-${column}`);
  byId(`output-title-${column}`).textContent = column === 1 ? `Output · ${model}` : `Second output · ${model}`;
  output.textContent = "";
  stats.textContent = "";
  showError(error, "");
  output.setAttribute("aria-busy", "true");
  const chat = chatMode();
  let path = "/v1/completions";
  let body = { model, prompt, ...settings };
  if (chat) {
    const system = byId("system").value.trim();
    const history = [...chats[column], { role: "user", content: prompt }];
    showTranscript(column, history);
    const messages = system ? [{ role: "system", content: system }, ...history] : history;
    path = "/v1/chat/completions";
    body = { model, messages, ...settings };
  }
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  let finish = null;
  try {
    await stream(
      path,
      body,
      (event) => {
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const piece = chat ? choice.delta?.content : choice.text;
          if (piece) {
            firstToken ??= performance.now();
            output.textContent += piece; // text, never HTML
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      },
      signal,
    );
    if (chat) remember(column, prompt, output.textContent);
  } catch (failure) {
    if (failure.name === "AbortError") stats.textContent = "stopped";
    else showError(error, failure);
  } finally {
    output.removeAttribute("aria-busy");
  }
  if (usage || finish) {
    const seconds = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens (prompt ${usage.prompt_tokens})`);
    if (firstToken !== null) parts.push(`first token ${Math.round(firstToken - started)} ms`);
    parts.push(`${seconds.toFixed(2)} s`);
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
  }
}

function remember(column, prompt, answer) {
  chats[column].push({ role: "user", content: prompt }, { role: "assistant", content: answer });
}

/** The conversation so far and the question asked now; the answer streams into the output below. */
function showTranscript(column, messages) {
  byId(`transcript-${column}`).replaceChildren(
    ...messages.map((message) =>
      h("li", { class: message.role }, h("span", { class: "role" }, message.role === "user" ? "you" : "model"), message.content),
    ),
  );
}
