// cyborg annotate: judge real or fake, paint the regions behind the decision, save; resumes on reload.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const HEADERS = { "X-Requested-With": "cyborg" };
  const photo = $("photo"), paint = $("paint"), stage = $("stage"), viewport = $("viewport");
  const ctx = paint.getContext("2d");
  let config = null, annotator = null, item = null, decision = null, strokes = [], current = null;
  let zoom = 1, shownAt = 0, saving = false;

  function status(text) { $("status").textContent = text || ""; }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    return { ok: response.ok, status: response.status, body };
  }

  function chooseAnnotator() {
    const fromLink = new URLSearchParams(location.search).get("annotator");
    const name = fromLink || localStorage.getItem("cyborg-annotator");
    if (name) return start(name);
    $("name-form").hidden = false;
    $("name").focus();
  }

  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    localStorage.setItem("cyborg-annotator", name);
    $("name-form").hidden = true;
    start(name);
  });

  async function start(name) {
    annotator = name;
    $("who").textContent = "annotator: " + name;
    const reply = await api("/api/config");
    if (!reply.ok) { document.body.textContent = reply.body.error; return; }
    config = reply.body;
    $("check-link").hidden = !config.check;
    const next = await api("/api/next?annotator=" + encodeURIComponent(name));
    if (!next.ok) {
      localStorage.removeItem("cyborg-annotator");
      $("name-form").hidden = false;
      status(next.body.error);
      return;
    }
    show(next.body);
  }

  function show(state) {
    $("progress").textContent = state.done + " / " + state.total + " done";
    $("progress").dataset.done = state.done;
    if (state.finished) {
      $("work").hidden = true;
      $("finished").hidden = false;
      return;
    }
    $("work").hidden = false;
    item = state.item;
    decision = null;
    strokes = [];
    for (const button of document.querySelectorAll(".decisions button")) button.setAttribute("aria-pressed", "false");
    $("label-hint").textContent = item.label ? "(labelled " + item.label + ")" : "";
    paint.width = item.width;
    paint.height = item.height;
    const side = Math.min(item.width, item.height);
    $("brush").max = Math.max(8, Math.round(side / 4));
    $("brush").value = Math.max(2, Math.round(side * 0.04));
    brushLabel();
    photo.onload = () => { fit(); shownAt = performance.now(); redraw(); updateSave(); stage.dataset.ready = item.position; };
    delete stage.dataset.ready;
    photo.src = item.url;
  }

  // ---- painting: pointer events cover mouse, pen and touch ---------------------------------------
  function toImage(event) {
    const rect = paint.getBoundingClientRect();
    return [(event.clientX - rect.left) * (paint.width / rect.width), (event.clientY - rect.top) * (paint.height / rect.height)];
  }

  function drawStroke(context, stroke, colour) {
    context.strokeStyle = colour;
    context.fillStyle = colour;
    context.lineWidth = stroke.size;
    context.lineCap = "round";
    context.lineJoin = "round";
    const points = stroke.points;
    if (points.length === 1) {
      context.beginPath();
      context.arc(points[0][0], points[0][1], stroke.size / 2, 0, 2 * Math.PI);
      context.fill();
      return;
    }
    context.beginPath();
    context.moveTo(points[0][0], points[0][1]);
    for (const [x, y] of points.slice(1)) context.lineTo(x, y);
    context.stroke();
  }

  function redraw() {
    ctx.clearRect(0, 0, paint.width, paint.height);
    for (const stroke of strokes) drawStroke(ctx, stroke, "#ff2020");
  }

  paint.addEventListener("pointerdown", (event) => {
    if (!item || event.button > 0) return;
    event.preventDefault();
    paint.setPointerCapture(event.pointerId);
    current = { size: Number($("brush").value), points: [toImage(event)] };
    strokes.push(current);
    redraw();
  });
  paint.addEventListener("pointermove", (event) => {
    if (!current) return;
    event.preventDefault();
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const one of (events.length ? events : [event])) current.points.push(toImage(one));
    redraw();
  });
  for (const name of ["pointerup", "pointercancel"]) paint.addEventListener(name, () => { current = null; });

  $("undo").addEventListener("click", () => { strokes.pop(); redraw(); });
  $("clear").addEventListener("click", () => { strokes = []; redraw(); });

  function brushLabel() { $("brush-size").textContent = $("brush").value + " px"; }
  $("brush").addEventListener("input", brushLabel);

  // ---- zoom: the stage is drawn at zoom x the image's pixels; the viewport scrolls ----------------
  function setZoom(value) {
    zoom = Math.min(16, Math.max(0.05, value));
    stage.style.width = Math.round(item.width * zoom) + "px";
    stage.style.height = Math.round(item.height * zoom) + "px";
    stage.classList.toggle("pixelated", zoom >= 2);
    $("zoom-level").textContent = Math.round(zoom * 100) + "%";
  }
  function fit() {
    const scale = Math.min(viewport.clientWidth / item.width, viewport.clientHeight / item.height);
    setZoom(scale > 0 ? scale : 1);
  }
  $("zoom-in").addEventListener("click", () => setZoom(zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(zoom / 1.25));
  $("zoom-fit").addEventListener("click", fit);
  $("zoom-full").addEventListener("click", () => setZoom(1));
  viewport.addEventListener("wheel", (event) => {
    if (!event.ctrlKey || !item) return;
    event.preventDefault();
    setZoom(zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });

  // ---- decision and saving ----------------------------------------------------------------------
  function decide(value) {
    decision = value;
    for (const button of document.querySelectorAll(".decisions button")) {
      button.setAttribute("aria-pressed", String(button.dataset.decision === value));
    }
    updateSave();
  }
  for (const button of document.querySelectorAll(".decisions button")) {
    button.addEventListener("click", () => decide(button.dataset.decision));
  }
  function updateSave() { $("save").disabled = !item || !decision || saving; }

  function maskBlob() {
    const canvas = document.createElement("canvas");
    canvas.width = item.width;
    canvas.height = item.height;
    const context = canvas.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    for (const stroke of strokes) drawStroke(context, stroke, "#fff");
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  async function save() {
    if (!item || !decision || saving) return;
    saving = true;
    updateSave();
    status("saving…");
    try {
      const form = new FormData();
      form.append("annotator", annotator);
      form.append("position", String(item.position));
      form.append("image", item.image);
      form.append("decision", decision);
      form.append("time_ms", String(Math.round(performance.now() - shownAt)));
      form.append("mask", await maskBlob(), "mask.png");
      const reply = await api("/api/answer", { method: "POST", body: form, headers: HEADERS });
      if (reply.ok || reply.status === 409) {
        status(reply.status === 409 ? "that image was answered elsewhere; here is the next" : "");
        show(reply.ok ? reply.body.next : reply.body.next);
      } else {
        status("not saved: " + reply.body.error);
      }
    } catch (error) {
      status("not saved (" + error + "); try again");
    } finally {
      saving = false;
      updateSave();
    }
  }
  $("save").addEventListener("click", save);

  document.addEventListener("keydown", (event) => {
    if ($("work").hidden || event.target.tagName === "INPUT") return;
    if (event.key === "r" || event.key === "R") decide("real");
    else if (event.key === "f" || event.key === "F") decide("fake");
    else if (event.key === "Enter") save();
    else if (event.key === "z" && (event.ctrlKey || event.metaKey)) { strokes.pop(); redraw(); }
    else if (event.key === "+" || event.key === "=") setZoom(zoom * 1.25);
    else if (event.key === "-") setZoom(zoom / 1.25);
    else if (event.key === "1") setZoom(1);
  });
  window.addEventListener("resize", () => { if (item) fit(); });

  chooseAnnotator();
})();
