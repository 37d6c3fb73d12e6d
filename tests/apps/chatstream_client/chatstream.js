// A ChatStream 0.3 web client in miniature: it talks to /chat_stream and
// /clear_context exactly the way ChatStream's own clients do (the web UI in
// ChatStream's repository, chatstream/data/chatstream.js, and the ChatStreamJs
// ChatStreamClient that UI bundles), so that what it relies on is tested.
"use strict";

// ChatStream ends every chunk with this marker: a read may hold several chunks,
// or part of one, so the text shown is the last one the marker completed.
const EOS = "<::EOS::>";

// ChatStreamJs' StreamStatus: how a client tells the outcomes apart.
const StreamStatus = Object.freeze({
  OK: "ok",
  CLIENT_ERROR: "client_error",
  SERVER_ERROR: "server_error",
  NETWORK_ERROR: "network_error",
  FETCH_ERROR: "fetch_error",
});

const $ = (id) => document.getElementById(id);

// Every text the reply showed during the current request, for the test to read.
window.shownTexts = [];

// ChatStreamJs' parse_http_error: the body as JSON if it is JSON, and as text.
async function parseHttpError(response) {
  const rawData = await response.text();
  try {
    return { json: JSON.parse(rawData), rawData };
  } catch (e) {
    return { json: null, rawData };
  }
}

// ChatStreamJs' ChatStreamClient.send: POST the input, then call onResponse once
// per read with {response_text, pos, status}, or once with the error.
async function send({ user_input, regenerate, onResponse }) {
  try {
    const response = await fetch("chat_stream", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user_input, regenerate }),
    });
    if (!response.ok) {
      // Only the status range decides what kind of error it is.
      const status = response.status >= 500 ? StreamStatus.SERVER_ERROR : StreamStatus.CLIENT_ERROR;
      onResponse({ response_text: null, pos: "end", status, statusCode: response.status, err: await parseHttpError(response) });
      return;
    }
    // ChatStream's clients never read headers; shown to check what is sent.
    $("message-id").textContent = response.headers.get("X-ChatStream-Last-Generated-Message-Id") || "";
    $("request-id").textContent = response.headers.get("X-Request-ID") || "";
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    for (let index = 0; ; index++) {
      const { done, value } = await reader.read();
      const text = decoder.decode(value, { stream: !done });
      const pos = done ? "end" : index === 0 ? "begin" : "mid";
      onResponse({ response_text: text === "" ? null : text, pos, status: StreamStatus.OK, statusCode: response.status });
      if (done) return;
    }
  } catch (e) {
    // A body that breaks off (a server that closes the connection without the
    // final chunk) makes the read throw a TypeError.
    const status = e.name === "TypeError" ? StreamStatus.NETWORK_ERROR : StreamStatus.FETCH_ERROR;
    onResponse({ response_text: null, pos: "end", status, err: { json: null, rawData: String(e) } });
  }
}

function startReply() {
  window.shownTexts = [];
  $("reply").textContent = "";
  for (const id of ["status", "status-code", "error-code", "error-detail", "error-raw", "message-id", "request-id"]) {
    $(id).textContent = "";
  }
  $("state").textContent = "sending";
}

function ask(user_input, regenerate) {
  startReply();
  let pending = ""; // text after the last marker: a chunk still arriving
  send({
    user_input,
    regenerate,
    onResponse: ({ response_text, pos, status, statusCode, err }) => {
      if (status === StreamStatus.OK && response_text) {
        const chunks = (pending + response_text).split(EOS);
        pending = chunks.pop();
        if (chunks.length) {
          // Each chunk is the whole reply so far: it replaces the text, never adds to it.
          const text = chunks[chunks.length - 1];
          $("reply").textContent = text;
          window.shownTexts.push(text);
        }
      }
      $("status").textContent = status;
      if (status !== StreamStatus.OK) {
        $("status-code").textContent = statusCode === undefined ? "" : String(statusCode);
        $("error-code").textContent = (err && err.json && err.json.error) || "";
        $("error-detail").textContent = (err && err.json && err.json.detail) || "";
        $("error-raw").textContent = (err && err.rawData) || "";
      }
      $("state").textContent = pos === "end" ? "end" : "streaming";
    },
  });
}

// ChatStream's web UI clears the context like this on every page load, and reads
// the answer as text; ChatStream 0.3 answers {"success": true, ...}.
async function clearContext() {
  $("cleared").textContent = "";
  const response = await fetch("clear_context", {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    credentials: "same-origin",
  });
  const body = await response.text();
  let answer = null;
  try {
    answer = JSON.parse(body);
  } catch (e) {
    answer = null;
  }
  $("cleared").textContent = answer && answer.success === true ? "success" : `failed: ${response.status} ${body}`;
}

$("send").addEventListener("click", () => ask($("input").value, false));
// The UI regenerates with no input of its own: the server reuses the last one.
$("regenerate").addEventListener("click", () => ask(null, true));
$("clear").addEventListener("click", () => clearContext());
clearContext();
