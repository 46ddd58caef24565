// AiryNet's view: polls the JSON API (docs/view.md) twice a second; no libraries, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const POLL_MS = 500;  // a published shot is on the page within a second: half of it waiting, the rest to spare
const state = { names: [], offset: 0, limit: 24, summary: null, shown: "", thresholds: null };
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#444"];

function element(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== "") e.textContent = text;
  return e;
}

function filters() {
  const p = new URLSearchParams();
  for (const id of ["cls", "prob", "sort"]) if ($(id).value) p.set(id, $(id).value);
  if (Number($("min").value) > 0) p.set("min", $("min").value);
  if (Number($("max").value) < 1) p.set("max", $("max").value);
  return p;
}

function imageUrl(id, map) {
  return `/api/shots/${encodeURIComponent(id)}/image.png` + (map ? `?map=${encodeURIComponent(map)}` : "");
}

function fillSelects(names) {
  for (const id of ["cls", "prob", "sort", "map"]) {
    for (const n of names) $(id).append(element("option", { value: n }, n));
  }
}

function showSummary(s) {
  $("source").textContent = s.source;
  $("state").textContent = s.waiting ? `waiting for data from ${s.source}` : (s.kind === "stream" ? "live" : "file");
  $("state").className = s.waiting ? "waiting" : "";
  if (!state.names.length && s.class_names.length) {
    state.names = s.class_names;
    fillSelects(s.class_names);
  }
  const share = s.hit_share === null ? "–" : (100 * s.hit_share).toFixed(1) + " %";
  $("totals").textContent = `${s.shots} shots, hits (not empty): ${share}`;
  const body = $("classes").tBodies[0];
  body.replaceChildren();
  const last = s.rates && s.rates.counts.length ? s.rates.counts[s.rates.counts.length - 1] : null;
  $("rate-head").hidden = !last;
  state.names.forEach((name, i) => {
    const count = s.classes[name] || 0;
    const row = element("tr", { "data-class": name });
    row.append(element("td", {}, name), element("td", { class: "n count" }, String(count)),
               element("td", { class: "n" }, s.shots ? (100 * count / s.shots).toFixed(1) + " %" : "–"));
    if (last) row.append(element("td", { class: "n" }, String(last[i])));
    if ($("cls").value === name) row.className = "chosen";
    row.onclick = () => { $("cls").value = $("cls").value === name ? "" : name; changed(); };
    body.append(row);
  });
  const notices = [];
  if (!s.images && !s.waiting) notices.push("Images are off in this source: the page shows the numbers only.");
  $("notice").textContent = notices.join(" ");
  if (s.kind === "stream") showStream(s);
  state.thresholds = s.thresholds;
}

function showStream(s) {
  const latency = s.latency === null ? "–" : (1000 * s.latency).toFixed(0) + " ms";
  $("stream").textContent = `${s.throughput} shots/s, latency ${latency}, messages ${s.messages}, ` +
    `dropped by the view ${s.dropped}, malformed ${s.malformed}`;
  drawRates(s.rates);
}

