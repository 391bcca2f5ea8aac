"""The search page: one HTML document with its CSS and JavaScript inline.

Flow: pick a file (or click any indexed image) -> it is shown as the query
and searched at once; drag on it to draw a box -> searched again with the
box; the result grid shows thumbnails, scores and paths, and a click on a
result makes it the query. For QAFF runs the query's fusion weights are
drawn over the searched region (regional grid as a heat overlay, blue =
lowest, red = highest cell of this query) with bars for the global weight,
the regional total and each scale.
"""

HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qaff_jax search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #f6f6f4; }
  header { background: #22313f; color: #fff; padding: 10px 18px; display: flex; gap: 18px;
           align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  header .meta { opacity: .8; font-size: 13px; }
  main { display: grid; grid-template-columns: minmax(280px, 420px) 1fr; gap: 18px; padding: 16px; }
  section { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 3px #0002; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  #stage { position: relative; display: inline-block; user-select: none;
           cursor: crosshair; line-height: 0; }
  #qimg { display: block; }
  #overlay { position: absolute; inset: 0; width: 100%; height: 100%; }
  .controls { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
  button { font: inherit; padding: 4px 10px; border-radius: 5px; border: 1px solid #99a; background: #fff; cursor: pointer; }
  #status { color: #555; min-height: 1.4em; }
  #status.error { color: #b00020; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
  .cell { border: 1px solid #ddd; border-radius: 6px; padding: 5px; background: #fafafa; cursor: pointer; }
  .cell:hover { border-color: #2f6fdd; }
  .cell img { width: 100%; height: 130px; object-fit: contain; background: #eee; display: block; }
  .cell .score { font-weight: 600; }
  .cell .path { font-size: 11px; color: #555; word-break: break-all; }
  .bars .row { display: grid; grid-template-columns: 150px 1fr 50px; gap: 6px; align-items: center; margin: 2px 0; font-size: 12px; }
  .bars .track { background: #e4e4e4; height: 10px; border-radius: 3px; overflow: hidden; }
  .bars .fill { height: 100%; }
  .legend { font-size: 11px; color: #555; display: flex; gap: 6px; align-items: center; margin-top: 6px; }
  .ramp { width: 120px; height: 10px; background: linear-gradient(90deg, rgb(40,70,220), rgb(110,170,235), rgb(250,240,150), rgb(245,140,50), rgb(220,25,25)); }
  #browse { margin-top: 14px; }
  .pager { display: flex; gap: 8px; align-items: center; margin-bottom: 8px; }
</style>
</head>
<body>
<header><h1>Search your photos</h1><span class="meta" id="info">loading…</span></header>
<main>
  <div>
    <section>
      <h2>Query</h2>
      <div class="controls">
        <input type="file" id="file" accept="image/*">
        <label>k <input type="number" id="k" value="20" min="1" max="200" style="width:4em"></label>
      </div>
      <div id="stage" hidden><img id="qimg" alt="query"><svg id="overlay" preserveAspectRatio="none"></svg></div>
      <div class="controls">
        <button id="clearbox" disabled>Clear box</button>
        <span style="font-size:12px;color:#666">drag on the image to search a region</span>
      </div>
      <div id="status"></div>
    </section>
    <section id="fusion" hidden style="margin-top:14px">
      <h2>QAFF fusion weights of the query</h2>
      <div class="bars" id="bars"></div>
      <div class="legend">regional cell weight: low <span class="ramp"></span> high
        (overlay on the searched region)</div>
    </section>
  </div>
  <div>
    <section>
      <h2 id="rtitle">Results</h2>
      <div class="grid" id="results"></div>
    </section>
    <section id="browse">
      <h2>Indexed images <span style="font-weight:normal;font-size:12px">(click one to search with it)</span></h2>
      <div class="pager"><button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button></div>
      <div class="grid" id="gallery"></div>
    </section>
  </div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { file: null, id: null, box: null, info: null, offset: 0, fusion: null, drag: null };
const PAGE = 48;
const STOPS = [[40,70,220],[110,170,235],[250,240,150],[245,140,50],[220,25,25]];
const TYPE = { global: "rgb(70,110,200)", regional: "rgb(220,90,40)", scale: "rgb(60,160,90)" };

function heat(t) {
  t = Math.min(1, Math.max(0, t));
  const p = t * (STOPS.length - 1), lo = Math.min(Math.floor(p), STOPS.length - 2), f = p - lo;
  const c = STOPS[lo].map((v, i) => Math.round(v * (1 - f) + STOPS[lo + 1][i] * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
function setStatus(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }

async function loadInfo() {
  const r = await fetch("api/info");
  state.info = await r.json();
  const i = state.info;
  $("info").textContent = `${i.images} images in ${i.images_root} · ${i.model.head} ${i.model.backbone} step ${i.model.step} · ${i.searcher} search` +
    (i.unreadable.length ? ` · ${i.unreadable.length} unreadable` : "");
  loadPage(0);
}
async function loadPage(offset) {
  state.offset = Math.max(0, offset);
  const r = await (await fetch(`api/images?offset=${state.offset}&limit=${PAGE}`)).json();
  $("page").textContent = r.total ? `${r.offset + 1}–${r.offset + r.items.length} of ${r.total}` : "empty";
  $("gallery").innerHTML = r.items.map((it) =>
    `<div class="cell" data-id="${it.id}" title="${esc(it.path)}"><img loading="lazy" src="${it.thumb}" alt=""><div class="path">${esc(it.path)}</div></div>`).join("");
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE >= r.total;
}
function showQuery(src) {
  $("stage").hidden = false;
  $("qimg").src = src;
  state.box = null; state.fusion = null;
  $("clearbox").disabled = true;
  drawOverlay();
}
function pickIndexed(id) {
  state.file = null; state.id = id;
  $("file").value = "";
  showQuery(`api/image/${id}`);
  search();
}
async function search() {
  const k = Math.max(1, Math.min(200, parseInt($("k").value) || 20));
  const params = new URLSearchParams({ k });
  if (state.box) params.set("box", state.box.map((v) => v.toFixed(5)).join(","));
  let url, opts = { method: "POST" };
  if (state.file) {
    if (state.info && state.file.size > state.info.max_upload_bytes) { setStatus("file too large", true); return; }
    url = `api/query?${params}`;
    opts.body = state.file; opts.headers = { "Content-Type": "application/octet-stream" };
  } else if (state.id !== null) {
    url = `api/query/${state.id}?${params}`;
  } else return;
  setStatus("searching…");
  let r;
  try { r = await fetch(url, opts); } catch (e) { setStatus(`request failed: ${e}`, true); return; }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { setStatus(`error ${r.status}: ${body.error || body.detail || r.statusText}`, true); return; }
  showResults(body);
}
function showResults(res) {
  $("results").innerHTML = res.results.map((x) =>
    `<div class="cell result" data-id="${x.id}" data-path="${esc(x.path)}"><img src="${x.thumb}" alt=""><div><span class="rank">#${x.rank}</span> <span class="score">${x.score.toFixed(4)}</span></div><div class="path">${esc(x.path)}</div></div>`).join("");
  $("rtitle").textContent = `Results (${res.results.length}, ${res.ms} ms)`;
  setStatus(`${res.results.length} results` + (state.box ? " for the box" : ""));
  state.fusion = res.fusion;
  drawOverlay();
  showBars(res.fusion);
}
function showBars(f) {
  $("fusion").hidden = !f;
  if (!f) return;
  const rows = [["global", f.global, TYPE.global], [`regional ${f.grid}×${f.grid} total`, f.regional_total, TYPE.regional]];
  f.scales.forEach((s, i) => rows.push([`scale ×${s}`, f.scale_weights[i], TYPE.scale]));
  if (f.scales.length) rows.push(["scales total", f.scale_total, TYPE.scale]);
  $("bars").innerHTML = rows.map(([name, v, c]) =>
    `<div class="row"><span>${esc(name)}</span><div class="track"><div class="fill" style="width:${(100 * Math.max(0, Math.min(1, v))).toFixed(1)}%;background:${c}"></div></div><span>${v.toFixed(3)}</span></div>`).join("");
}
function drawOverlay() {
  const svg = $("overlay"), img = $("qimg");
  const w = img.clientWidth, h = img.clientHeight;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  let parts = [];
  const b = state.drag ? state.drag.box : state.box;
  const region = state.box ? [state.box[0] * w, state.box[1] * h, state.box[2] * w, state.box[3] * h] : [0, 0, w, h];
  const f = state.fusion;
  if (f && !state.drag) {
    const g = f.grid, cells = f.regional.flat();
    const lo = Math.min(...cells), hi = Math.max(...cells);
    const cw = (region[2] - region[0]) / g, ch = (region[3] - region[1]) / g;
    for (let r = 0; r < g; r++) for (let c = 0; c < g; c++) {
      const v = f.regional[r][c], t = hi - lo > 1e-12 ? (v - lo) / (hi - lo) : 0.5;
      const x = region[0] + c * cw, y = region[1] + r * ch;
      parts.push(`<rect class="fcell" x="${x}" y="${y}" width="${cw}" height="${ch}" fill="${heat(t)}" fill-opacity="0.45" stroke="#fff" stroke-width="1"/>`);
      parts.push(`<text x="${x + cw / 2}" y="${y + ch / 2}" font-size="${Math.max(9, Math.min(16, cw / 4))}" fill="#fff" stroke="#000" stroke-width="2.5" paint-order="stroke" font-weight="600" text-anchor="middle" dominant-baseline="middle">${v.toFixed(3)}</text>`);
    }
  }
  if (b) parts.push(`<rect x="${b[0] * w}" y="${b[1] * h}" width="${(b[2] - b[0]) * w}" height="${(b[3] - b[1]) * h}" fill="none" stroke="#00e000" stroke-width="2"/>`);
  svg.innerHTML = parts.join("");
}
function frac(ev) {
  const r = $("qimg").getBoundingClientRect();
  return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
}
$("stage").addEventListener("mousedown", (ev) => { ev.preventDefault(); const p = frac(ev); state.drag = { start: p, box: [p[0], p[1], p[0], p[1]] }; drawOverlay(); });
window.addEventListener("mousemove", (ev) => {
  if (!state.drag) return;
  const p = frac(ev), s = state.drag.start;
  state.drag.box = [Math.min(s[0], p[0]), Math.min(s[1], p[1]), Math.max(s[0], p[0]), Math.max(s[1], p[1])];
  drawOverlay();
});
window.addEventListener("mouseup", () => {
  if (!state.drag) return;
  const b = state.drag.box; state.drag = null;
  if ((b[2] - b[0]) * $("qimg").clientWidth > 4 && (b[3] - b[1]) * $("qimg").clientHeight > 4) {
    state.box = b; $("clearbox").disabled = false; search();
  }
  drawOverlay();
});
$("clearbox").addEventListener("click", () => { state.box = null; $("clearbox").disabled = true; drawOverlay(); search(); });
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (!f) return;
  state.file = f; state.id = null;
  showQuery(URL.createObjectURL(f));
  search();
});
$("k").addEventListener("change", search);
$("qimg").addEventListener("load", () => {
  // Small images are enlarged and tall ones bounded: the box is drawn on this.
  const img = $("qimg"), panel = $("stage").parentElement, css = getComputedStyle(panel);
  const room = panel.clientWidth - parseFloat(css.paddingLeft) - parseFloat(css.paddingRight);
  const s = Math.min(room / img.naturalWidth, 480 / img.naturalHeight);
  img.style.width = `${Math.round(img.naturalWidth * s)}px`;
  img.style.height = `${Math.round(img.naturalHeight * s)}px`;
  drawOverlay();
});
window.addEventListener("resize", drawOverlay);
for (const grid of ["results", "gallery"]) {
  $(grid).addEventListener("click", (ev) => { const c = ev.target.closest(".cell"); if (c) pickIndexed(parseInt(c.dataset.id)); });
}
$("prev").addEventListener("click", () => loadPage(state.offset - PAGE));
$("next").addEventListener("click", () => loadPage(state.offset + PAGE));
loadInfo();
</script>
</body>
</html>
"""
