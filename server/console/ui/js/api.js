// Every call the console makes goes to the gateway's own /v1 API with the signed-in key, sent
// only as the Authorization header. The key lives in this tab's sessionStorage, never in a URL
// or a cookie.

const KEY_SLOT = "lora-gateway.api-key";

export function storedKey() {
  return sessionStorage.getItem(KEY_SLOT);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_SLOT, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_SLOT);
}

function authHeaders() {
  const key = storedKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** An error as the API gave it: status, and OpenAI's {message, type, param, code}. */
export class ApiError extends Error {
  constructor(status, body, fallback) {
    const error = body && typeof body === "object" && body.error ? body.error : null;
    super(error && error.message ? String(error.message) : fallback);
    this.status = status;
    this.code = error && error.code ? String(error.code) : null;
    this.type = error && error.type ? String(error.type) : null;
    this.param = error && error.param ? String(error.param) : null;
  }

  /** One line for people: "404 adapter_not_found: no adapter named 'x'". */
  describe() {
    const head = this.status ? `${this.status}${this.code ? " " + this.code : ""}` : "network error";
    return `${head}: ${this.message}`;
  }
}

async function parse(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Call the API; resolve to the JSON body, or reject with an ApiError. */
export async function api(path, { method = "GET", json, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  const options = { method, headers, signal, cache: "no-store", credentials: "omit" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null, `the gateway did not answer (${error.message})`);
  }
  const body = await parse(response);
  if (!response.ok) {
    throw new ApiError(response.status, body, typeof body === "string" && body ? body : response.statusText);
  }
  return body;
}

/** POST a multipart form with upload progress (fetch has none): onProgress(fraction). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.setRequestHeader("Accept", "application/json");
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      let body = null;
      try {
        body = request.responseText ? JSON.parse(request.responseText) : null;
      } catch {
        body = request.responseText;
      }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new ApiError(request.status, body, request.statusText || "upload refused"));
    });
    request.addEventListener("error", () => reject(new ApiError(0, null, "the upload did not reach the gateway")));
    request.addEventListener("abort", () => reject(new ApiError(0, null, "the upload was cancelled")));
    request.send(form);
  });
}

/**
 * POST a streaming generation request and call onEvent(json) for each server-sent event until
 * [DONE]. A final {"error": ...} event (the stream had started) rejects like an error status.
 */
export async function stream(path, body, onEvent, signal) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null, `the gateway did not answer (${error.message})`);
  }
  if (!response.ok) {
    const failure = await parse(response);
    throw new ApiError(response.status, failure, response.statusText);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const event = pending.slice(0, end);
      pending = pending.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(response.status, parsed, "the stream failed");
      onEvent(parsed);
    }
  }
}
