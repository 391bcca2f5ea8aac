r"""Draw QAFF fusion weights on the images they were predicted for.

python -m qaff_jax.viz.fusion --workdir runs/qaff --out viz/ \
    --images 'photos/*.jpg' revisited:/data/revisitop:roxford5k:50 \
    [--max_side 512] [--gallery 8] [--display_side 384] [--step N]

`--images` takes image files, globs or folders, and `revisited:<root>:<name>`
for the database images of a revisitop dataset (`:N` appended keeps the
first N). The run's network (`--workdir`, head 'qaff') predicts per image the
fusion weights w [1+g^2+S] (global, g x g regional cells row-major, scales in
config order). Written to `--out`:

  <id>.png              the image with the regional weights as a heat overlay
                        (blue = lowest, red = highest of that image; the
                        weight printed in each cell) and a bar strip with
                        the global weight, the regional total and each scale
  gallery.png           the `--gallery` most global-leaning images (highest
                        global weight) above the most region-leaning ones
                        (highest regional total)
  fusion_summary.json   `evaluation.fusion_stats.fusion_summary` (+ run info)
  fusion_summary.md     the same as Markdown
  fusion_weights.json   the weights of every image

When a revisited dataset's folder holds the object sidecar `objects.json`
(`evaluation.fusion_stats.load_objects_sidecar`), its images' object boxes
are drawn (green outline) on their pictures and gallery thumbnails, their
kind is added to the picture title, and the summary gains its `adaptivity`
section (region follow with chance levels, weights by kind, scale-size
correlation) over all the images shown; `fusion_weights.json` then also
holds each image's kind and normalised box. Plain files count as 'unknown'.

A regional cell (r, c) of the g x g grid covers image rows
floor(r H / g) .. ceil((r+1) H / g) and likewise columns: the fractions the
head uses on the feature map.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qaff_jax import cli_util
from qaff_jax.evaluation import fusion_stats

ImageLike = Union[np.ndarray, Image.Image]
ImageSource = Union[ImageLike, Callable[[], ImageLike]]

DISPLAY_SIDE = 384       # long side of the image in a per-image picture
STRIP_WIDTH = 240        # width of the bar strip right of the image
THUMB = 160              # gallery thumbnail box (square)
OVERLAY_ALPHA = 0.45     # opacity of the heat colours
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
REVISITED_PREFIX = "revisited:"

# Blue (low) -> light blue -> pale yellow -> orange -> red (high).
_HEAT_STOPS = np.array([[40, 70, 220], [110, 170, 235], [250, 240, 150],
                        [245, 140, 50], [220, 25, 25]], np.float64)
_BACKGROUND = (250, 250, 250)
_TEXT = (20, 20, 20)
_TYPE_COLORS = {"global": (70, 110, 200), "regional": (220, 90, 40),
                "scale": (60, 160, 90)}
BOX_COLOR = (0, 255, 0)  # object box outline (no heat colour is green)


# ------------------------------------------------------------------ drawing


def heat_color(t: float | np.ndarray) -> np.ndarray:
  """Colour map value(s) in [0, 1] -> RGB float [..., 3] (blue low, red high)."""
  t = np.clip(np.asarray(t, np.float64), 0.0, 1.0)
  pos = t * (len(_HEAT_STOPS) - 1)
  lo = np.minimum(np.floor(pos).astype(int), len(_HEAT_STOPS) - 2)
  frac = (pos - lo)[..., None]
  return _HEAT_STOPS[lo] * (1 - frac) + _HEAT_STOPS[lo + 1] * frac


def _font(size: int) -> ImageFont.ImageFont:
  """PIL's built-in font at `size` px (the bitmap font on old Pillow)."""
  try:
    return ImageFont.load_default(size=max(6, int(size)))
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
    return ImageFont.load_default()


