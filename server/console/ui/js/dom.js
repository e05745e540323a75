// Small DOM helpers. Text always goes in as text (textContent or text nodes), never as HTML:
// adapter names, errors and model output come from elsewhere.

/** An element with attributes and children; strings become text nodes. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function byId(id) {
  return document.getElementById(id);
}

/** Show a message (an ApiError's description, or any text) in an alert element; "" clears it. */
export function showError(element, error) {
  element.textContent = !error ? "" : typeof error.describe === "function" ? error.describe() : String(error.message || error);
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** "12 s ago", "3 min ago", or a date; "never" for none. Times are Unix seconds. */
export function formatAgo(seconds) {
  if (!seconds) return "never";
  const age = Date.now() / 1000 - seconds;
  if (age < 0) return new Date(seconds * 1000).toLocaleString();
  if (age < 60) return `${Math.round(age)} s ago`;
  if (age < 3600) return `${Math.round(age / 60)} min ago`;
  if (age < 86400) return `${Math.round(age / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

export function formatTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

export function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}
