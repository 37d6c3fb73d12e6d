// The chat page: streams replies from /chat_stream as server-sent events.
// Events: queued {position}, token {text}, done {finish_reason, usage}, error {code, message};
// others are ignored. A reply whose connection drops before done or error is resumed right
// after the last event shown (GET /chat_stream/{X-Request-ID} with Last-Event-ID), on
// whichever pod answers, every `retry:` milliseconds until RESUME_GIVE_UP_MS pass without success.
// The conversation lives on the server, keyed by the HttpOnly `sid` cookie that fetch sends;
// so do its generation settings (GET/POST /generation_params, the Settings panel).
// The header's load badge polls GET /load every few seconds while the page is visible.
"use strict";

(() => {
  const KEY_STORAGE = "chatstream.apiKey"; // per tab; gone when the tab closes
  const SETTINGS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"];
  const LOAD_POLL_MS = 5000; // gentle: every open page polls
  const RESUME_RETRY_MS = 1000; // between reconnection attempts, until the server's `retry:` says otherwise
  const RESUME_GIVE_UP_MS = 30000; // of reconnecting without getting an event
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), empty: $("empty"), status: $("status"), composer: $("composer"),
    input: $("input"), send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
    keyPanel: $("key-panel"), keyForm: $("key-form"), key: $("api-key"),
    load: $("load"), settingsToggle: $("settings-toggle"), settingsPanel: $("settings-panel"),
    settingsForm: $("settings-form"), settingsStatus: $("settings-status"), resetSettings: $("reset-settings"),
  };
  const settingInput = (name) => $(`set-${name}`);
  let loadTimer = 0; // the next GET /load
  let loadInFlight = false;
  let controller = null; // aborts the reply in flight
  let streamingId = ""; // its X-Request-ID, once known: Stop also stops its generation
  let lastReply = null; // the last assistant bubble, replaced by Regenerate
  let afterKey = null; // what to retry once the user has entered an API key

  function headers(extra) {
    const result = { ...extra };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  function setStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.clear.disabled = busy;
    ui.stop.hidden = !busy;
    if (busy) ui.regenerate.disabled = true;
  }

  function addBubble(role, text) {
    ui.empty.hidden = true;
    const bubble = document.createElement("div");
    bubble.className = `msg ${role}`;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    bubble.append(body);
    ui.messages.append(bubble);
    bubble.scrollIntoView({ block: "end" });
    return bubble;
  }

  function resetBubble(bubble) {
    bubble.querySelector(".text").textContent = "";
    bubble.querySelector(".error")?.remove();
  }

  function showError(bubble, text) {
    const error = document.createElement("span");
    error.className = "error";
    error.textContent = text;
    bubble.append(error);
    bubble.classList.remove("streaming");
    setStatus("The reply failed", true);
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return `${body.message || body.error} (HTTP ${response.status})`;
    } catch {
      return `HTTP ${response.status} ${response.statusText}`;
    }
  }

  // Resolves after `ms`, or rejects with the abort's AbortError when `signal` aborts first.
  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const abort = () => {
        clearTimeout(timer);
        reject(signal.reason);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener("abort", abort);
        resolve();
      }, ms);
      signal.addEventListener("abort", abort, { once: true });
    });
  }

  // Yields {name, data, id} for each server-sent event of a fetch() response body (id: the
  // event's `id:`, or null); a `retry:` field is passed to onRetry. Ends when the body ends
  // or its connection drops, alike (an event cut off is not yielded).
  async function* sseEvents(response, onRetry) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error instanceof TypeError) return; // fetch's "network error"
        throw error; // an abort
      }
      const { value, done } = chunk;
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let data = "";
        let id = null;
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
          else if (line.startsWith("id:")) id = line.slice(3).trim();
          else if (line.startsWith("retry:")) {
            const ms = Number(line.slice(6).trim());
            if (Number.isInteger(ms) && ms >= 0) onRetry(ms);
          }
        }
        if (data) yield { name, data: JSON.parse(data), id };
      }
    }
  }

  function askForKey(retry, message) {
    afterKey = retry;
    ui.keyPanel.hidden = false;
    ui.key.focus();
    setStatus(message, true);
  }

  // One assistant reply in flight: shows its events in its bubble and keeps the cursor of
  // the last one, so that a dropped connection resumes right after it, text shown once.
  class Reply {
    constructor(bubble, requestId, signal) {
      this.bubble = bubble;
      this.text = bubble.querySelector(".text");
      this.requestId = requestId;
      this.signal = signal; // the Stop button's: aborts reading, waiting and reconnecting
      this.lastId = "";
      this.retryMs = RESUME_RETRY_MS;
      this.generating = false; // a token arrived on this connection
      this.ended = false; // done or error arrived
      this.succeeded = false;
    }

    // Shows `response`, resuming as often as its connections drop, until the reply ends.
    async follow(response) {
      let failingSince = Date.now();
      for (;;) {
        if (await this.read(response)) failingSince = Date.now();
        if (this.ended) return;
        if (!this.requestId) {
          showError(this.bubble, "The connection closed before the reply was complete.");
          return;
        }
        response = await this.reconnect(failingSince);
        if (!response) return;
      }
    }

    // Shows the events of one response until it ends or its connection drops (the caller
    // then resumes); returns whether it showed any.
    async read(response) {
      let shown = false;
      this.generating = false;
      for await (const event of sseEvents(response, (ms) => (this.retryMs = ms))) {
        if (event.id) this.lastId = event.id;
        if (this.show(event)) shown = true;
      }
      return shown;
    }

    // Shows one event; false for an event this page does not know (e.g. a `reconnect`
    // hint: the stream ends after it, and the page resumes anyway).
    show(event) {
      if (event.name === "queued") {
        setStatus(`Waiting in queue: position ${event.data.position}`);
      } else if (event.name === "token") {
        if (!this.generating) setStatus("Generating…");
        this.generating = true;
        this.text.textContent += event.data.text;
        this.bubble.scrollIntoView({ block: "end" });
      } else if (event.name === "done") {
        this.ended = this.succeeded = true;
        const usage = event.data.usage;
        setStatus(`Done: ${usage.completion_tokens} tokens (${event.data.finish_reason})`);
      } else if (event.name === "error") {
        this.ended = true;
        showError(this.bubble, `${event.data.message} [${event.data.code}]`);
      } else {
        return false;
      }
      return true;
    }

    // The rest of the reply, after the last event shown, from any pod: waits `retry:`
    // between attempts while the server is unreachable. Null (the error shown) when the
    // reply is gone or RESUME_GIVE_UP_MS passed since `failingSince` without success.
    async reconnect(failingSince) {
      const resumeHeaders = { Accept: "text/event-stream" };
      if (this.lastId) resumeHeaders["Last-Event-ID"] = this.lastId;
      for (let attempt = 1; Date.now() - failingSince < RESUME_GIVE_UP_MS; attempt++) {
        setStatus(attempt === 1 ? "Reconnecting…" : `Reconnecting… (attempt ${attempt})`);
        await sleep(this.retryMs, this.signal);
        let response;
        try {
          response = await fetch(`/chat_stream/${encodeURIComponent(this.requestId)}`, {
            headers: headers(resumeHeaders),
            credentials: "same-origin",
            signal: this.signal,
          });
        } catch (error) {
          if (error instanceof TypeError) continue; // fetch's "network error": unreachable for now
          throw error; // an abort
        }
        if (response.status === 204) return null; // this page had the last event already
        if (response.ok) return response;
        if (response.status === 404) {
          showError(this.bubble, "The connection was lost, and the server no longer has this reply.");
          return null;
        }
        if (response.status < 500) {
          showError(this.bubble, `The connection was lost and could not be resumed: ${await errorText(response)}`);
          return null;
        }
        response.body?.cancel(); // a pod or Redis restarting: try again
      }
      const seconds = RESUME_GIVE_UP_MS / 1000;
      showError(this.bubble, `The connection was lost and could not be resumed within ${seconds} s; try again later.`);
      return null;
    }
  }

  async function generate(payload, bubble) {
    resetBubble(bubble);
    bubble.classList.add("streaming");
    setBusy(true);
    setStatus("Sending…");
    controller = new AbortController();
    let succeeded = false;
    try {
      const response = await fetch("/chat_stream", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(payload),
        credentials: "same-origin",
        signal: controller.signal,
      });
      if (response.status === 401) {
        bubble.classList.remove("streaming");
        askForKey(() => generate(payload, bubble), "This server needs an API key.");
        return;
      }
      if (!response.ok) {
        showError(bubble, await errorText(response));
        return;
      }
      streamingId = response.headers.get("X-Request-ID") || "";
      const reply = new Reply(bubble, streamingId, controller.signal);
      await reply.follow(response);
      succeeded = reply.succeeded;
    } catch (error) {
      if (error.name === "AbortError") setStatus("Stopped.");
      else showError(bubble, `Could not reach the server: ${error.message}`);
    } finally {
      bubble.classList.remove("streaming");
      controller = null;
      streamingId = "";
      setBusy(false);
      // Only a finished reply is recorded on the server, so only it can be regenerated.
      ui.regenerate.disabled = !succeeded;
      ui.input.focus();
    }
  }

  async function clearConversation() {
    const response = await fetch("/clear_context", { method: "POST", headers: headers({ "Content-Type": "application/json" }), credentials: "same-origin" });
    if (response.status === 401) {
      askForKey(clearConversation, "This server needs an API key.");
      return;
    }
    if (!response.ok) {
      setStatus(`Clearing failed: ${await errorText(response)}`, true);
      return;
    }
    ui.messages.querySelectorAll(".msg").forEach((m) => m.remove());
    ui.empty.hidden = false;
    lastReply = null;
    ui.regenerate.disabled = true;
    setStatus("Conversation cleared.");
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value.trim();
    if (!text || controller) return;
    ui.input.value = "";
    addBubble("user", text);
    lastReply = addBubble("assistant", "");
    generate({ user_input: text }, lastReply);
  });

  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  ui.regenerate.addEventListener("click", () => {
    if (lastReply && !controller) generate({ user_input: "", regenerate: true }, lastReply);
  });

  // Leaving alone would keep the generation going for the server's resume grace.
  ui.stop.addEventListener("click", () => {
    if (streamingId) {
      fetch(`/chat_stream/${encodeURIComponent(streamingId)}`, { method: "DELETE", headers: headers({}), credentials: "same-origin" })
        .catch(() => {}); // best effort: the grace ends it anyway
    }
    controller?.abort();
  });
  ui.clear.addEventListener("click", clearConversation);

  function setSettingsStatus(text, isError = false) {
    ui.settingsStatus.textContent = text;
    ui.settingsStatus.classList.toggle("error", isError);
  }

  function describeLimit(limit) {
    const low = "exclusiveMinimum" in limit ? `> ${limit.exclusiveMinimum}` : `≥ ${limit.minimum}`;
    const kind = limit.type === "integer" ? "an integer" : "a number";
    return "maximum" in limit ? `${kind} ${low} and ≤ ${limit.maximum}` : `${kind} ${low}`;
  }

  // state: the body of GET /generation_params. A field the session did not set stays
  // empty and shows the servers' default as its placeholder.
  function showSettings(state) {
    for (const name of SETTINGS) {
      const input = settingInput(name);
      input.value = state.session[name] ?? "";
      const fallback = state.defaults[name];
      input.placeholder = fallback === null ? "default" : `default ${fallback}`;
      input.title = describeLimit(state.limits[name]);
      input.removeAttribute("aria-invalid");
    }
  }

  async function loadSettings() {
    setSettingsStatus("Loading…");
    const response = await fetch("/generation_params", { headers: headers(), credentials: "same-origin" });
    if (response.status === 401) {
      askForKey(loadSettings, "This server needs an API key.");
      setSettingsStatus("");
      return;
    }
    if (!response.ok) {
      setSettingsStatus(`Could not load the settings: ${await errorText(response)}`, true);
      return;
    }
    showSettings(await response.json());
    setSettingsStatus("");
  }

  // values: {name: number or null}; null resets that setting to the default.
  async function saveSettings(values, done) {
    setSettingsStatus("Saving…");
    const response = await fetch("/generation_params", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(values),
      credentials: "same-origin",
    });
    if (response.status === 401) {
      askForKey(() => saveSettings(values, done), "This server needs an API key.");
      setSettingsStatus("");
      return;
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      // 422 names each refused field in detail: mark those inputs.
      for (const problem of body?.detail ?? []) settingInput(problem.field)?.setAttribute("aria-invalid", "true");
      setSettingsStatus(body?.message ? `${body.message} (HTTP ${response.status})` : `HTTP ${response.status}`, true);
      return;
    }
    showSettings(body);
    setSettingsStatus(done);
  }

  function readSettingsForm() {
    const values = {};
    const problems = [];
    for (const name of SETTINGS) {
      const input = settingInput(name);
      input.removeAttribute("aria-invalid");
      if (input.validity.badInput) {
        input.setAttribute("aria-invalid", "true");
        problems.push(`${name}: must be a number`);
      } else {
        values[name] = input.value.trim() === "" ? null : Number(input.value);
      }
    }
    return { values, problems };
  }

  // load: the body of GET /load.
  function showLoad(load) {
    const { permits, queue } = load;
    let state = "idle";
    let text = "Ready";
    if (load.generators.length === 0) [state, text] = ["down", "No generator"];
    else if (queue.full) [state, text] = ["full", `Full: ${queue.waiting} waiting`];
    else if (load.busy) [state, text] = ["busy", queue.waiting ? `Busy: ${queue.waiting} waiting` : "Busy"];
    ui.load.dataset.state = state;
    ui.load.textContent = text;
    ui.load.title = `${permits.in_use} of ${permits.limit} generating, ${queue.waiting} of ${queue.max} waiting`;
  }

  function showLoadUnknown(why) {
    ui.load.dataset.state = "unknown";
    ui.load.textContent = "";
    ui.load.title = why;
  }

  async function pollLoad() {
    clearTimeout(loadTimer);
    if (loadInFlight || document.hidden) return; // a hidden page resumes on visibilitychange
    loadInFlight = true;
    try {
      const response = await fetch("/load", { headers: headers(), credentials: "same-origin" });
      if (response.ok) showLoad(await response.json());
      else showLoadUnknown(response.status === 401 ? "needs the API key" : `HTTP ${response.status}`);
    } catch (error) {
      showLoadUnknown(`unreachable: ${error.message}`);
    } finally {
      loadInFlight = false;
    }
    if (!document.hidden) loadTimer = setTimeout(pollLoad, LOAD_POLL_MS);
  }

  ui.settingsToggle.addEventListener("click", () => {
    const open = ui.settingsPanel.hidden;
    ui.settingsPanel.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) loadSettings();
  });

  ui.settingsForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const { values, problems } = readSettingsForm();
    if (problems.length) setSettingsStatus(problems.join("; "), true);
    else saveSettings(values, "Saved.");
  });

  ui.resetSettings.addEventListener("click", () => {
    saveSettings(Object.fromEntries(SETTINGS.map((name) => [name, null])), "Reset to the defaults.");
  });

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(loadTimer);
    else pollLoad();
  });

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    ui.key.value = "";
    ui.keyPanel.hidden = true;
    setStatus("");
    const retry = afterKey;
    afterKey = null;
    if (retry) retry();
    pollLoad(); // it had no key either
  });

  ui.input.focus();
  pollLoad();
})();
