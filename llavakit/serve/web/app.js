// The chat page of `llavakit serve`: a client of the server's own OpenAI API (POST /v1/chat/completions with
// stream: true, pictures as data: URLs), plain JavaScript with no dependencies and no build step.
"use strict";

const KEY_NAME = "llavakit-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  settings: null,   // GET /web/settings: model, context, limits
  messages: [],     // the conversation sent with each request (OpenAI messages)
  pictures: [],     // data: URLs of every picture in `messages`, in order (boxes are drawn on the last one)
  pending: [],      // attached, not sent yet: {name, url}
  controller: null, // the AbortController of the answer being streamed
  chat: 0,          // counts new chats: an answer that ends after "New chat" belongs to none
};

class ServerError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// --- the API key ------------------------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  sessionStorage.setItem(KEY_NAME, key);
  if ($("remember").checked) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
  $("key-form").hidden = true;
  loadSettings();
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  let res;
  try {
    res = await fetch(path, { ...init, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError("cannot reach the server; check that llavakit serve is still running", 0);
  }
  if (res.ok) return res;
  const message = await errorMessage(res);
  if (res.status === 401) askForKey(message);
  throw new ServerError(message, res.status);
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (e) { /* not the server's JSON: a proxy's page */ }
  return `the server answered ${res.status} ${res.statusText}`;
}

// --- settings -----------------------------------------------------------------------------------------------------

async function loadSettings() {
  try {
    const s = state.settings = await (await api("/web/settings")).json();
    $("model").replaceChildren(new Option(s.model, s.model, true, true));
    $("max-tokens").max = s.max_model_len;
    setStatus(`${s.model}: context ${s.max_model_len} tokens; at most ${s.max_images_per_request} picture(s) ` +
              `per chat, ${mib(s.max_image_bytes)} each`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function mib(bytes) {
  return `${Math.round(bytes / 2 ** 20 * 10) / 10} MiB`;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// --- attaching pictures ---------------------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Files are sent as they are: the server checks them and says what is wrong with one that is not a picture.
async function attach(files) {
  for (const file of files) {
    try {
      state.pending.push({ name: file.name || "pasted picture", url: await readAsDataURL(file) });
    } catch (e) {
      setStatus(`${file.name}: cannot be read (${e.message})`, true);
    }
  }
  showAttachments();
}

function showAttachments() {
  $("attachments").replaceChildren(...state.pending.map((picture, i) => {
    const item = el("figure", "attachment");
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = `Remove ${picture.name}`;
    remove.onclick = () => { state.pending.splice(i, 1); showAttachments(); };
    item.append(thumbnail(picture), remove);
    return item;
  }));
}

function thumbnail(picture) {
  const img = el("img", "thumb");
  img.src = picture.url;
  img.alt = img.title = picture.name;
  return img;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- one turn on screen -------------------------------------------------------------------------------------------

function showTurn(text, pictures) {
  $("hint")?.remove();
  const user = el("section", "turn user");
  if (pictures.length) user.append(el("div", "pictures"));
  pictures.forEach((p) => user.firstChild.append(thumbnail(p)));
  user.append(el("p", "text", text));
  const answer = el("section", "turn assistant");
  const body = el("p", "text");
  const note = el("p", "note");
  answer.append(body, note);
  $("log").append(user, answer);
  const scroll = () => answer.scrollIntoView({ block: "end" });
  scroll();
  return {
    user,
    answer,
    write(textSoFar) { body.textContent = textSoFar; scroll(); },
    finish(kind, message) {
      answer.classList.add(kind);
      note.textContent = message;
      scroll();
    },
  };
}

// --- sending and streaming ----------------------------------------------------------------------------------------

function request(messages) {
  const body = { model: $("model").value || state.settings?.model, messages, stream: true };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return JSON.stringify(body);
}

// Refusals the page can give before sending, in the server's own terms (it would refuse the same).
function checkLimits(pictureCount, bodyBytes) {
  const s = state.settings;
  if (!s) return null;
  if (pictureCount > s.max_images_per_request) {
    return `this chat would hold ${pictureCount} pictures; the server takes at most ${s.max_images_per_request} ` +
           "per request: start a new chat, or remove some";
  }
  if (bodyBytes > s.max_body_bytes) {
    return `the request would be ${mib(bodyBytes)}, over the server's ${mib(s.max_body_bytes)} limit; ` +
           "attach smaller pictures, or start a new chat";
  }
  return null;
}

async function send() {
  const text = $("prompt").value.trim();
  if (state.controller || (!text && !state.pending.length)) return;
  const pictures = state.pending;
  const content = [...pictures.map((p) => ({ type: "image_url", image_url: { url: p.url } })),
                   { type: "text", text }];
  const message = { role: "user", content };
  const body = request([...state.messages, message]);
  const refusal = checkLimits(state.pictures.length + pictures.length, new Blob([body]).size);
  if (refusal) return setStatus(refusal, true);

  state.pending = [];
  showAttachments();
  $("prompt").value = "";
  const turn = showTurn(text, pictures);
  const chat = state.chat;
  state.controller = new AbortController();
  setBusy(true);
  let answer = "";
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body, signal: state.controller.signal,
    });
    let finish = null;
    for await (const event of serverEvents(res.body)) {
      if (event.error) throw new ServerError(event.error.message, 0);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      answer += choice.delta?.content || "";
      finish = choice.finish_reason || finish;
      turn.write(answer);
    }
    remember(chat, message, pictures, answer);
    turn.finish("done", finish === "length" ? "(stopped at the max tokens limit)" : "");
    if ($("boxes").checked) drawBoxes(turn.answer, answer);
  } catch (e) {
    if (e.name === "AbortError") {
      if (answer) remember(chat, message, pictures, answer);
      turn.finish("stopped", "(stopped)");
    } else if (chat === state.chat) {
      // Not part of the chat: the question and its pictures go back to the composer, to fix and send again.
      turn.user.classList.add("unsent");
      turn.finish("error", e.message);
      $("prompt").value = text;
      state.pending = [...pictures, ...state.pending];
      showAttachments();
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function remember(chat, message, pictures, answer) {
  if (chat !== state.chat) return;
  state.messages.push(message, { role: "assistant", content: answer });
  state.pictures.push(...pictures.map((p) => p.url));
}

// Server-sent events of a streamed response: each `data:` line's JSON, until [DONE].
async function* serverEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (!busy) $("prompt").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.chat++;
  state.messages = [];
  state.pictures = [];
  state.pending = [];
  showAttachments();
  $("log").replaceChildren();
  $("prompt").value = "";
  $("prompt").focus();
}

// --- grounding boxes ----------------------------------------------------------------------------------------------

// Boxes as eval/grounding.py parses them: a run of exactly four comma-separated numbers, all in 0-1 or all in
// 0-1000 (then divided by 1000), with x2 > x1 and y2 > y1; brackets end a run.
function parseBoxes(text) {
  const num = String.raw`-?(?:\d+(?:\.\d+)?|\.\d+)`;
  const runs = text.match(new RegExp(`${num}(?:\\s*,\\s*${num})+`, "g")) || [];
  const boxes = [];
  for (const run of runs) {
    const v = run.split(",").map(Number);
    const top = Math.max(...v);
    if (v.length !== 4 || top > 1000 || Math.min(...v) < 0) continue;
    const [x1, y1, x2, y2] = v.map((x) => x / (top <= 1 ? 1 : 1000));
    if (x2 > x1 && y2 > y1) boxes.push([x1, y1, x2, y2]);
  }
  return boxes;
}

// The boxes on the conversation's last picture. LLaVA-1.5 gives them on the padded square it saw: the picture
// centred on a max(w, h) square, as grounding.square_to_image undoes.
function drawBoxes(answerNode, text) {
  const boxes = parseBoxes(text);
  const url = state.pictures[state.pictures.length - 1];
  if (!boxes.length || !url) return;
  const figure = el("figure", "grounding");
  const img = el("img");
  img.alt = "the picture with the answer's boxes";
  img.onload = () => {
    const w = img.naturalWidth, h = img.naturalHeight;
    const padded = state.settings ? state.settings.boxes_on_padded_square : true;
    const side = Math.max(w, h);
    const [sw, sh, dx, dy] = padded ? [side, side, Math.floor((side - w) / 2), Math.floor((side - h) / 2)] : [w, h, 0, 0];
    const clip = (value, size) => Math.min(Math.max(value, 0), size);
    boxes.forEach(([x1, y1, x2, y2], i) => {
      const [left, top] = [clip(x1 * sw - dx, w), clip(y1 * sh - dy, h)];
      const [right, bottom] = [clip(x2 * sw - dx, w), clip(y2 * sh - dy, h)];
      const box = el("div", "box");
      box.append(el("span", null, String(i + 1)));
      Object.assign(box.style, { left: `${100 * left / w}%`, top: `${100 * top / h}%`,
                                 width: `${100 * (right - left) / w}%`, height: `${100 * (bottom - top) / h}%` });
      figure.append(box);
    });
    answerNode.scrollIntoView({ block: "end" });
  };
  img.src = url;
  figure.append(img);
  answerNode.append(figure);
}

// --- wiring -------------------------------------------------------------------------------------------------------

function onKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
}

function filesOf(transfer) {
  return transfer ? [...transfer.files] : [];
}

function wireDragAndDrop() {
  let depth = 0;  // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    attach(filesOf(e.dataTransfer));
  });
}

function main() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", onKey);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", saveKey);
  $("file").addEventListener("change", (e) => { attach([...e.target.files]); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    const files = filesOf(e.clipboardData);
    if (files.length) { e.preventDefault(); attach(files); }
  });
  wireDragAndDrop();
  loadSettings();
  $("prompt").focus();
}

main();
