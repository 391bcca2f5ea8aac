"""Result tables in the form papers print them (percentages, E/M/H).

`write_report` writes report.json + report.md; `write_html_report` writes a
self-contained report.html beside them (inline CSS and SVG, images as small
base64 JPEGs): the table, per-query APs, and each query with its top
retrieved images outlined by ground-truth label (+ QAFF fusion pictures).
"""

from __future__ import annotations

import html
import json
import os
from typing import Sequence

import numpy as np

PROTOCOLS = ("E", "M", "H")


def markdown_table(results: dict[str, dict], kappas=(1, 5, 10)) -> str:
  """`results[name]` holds flat metric keys (`mAP_E`, `mP@1_E`, ...) as fractions."""
  head = ["dataset"] + [f"mAP {p}" for p in PROTOCOLS] + [
      f"mP@{k} {p}" for p in PROTOCOLS for k in kappas]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  other = {name: m for name, m in results.items() if "mAP_E" not in m}
  for name, m in results.items():
    if name in other:
      continue
    cells = [name] + [f"{100 * m[f'mAP_{p}']:.2f}" for p in PROTOCOLS] + [
        f"{100 * m[f'mP@{k}_{p}']:.2f}" for p in PROTOCOLS for k in kappas]
    lines.append("| " + " | ".join(cells) + " |")
  if len(other) == len(results):
    lines = []
  for name, m in other.items():  # e.g. GLDv2 retrieval: mAP@100_public / _private / _all
    lines += ["", f"| {name} | value |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.2f} |" for k, v in m.items() if isinstance(v, float)]
  return "\n".join(lines).strip("\n")


def write_report(results: dict[str, dict], out_dir: str, extra: dict | None = None) -> str:
  """Writes `report.json` (all numbers, per-query APs) and `report.md`; returns the md path."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump({"results": results, **(extra or {})}, f, indent=1, default=float)
  md = os.path.join(out_dir, "report.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown_table(results) + "\n")
    fusions = {name: r["fusion"] for name, r in results.items() if "fusion" in r}
    fusions.update({name: i["fusion"] for name, i in (extra or {}).get("info", {}).items()
                    if isinstance(i, dict) and "fusion" in i})
    if fusions:
      from qaff_jax.evaluation import fusion_stats
      for name, summary in fusions.items():
        f.write(f"\n## QAFF fusion weights: {name}\n\n"
                + fusion_stats.format_fusion_summary(summary) + "\n")
  return md


# ---------------------------------------------------------------------------
# A self-contained HTML report: tables, per-query APs, retrieved images.

# Outline colours of retrieved images by their ground-truth label.
LABEL_COLORS = {"easy": "#1a9641", "hard": "#2b83ba", "junk": "#f0a30a",
                "negative": "#d7191c"}
_PROTOCOL_COLORS = {"E": "#66a61e", "M": "#1f78b4", "H": "#6a3d9a"}
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 18px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f0f0f0}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.query{display:flex;gap:10px;align-items:flex-start;margin:10px 0;padding:8px 0;
  border-top:1px solid #e4e4e4;flex-wrap:wrap}
.query .head{flex:0 0 170px}
.query .head p{margin:2px 0;font-size:12px;word-break:break-all}
.hits{display:flex;gap:6px;flex-wrap:wrap;flex:1 1 0;min-width:320px}
.hits figure{margin:0;text-align:center;font-size:11px}
img{display:block}
img.hit{border:4px solid #999}
""" + "".join(f"img.hit.{k}{{border-color:{v}}}\n" for k, v in LABEL_COLORS.items())


def gnd_label(gnd_entry: dict, db_index: int) -> str:
  """'easy', 'hard', 'junk' or 'negative': the label of a database image."""
  for label in ("easy", "hard", "junk"):
    if int(db_index) in {int(v) for v in np.asarray(gnd_entry.get(label, [])).reshape(-1)}:
      return label
  return "negative"


def _jpeg_uri(img, side: int, box=None, quality: int = 72) -> tuple[str, int, int]:
  """A data: URI of `img` (uint8 [H, W, 3] or PIL) fitted in `side` pixels,
  with `box` (pixels of `img`) outlined in green."""
  import base64
  import io
  from PIL import Image, ImageDraw
  pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
  pil = pil.convert("RGB")
  scale = side / max(pil.size)
  size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
  small = pil.resize(size, Image.Resampling.BILINEAR)
  if box is not None:
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    ImageDraw.Draw(small).rectangle([x0, y0, x1, y1], outline=(0, 230, 0),
                                    width=max(2, round(side / 80)))
  buf = io.BytesIO()
  small.save(buf, "JPEG", quality=quality)
  return ("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
          small.width, small.height)


