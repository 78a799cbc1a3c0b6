// Retouch playground: upload up to three images, create an edit task, follow it
// live (server-sent events read through fetch, or polling), show the results.
"use strict";

(() => {
  const MAX_IMAGES = 3;
  const KEY_STORAGE = "retouch.playground.apiKey";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const POLL_MS = 1000;

  const $ = (id) => document.getElementById(id);
  const form = $("edit-form");
  const keyInput = $("api-key");
  const controls = $("controls");
  const fileInput = $("file-input");
  const dropZone = $("drop-zone");
  const thumbs = $("thumbs");
  const promptInput = $("prompt");
  const statusText = $("status");
  const progressBar = $("progress");
  const percentText = $("percent");
  const elapsedText = $("elapsed");
  const cancelButton = $("cancel");
  const errorBox = $("error");
  const results = $("results");

  let images = []; // {file, url, upload, uploadKey}
  let run = null; // {key, images, prompt, task, controller, started, timer}
  let shownUrls = new Set(); // object URLs in the results: kept until replaced

  class ApiError extends Error {
    constructor(info, status, retryAfter) {
      super(info.message || `HTTP ${status}`);
      this.info = info; // the seed's error object: code, message, type, param, fallback_suggestion
      this.status = status;
      this.retryAfter = retryAfter;
      this.image = null; // the file name the error is about, when known
    }
  }

  // --- The API key: this tab only -------------------------------------------------

  function storeKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // storage disabled: the key just is not remembered
    }
  }

  try {
    keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    keyInput.value = "";
  }
  keyInput.addEventListener("input", () => storeKey(keyInput.value.trim()));
  $("forget-key").addEventListener("click", () => {
    storeKey("");
    keyInput.value = "";
    setStatus("The API key was forgotten.");
    keyInput.focus();
  });

  // --- Choosing images -----------------------------------------------------------

  function addFiles(list) {
    if (run) return;
    clearError();
    const incoming = Array.from(list || []);
    const room = Math.max(MAX_IMAGES - images.length, 0);
    for (const file of incoming.slice(0, room)) {
      images.push({ file, url: URL.createObjectURL(file), upload: null, uploadKey: null });
    }
    const left = incoming.length - room;
    if (left > 0) {
      showError(`An edit takes at most ${MAX_IMAGES} images; ${left} ${left === 1 ? "was" : "were"} not added.`);
    }
    renderThumbs();
  }

  function removeImage(index) {
    const [gone] = images.splice(index, 1);
    if (!shownUrls.has(gone.url)) URL.revokeObjectURL(gone.url);
    renderThumbs();
    const buttons = thumbs.querySelectorAll("button");
    (buttons[Math.min(index, buttons.length - 1)] || fileInput).focus();
    setStatus(`Removed ${gone.file.name}.`);
  }

  function renderThumbs() {
    thumbs.replaceChildren(
      ...images.map((image, index) => {
        const item = document.createElement("li");
        const preview = document.createElement("img");
        preview.src = image.url;
        preview.alt = "";
        preview.addEventListener("error", () => {
          const none = document.createElement("span");
          none.className = "no-preview";
          none.textContent = "no preview";
          preview.replaceWith(none);
        });
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = image.file.name;
        name.title = image.file.name;
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "Remove";
        remove.setAttribute("aria-label", `Remove image ${index + 1}, ${image.file.name}`);
        remove.addEventListener("click", () => removeImage(index));
        item.append(preview, name, remove);
        return item;
      }),
    );
  }

  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = ""; // choosing the same file again still fires `change`
  });
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      if (!run) dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", (event) => {
    if (!dropZone.contains(event.relatedTarget)) dropZone.classList.remove("dragging");
  });
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    addFiles(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped beside the zone must not replace the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());

  // --- Talking to the server -----------------------------------------------------

  async function api(path, { method = "GET", key, json, body, signal } = {}) {
    const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError({ type: "network_error", message: String(error.message || error) }, 0);
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      // not JSON: described by the status below
    }
    if (!response.ok) {
      const info = data && data.error ? data.error : { code: response.status, message: `The server answered HTTP ${response.status}.` };
      throw new ApiError(info, response.status, response.headers.get("Retry-After"));
    }
    if (data === null) throw new ApiError({ message: "The server's answer was not JSON." }, response.status);
    return data;
  }

  async function upload(image, key, signal) {
    const fresh = image.upload && image.uploadKey === key && image.upload.expires_at * 1000 > Date.now() + 600000;
    if (!fresh) {
      const body = new FormData();
      body.append("file", image.file, image.file.name);
      try {
        image.upload = await api("v1/uploads", { method: "POST", key, body, signal });
        image.uploadKey = key;
      } catch (error) {
        if (error instanceof ApiError) error.image = image.file.name;
        throw error;
      }
    }
    return image.upload.url;
  }

  // Follow a task: its event stream first (fetch, so the key goes in a header),
  // then polling once a second if the stream fails or ends early.
  async function follow(id, key, signal) {
    let task = null;
    try {
      task = await streamEvents(id, key, signal);
    } catch (error) {
      if (error.name === "AbortError") throw error;
    }
    let failures = 0;
    while (!task || !TERMINAL.has(task.status)) {
      await sleep(POLL_MS, signal);
      try {
        task = await api(`v1/tasks/${encodeURIComponent(id)}`, { key, signal });
        failures = 0;
        showTask(task);
      } catch (error) {
        const transient = error instanceof ApiError && (error.status === 0 || error.status >= 500);
        if (!transient || ++failures > 10) throw error;
        setStatus("The connection to the server was lost; trying again…");
      }
    }
    return task;
  }

  async function streamEvents(id, key, signal) {
    const response = await fetch(`v1/tasks/${encodeURIComponent(id)}/events`, {
      headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream" },
      signal,
      cache: "no-store",
    });
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !response.body || !type.startsWith("text/event-stream")) {
      if (response.body) response.body.cancel().catch(() => {});
      return null;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return last;
      buffer += value;
      let end;
      while ((end = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
        const block = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const task = parseEvent(block);
        if (!task) continue;
        last = task;
        showTask(task);
        if (TERMINAL.has(task.status)) {
          reader.cancel().catch(() => {});
          return task;
        }
      }
    }
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split(/\r\n|\n|\r/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if ((name !== "task" && name !== "message") || !data.length) return null;
    try {
      return JSON.parse(data.join("\n"));
    } catch {
      return null;
    }
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(new DOMException("Stopped", "AbortError"));
      }, { once: true });
    });
  }

  // --- A run: upload, create, follow, show ----------------------------------------

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (run) return;
    clearError();
    const key = keyInput.value.trim();
    const prompt = promptInput.value.trim();
    if (!key) return refuse(keyInput, "Paste an API key first.");
    if (!images.length) return refuse(fileInput, "Choose at least one image to edit.");
    if (!prompt) return refuse(promptInput, "Describe the edit in the prompt.");
    const request = { model: $("model").value.trim(), prompt, n: Number($("n").value || 1) };
    if ($("seed").value !== "") request.seed = Number($("seed").value);
    if ($("size").value) request.size = $("size").value;

    startRun(key, prompt);
    const { signal } = run.controller;
    try {
      const urls = [];
      for (const [index, image] of run.images.entries()) {
        setStatus(`Uploading image ${index + 1} of ${run.images.length} (${image.file.name})…`);
        urls.push(await upload(image, key, signal));
      }
      setStatus("Creating the task…");
      run.task = await api("v1/images/generations", { method: "POST", key, json: { ...request, image_urls: urls }, signal });
      showTask(run.task);
      const task = await follow(run.task.id, key, signal);
      if (task.status === "failed") throw new ApiError(task.error || { message: "The edit failed." }, 0);
      if (task.status === "completed") showResults(task);
      endRun(task.status === "completed" ? $("results-heading") : null);
    } catch (error) {
      if (error.name === "AbortError") setStatus("Stopped before the task was created.");
      else {
        setStatus(run.task ? "The edit failed." : "The edit could not start.");
        showError(describe(error));
      }
      endRun(null);
    }
  });

  cancelButton.addEventListener("click", async () => {
    if (!run) return;
    if (!run.task) {
      run.controller.abort();
      return;
    }
    cancelButton.disabled = true;
    setStatus("Cancelling…");
    try {
      showTask(await api(`v1/tasks/${encodeURIComponent(run.task.id)}/cancel`, { method: "POST", key: run.key }));
    } catch (error) {
      if (run) showError(describe(error)); // e.g. 409: it finished first
    }
  });

  function refuse(control, message) {
    showError(message);
    control.setAttribute("aria-invalid", "true");
    control.addEventListener("input", () => control.removeAttribute("aria-invalid"), { once: true });
    control.focus();
  }

  function startRun(key, prompt) {
    run = { key, prompt, images: images.slice(), task: null, controller: new AbortController(), started: performance.now(), timer: 0 };
    run.timer = setInterval(tick, 100);
    setProgress(0);
    tick();
    controls.disabled = true;
    form.setAttribute("aria-busy", "true");
    cancelButton.hidden = false;
    cancelButton.disabled = false;
    cancelButton.focus();
  }

  function endRun(focusTarget) {
    tick();
    clearInterval(run.timer);
    run = null;
    controls.disabled = false;
    form.removeAttribute("aria-busy");
    cancelButton.hidden = true;
    (focusTarget || $("submit")).focus();
  }

  function tick() {
    if (run) elapsedText.textContent = seconds(performance.now() - run.started);
  }

  function seconds(ms) {
    return `${(ms / 1000).toFixed(1)} s`;
  }

  function showTask(task) {
    if (!run) return;
    setProgress(task.progress || 0);
    const words = {
      pending: "Waiting in the queue…",
      processing: "Editing…",
      completed: `Done in ${seconds(performance.now() - run.started)}.`,
      cancelled: "The edit was cancelled.",
    };
    if (words[task.status]) setStatus(words[task.status]);
    cancelButton.hidden = !(task.task_info ? task.task_info.can_cancel : !TERMINAL.has(task.status));
  }

  function setProgress(value) {
    const percent = Math.max(0, Math.min(100, Math.round(value)));
    progressBar.value = percent;
    progressBar.textContent = `${percent}%`;
    percentText.textContent = `${percent}%`;
  }

  function showResults(task) {
    for (const url of shownUrls) if (!images.some((image) => image.url === url)) URL.revokeObjectURL(url);
    shownUrls = new Set(run.images.map((image) => image.url));
    $("input-figures").replaceChildren(
      ...run.images.map((image, index) => figure(image.url, `Input image ${index + 1}, ${image.file.name}`, image.file.name)),
    );
    const links = task.results || [];
    $("result-figures").replaceChildren(
      ...links.map((url, index) => {
        const item = figure(url, `Result ${index + 1} of the edit: ${run.prompt}`, `Result ${index + 1}`);
        const link = document.createElement("a");
        link.href = url;
        link.download = `${task.id}-${index}.png`;
        link.textContent = "Download";
        link.setAttribute("aria-label", `Download result ${index + 1} (PNG)`);
        item.querySelector("figcaption").append(" · ", link);
        return item;
      }),
    );
    const credits = task.usage ? ` · ${task.usage.credits_reserved} credit${task.usage.credits_reserved === 1 ? "" : "s"}` : "";
    $("summary").textContent = `Task ${task.id}${credits}. Result links stay valid for a limited time (24 hours by default).`;
    results.hidden = false;
  }

  function figure(src, alt, caption) {
    const item = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = alt;
    const text = document.createElement("figcaption");
    const label = document.createElement("span");
    label.textContent = caption;
    text.append(label);
    img.addEventListener("load", () => {
      label.textContent = `${caption} · ${img.naturalWidth}×${img.naturalHeight}`;
    });
    item.append(img, text);
    return item;
  }

  // --- Words ----------------------------------------------------------------------

  function setStatus(message) {
    statusText.textContent = message;
  }

  function showError(message) {
    errorBox.textContent = message;
  }

  function clearError() {
    errorBox.textContent = "";
  }

  function describe(error) {
    if (!(error instanceof ApiError)) return `Something went wrong in this page: ${error.message || error}`;
    const info = error.info;
    const message = sentence(info.message, true);
    const image = error.image || imageNamed(info.param);
    const retry = error.retryAfter ? `Try again in ${error.retryAfter} seconds.` : sentence(info.fallback_suggestion, true) || "Try again shortly.";
    switch (info.type) {
      case "network_error":
        return "The server could not be reached. Check that it is running, then try again.";
      case "authentication_error":
        return "This API key was not accepted. Check that you pasted all of it; it may also have been revoked or replaced. An administrator can create one with: retouch keys create --name you";
      case "insufficient_quota_error":
        return `Your account does not have enough credits for this edit. ${message}`;
      case "permission_error":
        return `This key is not allowed to do that. ${message}`;
      case "rate_limit_error":
        return `Too many edits at once for this account. ${retry}`;
      case "service_unavailable_error":
        return `The server is busy. ${retry}`;
      case "internal_server_error":
        return "The server ran into an unexpected problem. Try again; if it keeps happening, the server's log says why.";
      default:
        if (image) return `${image} was not accepted: ${sentence(info.message, false)}`;
        return [message, sentence(info.fallback_suggestion, true)].filter(Boolean).join(" ");
    }
  }

  // `image_urls[1]` (a failed task, or a refused create) → the name of that image.
  function imageNamed(param) {
    const match = /^image_urls\[(\d+)\]/.exec(param || "");
    const image = match && run && run.images[Number(match[1])];
    return image ? image.file.name : null;
  }

  // The server's message as a sentence: a full stop, and (to stand alone) a capital
  // letter unless it starts with a name such as `image_urls[0]`.
  function sentence(text, capital) {
    let words = String(text || "").trim();
    if (!words) return "";
    if (capital && /^[a-z]+(\s|$)/.test(words)) words = words[0].toUpperCase() + words.slice(1);
    return /[.!?…]$/.test(words) ? words : `${words}.`;
  }
})();
