// imagegw playground: submit with `Prefer: respond-async`, follow the job on the /image-progress Socket.IO
// namespace, show partial images as they come and the final images in a gallery.
"use strict";

(() => {
  const KEY_STORAGE = "imagegw.apiKey";
  const MODEL_STORAGE = "imagegw.model";
  const NAMESPACE = "/image-progress";
  // Relative to this page, so the gateway also works behind a path prefix.
  const base = new URL(".", location.href);
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("form"), key: $("api-key"), forget: $("forget-key"), model: $("model"), reload: $("reload-models"),
    prompt: $("prompt"), size: $("size"), n: $("n"), format: $("output-format"), quality: $("quality"),
    partials: $("partial-images"), generate: $("generate"), cancel: $("cancel"), status: $("status"),
    stage: $("stage"), percent: $("percent"), progress: $("progress"), bar: $("progress-bar"),
    jobLine: $("job-line"), error: $("error"), partialsBox: $("partials-box"), partialStrip: $("partials"),
    galleryBox: $("gallery-box"), gallery: $("gallery"), empty: $("empty"),
  };

  let socket = null;       // one connection per API key
  let socketKey = null;
  let job = null;          // {id, done, format}
  const objectUrls = [];

  class ApiError extends Error {
    constructor(status, error) {
      super(error && error.message ? error.message : `HTTP ${status}`);
      this.status = status;
      this.error = error || {};
    }
  }

  // ---- API key: only ever in this browser's localStorage ----
  el.key.value = localStorage.getItem(KEY_STORAGE) || "";
  el.key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, el.key.value.trim());
    loadModels();
  });
  el.forget.addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    el.key.value = "";
    closeSocket();
  });

  function apiKey() {
    return el.key.value.trim();
  }

  async function api(method, path, body, extraHeaders) {
    const headers = { Authorization: `Bearer ${apiKey()}`, ...(extraHeaders || {}) };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(new URL(path, base), {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, { message: `The gateway cannot be reached (${err.message}).`, type: "network_error" });
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (err) {
      payload = null;
    }
    if (!response.ok) throw new ApiError(response.status, payload && payload.error);
    return { status: response.status, body: payload };
  }

  // ---- models ----
  async function loadModels() {
    const wanted = el.model.value || localStorage.getItem(MODEL_STORAGE);
    try {
      const { body } = await api("GET", "v1/models");
      el.model.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
      if (wanted && body.data.some((m) => m.id === wanted)) el.model.value = wanted;
      hideError();
    } catch (err) {
      el.model.replaceChildren(new Option("(no models: check the API key)", ""));
      showError("Could not load the models", err);
    }
  }
  el.reload.addEventListener("click", loadModels);
  el.model.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, el.model.value));

  // ---- Socket.IO ----
  function closeSocket() {
    if (socket) socket.disconnect();
    socket = null;
    socketKey = null;
  }

  function connectedSocket() {
    const key = apiKey();
    if (socket && socketKey === key && socket.connected) return Promise.resolve(socket);
    if (!socket || socketKey !== key) {
      closeSocket();
      socketKey = key;
      socket = io(location.origin + NAMESPACE, {
        path: base.pathname + "socket.io",
        auth: { api_key: key },
        transports: ["websocket", "polling"],
      });
      socket.on("progress", (e) => forCurrentJob(e, () => setProgress(e.progress, e.stage || e.status)));
      socket.on("partial_image", (e) => forCurrentJob(e, () => addPartial(e)));
      socket.on("completed", (e) => forCurrentJob(e, () => completed(e)));
      socket.on("failed", (e) => forCurrentJob(e, () => failed(e.error, e.status)));
      // after a dropped connection the server forgets our subscription: ask again, it replays the state
      socket.io.on("reconnect", () => { if (job && !job.done) subscribe(job.id).catch(() => {}); });
    }
    const current = socket;
    if (!current.active) current.connect();  // a refused connection does not retry by itself
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("timed out connecting to the progress channel")), 8000);
      current.once("connect", () => { clearTimeout(timer); resolve(current); });
      current.once("connect_error", (err) => { clearTimeout(timer); reject(err); });
    });
  }

  function forCurrentJob(event, action) {
    if (job && !job.done && event && event.job_id === job.id) action();
  }

  async function subscribe(jobId) {
    const s = await connectedSocket();
    const ack = await s.timeout(8000).emitWithAck("subscribe", { job_id: jobId });
    if (ack && ack.error) throw new ApiError(404, ack.error);
    return ack;
  }

  // ---- rendering ----
  function setProgress(value, stage) {
    const pct = Math.max(0, Math.min(100, Math.round(value || 0)));
    el.bar.style.width = `${pct}%`;
    el.progress.setAttribute("aria-valuenow", String(pct));
    el.percent.textContent = `${pct}%`;
    if (stage) el.stage.textContent = stage;
  }

  function reset() {
    hideError();
    objectUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
    el.partialStrip.replaceChildren();
    el.gallery.replaceChildren();
    el.partialsBox.hidden = true;
    el.galleryBox.hidden = true;
    el.empty.hidden = true;
    el.status.hidden = false;
    el.progress.classList.remove("done", "failed");
    setProgress(0, "submitting");
    el.jobLine.textContent = "";
  }

  function imageSource(item, format) {
    if (item.url) return { src: item.url, href: item.url };
    const bytes = Uint8Array.from(atob(item.b64_json), (c) => c.charCodeAt(0));
    const href = URL.createObjectURL(new Blob([bytes], { type: `image/${format}` }));
    objectUrls.push(href);
    return { src: href, href };
  }

  function addPartial(e) {
    const fmt = e.output_format || "png";
    const figure = document.createElement("figure");
    const img = new Image();
    img.alt = `partial image ${e.partial_image_index + 1}`;
    img.src = `data:image/${fmt};base64,${e.b64_json}`;
    img.className = "partial";
    const caption = document.createElement("figcaption");
    caption.textContent = `partial ${e.partial_image_index + 1}`;
    figure.append(img, caption);
    el.partialStrip.append(figure);
    el.partialsBox.hidden = false;
  }

  function showResult(result) {
    const format = result.output_format || job.format || "png";
    el.gallery.replaceChildren(...result.data.map((item, i) => {
      const { src, href } = imageSource(item, format);
      const figure = document.createElement("figure");
      const img = new Image();
      img.src = src;
      img.alt = `generated image ${i + 1}`;
      img.className = "result";
      const caption = document.createElement("figcaption");
      const label = document.createElement("span");
      label.textContent = `${i + 1} / ${result.data.length}${result.size ? " · " + result.size : ""}`;
      const link = document.createElement("a");
      link.href = href;
      link.download = `imagegw-${job.id.slice(0, 8)}-${i + 1}.${format}`;
      link.textContent = "Download";
      caption.append(label, link);
      figure.append(img, caption);
      return figure;
    }));
    el.galleryBox.hidden = false;
  }

  async function completed(event) {
    finishJob("done");
    let result = event.result;
    if (!result) {
      try {
        result = (await api("GET", `v1/images/jobs/${job.id}`)).body.result;
      } catch (err) {
        showError("The job finished but its result could not be read", err);
        return;
      }
    }
    setProgress(100, "done");
    el.progress.classList.add("done");
    showResult(result);
  }

  function failed(error, status) {
    finishJob(status || "failed");
    el.progress.classList.add("failed");
    el.stage.textContent = status || "failed";
    showError(status === "cancelled" ? "The job was cancelled" : "The job failed", new ApiError(0, error));
  }

  function finishJob(stage) {
    if (job) job.done = true;
    el.generate.disabled = false;
    el.cancel.hidden = true;
    el.stage.textContent = stage;
  }

  function showError(title, err) {
    const e = (err && err.error) || {};
    const details = [err && err.status ? `HTTP ${err.status}` : null, e.code, e.param ? `param: ${e.param}` : null]
      .filter(Boolean).join(" · ");
    const heading = document.createElement("b");
    heading.textContent = title;
    const text = document.createElement("span");
    text.textContent = `${err && err.message ? err.message : err}${details ? `\n(${details})` : ""}`;
    el.error.replaceChildren(heading, text);
    el.error.hidden = false;
  }

  function hideError() {
    el.error.hidden = true;
    el.error.replaceChildren();
  }

  // ---- generate ----
  function requestBody() {
    const body = { model: el.model.value, prompt: el.prompt.value.trim(), n: Number(el.n.value) || 1,
                   response_format: "b64_json" };
    if (el.size.value.trim()) body.size = el.size.value.trim();
    if (el.format.value) body.output_format = el.format.value;
    if (el.quality.value) body.quality = el.quality.value;
    if (Number(el.partials.value) > 0) body.partial_images = Number(el.partials.value);
    return body;
  }

  el.form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!el.prompt.value.trim()) {
      showError("Nothing to draw", new Error("Type a prompt first."));
      return;
    }
    reset();
    el.generate.disabled = true;
    const body = requestBody();
    let answer;
    try {
      answer = await api("POST", "v1/images/generations", body, { Prefer: "respond-async" });
    } catch (err) {
      finishJob("rejected");
      el.progress.classList.add("failed");
      showError("The request was rejected", err);
      return;
    }
    job = { id: answer.body.id, done: false, format: body.output_format };
    el.jobLine.textContent = `job ${job.id}`;
    if (answer.status === 200 || answer.body.status === "succeeded") {
      // an already finished job (a synchronous answer or a very fast worker)
      completed({ job_id: job.id, result: answer.body.result || answer.body });
      return;
    }
    el.cancel.hidden = false;
    setProgress(answer.body.progress, answer.body.stage || answer.body.status);
    try {
      await subscribe(job.id);
    } catch (err) {
      showError("Live progress is unavailable; following the job by polling", err);
      poll(job.id);
    }
  });

  // used only when Socket.IO cannot connect: the job record has the same state, just later
  async function poll(jobId) {
    while (job && job.id === jobId && !job.done) {
      await new Promise((r) => setTimeout(r, 1000));
      try {
        const { body } = await api("GET", `v1/images/jobs/${jobId}`);
        if (!job || job.id !== jobId || job.done) return;
        setProgress(body.progress, body.stage || body.status);
        if (body.status === "succeeded") completed({ job_id: jobId, result: body.result });
        else if (body.status === "failed" || body.status === "cancelled") failed(body.error, body.status);
      } catch (err) {
        failed(err.error, "failed");
      }
    }
  }

  el.cancel.addEventListener("click", async () => {
    if (!job || job.done) return;
    try {
      await api("DELETE", `v1/images/jobs/${job.id}`);
    } catch (err) {
      showError("Could not cancel", err);
    }
  });

  loadModels();
})();