def _safe_load(fn):
  try:
    return fn()
  except (OSError, ValueError):   # a missing image (--skip_missing): grey
    return np.full((64, 64, 3), 200, np.uint8)


def _html_table(results: dict[str, dict], kappas=(1, 5, 10)) -> str:
  keys = [f"mAP_{p}" for p in PROTOCOLS] + [f"mP@{k}_{p}" for p in PROTOCOLS for k in kappas]
  head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
  rows = []
  for name, m in results.items():
    if "mAP_E" not in m:
      continue
    cells = "".join(f'<td data-key="{k}">{100 * m[k]:.2f}</td>' for k in keys)
    rows.append(f'<tr data-dataset="{html.escape(name)}"><td>{html.escape(name)}</td>{cells}</tr>')
  other = []
  for name, m in results.items():
    if "mAP_E" in m:
      continue
    cells = "".join(f'<tr><td>{html.escape(k)}</td><td data-key="{html.escape(k)}">'
                    f'{100 * v:.2f}</td></tr>' for k, v in m.items() if isinstance(v, float))
    other.append(f'<table data-dataset="{html.escape(name)}"><tr><th>{html.escape(name)}</th>'
                 f'<th>value</th></tr>{cells}</table>')
  table = (f'<table class="metrics"><tr><th>dataset</th>{head}</tr>{"".join(rows)}</table>'
           if rows else "")
  return table + "".join(other)


def ap_chart_svg(per_query: dict[str, Sequence[float]], labels: Sequence[str] | None = None,
                 height: int = 180) -> str:
  """Grouped bars (E / M / H) of per-query APs as an inline SVG; NaN = no bar."""
  n = max((len(v) for v in per_query.values()), default=0)
  protos = [p for p in PROTOCOLS if p in per_query]
  group = max(6 * len(protos) + 4, 14)
  left, bottom, top = 36, 22, 8
  width = left + n * group + 10
  plot = height - bottom - top
  parts = [f'<svg class="ap-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}">']
  for t in (0.0, 0.25, 0.5, 0.75, 1.0):
    y = top + plot * (1 - t)
    parts.append(f'<line x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" '
                 f'stroke="#ddd"/><text x="{left - 4}" y="{y + 4:.1f}" font-size="10" '
                 f'text-anchor="end">{t:.2f}</text>')
  bar = (group - 4) / max(1, len(protos))
  for q in range(n):
    x0 = left + q * group + 2
    for j, p in enumerate(protos):
      v = per_query[p][q] if q < len(per_query[p]) else float("nan")
      if v is None or not np.isfinite(v):
        continue
      h = plot * float(v)
      name = labels[q] if labels is not None else str(q)
      parts.append(f'<rect class="ap {p}" x="{x0 + j * bar:.1f}" y="{top + plot - h:.1f}" '
                   f'width="{bar:.1f}" height="{h:.1f}" fill="{_PROTOCOL_COLORS[p]}">'
                   f'<title>{html.escape(name)} AP {p} {100 * v:.2f}</title></rect>')
    if n <= 60 or q % 5 == 0:
      parts.append(f'<text x="{x0 + (group - 4) / 2:.1f}" y="{height - 8}" font-size="9" '
                   f'text-anchor="middle">{q}</text>')
  parts.append("</svg>")
  legend = "".join(f'<span><i style="background:{_PROTOCOL_COLORS[p]}"></i>AP {p}</span>'
                   for p in protos)
  return f'<div class="legend">{legend}</div>' + "".join(parts)


