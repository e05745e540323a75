// The adapters table (GET /v1/adapters) and its actions: upload, replace, delete, pin and unpin.
import { api, upload } from "./api.js";
import { byId, formatAgo, formatBytes, h, showError } from "./dom.js";

let session = null;
let started = false;
let confirming = null; // the name whose "Confirm delete" is showing

export function init(current) {
  session = current;
  if (started) return;
  started = true;
  byId("adapters-refresh").addEventListener("click", () => refresh());
  byId("upload-form").addEventListener("submit", onUpload);
}

export function show() {
  refresh();
}

/** Tell the other panels (the playground's model list) that adapters changed. */
function changed() {
  document.dispatchEvent(new CustomEvent("adapters-changed"));
}

export async function refresh() {
  const error = byId("adapters-error");
  try {
    const listing = await api("/v1/adapters");
    render(listing.data || []);
    showError(error, "");
  } catch (failure) {
    showError(error, failure);
  }
}

function ownerOf(card) {
  if (card.shared) return "shared";
  return "owner" in card ? card.owner : "this tenant";
}

function render(cards) {
  const body = byId("adapters-table").querySelector("tbody");
  body.replaceChildren(...cards.map(row));
  byId("adapters-empty").hidden = cards.length > 0;
}

function row(card) {
  const name = card.name;
  const cached = card.state === "resident" || card.state === "loaded";
  const actions = h("td", { class: "row-actions" });
  if (confirming === name) {
    actions.append(
      h("button", { type: "button", class: "danger", "aria-label": `Confirm delete ${name}`, onclick: () => remove(name) }, "Confirm delete"),
      h("button", { type: "button", class: "secondary", "aria-label": `Cancel delete ${name}`, onclick: () => { confirming = null; refresh(); } }, "Cancel"),
    );
  } else {
    actions.append(
      h("button", { type: "button", class: "secondary", "aria-label": `${card.pinned ? "Unpin" : "Pin"} ${name}`, onclick: () => pin(name, !card.pinned) }, card.pinned ? "Unpin" : "Pin"),
      h("button", { type: "button", class: "secondary", "aria-label": `Replace ${name}`, onclick: () => replace(name) }, "Replace"),
      h("button", { type: "button", class: "secondary danger", "aria-label": `Delete ${name}`, onclick: () => { confirming = name; refresh(); } }, "Delete"),
    );
  }
  const targets = (card.target_modules || []).join(", ");
  return h(
    "tr",
    { "data-name": name },
    h("th", { scope: "row", class: "name" }, name),
    h("td", {}, ownerOf(card)),
    h("td", { class: "number" }, card.rank),
    h("td", { class: "targets", title: targets }, targets),
    h("td", { class: "number" }, formatBytes(card.size_bytes)),
    h("td", {}, h("span", { class: `badge ${cached ? "hot" : "cold"}` }, cached ? "in cache" : "not cached"), card.in_flight ? ` · ${card.in_flight} running` : ""),
    h("td", {}, card.pinned ? "pinned" : "no"),
    h("td", { class: "number" }, card.request_count),
    h("td", { title: card.last_used ? new Date(card.last_used * 1000).toLocaleString() : "" }, formatAgo(card.last_used)),
    actions,
  );
}

async function pin(name, pinned) {
  try {
    await api(`/v1/adapters/${encodeName(name)}/${pinned ? "pin" : "unpin"}`, { method: "POST" });
    showError(byId("adapters-error"), "");
  } catch (failure) {
    showError(byId("adapters-error"), failure);
  }
  refresh();
}

async function remove(name) {
  confirming = null;
  try {
    await api(`/v1/adapters/${encodeName(name)}`, { method: "DELETE" });
    showError(byId("adapters-error"), "");
    byId("upload-status").textContent = `Deleted ${name}.`;
    changed();
  } catch (failure) {
    showError(byId("adapters-error"), failure);
  }
  refresh();
}

/** The admin names a tenant's adapter "tenant/name": replacing it uploads "name" for that owner. */
function replace(name) {
  const [owner, plain] = name.includes("/") ? name.split("/", 2) : ["", name];
  byId("adapter-name").value = plain;
  if (session.admin) byId("adapter-owner").value = owner;
  byId("upload-status").textContent = `Choose the new files for ${name}, then Upload: the same name replaces it.`;
  byId("adapter-files").focus();
}

function encodeName(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

async function onUpload(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const name = byId("adapter-name").value.trim();
  const files = byId("adapter-files").files;
  const progress = byId("upload-progress");
  const status = byId("upload-status");
  const error = byId("upload-error");
  const button = byId("upload-button");
  showError(error, "");
  const data = new FormData();
  data.append("name", name);
  const owner = session.admin ? byId("adapter-owner").value.trim() : "";
  if (owner) data.append("owner", owner);
  for (const file of files) data.append("file", file, file.name);
  progress.value = 0;
  progress.hidden = false;
  button.disabled = true;
  status.textContent = "Uploading…";
  try {
    const card = await upload("/v1/adapters", data, (fraction) => {
      progress.value = Math.round(fraction * 100);
      status.textContent = fraction < 1 ? `Uploading… ${Math.round(fraction * 100)} %` : "Validating and loading…";
    });
    progress.value = 100;
    status.textContent = `Registered ${card.name} (rank ${card.rank}).`;
    form.reset();
    changed();
  } catch (failure) {
    status.textContent = "";
    showError(error, failure);
  } finally {
    button.disabled = false;
    progress.hidden = true;
  }
  refresh();
}
