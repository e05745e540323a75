// The console's shell: sign-in, who the key belongs to, and the section tabs.
import { api, ApiError, forgetKey, storedKey, storeKey } from "./api.js";
import { byId, showError } from "./dom.js";
import * as adapters from "./adapters.js";
import * as jobs from "./jobs.js";
import * as playground from "./playground.js";
import * as tenants from "./tenants.js";
import * as usage from "./usage.js";

const panels = {
  "adapters-panel": adapters,
  "playground-panel": playground,
  "usage-panel": usage,
  "tenants-panel": tenants,
  "jobs-panel": jobs,
};
const session = { admin: false, active: null };

/** Whether the key is the admin's: the tenants list is for the admin alone (403 otherwise). */
async function whoIs() {
  await api("/v1/models"); // 401 for a key that is not valid
  try {
    await api("/v1/tenants");
    return { admin: true };
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) return { admin: false };
    throw error;
  }
}

async function signIn(key) {
  storeKey(key);
  let identity;
  try {
    identity = await whoIs();
  } catch (error) {
    forgetKey();
    throw error;
  }
  session.admin = identity.admin;
  document.body.classList.toggle("admin", identity.admin);
  for (const element of document.querySelectorAll("[data-admin]")) element.hidden = !identity.admin;
  byId("whoami").textContent = identity.admin ? "Signed in with the admin key" : "Signed in with a tenant key";
  byId("whoami").hidden = false;
  byId("sign-out").hidden = false;
  byId("sign-in").hidden = true;
  byId("console").hidden = false;
  for (const panel of Object.values(panels)) panel.init(session);
  activate(location.hash.slice(1) in panels ? location.hash.slice(1) : "adapters-panel");
}

function signOut() {
  forgetKey();
  // Drop everything the key could see: the simplest way is a fresh page.
  location.replace(location.pathname);
}

function activate(id) {
  if (!session.admin && id === "tenants-panel") id = "adapters-panel";
  for (const tab of document.querySelectorAll(".tabs button")) {
    const selected = tab.dataset.panel === id;
    if (selected) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  for (const [panelId, panel] of Object.entries(panels)) {
    const visible = panelId === id;
    byId(panelId).hidden = !visible;
    if (visible) panel.show();
    else panel.hide?.();
  }
  session.active = id;
  history.replaceState(null, "", `#${id}`);
}

function start() {
  byId("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const field = byId("api-key");
    const error = byId("sign-in-error");
    showError(error, "");
    try {
      await signIn(field.value.trim());
      field.value = "";
    } catch (failure) {
      showError(error, failure);
      field.focus();
    }
  });
  byId("sign-out").addEventListener("click", signOut);
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.addEventListener("click", () => activate(tab.dataset.panel));
  }
  const key = storedKey();
  if (key !== null) {
    signIn(key).catch((failure) => showError(byId("sign-in-error"), failure));
  } else {
    byId("api-key").focus();
  }
}

start();