def _as_pil(img: ImageLike) -> Image.Image:
  if isinstance(img, Image.Image):
    return img.convert("RGB")
  arr = np.asarray(img)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
  return Image.fromarray(arr.astype(np.uint8), "RGB")


def _fit(img: Image.Image, long_side: int | None) -> Image.Image:
  """Resizes so that the long side is `long_side` (None: unchanged)."""
  if long_side is None or max(img.size) == long_side:
    return img
  s = long_side / max(img.size)
  size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
  return img.resize(size, Image.Resampling.BILINEAR)


def cell_bounds(extent: int, grid: int) -> list[tuple[int, int]]:
  """[start, stop) of each of `grid` cells over `extent` pixels.

  Cell i covers floor(i e / g) .. ceil((i + 1) e / g), as the head's
  regional pooling does on the feature map.
  """
  return [((i * extent) // grid, -(-((i + 1) * extent) // grid))
          for i in range(grid)]


def _split(weights: np.ndarray, grid: int, scales: Sequence[float]
           ) -> tuple[float, np.ndarray, np.ndarray]:
  """w [K] -> (global, regional [g, g], scale [S]), checking K."""
  w = np.asarray(weights, np.float64).reshape(-1)
  k = 1 + grid * grid + len(scales)
  if w.size != k:
    raise ValueError(f"{w.size} fusion weights; expected {k} for grid={grid} "
                     f"and {len(scales)} scales")
  return (float(w[0]), w[1:1 + grid * grid].reshape(grid, grid),
          w[1 + grid * grid:])


def _normalised(regional: np.ndarray) -> np.ndarray:
  """Regional weights -> [0, 1] over this image (all equal -> 0.5)."""
  lo, hi = float(regional.min()), float(regional.max())
  if hi - lo <= 1e-12 * max(1.0, abs(hi)):
    return np.full(regional.shape, 0.5)
  return (regional - lo) / (hi - lo)


def overlay_regions(img: ImageLike, regional: np.ndarray, *,
                    numbers: bool = True) -> Image.Image:
  """The image with a g x g heat overlay of `regional` weights [g, g].

  Colours are normalised over the cells of this image (lowest blue, highest
  red) and blended with opacity OVERLAY_ALPHA; with `numbers`, each cell
  shows its weight.
  """
  base = _as_pil(img)
  regional = np.asarray(regional, np.float64)
  grid = regional.shape[0]
  colors = heat_color(_normalised(regional))
  src = np.asarray(base, np.float64)
  out = src.copy()
  rows, cols = cell_bounds(base.height, grid), cell_bounds(base.width, grid)
  for r, (y0, y1) in enumerate(rows):
    for c, (x0, x1) in enumerate(cols):
      out[y0:y1, x0:x1] = ((1 - OVERLAY_ALPHA) * src[y0:y1, x0:x1]
                           + OVERLAY_ALPHA * colors[r, c])
  result = Image.fromarray(np.round(out).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(result)
  for y0, _ in rows[1:]:
    draw.line([(0, y0), (base.width - 1, y0)], fill=(255, 255, 255), width=1)
  for x0, _ in cols[1:]:
    draw.line([(x0, 0), (x0, base.height - 1)], fill=(255, 255, 255), width=1)
  if numbers:
    cell = min(base.width, base.height) / grid
    size = max(8, min(28, cell / 4.5))
    font, stroke = _font(size), 1 if size < 14 else 2
    for r, (y0, y1) in enumerate(rows):
      for c, (x0, x1) in enumerate(cols):
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), f"{regional[r, c]:.3f}",
                  fill=(255, 255, 255), font=font, anchor="mm",
                  stroke_width=stroke, stroke_fill=(0, 0, 0))
  return result


