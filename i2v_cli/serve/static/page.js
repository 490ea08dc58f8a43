// The page's behaviour: a click on an image shows its tags and neighbours; a dropped file is tagged and
// searched by similarity. Plain DOM, no build step; every call goes to the same JSON API as other clients.
"use strict";

const detail = document.getElementById("detail");
const statusLine = document.getElementById("status");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function showError(message) {
  statusLine.textContent = message;
  statusLine.className = "error";
}

async function api(url, options) {
  const response = await fetch(url, Object.assign({ credentials: "same-origin" }, options));
  const body = await response.json();
  if (!response.ok && !body.records) throw new Error(body.error || response.statusText);
  return body;
}

function tagList(record) {
  const list = el("ul", { class: "tags" });
  for (const category of ["character", "copyright", "general", "rating"]) {
    // Sorted again by score: JavaScript puts integer-like keys (the copyright tag "428") first in an object.
    const entries = Object.entries(record[category] || {}).sort((a, b) => b[1] - a[1]);
    for (const [tag, score] of entries) {
      const item = el("li", { "data-category": category }, el("span", { class: "tag" }, tag),
                       el("span", { class: "score" }, score.toFixed(3)));
      list.append(item);
    }
  }
  return list;
}

function neighbours(results) {
  const box = el("div", { class: "neighbours" });
  for (const hit of results) {
    const link = el("a", { href: "#", "data-id": hit.id, title: `${hit.path} (${hit.score.toFixed(3)})` });
    link.append(el("img", { src: `/v1/images/${hit.id}/thumb`, alt: hit.path }));
    link.addEventListener("click", (e) => { e.preventDefault(); showImage(hit.id); });
    box.append(link);
  }
  return box;
}

async function showImage(id) {
  document.querySelectorAll("#gallery a.selected").forEach((a) => a.classList.remove("selected"));
  const tile = document.querySelector(`#gallery a[data-id="${id}"]`);
  if (tile) tile.classList.add("selected");
  try {
    const [info, similar] = await Promise.all([
      api(`/v1/images/${id}/info`),
      api(`/v1/search?like=${id}&k=8`),
    ]);
    detail.replaceChildren(
      el("h2", {}, info.path),
      el("a", { href: `/v1/images/${id}`, target: "_blank" }, el("img", { class: "preview", src: `/v1/images/${id}/thumb` })),
      info.error ? el("p", { class: "error" }, info.error) : tagList(info),
      el("h3", {}, "Most similar"),
      neighbours(similar.results),
    );
  } catch (err) {
    showError(String(err.message || err));
  }
}

async function showUpload(file) {
  const form = () => { const f = new FormData(); f.append("image", file, file.name); return f; };
  statusLine.textContent = `Tagging ${file.name}…`;
  statusLine.className = "";
  try {
    const tagged = await api("/v1/tag", { method: "POST", body: form() });
    const record = tagged.records[0];
    if (record.error) throw new Error(record.error);
    const parts = [el("h2", { id: "upload-name" }, file.name), el("img", { class: "preview", src: URL.createObjectURL(file) }),
                   tagList(record)];
    try {
      const similar = await api("/v1/similar?k=8", { method: "POST", body: form() });
      parts.push(el("h3", {}, "Nearest indexed images"), neighbours(similar.results));
    } catch (err) {
      parts.push(el("p", { class: "hint" }, `No neighbours: ${err.message || err}`));
    }
    detail.replaceChildren(...parts);
    statusLine.textContent = `Tagged ${file.name}`;
  } catch (err) {
    showError(String(err.message || err));
  }
}

document.querySelectorAll("#gallery a[data-id]").forEach((a) => {
  a.addEventListener("click", (e) => { e.preventDefault(); showImage(a.dataset.id); });
});
document.getElementById("file").addEventListener("change", (e) => {
  if (e.target.files.length) showUpload(e.target.files[0]);
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("over"); });
document.addEventListener("dragleave", () => document.body.classList.remove("over"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("over");
  if (e.dataTransfer.files.length) showUpload(e.dataTransfer.files[0]);
});