def write_html_report(results: dict[str, dict], out_dir: str, *, datasets=None,
                      ranks=None, fusion=None, grid: int | None = None,
                      scales: Sequence[float] = (), top: int = 10, thumb_side: int = 150,
                      title: str = "Retrieval report", max_queries: int | None = None) -> str:
  """Writes `out_dir/report.html` (self-contained) and returns its path.

  Args:
    results: {dataset: revisitop metrics} as `write_report` gets them (with
      `per_query` APs for the chart).
    datasets: {name: `revisited.RevisitedDataset`} (or one dataset) whose
      queries get a section: the query image with its box, then its `top`
      first retrieved database images, each outlined by its ground-truth
      label (`LABEL_COLORS`: easy / hard / junk / negative).
    ranks: {name: [nq, k] database indices, best first} (or one array).
    fusion: {name: [nq, 1+g^2+S] QAFF fusion weights of the queries} (or one
      array) with `grid` and `scales`: each query also gets the picture of
      `viz.fusion.render_image` (regional heat overlay on the crop the
      network saw, bars of global / regional / scale weights).
    top: retrieved images shown per query.
    thumb_side: long side of the thumbnails (base64 JPEG) in pixels.
    max_queries: at most this many query sections per dataset (None: all).
  """
  from qaff_jax.data import revisited
  if isinstance(datasets, revisited.RevisitedDataset):
    datasets = {datasets.name: datasets}
  datasets = dict(datasets or {})
  ranks = _by_name(ranks, datasets)
  fusion = _by_name(fusion, datasets)
  body = [f"<h1>{html.escape(title)}</h1>", _html_table(results)]
  for name, m in results.items():
    if "per_query" in m:
      ids = datasets[name].qimlist if name in datasets else None
      body.append(f"<h2>Per-query AP: {html.escape(name)}</h2>"
                  + ap_chart_svg(m["per_query"], ids))
  legend = "".join(f'<span><i style="background:{c}"></i>{k}</span>'
                   for k, c in LABEL_COLORS.items())
  for name, ds in datasets.items():
    if name not in ranks:
      continue
    idx = np.asarray(ranks[name])
    if idx.shape[0] != ds.n_queries:
      raise ValueError(f"{name}: ranks for {idx.shape[0]} queries, dataset has {ds.n_queries}")
    body.append(f"<h2>Queries and top {top}: {html.escape(name)}</h2>"
                f'<div class="legend">{legend}<span><i style="background:#00e600"></i>'
                "query box</span></div>")
    per_query = results.get(name, {}).get("per_query", {})
    weights = fusion.get(name)
    n = ds.n_queries if max_queries is None else min(max_queries, ds.n_queries)
    for i in range(n):
      body.append(_query_section(ds, i, idx[i][:top], per_query, weights, grid, scales,
                                 thumb_side))
  doc = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
         + "\n".join(body) + "</body></html>\n")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "report.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(doc)
  return path


def _by_name(value, datasets: dict) -> dict:
  if value is None:
    return {}
  if isinstance(value, dict):
    return value
  if len(datasets) != 1:
    raise ValueError("pass ranks / fusion as {dataset: array} for several datasets")
  return {next(iter(datasets)): value}


def _query_section(ds, i: int, hits, per_query, weights, grid, scales, side: int) -> str:
  bbx = ds.query_bbx(i)
  full = _safe_load(lambda: ds.load_query(i, crop=False))
  uri, w, h = _jpeg_uri(full, side, box=bbx)
  aps = " ".join(f"{p} {100 * per_query[p][i]:.1f}" for p in PROTOCOLS
                 if p in per_query and i < len(per_query[p]) and np.isfinite(per_query[p][i]))
  head = (f'<div class="head"><img class="query" src="{uri}" width="{w}" height="{h}" '
          f'alt="query {i}"><p><b>query {i}</b> {html.escape(ds.qimlist[i])}</p>'
          f"<p>AP {aps or 'n/a'}</p></div>")
  figs = []
  for rank, j in enumerate(hits):
    j = int(j)
    if j < 0 or j >= ds.n_db:   # a distractor (R1M) or an empty slot
      label, img, name = "negative", np.full((64, 64, 3), 200, np.uint8), f"#{j}"
    else:
      label, img, name = gnd_label(ds.gnd[i], j), _safe_load(lambda j=j: ds.load_db(j)), ds.imlist[j]
    src, tw, th = _jpeg_uri(img, side)
    figs.append(f'<figure><img class="hit {label}" data-db="{j}" src="{src}" width="{tw}" '
                f'height="{th}" alt="{label}" title="{html.escape(name)}">'
                f"<figcaption>{rank + 1}. {label}</figcaption></figure>")
  extra = ""
  if weights is not None and grid:
    from qaff_jax.viz import fusion as viz_fusion
    crop = _safe_load(lambda: ds.load_query(i, crop=True))
    pic = viz_fusion.render_image(crop, np.asarray(weights)[i], grid, scales,
                                  display_side=2 * side, title=f"query {i} fusion weights")
    src, fw, fh = _jpeg_uri(pic, max(pic.size), quality=80)
    extra = f'<img class="fusion" src="{src}" width="{fw}" height="{fh}" alt="fusion weights">'
  return (f'<div class="query" data-query="{i}">{head}<div class="hits">{"".join(figs)}'
          f"</div>{extra}</div>")