def draw_box(img: Image.Image, box: Sequence[float] | None,
             color: tuple[int, int, int] = BOX_COLOR) -> Image.Image:
  """Outlines a normalised box (x0, y0, x1, y1 in [0, 1] of the image) on
  `img` in place and returns it; None or a NaN box draws nothing."""
  if box is None:
    return img
  b = np.clip(np.asarray(box, np.float64).reshape(-1), 0.0, 1.0)
  if b.size != 4 or not np.all(np.isfinite(b)):
    return img
  w, h = img.size
  x0, x1 = (int(round(v)) for v in np.clip(b[[0, 2]] * w, 0, w - 1))
  y0, y1 = (int(round(v)) for v in np.clip(b[[1, 3]] * h, 0, h - 1))
  width = max(2, round(max(w, h) / 150))
  ImageDraw.Draw(img).rectangle([x0, y0, x1, y1], outline=color, width=width)
  return img


def _bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, height: int,
         value: float, color: tuple[int, int, int]) -> None:
  draw.rectangle([x, y, x + width - 1, y + height - 1], fill=(225, 225, 225))
  filled = int(round(np.clip(value, 0.0, 1.0) * width))
  if filled > 0:
    draw.rectangle([x, y, x + filled - 1, y + height - 1], fill=color)


_ROW_H = 34    # strip: one labelled bar
_PAD = 10


def _strip_rows(weights: np.ndarray, grid: int, scales: Sequence[float]
                ) -> list[tuple[str, float, tuple[int, int, int]]]:
  glob_w, regional, scale_w = _split(weights, grid, scales)
  rows = [(f"global {glob_w:.3f}", glob_w, _TYPE_COLORS["global"]),
          (f"regional {grid}x{grid} total {regional.sum():.3f}",
           float(regional.sum()), _TYPE_COLORS["regional"])]
  for s, w in zip(scales, scale_w):
    rows.append((f"x{float(s):g} {w:.3f}", float(w), _TYPE_COLORS["scale"]))
  if len(scales):
    rows.append((f"scales total {scale_w.sum():.3f}", float(scale_w.sum()),
                 _TYPE_COLORS["scale"]))
  return rows


def strip_height(grid: int, scales: Sequence[float], title: bool) -> int:
  """Height of the bar strip of `render_image`."""
  n_rows = 2 + len(scales) + (1 if len(scales) else 0)
  return _PAD + (24 if title else 0) + n_rows * _ROW_H + 58 + _PAD


def render_image(img: ImageLike, weights: np.ndarray, grid: int,
                 scales: Sequence[float], *, title: str | None = None,
                 display_side: int | None = DISPLAY_SIDE,
                 box: Sequence[float] | None = None) -> Image.Image:
  """One image's fusion weights as a picture.

  Args:
    img: uint8 RGB [H, W, 3] (or a PIL image).
    weights: its fusion weights [1+g^2+S] (global, regional row-major,
      scales in config order).
    grid: g; scales: the S factors (labels).
    title: text above the bars (e.g. the image id).
    display_side: the image is resized to this long side (None: as is).
    box: optional object box, normalised (x0, y0, x1, y1) in [0, 1] of the
      image, drawn as a BOX_COLOR outline over the overlay (None or NaN:
      none).

  Returns:
    An RGB image of width W' + STRIP_WIDTH and height
    max(H', strip_height(...)), (W', H') the displayed image size: the image
    with the regional heat overlay on the left, bars on the right.
  """
  _, regional, _ = _split(weights, grid, scales)
  shown = draw_box(overlay_regions(_fit(_as_pil(img), display_side),
                                   regional), box)
  height = max(shown.height, strip_height(grid, scales, title is not None))
  canvas = Image.new("RGB", (shown.width + STRIP_WIDTH, height), _BACKGROUND)
  canvas.paste(shown, (0, 0))
  draw = ImageDraw.Draw(canvas)
  x, width = shown.width + _PAD, STRIP_WIDTH - 2 * _PAD
  y = _PAD
  if title is not None:
    draw.text((x, y), _ellipsis(title, 30), fill=_TEXT, font=_font(15))
    y += 24
  font = _font(13)
  for label, value, color in _strip_rows(weights, grid, scales):
    draw.text((x, y), label, fill=_TEXT, font=font)
    _bar(draw, x, y + 17, width, 10, value, color)
    y += _ROW_H
  # Colour legend of the overlay (normalised over this image's cells).
  y += 6
  draw.text((x, y), "regional cell weight", fill=_TEXT, font=font)
  ramp = heat_color(np.linspace(0.0, 1.0, width))
  ramp = np.round(np.repeat(ramp[None], 10, axis=0)).astype(np.uint8)
  canvas.paste(Image.fromarray(ramp, "RGB"), (x, y + 17))
  small = _font(11)
  draw.text((x, y + 30), f"{regional.min():.3f}", fill=_TEXT, font=small)
  draw.text((x + width, y + 30), f"{regional.max():.3f}", fill=_TEXT,
            font=small, anchor="ra")
  return canvas


