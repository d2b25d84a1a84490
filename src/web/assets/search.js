// The search page: text → images, image → captions, with payload filters.
"use strict";

let facets = { metadata: {} };

async function loadFacets() {
  try {
    facets = await api("/v1/facets");
    showMessage("");
  } catch (error) {
    showMessage(error.message, true);
    return;
  }
  fill("f-split", facets.split);
  fill("f-source", facets.source);
  fill("f-meta-key", Object.keys(facets.metadata || {}));
  metaValues();
}

function fill(id, values) {
  const select = document.getElementById(id);
  const current = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const value of values || []) select.append(el("option", { value: String(value), text: String(value) }));
  select.value = current;
}

function metaValues() {
  const key = document.getElementById("f-meta-key").value;
  const list = document.getElementById("f-meta-values");
  list.replaceChildren(...((facets.metadata || {})[key] || []).map((v) => el("option", { value: String(v) })));
}

// A typed metadata value takes the type the stored values have (filters match exactly).
function typed(key, text) {
  for (const value of (facets.metadata || {})[key] || []) {
    if (String(value) === text) return value;
  }
  if (/^-?\d+$/.test(text)) return Number(text);
  if (text === "true" || text === "false") return text === "true";
  return text;
}

function filter() {
  const out = {};
  const split = document.getElementById("f-split").value;
  const source = document.getElementById("f-source").value;
  const key = document.getElementById("f-meta-key").value;
  const value = document.getElementById("f-meta-value").value.trim();
  if (split) out.split = split;
  if (source) out.source = source;
  if (key && value) out["metadata." + key] = typed(key, value);
  return out;
}

function k() {
  const value = parseInt(document.getElementById("k").value, 10);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 200) : 24;
}

async function search(body, kind) {
  const results = document.getElementById("results");
  showMessage("Searching…");
  const started = performance.now();
  let answer;
  try {
    answer = await api("/v1/search", { method: "POST", body: Object.assign({ k: k(), filter: filter() }, body) });
  } catch (error) {
    showMessage(error.message, true);
    return;
  }
  const ms = Math.round(performance.now() - started);
  const hits = answer.results || [];
  const what = kind === "images" ? "images" : "captions";
  showMessage(hits.length + " " + what + " · adapter v" + answer.adapter_version + " · " + ms + " ms");
  results.className = kind === "images" ? "grid images" : "grid captions";
  results.replaceChildren(...hits.map((hit) => (kind === "images" ? imageCard(hit) : captionCard(hit))));
}

function thumb(sampleId, size, title) {
  const img = el("img", { class: "thumb", alt: title || "", title: "Search with this image", "data-sample": sampleId });
  img.addEventListener("click", () => searchBySample(sampleId));
  loadImage(img, sampleId, size);
  return img;
}

function metaLine(hit) {
  const parts = [];
  if (hit.source) parts.push("source: " + hit.source);
  if (hit.split) parts.push("split: " + hit.split);
  for (const [key, value] of Object.entries(hit.metadata || {})) parts.push(key + ": " + JSON.stringify(value));
  return el("div", { class: "meta", text: parts.join(" · ") });
}

function imageCard(hit) {
  const captions = (hit.captions || []).slice(0, 5).map((c) => el("li", { class: "caption", text: c }));
  return el("article", { class: "result", "data-sample": hit.sample_id }, [
    thumb(hit.sample_id, 256, (hit.captions || [])[0]),
    el("div", { class: "body" }, [
      el("div", { class: "score", text: hit.score.toFixed(4) }),
      el("ul", {}, captions),
      metaLine(hit),
      el("div", { class: "meta mono", text: hit.sample_id.slice(0, 16) + "…" }),
    ]),
  ]);
}

function captionCard(hit) {
  return el("article", { class: "result", "data-sample": hit.sample_id }, [
    thumb(hit.sample_id, 128, hit.caption),
    el("div", { class: "body" }, [
      el("span", { class: "score", text: hit.score.toFixed(4) + " " }),
      el("span", { class: "caption", text: hit.caption || (hit.captions || [])[0] || "" }),
      metaLine(hit),
    ]),
  ]);
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function showQueryImage(blob) {
  const img = document.getElementById("query-image");
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
}

async function searchByBlob(blob) {
  showQueryImage(blob);
  const b64 = toBase64(await blob.arrayBuffer());
  await search({ image_b64: b64 }, "captions");
}

async function searchBySample(sampleId) {
  try {
    const response = await fetch("/v1/samples/" + sampleId + "/image?size=0", { headers: headers() });
    if (!response.ok) throw new Error("the image could not be read (" + response.status + ")");
    await searchByBlob(await response.blob());
  } catch (error) {
    showMessage(error.message, true);
  }
}

function setupDrop() {
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const dropped = event.dataTransfer.files[0];
    if (dropped) searchByBlob(dropped);
  });
  file.addEventListener("change", () => { if (file.files[0]) searchByBlob(file.files[0]); });
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken(loadFacets);
  setupDrop();
  document.getElementById("f-meta-key").addEventListener("change", metaValues);
  document.getElementById("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = document.getElementById("q").value.trim();
    if (!text) { showMessage("Type what the images should show.", true); return; }
    document.getElementById("query-image").hidden = true;
    search({ text }, "images");
  });
  loadFacets();
});
