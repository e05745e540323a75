// Fine-tuning jobs through OpenAI's API shapes: GET /v1/fine_tuning/jobs, and each job's
// metrics events for its loss curve. A gateway without that API answers 404: say so.
import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { byId, formatTime, h, showError } from "./dom.js";

const EVENTS_PAGE = 100; // the API's largest page
const EVENTS_PAGES = 50;
let started = false;

export function init() {
  if (started) return;
  started = true;
  byId("jobs-refresh").addEventListener("click", refresh);
}

export function show() {
  refresh();
}

async function refresh() {
  const note = byId("jobs-note");
  const error = byId("jobs-error");
  try {
    const listing = await api("/v1/fine_tuning/jobs?limit=100");
    const jobs = listing.data || [];
    byId("jobs-table").querySelector("tbody").replaceChildren(...jobs.map(row));
    byId("jobs-empty").hidden = jobs.length > 0;
    note.hidden = true;
    showError(error, "");
  } catch (failure) {
    byId("jobs-table").querySelector("tbody").replaceChildren();
    byId("jobs-empty").hidden = true;
    if (failure.status === 404) {
      note.textContent = "This gateway has no fine-tuning API: GET /v1/fine_tuning/jobs answered 404.";
      note.hidden = false;
      showError(error, "");
    } else {
      note.hidden = true;
      showError(error, failure);
    }
  }
}

function row(job) {
  return h(
    "tr",
    { "data-job": job.id },
    h("th", { scope: "row", class: "name" }, h("code", {}, job.id)),
    h("td", {}, h("span", { class: `badge status-${String(job.status).replace(/[^a-z_]/g, "")}` }, job.status)),
    h("td", {}, job.model ?? "–"),
    h("td", {}, job.fine_tuned_model ?? "–"),
    h("td", {}, formatTime(job.created_at)),
    h("td", {}, formatTime(job.finished_at)),
    h("td", { class: "row-actions" }, h("button", { type: "button", class: "secondary", "aria-label": `Loss curve of ${job.id}`, onclick: () => showLoss(job) }, "Loss curve")),
  );
}

async function showLoss(job) {
  const figure = byId("loss");
  const error = byId("jobs-error");
  try {
    const metrics = (await allEvents(job.id))
      .filter((event) => event.type === "metrics" && event.data && Number.isFinite(event.data.step))
      .sort((a, b) => a.data.step - b.data.step);
    const steps = metrics.map((event) => event.data.step);
    const train = metrics.map((event) => (Number.isFinite(event.data.train_loss) ? event.data.train_loss : null));
    const valid = metrics.map((event) => (Number.isFinite(event.data.valid_loss) ? event.data.valid_loss : null));
    byId("loss-title").textContent = `Loss of ${job.id} (${job.status})`;
    const chart = byId("loss-chart");
    if (!metrics.length) {
      chart.replaceChildren(h("p", { class: "muted" }, "No metrics events yet."));
      byId("loss-summary").textContent = "";
    } else {
      const last = metrics[metrics.length - 1].data;
      const label = `training loss over ${steps.length} steps, last ${Number(last.train_loss).toFixed(4)}`;
      const series = [{ values: train, className: "train" }];
      if (valid.some((value) => value !== null)) series.push({ values: valid, className: "valid", connect: true });
      chart.replaceChildren(lineChart(series, { xs: steps, label, width: 560, height: 180, format: (v) => v.toFixed(2) }));
      const validText = Number.isFinite(last.valid_loss) ? `, validation ${last.valid_loss.toFixed(4)}` : "";
      byId("loss-summary").textContent = `Step ${last.step}: training loss ${Number(last.train_loss).toFixed(4)}${validText}. ` +
        (series.length > 1 ? "Solid: training; dashed: validation." : "");
    }
    figure.hidden = false;
    showError(error, "");
  } catch (failure) {
    showError(error, failure);
  }
}

/** Every event of a job, page by page (OpenAI's `after` cursor), up to EVENTS_PAGES pages. */
async function allEvents(jobId) {
  const events = [];
  let after = null;
  for (let page = 0; page < EVENTS_PAGES; page += 1) {
    const query = `limit=${EVENTS_PAGE}${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const listing = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?${query}`);
    const data = listing.data || [];
    events.push(...data);
    if (!listing.has_more || !data.length) break;
    after = data[data.length - 1].id;
  }
  return events;
}