def _ellipsis(text: str, n: int) -> str:
  return text if len(text) <= n else text[:n - 1] + "…"


def gallery_indices(weights: np.ndarray, grid: int, n: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the `n` most global-leaning (highest global weight) and the
  `n` most region-leaning (highest regional total) images, best first."""
  totals = fusion_stats.type_totals(np.asarray(weights), grid)
  by_global = np.argsort(-totals[:, 0], kind="stable")[:n]
  by_regional = np.argsort(-totals[:, 1], kind="stable")[:n]
  return by_global, by_regional


def _load(source: ImageSource) -> ImageLike:
  return source() if callable(source) else source


def render_gallery(images: Sequence[ImageSource], weights: np.ndarray,
                   grid: int, scales: Sequence[float], *,
                   ids: Sequence[str] | None = None, n: int = 8,
                   thumb: int = THUMB,
                   boxes: np.ndarray | None = None) -> Image.Image:
  """Two rows of thumbnails: the `n` most global-leaning images (highest
  global weight), then the `n` most region-leaning (highest regional total).

  Args:
    images: per image an RGB array / PIL image, or a zero-argument loader
      returning one (only the shown images are loaded).
    weights: [N, 1+g^2+S] fusion weights.
    grid, scales: the head's g and scale factors.
    ids: captions (default: the indices).
    n: thumbnails per row.
    thumb: side of the square box each thumbnail fits in.
    boxes: optional [N, 4] normalised object boxes (NaN rows: none), drawn
      on the thumbnails.

  Returns:
    The gallery; each thumbnail carries the regional heat overlay and a
    caption with its id and global / regional / scale totals.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 2 or weights.shape[0] != len(images):
    raise ValueError(f"weights of shape {weights.shape} for {len(images)} "
                     "images")
  if n < 1:
    raise ValueError(f"n={n}: need at least one thumbnail per row")
  ids = [str(i) for i in range(len(images))] if ids is None else list(ids)
  by_global, by_regional = gallery_indices(weights, grid, n)
  cols = max(1, min(n, len(images)))
  gap, band, caption = 8, 26, 34
  tile_h = thumb + caption
  width = gap + cols * (thumb + gap)
  height = gap + 2 * (band + tile_h + gap)
  canvas = Image.new("RGB", (width, height), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  title_font, font = _font(15), _font(11)
  cache: dict[int, Image.Image] = {}
  rows = [("Most global-leaning (highest global weight)", by_global),
          ("Most region-leaning (highest regional total)", by_regional)]
  y = gap
  for title, indices in rows:
    draw.text((gap, y + 4), title, fill=_TEXT, font=title_font)
    y += band
    for col, i in enumerate(indices):
      i = int(i)
      if i not in cache:
        _, regional, _ = _split(weights[i], grid, scales)
        tile = _fit(_as_pil(_load(images[i])), thumb)
        cache[i] = draw_box(
            overlay_regions(tile, regional, numbers=thumb >= 120),
            None if boxes is None else boxes[i])
      tile = cache[i]
      x = gap + col * (thumb + gap)
      canvas.paste(tile, (x + (thumb - tile.width) // 2, y))
      g, r, s = fusion_stats.type_totals(weights[i:i + 1], grid)[0]
      draw.text((x, y + tile.height + 3), _ellipsis(ids[i], 24), fill=_TEXT,
                font=font)
      draw.text((x, y + tile.height + 17),
                f"g {g:.3f}  r {r:.3f}  s {s:.3f}", fill=_TEXT, font=font)
    y += tile_h + gap
  return canvas


# ------------------------------------------------------------------- inputs


def _safe_id(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _unique(ids: Sequence[str]) -> list[str]:
  """File-safe ids, made unique by suffixes _2, _3, ..."""
  seen: dict[str, int] = {}
  out = []
  taken = set()
  for raw in ids:
    base = _safe_id(raw)
    name, k = base, seen.get(base, 1)
    while name in taken or name in ("gallery",):
      k += 1
      name = f"{base}_{k}"
    seen[base] = k
    taken.add(name)
    out.append(name)
  return out


def parse_revisited(spec: str) -> tuple[str, str, int | None]:
  """'revisited:<root>:<name>[:N]' -> (root, name, N or None)."""
  rest = spec[len(REVISITED_PREFIX):]
  limit = None
  head, sep, last = rest.rpartition(":")
  if sep and last.isdigit() and ":" in head:
    limit, rest = int(last), head
  root, sep, name = rest.rpartition(":")
  if not sep or not root or not name:
    raise ValueError(f"--images {spec!r}: expected revisited:<root>:<name>"
                     "[:N]")
  return root, name, limit


def _files(spec: str) -> list[str]:
  if os.path.isdir(spec):
    return sorted(p for p in glob.glob(os.path.join(spec, "*"))
                  if p.lower().endswith(IMAGE_EXTENSIONS))
  matches = sorted(glob.glob(spec))
  if matches:
    return [p for p in matches if os.path.isfile(p)]
  if os.path.isfile(spec):
    return [spec]
  raise FileNotFoundError(f"--images {spec!r}: no such file, folder or glob "
                          "match")


def resolve_images(image_specs: Sequence[str], *, metadata: bool = False
                   ) -> tuple[Any, ...]:
  """Image specs -> (ids, source paths, loaders, (height, width) sizes).

  Every file is checked up front; one error lists all unreadable ones.
  With `metadata`, a fifth element: None when no revisited dataset among the
  specs has an `objects.json` sidecar, else (kinds, boxes [N, 4]) as
  `fusion_stats.metadata_for` gives them for the database images ('unknown'
  and NaN for plain files and images the sidecar does not list).

  Raises:
    ValueError: a malformed sidecar (names the file and entry).
  """
  from qaff_jax.data import revisited
  from qaff_jax.evaluation import runner
  ids, paths, loaders, sizes = [], [], [], []
  kinds: list[str] = []
  boxes: list[np.ndarray] = []
  any_sidecar = False
  plain: list[str] = []

  def flush():
    if not plain:
      return
    revisited.check_paths(plain)
    ld, sz = runner.path_inputs(plain, set())
    ids.extend(os.path.splitext(os.path.basename(p))[0] for p in plain)
    paths.extend(plain)
    loaders.extend(ld)
    sizes.extend(sz)
    kinds.extend([fusion_stats.UNKNOWN_KIND] * len(plain))
    boxes.append(np.full((len(plain), 4), np.nan))
    plain.clear()

  for spec in image_specs:
    if spec.startswith(REVISITED_PREFIX):
      flush()
      root, name, limit = parse_revisited(spec)
      ds = revisited.RevisitedDataset(root, name)
      n = ds.n_db if limit is None else min(limit, ds.n_db)
      db = [ds.db_path(i) for i in range(n)]
      revisited.check_paths(db, what=f"{name} images")
      ids.extend(ds.imlist[:n])
      paths.extend(db)
      loaders.extend(lambda i=i, ds=ds: ds.load_db(i) for i in range(n))
      db_sizes = [runner.image_size(p) for p in db]
      sizes.extend(db_sizes)
      sidecar = fusion_stats.load_objects_sidecar(
          os.path.join(ds.data_dir, fusion_stats.SIDECAR_NAME))
      any_sidecar |= sidecar is not None
      k, b = fusion_stats.metadata_for(ds.imlist[:n], sidecar, use_boxes=True)
      kinds.extend(k)
      boxes.append(b)
      _warn_size_mismatch(ds.data_dir, ds.imlist[:n], db_sizes, sidecar)
    else:
      plain.extend(_files(spec))
  flush()
  if not ids:
    raise ValueError("--images selected no images")
  out = (_unique(ids), paths, loaders, sizes)
  if metadata:
    out += ((kinds, np.concatenate(boxes)) if any_sidecar else None,)
  return out


def _warn_size_mismatch(data_dir: str, ids: Sequence[str],
                        sizes: Sequence[tuple[int, int]],
                        sidecar: dict[str, Any] | None) -> None:
  """Logs images whose size differs from the sidecar's (its boxes are in
  pixels of the image it describes)."""
  if sidecar is None:
    return
  bad = [i for i, (h, w) in zip(ids, sizes)
         if i in sidecar["images"] and (sidecar["images"][i]["width"],
                                        sidecar["images"][i]["height"]) != (w, h)]
  if bad:
    logging.warning("%s: %d images differ in size from %s (e.g. %s); their "
                    "boxes may be off", data_dir, len(bad),
                    fusion_stats.SIDECAR_NAME, bad[0])


# ---------------------------------------------------------------------- run


def predict_weights(workdir: str, loaders, sizes, *, max_side: int = 512,
                    batch_size: int = 8, step: int | None = None
                    ) -> tuple[np.ndarray, int, tuple[float, ...], int]:
  """Fusion weights [N, K] of the images from the run in `workdir`.

  Returns:
    (weights, grid, scales, checkpoint step).

  Raises:
    ValueError: the run's head is not 'qaff' (no fusion weights).
  """
  from qaff_jax.evaluation import extract as extract_lib
  from qaff_jax.evaluation import runner
  from qaff_jax.models import qaff
  config, net, mesh, step = runner.load_network(workdir, step=step)
  if config.model.head != "qaff":
    raise ValueError(f"{workdir}: model.head={config.model.head!r} has no "
                     "fusion weights; need a 'qaff' run")
  settings = qaff.settings_from_config(config.model)
  forward = extract_lib.make_forward(net, mesh,
                                     keys=("descriptor", "fusion_weights"))
  out = extract_lib.extract(forward, loaders, sizes, mesh=mesh,
                            max_side=max_side, scales=(1.0,),
                            batch_size=batch_size)
  return (np.asarray(out["fusion_weights"], np.float64), settings.grid,
          settings.scales, int(step))


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def run(workdir: str, image_specs: Sequence[str], out: str, *,
        max_side: int = 512, gallery: int = 8,
        display_side: int | None = DISPLAY_SIDE, batch_size: int = 8,
        step: int | None = None) -> dict[str, Any]:
  """Predicts and draws the fusion weights of images (see the module doc).

  Args:
    workdir: a training run of a 'qaff' head.
    image_specs: files, globs, folders, or 'revisited:<root>:<name>[:N]'.
    out: output folder (created).
    max_side: long-side cap of the images at extraction.
    gallery: thumbnails per gallery row (0: no gallery).
    display_side: long side of the image in the per-image pictures.
    batch_size: extraction batch size.
    step: checkpoint step (default: the latest).

  Returns:
    {"summary": fusion_summary dict, "images": {id: png path}, "gallery",
     "summary_json", "summary_md", "weights_json": paths, "step"}.
  """
  import jax
  ids, paths, loaders, sizes, meta = resolve_images(image_specs,
                                                    metadata=True)
  weights, grid, scales, step = predict_weights(
      workdir, loaders, sizes, max_side=max_side, batch_size=batch_size,
      step=step)
  kinds, boxes = meta if meta is not None else (None, None)
  summary = fusion_stats.fusion_summary(weights, grid, scales, kinds=kinds,
                                        boxes=boxes)
  result: dict[str, Any] = {"summary": summary, "images": {}, "step": step,
                            "gallery": None}
  if jax.process_index() != 0:
    return result
  os.makedirs(out, exist_ok=True)
  for i, image_id in enumerate(ids):
    png = os.path.join(out, f"{image_id}.png")
    title = image_id
    if kinds is not None and kinds[i] != fusion_stats.UNKNOWN_KIND:
      title = f"{image_id} ({kinds[i]})"
    render_image(loaders[i](), weights[i], grid, scales, title=title,
                 display_side=display_side,
                 box=None if boxes is None else boxes[i]).save(png)
    result["images"][image_id] = png
  logging.info("wrote %d pictures to %s", len(ids), out)
  if gallery > 0:
    result["gallery"] = os.path.join(out, "gallery.png")
    render_gallery(loaders, weights, grid, scales, ids=ids, n=gallery,
                   boxes=boxes).save(result["gallery"])
  info = {"workdir": os.path.abspath(workdir), "step": step,
          "max_side": max_side, "extraction_scales": [1.0]}
  result["summary_json"] = os.path.join(out, "fusion_summary.json")
  _write_json(result["summary_json"], {**summary, "run": info})
  result["summary_md"] = os.path.join(out, "fusion_summary.md")
  with open(result["summary_md"], "w", encoding="utf-8") as f:
    f.write(f"# QAFF fusion weights\n\nRun `{info['workdir']}`, step {step}."
            f"\n\n{fusion_stats.format_fusion_summary(summary)}")
  result["weights_json"] = os.path.join(out, "fusion_weights.json")
  entries = [{"id": image_id, "path": os.path.abspath(p),
              "weights": [float(v) for v in w]}
             for image_id, p, w in zip(ids, paths, weights)]
  if meta is not None:
    for e, kind, box in zip(entries, kinds, boxes):
      e["kind"] = kind
      e["box"] = None if np.isnan(box).any() else [float(v) for v in box]
  _write_json(result["weights_json"], {"labels": summary["labels"],
                                       "images": entries})
  return result


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.viz.fusion",
      description="Draw QAFF fusion weights on the images they were "
      "predicted for (see the module docstring).")
  parser.add_argument("--workdir", required=True,
                      help="training run of a 'qaff' head")
  parser.add_argument("--images", required=True, nargs="+",
                      help="image files/globs/folders or "
                      "revisited:<root>:<name>[:N]")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--max_side", type=int, default=512,
                      help="long-side cap at extraction")
  parser.add_argument("--gallery", type=int, default=8,
                      help="thumbnails per gallery row (0: none)")
  parser.add_argument("--display_side", type=int, default=DISPLAY_SIDE,
                      help="long side of the image in each picture")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="images per extraction batch")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: latest)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  cli_util.quiet_backend_probe()
  try:
    result = run(args.workdir, args.images, args.out, max_side=args.max_side,
                 gallery=args.gallery, display_side=args.display_side,
                 batch_size=args.batch_size, step=args.step)
  except (FileNotFoundError, ValueError) as e:  # bad inputs: no traceback
    parser.exit(2, f"error: {e}\n")
  print(fusion_stats.format_fusion_summary(result["summary"]))
  print(f"wrote {len(result['images'])} pictures, gallery and summary to "
        f"{args.out}")


if __name__ == "__main__":
  main()
