// Shared by the pages: the API token (kept in this browser's local storage, sent as a bearer
// header, never put in a URL), JSON calls, and images fetched with the token.
"use strict";

const TOKEN_KEY = "rsitrd-token";

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = token();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  options = options || {};
  const init = { method: options.method || "GET", headers: headers() };
  if (options.body !== undefined) {
    init.body = JSON.stringify(options.body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let value = null;
  try { value = text ? JSON.parse(text) : null; } catch (_) { value = null; }
  if (!response.ok) {
    const reason = value && value.error ? value.error : text || response.statusText;
    if (response.status === 401) {
      throw new ApiError(401, "This daemon needs an API token: enter it above (" + reason + ").");
    }
    throw new ApiError(response.status, reason);
  }
  return value;
}

// Thumbnails, fetched with the token and shown from blob URLs; a few at a time so a large
// page of results does not queue a hundred requests at once.
const imageQueue = [];
let imagesInFlight = 0;
const MAX_IMAGE_FETCHES = 6;

function loadImage(img, sampleId, size) {
  imageQueue.push({ img, url: "/v1/samples/" + sampleId + "/image?size=" + size });
  // After the current task: the image is in the page by then, and images of results already
  // replaced are skipped.
  setTimeout(pumpImages, 0);
}

function pumpImages() {
  while (imagesInFlight < MAX_IMAGE_FETCHES && imageQueue.length) {
    const job = imageQueue.shift();
    if (!job.img.isConnected) continue;
    imagesInFlight++;
    fetch(job.url, { headers: headers() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
      .then((blob) => {
        job.img.src = URL.createObjectURL(blob);
        job.img.onload = () => URL.revokeObjectURL(job.img.src);
      })
      .catch(() => { job.img.alt = "image unavailable"; job.img.classList.add("missing"); })
      .finally(() => { imagesInFlight--; pumpImages(); });
  }
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function showMessage(text, isError) {
  const message = document.getElementById("message");
  message.textContent = text || "";
  message.classList.toggle("error", !!isError);
}

function when(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}

function setupToken(onChange) {
  const input = document.getElementById("token");
  input.value = token();
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) localStorage.setItem(TOKEN_KEY, input.value);
    else localStorage.removeItem(TOKEN_KEY);
    onChange();
  });
}
