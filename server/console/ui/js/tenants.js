// Tenants and their keys (the admin's): create, set limits, issue a key (shown once), revoke.
import { api } from "./api.js";
import { byId, formatBytes, formatTime, h, showError } from "./dom.js";

const LIMITS = [
  ["max_concurrent", "limit-max-concurrent", "concurrent"],
  ["requests_per_second", "limit-rps", "req/s"],
  ["max_adapters", "limit-max-adapters", "adapters"],
  ["max_upload_bytes", "limit-max-upload", "upload"],
];
let session = null;
let started = false;
let editing = null; // the tenant whose limits the form sets, or null to create one

export function init(current) {
  session = current;
  if (started || !session.admin) return;
  started = true;
  byId("tenants-refresh").addEventListener("click", refresh);
  byId("tenant-form").addEventListener("submit", onSubmit);
  byId("tenant-cancel").addEventListener("click", () => edit(null));
  byId("new-key-dismiss").addEventListener("click", () => {
    byId("new-key-value").textContent = "";
    byId("new-key").hidden = true;
  });
  byId("new-key-copy").addEventListener("click", async () => {
    await navigator.clipboard?.writeText(byId("new-key-value").textContent);
    byId("tenant-status").textContent = "Copied.";
  });
}

export function show() {
  if (session?.admin) refresh();
}

async function refresh() {
  try {
    const listing = await api("/v1/tenants");
    byId("tenants-table").querySelector("tbody").replaceChildren(...(listing.data || []).map(row));
    showError(byId("tenants-error"), "");
  } catch (failure) {
    showError(byId("tenants-error"), failure);
  }
}

function row(tenant) {
  const limits = h(
    "ul",
    { class: "limits" },
    LIMITS.map(([field, , unit]) => {
      const value = tenant.limits[field];
      return h("li", {}, field === "max_upload_bytes" ? `${formatBytes(value)} upload` : `${value} ${unit}`);
    }),
  );
  const keys = h(
    "ul",
    { class: "keys" },
    (tenant.keys || []).map((key) =>
      h(
        "li",
        {},
        h("code", {}, key.id),
        h("span", { class: "muted" }, ` ${formatTime(key.created)} `),
        h("button", { type: "button", class: "secondary danger", "aria-label": `Revoke ${key.id}`, onclick: () => revoke(tenant.name, key.id) }, "Revoke"),
      ),
    ),
  );
  const name = tenant.name;
  return h(
    "tr",
    { "data-tenant": name },
    h("th", { scope: "row", class: "name" }, name),
    h("td", {}, limits),
    h("td", { class: "number" }, tenant.adapters),
    h("td", { class: "number" }, tenant.in_flight),
    h("td", {}, keys),
    h(
      "td",
      { class: "row-actions" },
      h("button", { type: "button", class: "secondary", "aria-label": `Issue a key for ${name}`, onclick: () => issue(name) }, "Issue key"),
      h("button", { type: "button", class: "secondary", "aria-label": `Set limits of ${name}`, onclick: () => edit(tenant) }, "Set limits"),
    ),
  );
}

function edit(tenant) {
  editing = tenant ? tenant.name : null;
  const nameField = byId("tenant-name");
  nameField.value = tenant ? tenant.name : "";
  nameField.readOnly = Boolean(tenant);
  for (const [field, id] of LIMITS) byId(id).value = tenant ? tenant.limits[field] : "";
  byId("tenant-form-title").textContent = tenant ? `Set the limits of ${tenant.name}` : "Create a tenant or set its limits";
  byId("tenant-submit").textContent = tenant ? "Save limits" : "Create tenant";
  byId("tenant-cancel").hidden = !tenant;
  (tenant ? byId("limit-max-concurrent") : nameField).focus();
}

function showKey(title, key) {
  byId("new-key-title").textContent = title;
  byId("new-key-value").textContent = key;
  byId("new-key").hidden = false;
}

async function onSubmit(event) {
  event.preventDefault();
  const limits = {};
  for (const [field, id] of LIMITS) {
    const value = byId(id).value.trim();
    if (value !== "") limits[field] = Number(value);
  }
  const status = byId("tenant-status");
  try {
    if (editing) {
      await api(`/v1/tenants/${encodeURIComponent(editing)}`, { method: "PATCH", json: { limits } });
      status.textContent = `Saved the limits of ${editing}.`;
      edit(null);
    } else {
      const name = byId("tenant-name").value.trim();
      const created = await api("/v1/tenants", { method: "POST", json: { name, limits } });
      showKey(`Tenant ${created.name} created. Its first key:`, created.api_key);
      status.textContent = "";
      byId("tenant-form").reset();
    }
    showError(byId("tenants-error"), "");
  } catch (failure) {
    showError(byId("tenants-error"), failure);
  }
  refresh();
}

async function issue(name) {
  try {
    const issued = await api(`/v1/tenants/${encodeURIComponent(name)}/keys`, { method: "POST" });
    showKey(`New key ${issued.id} for ${name}:`, issued.api_key);
    showError(byId("tenants-error"), "");
  } catch (failure) {
    showError(byId("tenants-error"), failure);
  }
  refresh();
}

async function revoke(name, keyId) {
  try {
    await api(`/v1/tenants/${encodeURIComponent(name)}/keys/${encodeURIComponent(keyId)}`, { method: "DELETE" });
    byId("tenant-status").textContent = `Revoked ${keyId}.`;
    showError(byId("tenants-error"), "");
  } catch (failure) {
    showError(byId("tenants-error"), failure);
  }
  refresh();
}