function drawRates(rates) {
  // Shots per class and train over the last minutes: one line per class, newest at the right.
  const canvas = $("rates"), ctx = canvas.getContext("2d");
  canvas.hidden = rates.counts.length < 2;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (canvas.hidden) return;
  const span = Math.max(...rates.seconds_ago, 1);
  const top = Math.max(1, ...rates.counts.flat());
  state.names.forEach((_, c) => {
    ctx.strokeStyle = COLOURS[c % COLOURS.length];
    ctx.beginPath();
    rates.counts.forEach((counts, t) => {
      const x = canvas.width * (1 - rates.seconds_ago[t] / span), y = canvas.height * (1 - counts[c] / top);
      t ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
}

function card(shot) {
  const div = element("div", { class: "shot", "data-id": shot.id });
  if (state.summary && state.summary.images) {
    const img = element("img", { alt: shot.id, src: imageUrl(shot.id, $("map").value) });
    img.onerror = () => { if (img.src.includes("map=")) img.src = imageUrl(shot.id, ""); };
    div.append(img);
  } else {
    div.append(element("div", { class: "noimage" }, "images off"));
  }
  const where = shot.pulse === undefined ? `bunch ${shot.bunch_id}` : `train ${shot.bunch_id}, pulse ${shot.pulse}`;
  div.append(element("div", {}, where), element("div", { class: "predicted" }, shot.classes.join(", ") || "(none)"));
  if (shot.unknown) div.append(element("div", { class: "unknown" }, "unknown"));
  if (shot.ood_score !== undefined) div.append(element("div", {}, `ood ${shot.ood_score}`));
  div.onclick = () => showShot(shot.id);
  return div;
}

async function loadShots() {
  const p = filters();
  p.set("offset", state.offset);
  p.set("limit", state.limit);
  const answer = await (await fetch("/api/shots?" + p)).json();
  const key = JSON.stringify(answer.shots.map((s) => s.id)) + $("map").value;
  if (key !== state.shown) {
    state.shown = key;
    $("grid").replaceChildren(...answer.shots.map(card));
  }
  const last = Math.min(state.offset + state.limit, answer.total);
  $("page").textContent = answer.total ? `${state.offset + 1}–${last} of ${answer.total}` : "no shots";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= answer.total;
  $("download").href = "/api/ids.txt?" + filters();
}

async function showShot(id) {
  const shot = await (await fetch(`/api/shots/${encodeURIComponent(id)}`)).json();
  $("detail").hidden = false;
  const where = shot.pulse === undefined ? `bunch ${shot.bunch_id}` : `train ${shot.bunch_id}, pulse ${shot.pulse}`;
  $("detail-title").textContent = `${shot.id}: ${where}`;
  $("detail-image").src = shot.image ? imageUrl(shot.id, "") : "";
  $("detail-image").hidden = !shot.image;
  const maps = $("detail-maps");
  maps.replaceChildren();
  for (const name of shot.maps) {
    const b = element("button", { type: "button", "data-map": name }, `map: ${name}`);
    b.onclick = () => { $("detail-image").src = imageUrl(shot.id, name); };
    maps.append(b);
  }
  const body = $("detail-probs").tBodies[0];
  body.replaceChildren();
  state.names.forEach((name, i) => {
    const p = shot.probabilities[i], t = state.thresholds ? state.thresholds[i] : null;
    const bar = element("div", { class: "bar" });
    const fill = element("span");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    if (t !== null) {
      const mark = element("i");
      mark.style.left = (100 * t).toFixed(1) + "%";
      bar.append(mark);
    }
    const row = element("tr", { class: shot.classes.includes(name) ? "decided" : "" });
    const cell = element("td");
    cell.append(bar);
    row.append(element("td", {}, name), element("td", { class: "n" }, p.toFixed(3) + (t === null ? "" : ` / ${t.toFixed(2)}`)),
               cell);
    body.append(row);
  });
}

function changed() {
  state.offset = 0;
  state.shown = "";
  state.busy = false;  // a choice of the user's goes out at once
  refresh();
}

async function refresh() {
  if (state.busy) return;  // the last refresh has not finished: skip this one rather than pile them up
  state.busy = true;
  try {
    const s = await (await fetch("/api/summary")).json();
    state.summary = s;
    showSummary(s);
    await loadShots();
  } catch (e) {
    $("state").textContent = `no answer from the view (${e})`;
  } finally {
    state.busy = false;
  }
}

for (const id of ["cls", "prob", "min", "max", "sort", "map"]) $(id).onchange = changed;
$("prev").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); state.busy = false; refresh(); };
$("next").onclick = () => { state.offset += state.limit; state.busy = false; refresh(); };
$("close").onclick = () => { $("detail").hidden = true; };
refresh();
setInterval(refresh, POLL_MS);
