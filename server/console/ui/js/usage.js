// Usage per model from GET /v1/usage (the gateway's rolling window), polled while shown.
import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { byId, formatMs, h, showError } from "./dom.js";

const POLL_MS = 5000;
const CHART_WIDTH = 112;
let started = false;
let timer = null;

export function init() {
  if (started) return;
  started = true;
  byId("usage-minutes").addEventListener("change", refresh);
}

export function show() {
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, POLL_MS);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

async function refresh() {
  const error = byId("usage-error");
  try {
    const report = await api(`/v1/usage?minutes=${encodeURIComponent(byId("usage-minutes").value)}`);
    render(report);
    showError(error, "");
  } catch (failure) {
    showError(error, failure);
  }
}

function render(report) {
  const rows = (report.data || []).map((entry) => row(entry, report.bucket_seconds));
  byId("usage-table").querySelector("tbody").replaceChildren(...rows);
  byId("usage-empty").hidden = rows.length > 0;
}

function row(entry, bucketSeconds) {
  const points = entry.series || [];
  const xs = points.map((point) => point.start);
  const rate = points.map((point) => point.requests / bucketSeconds);
  const tokens = points.map((point) => point.tokens);
  const p50 = points.map((point) => point.p50_latency_ms);
  const p99 = points.map((point) => point.p99_latency_ms);
  const name = entry.model;
  const tokensTotal = entry.prompt_tokens + entry.completion_tokens;
  return h(
    "tr",
    { "data-model": name },
    h("th", { scope: "row", class: "name" }, name, entry.base ? h("span", { class: "badge" }, "base") : null),
    h("td", { class: "number" }, entry.requests_per_second.toFixed(entry.requests_per_second >= 1 ? 2 : 3)),
    h("td", { class: "number" }, entry.requests),
    h("td", { class: "number" }, entry.errors),
    h("td", { class: "number", title: `prompt ${entry.prompt_tokens}, generated ${entry.completion_tokens}` }, tokensTotal),
    h("td", { class: "number" }, formatMs(entry.p50_latency_ms)),
    h("td", { class: "number" }, formatMs(entry.p99_latency_ms)),
    h("td", {}, lineChart([{ values: rate, className: "requests" }], {
      xs, width: CHART_WIDTH, label: `${name}: requests per second, peak ${Math.max(0, ...rate).toFixed(2)}`, format: (v) => `${v}/s`,
    })),
    h("td", {}, lineChart([{ values: tokens, className: "tokens" }], {
      xs, width: CHART_WIDTH, label: `${name}: tokens per ${bucketSeconds} s, ${tokensTotal} in all`, format: (v) => `${v}`,
    })),
    h("td", {}, lineChart(
      [{ values: p50, className: "p50" }, { values: p99, className: "p99" }],
      { xs, width: CHART_WIDTH, label: `${name}: latency p50 ${formatMs(entry.p50_latency_ms)}, p99 ${formatMs(entry.p99_latency_ms)}`, format: formatMs },
    )),
  );
}
