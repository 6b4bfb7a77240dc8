// The keras-sd3 serve page: plain JavaScript, no framework, no build step.
// It talks to the JSON API under /api/v1 (see keras_sd3/serve/app.py): GET info, POST generate,
// EventSource on jobs/{id}/events for progress, GET jobs for the gallery, DELETE jobs/{id} to cancel.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "keras-sd3-api-key";
const PAGE_SIZE = 24;
const MAX_TRACKED = 4; // EventSources open at once (browsers allow 6 connections per host)
const FINAL_STATES = ["done", "failed", "cancelled"];

const state = {
  info: null,
  task: "text-to-image",
  key: localStorage.getItem(KEY_STORAGE) || "",
  keyPrompt: null, // the pending "ask for the key" promise, shared by every call that got a 401
  source: null, // the uploaded picture (an <img>), fitted onto the picture canvas
  oldest: null, // id of the oldest job shown, for "older results"
  tracked: new Map(), // job id -> its progress row
};

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, data) {
    const detail = data && data.detail;
    let lines;
    if (Array.isArray(detail)) {
      lines = detail.map((item) => ({ field: fieldOf(item.loc), text: item.msg }));
    } else {
      lines = [{ field: null, text: typeof detail === "string" ? detail : `the server answered HTTP ${status}` }];
    }
    super(lines.map(lineText).join("\n"));
    this.status = status;
    this.lines = lines;
  }
}

// "num_steps: must be ..." unless the message already starts with the field's name.
function lineText({ field, text }) {
  text = String(text ?? "");
  return field && !text.startsWith(field) ? `${field}: ${text}` : text;
}

function fieldOf(loc) {
  const parts = (loc || []).filter((part) => part !== "body");
  return parts.length ? parts.join(".") : null;
}

function withToken(url) {
  if (!state.key) return url;
  return `${url}${url.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(state.key)}`;
}

