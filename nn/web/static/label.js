// The labelling page: one shot at a time from /api/next; the keys of the README toggle classes, save,
// take back, skip and mark "not a droplet". A shot's choice always starts empty.
"use strict";
const KEYS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "-"];
let names = [], current = null, chosen = [], camOn = false;

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || response.statusText);
  return value;
}

function say(text) { document.getElementById("message").textContent = text || ""; }

function camClass() {
  const picked = chosen.indexOf(1);
  if (picked >= 0) return picked;
  const p = current.probabilities;
  return p.indexOf(Math.max(...p));
}

function showImage() {
  const img = document.getElementById("shot");
  if (!current || current.id === null) { img.removeAttribute("src"); return; }
  const id = encodeURIComponent(current.id);
  img.src = camOn ? `/api/cam?id=${id}&class=${camClass()}` : `/api/image?id=${id}`;
}

function render(progress) {
  const body = document.querySelector("#classes tbody");
  body.innerHTML = "";
  names.forEach((name, k) => {
    const row = body.insertRow();
    row.dataset.cls = k;
    if (chosen[k]) row.className = "chosen";
    const p = current && current.id !== null ? current.probabilities[k] : 0;
    const t = current && current.id !== null ? current.thresholds[k] : 0.5;
    row.innerHTML = `<td>${KEYS[k]}</td><td>${name}</td><td class="mark">${chosen[k] ? "&#10003;" : ""}</td>` +
      `<td><div class="bar"><div class="p${p >= t ? " on" : ""}" style="width:${100 * p}%"></div>` +
      `<div class="t" style="left:${100 * t}%"></div></div> ${p.toFixed(2)}${p >= t ? " (yes)" : ""}</td>` +
      `<td>${progress ? progress.classes[name] : ""}</td>`;
  });
  if (progress) {
    document.getElementById("progress").textContent =
      `${progress.labelled} labelled, ${progress.not_a_droplet} not droplets, ` +
      `${current && current.remaining !== undefined ? current.remaining : "?"} left of ${progress.total}`;
  }
  document.getElementById("shot-info").textContent = !current ? "" : current.id === null ?
    "No shots left." : `shot ${current.id} (bunch ${current.bunch_id}${current.pulse >= 0 ? ", pulse " + current.pulse : ""})` +
    (current.ood_score === undefined ? "" :
      `; out-of-distribution score ${current.ood_score.toFixed(2)}${current.unknown ? " (unknown: unlike the training shots)" : ""}`);
}

async function loadNext() {
  current = await api("/api/next");
  chosen = names.map(() => 0);
  camOn = false;
  showImage();
  render(await api("/api/progress"));
  document.body.dataset.shot = current.id === null ? "" : current.id;  // for scripts and tests
}

async function act(key) {
  if (!current || current.id === null) { if (key === "Backspace") { await undo(); } return; }
  const k = KEYS.indexOf(key);
  if (k >= 0 && k < names.length) {
    chosen[k] = 1 - chosen[k];
    say("");
    render(await api("/api/progress"));
    if (camOn) showImage();
  } else if (key === "Enter") {
    await api("/api/label", {id: current.id, classes: chosen});
    say("");
    await loadNext();
  } else if (key === "x") {
    await api("/api/label", {id: current.id, not_a_droplet: true});
    say("");
    await loadNext();
  } else if (key === "s") {
    await api("/api/skip", {id: current.id});
    await loadNext();
  } else if (key === "Backspace") {
    await undo();
  } else if (key === "g") {
    camOn = !camOn;
    showImage();
  }
}

async function undo() {
  const back = await api("/api/undo", {});
  say(back.id === null ? "Nothing saved in this session to take back." : `Took back the label of shot ${back.id}.`);
  await loadNext();
}

let queue = Promise.resolve();
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Backspace" || event.key === "Enter") event.preventDefault();
  const key = event.key;  // one key at a time, in the order typed
  queue = queue.then(() => act(key)).catch((error) => say(`Refused: ${error.message}`));
});

(async () => {
  names = (await api("/api/classes")).classes;
  await loadNext();
  document.body.dataset.ready = "1";
})().catch((error) => say(error.message));
