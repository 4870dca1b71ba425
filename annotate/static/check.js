// cyborg: check a photo against the gRPC server (through this app), show verdict, probability and heatmap.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop");

  function percent(value) { return (100 * value).toFixed(1) + " %"; }

  async function check(file) {
    if (!file) return;
    $("result").hidden = true;
    $("check-status").textContent = "checking " + file.name + "…";
    $("preview").src = URL.createObjectURL(file);
    const form = new FormData();
    form.append("image", file, file.name);
    let reply, body;
    try {
      reply = await fetch("/api/check", { method: "POST", body: form, headers: { "X-Requested-With": "cyborg" }, credentials: "same-origin" });
      body = await reply.json();
    } catch (error) {
      $("check-status").textContent = "failed: " + error;
      return;
    }
    if (!reply.ok) {
      $("check-status").textContent = "failed: " + body.error;
      return;
    }
    $("check-status").textContent = file.name;
    const verdict = $("verdict");
    verdict.className = body.label;
    verdict.dataset.label = body.label;
    verdict.textContent = (body.label === "fake" ? "Likely generated (fake)" : "Likely real") + " — " + percent(body.probability) + " fake";
    $("details").textContent = "operating point " + (body.operating_point || "default") + " (fake from " + percent(body.probability_threshold) + ")"
      + "; raw score " + body.score.toFixed(4) + "; model " + body.model + " v" + body.version
      + (body.saliency ? (body.saliency === "none" ? "; trained without saliency maps" : "; trained with " + body.saliency + " saliency maps") : "");
    const faces = $("faces");
    faces.textContent = "";
    if (body.input_kind === "photo") {
      const found = (body.faces || []).length;
      if (body.status === "no_face") verdict.textContent = "No face found";
      else if (body.status === "faces_too_small") verdict.textContent = "Faces too small to judge";
      $("details").textContent = found + " face(s) found; " + $("details").textContent;
    }
    for (const [index, face] of (body.faces || []).entries()) {
      const line = document.createElement("li");
      const box = face.box.map((v) => Math.round(v)).join(", ");
      line.textContent = "face " + (index + 1) + " at (" + box + "): "
        + (face.status === "scored" ? face.label + ", " + percent(face.probability) + " fake" : face.status.replace(/_/g, " "))
        + (index === body.verdict_face ? " (the verdict)" : "");
      line.dataset.label = face.label || "";
      faces.appendChild(line);
    }
    $("heatmap").src = body.heatmap || "";
    $("heatmap").parentElement.hidden = !body.heatmap;
    $("result").hidden = false;
  }

  $("file").addEventListener("change", () => check($("file").files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    check(event.dataTransfer.files[0]);
  });
})();