async function api(path, { method = "GET", body } = {}) {
  for (;;) {
    const key = state.key;
    const headers = {};
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(`/api/v1${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      if (state.key === key) await askKey(key ? "That key was refused: try again." : "This server needs an API key.");
      continue;
    }
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

function askKey(message) {
  if (!state.keyPrompt) {
    state.keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-message").textContent = message;
      $("key-input").value = "";
      $("key-form").onsubmit = (event) => {
        event.preventDefault();
        state.key = $("key-input").value.trim();
        localStorage.setItem(KEY_STORAGE, state.key);
        dialog.close();
        state.keyPrompt = null;
        resolve();
      };
      dialog.addEventListener("cancel", (event) => event.preventDefault()); // Escape: the key is needed
      dialog.showModal();
    });
  }
  return state.keyPrompt;
}

// ---------------------------------------------------------------- errors next to the form

function showErrors(error) {
  const box = $("errors");
  const lines = error instanceof ApiError ? error.lines : [{ field: null, text: String(error.message || error) }];
  box.replaceChildren(...lines.map((line) => {
    const item = document.createElement("p");
    item.textContent = lineText(line);
    const input = line.field && $(line.field.split(".")[0]);
    if (input) input.setAttribute("aria-invalid", "true");
    return item;
  }));
  box.hidden = false;
}

function clearErrors() {
  $("errors").hidden = true;
  $("errors").replaceChildren();
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// ---------------------------------------------------------------- the form

function setTask(task) {
  state.task = task;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.task === task));
  $("picture-section").hidden = task === "text-to-image";
  $("mask-tools").hidden = task !== "inpaint" || !state.source;
  $("mask-canvas").hidden = task !== "inpaint";
  setStrength(task === "inpaint" ? 0.6 : 0.8);
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function collect() {
  const body = {
    task: state.task,
    prompt: $("prompt").value.trim(),
    negative_prompt: $("negative_prompt").value.trim(),
    num_steps: numberOrNull("num_steps"),
    guidance_scale: numberOrNull("guidance_scale"),
    seed: $("seed-random").checked ? null : numberOrNull("seed"),
    width: Number($("width").value),
    height: Number($("height").value),
    num_images: numberOrNull("num_images") ?? 1,
  };
  if (!body.prompt) throw new Error("Write a prompt first.");
  if (state.task !== "text-to-image") {
    if (!state.source) throw new Error("Choose a picture first.");
    body.image = $("picture-canvas").toDataURL("image/png");
    body.strength = Number($("strength").value);
  }
  if (state.task === "inpaint") {
    body.mask = maskDataUrl();
    if (!body.mask) throw new Error("Paint the area to repaint on the picture first.");
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("generate");
  button.disabled = true;
  try {
    const body = collect();
    const { id } = await api("/generate", { method: "POST", body });
    track(id, body.prompt);
  } catch (error) {
    showErrors(error);
  } finally {
    updateGenerateButton();
  }
}

function updateGenerateButton() {
  const full = state.tracked.size >= MAX_TRACKED;
  $("generate").disabled = full;
  $("generate").textContent = full ? `${MAX_TRACKED} jobs running…` : "Generate";
}

function fill(parameters) {
  setTask(parameters.task || "text-to-image");
  $("prompt").value = parameters.prompt || "";
  $("negative_prompt").value = parameters.negative_prompt || "";
  $("num_steps").value = parameters.num_steps ?? "";
  $("guidance_scale").value = parameters.guidance_scale ?? "";
  $("seed-random").checked = parameters.seed == null;
  $("seed").disabled = parameters.seed == null;
  $("seed").value = parameters.seed ?? "";
  $("num_images").value = parameters.num_images || 1;
  setSize(parameters.width, parameters.height);
  if (parameters.strength != null) setStrength(parameters.strength);
  clearErrors();
  $("prompt").focus();
}

function sizeOptions(select, value) {
  const { multiple, max_size: maxSize } = state.info;
  const values = [];
  for (let size = multiple; size <= maxSize; size += multiple) values.push(size);
  if (!values.includes(value)) values.push(value);
  select.replaceChildren(...values.sort((a, b) => a - b).map((size) => new Option(`${size}`, size)));
  select.value = value;
}

function setSize(width, height) {
  const changed = String(width) !== $("width").value || String(height) !== $("height").value;
  if (width && ![...$("width").options].some((o) => o.value === String(width))) sizeOptions($("width"), width);
  if (height && ![...$("height").options].some((o) => o.value === String(height))) sizeOptions($("height"), height);
  if (width) $("width").value = width;
  if (height) $("height").value = height;
  if (changed) fitPicture();
}

// ---------------------------------------------------------------- running jobs

function track(id, prompt) {
  if (state.tracked.has(id)) return;
  const row = $("active-template").content.firstElementChild.cloneNode(true);
  row.dataset.job = id;
  row.querySelector(".job-prompt").textContent = prompt;
  row.querySelector(".cancel").addEventListener("click", async (event) => {
    event.target.disabled = true;
    try {
      await api(`/jobs/${id}`, { method: "DELETE" });
      row.querySelector(".job-status").textContent = "cancelling…";
    } catch (error) {
      if (error.status !== 409) showErrors(error);
    }
  });
  $("active").prepend(row);
  state.tracked.set(id, row);
  updateGenerateButton();

  const events = new EventSource(withToken(`/api/v1/jobs/${id}/events`));
  events.addEventListener("progress", (event) => showProgress(row, JSON.parse(event.data)));
  for (const name of FINAL_STATES) {
    events.addEventListener(name, (event) => {
      events.close();
      finish(id, JSON.parse(event.data));
    });
  }
  events.onerror = () => {
    // CONNECTING: the browser retries by itself. CLOSED: the stream was refused; ask for the job instead.
    if (events.readyState === EventSource.CLOSED) poll(id);
  };
}

function showProgress(row, progress) {
  const bar = row.querySelector("progress");
  const status = row.querySelector(".job-status");
  if (progress.state === "queued") {
    bar.value = 0;
    const position = progress.position;
    status.textContent = position == null ? "queued" : position === 0 ? "queued: next" : `queued: ${position} ahead`;
    return;
  }
  bar.max = Math.max(progress.total || 1, 1);
  bar.value = progress.step || 0;
  status.textContent = `step ${progress.step} / ${progress.total}`;
}

async function poll(id) {
  try {
    for (;;) {
      const job = await api(`/jobs/${id}`);
      if (FINAL_STATES.includes(job.state)) return finish(id, job);
      const row = state.tracked.get(id);
      if (row) showProgress(row, { ...job.progress, state: job.state, position: job.position });
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  } catch (error) {
    finish(id, { state: "failed", error: error.message });
  }
}

function finish(id, job) {
  const row = state.tracked.get(id);
  if (!row) return;
  state.tracked.delete(id);
  updateGenerateButton();
  row.classList.add(`state-${job.state}`);
  row.querySelector(".cancel").remove();
  if (job.state === "done") row.querySelector("progress").value = row.querySelector("progress").max;
  row.querySelector(".job-status").textContent = job.state === "failed" ? `failed: ${job.error}` : job.state;
  setTimeout(() => row.remove(), job.state === "failed" ? 8000 : 1200);
  loadGallery().catch(showErrors);
}

// ---------------------------------------------------------------- gallery

async function loadGallery(more = false) {
  const before = more && state.oldest ? `&before=${encodeURIComponent(state.oldest)}` : "";
  const { jobs } = await api(`/jobs?limit=${PAGE_SIZE}${before}`);
  const cards = [];
  for (const job of jobs) {
    if (FINAL_STATES.includes(job.state)) cards.push(card(job));
    else if (!more && state.tracked.size < MAX_TRACKED) track(job.id, job.parameters.prompt);
  }
  if (more) $("gallery").append(...cards);
  else $("gallery").replaceChildren(...cards);
  if (jobs.length) state.oldest = jobs[jobs.length - 1].id;
  $("more").hidden = jobs.length < PAGE_SIZE;
  $("gallery-empty").hidden = $("gallery").children.length > 0;
}

function card(job) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  const p = job.parameters;
  node.dataset.job = job.id;
  node.dataset.state = job.state;
  node.querySelector(".card-prompt").textContent = p.prompt;
  const images = node.querySelector(".card-images");
  const downloads = node.querySelector(".downloads");
  images.classList.toggle("several", job.images.length > 1);
  job.images.forEach((url, k) => {
    const img = document.createElement("img");
    img.src = withToken(url);
    img.alt = p.prompt;
    img.title = `seed ${p.seed + k}`;
    img.width = p.width;
    img.height = p.height;
    if (Math.max(p.width, p.height) < 256) img.classList.add("pixelated");
    images.append(img);
    const link = document.createElement("a");
    link.href = withToken(url);
    link.download = url.split("/").pop();
    link.className = "button secondary small";
    link.textContent = job.images.length > 1 ? `${k + 1}` : "Download";
    link.title = `download ${link.download}`;
    downloads.append(link);
  });
  if (job.images.length > 1) downloads.prepend("Download ");
  const seeds = p.num_images > 1 ? `${p.seed}–${p.seed + p.num_images - 1}` : `${p.seed}`;
  const meta = [["task", p.task], ["seed", seeds], ["steps", p.num_steps], ["guidance", p.guidance_scale],
    ["size", `${p.width} × ${p.height}`]];
  if (p.task !== "text-to-image" && p.strength != null) meta.push(["strength", p.strength]);
  if (p.negative_prompt) meta.push(["negative", p.negative_prompt]);
  node.querySelector(".card-meta").append(...meta.flatMap(([name, value]) => {
    const term = document.createElement("dt"), description = document.createElement("dd");
    term.textContent = name;
    description.textContent = value;
    return [term, description];
  }));
  if (job.state !== "done") {
    const error = node.querySelector(".card-error");
    error.textContent = job.state === "cancelled" ? "cancelled" : `failed: ${job.error || "unknown error"}`;
    error.hidden = false;
  }
  node.querySelector(".use").addEventListener("click", () => fill(p));
  return node;
}

// ---------------------------------------------------------------- start

async function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setTask(tab.dataset.task));
  $("form").addEventListener("submit", submit);
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("strength").addEventListener("input", () => setStrength($("strength").value));
  $("picture").addEventListener("change", () => { if ($("picture").files[0]) loadPicture($("picture").files[0]); });
  for (const id of ["width", "height"]) $(id).addEventListener("change", fitPicture);
  $("refresh").addEventListener("click", () => loadGallery().catch(showErrors));
  $("more").addEventListener("click", () => loadGallery(true).catch(showErrors));
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  setUpMaskPainting();
  setTask("text-to-image");
  try {
    const info = await api("/info");
    state.info = info;
    $("model-info").textContent = `${info.model} · ${info.backend} · native ${info.width} × ${info.height}`;
    sizeOptions($("width"), info.width);
    sizeOptions($("height"), info.height);
    $("num_steps").value = info.defaults.num_steps;
    $("num_steps").max = info.max_steps;
    $("guidance_scale").value = info.defaults.guidance_scale;
    $("num_images").max = info.max_images;
    if (info.vocabulary) {
      $("vocabulary").textContent = `This toy model knows only these words: ${info.vocabulary.join(", ")}.`;
      $("vocabulary").hidden = false;
    }
    await loadGallery();
  } catch (error) {
    $("model-info").textContent = "the server did not answer";
    showErrors(error);
  }
}

start();
