"""Statistics of QAFF fusion weights over a set of images.

The QAFF head outputs per image a weight vector w [1+g^2+S] (sum 1) over its
features: index 0 the global (SC-GeM) feature, then g^2 regional cells in
row-major order (cell i*g + j is row i from the top, column j from the left),
then S scales in config order. `fusion_summary` condenses an [N, K] matrix of
them into JSON-serialisable numbers that say how the weight is spread over
feature types and, through the spread across images, how much the fusion
actually adapts to the image; `format_fusion_summary` renders them as Markdown.

Adaptivity diagnostics use per-image metadata, when a dataset ships it in the
sidecar `<dataset folder>/objects.json` (see `load_objects_sidecar`):
  `region_follow`            does the top regional cell lie on the object box?
  `weight_by_kind`           type totals per image kind (scene / object / ...);
  `scale_size_correlation`   does the scale weight follow the object size?
The regional grid is laid over the whole image: in normalised image
coordinates cell (i, j) covers x in [j/g, (j+1)/g], y in [i/g, (i+1)/g]. (The
head's exact feature-cell rule, floor(i h / g) .. ceil((i+1) h / g) on an
h x w feature map, overlaps neighbours by at most one feature cell; the even
split is the documented approximation.)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

TYPES = ("global", "regional", "scale")
SIDECAR_NAME = "objects.json"
SIDECAR_VERSION = 1
KINDS = ("scene", "object", "distractor")
UNKNOWN_KIND = "unknown"
# Overlaps of at most this much (normalised units) count as touching, not
# overlapping: keeps boxes that end exactly on a cell line out of the cell
# despite float rounding.
_OVERLAP_EPS = 1e-9


def feature_labels(grid: int, scales: Sequence[float]) -> list[str]:
  """Names of the K = 1+g^2+S features: 'global', 'r0c0'.., 'x0.5'.."""
  regional = [f"r{r}c{c}" for r in range(grid) for c in range(grid)]
  return ["global"] + regional + [f"x{float(s):g}" for s in scales]


def type_totals(weights: np.ndarray, grid: int) -> np.ndarray:
  """[N, K] weights -> [N, 3] total weight of global, regional, scale."""
  w = np.asarray(weights, np.float64)
  n_reg = grid * grid
  return np.stack([w[:, 0], w[:, 1:1 + n_reg].sum(axis=1),
                   w[:, 1 + n_reg:].sum(axis=1)], axis=1)


def entropy(weights: np.ndarray) -> np.ndarray:
  """Shannon entropy (nats) of each row of [N, K] weights (0 log 0 = 0)."""
  w = np.asarray(weights, np.float64)
  logs = np.log(np.where(w > 0, w, 1.0))
  return -np.sum(w * logs, axis=-1)


def _check(weights: np.ndarray, grid: int, scales: Sequence[float]) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  k = 1 + grid * grid + len(scales)
  if w.ndim != 2 or w.shape[1] != k:
    raise ValueError(f"fusion weights of shape {w.shape}; expected [N, {k}] "
                     f"for grid={grid} and {len(scales)} scales")
  if w.shape[0] == 0:
    raise ValueError("no fusion weights to summarise (N = 0)")
  if not np.all(np.isfinite(w)):
    raise ValueError("fusion weights contain NaN or inf")
  return w


def _by_type(values: np.ndarray) -> dict[str, float]:
  return {t: float(v) for t, v in zip(TYPES, values)}


def _fractions(index: np.ndarray) -> dict[str, float]:
  counts = np.bincount(index, minlength=len(TYPES))
  return _by_type(counts / index.size)


# ------------------------------------------------------- per-image metadata


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_entry(where: str, entry: Any) -> dict[str, Any]:
  """One `images` entry of the sidecar, checked (see `load_objects_sidecar`)."""
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
  kind = entry.get("kind")
  if kind not in KINDS:
    raise ValueError(f"{where}: kind {kind!r}; expected one of {list(KINDS)}")
  size = {}
  for key in ("width", "height"):
    value = entry.get(key)
    if not (_is_number(value) and math.isfinite(value)
            and float(value).is_integer() and value > 0):
      raise ValueError(f"{where}: {key} {value!r}; expected a positive integer")
    size[key] = int(value)
  box = entry.get("box")
  if box is not None:
    if kind != "object":
      raise ValueError(f"{where}: a {kind!r} entry has a box; only 'object' "
                       "entries may have one (null otherwise)")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
        or not all(_is_number(v) and math.isfinite(v) for v in box)):
      raise ValueError(f"{where}: box {box!r}; expected [x0, y0, x1, y1] "
                       "(4 finite numbers) or null")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
      raise ValueError(f"{where}: box {box!r} has x1 <= x0 or y1 <= y0")
    if not (x0 < size["width"] and x1 > 0 and y0 < size["height"] and y1 > 0):
      raise ValueError(f"{where}: box {box!r} lies outside the "
                       f"{size['width']}x{size['height']} image")
    box = (x0, y0, x1, y1)
  return {"kind": kind, "box": box, **size}


def load_objects_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
  """Reads a dataset's object sidecar `<dataset folder>/objects.json`.

  Format: {"version": 1, "images": {"<image_id>": {"kind": "scene" | "object"
  | "distractor", "box": [x0, y0, x1, y1] or null, "width": W, "height": H}}}
  with the box in pixels of the stored image. Strict on what is there: the
  version must be 1, every entry must have a valid kind and positive integer
  width / height, and a box must be 4 finite numbers with x0 < x1, y0 < y1
  that overlaps the image (parts outside it are allowed; they are clipped
  when normalising). Tolerant of what is not: a missing "box" key means null,
  an 'object' may have a null box (unknown), and unknown keys are ignored.
  Only 'object' entries may have a box.

  Returns:
    None when `path` does not exist; otherwise {"version": 1, "images":
    {id: {"kind": str, "box": (x0, y0, x1, y1) floats or None, "width": int,
    "height": int}}}.

  Raises:
    ValueError: unreadable JSON or a malformed entry (names the file and the
      entry).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read objects sidecar {path}: {e}") from e
  if not isinstance(data, Mapping):
    raise ValueError(f"{path}: expected a JSON object, got "
                     f"{type(data).__name__}")
  version = data.get("version")
  if not (_is_number(version) and version == SIDECAR_VERSION):
    raise ValueError(f"{path}: version {version!r}; this reader knows "
                     f"version {SIDECAR_VERSION}")
  images = data.get("images")
  if not isinstance(images, Mapping):
    raise ValueError(f"{path}: 'images' must be an object of id -> entry, "
                     f"got {type(images).__name__}")
  return {"version": SIDECAR_VERSION,
          "images": {str(image_id): _parse_entry(
              f"{path}: images[{str(image_id)!r}]", entry)
                     for image_id, entry in images.items()}}


def normalised_box(entry: Mapping[str, Any]) -> np.ndarray:
  """A sidecar entry's pixel box -> [4] (x0, y0, x1, y1) / (W, H, W, H),
  clipped to [0, 1]; all NaN when it has no box."""
  if entry.get("box") is None:
    return np.full(4, np.nan)
  w, h = float(entry["width"]), float(entry["height"])
  return np.clip(np.asarray(entry["box"], np.float64) / [w, h, w, h], 0.0, 1.0)


def metadata_for(ids: Sequence[str], sidecar: Mapping[str, Any] | None,
                 use_boxes: bool, skip: Sequence[str] | set[str] = ()
                 ) -> tuple[list[str], np.ndarray]:
  """Per-image kinds and normalised boxes of `ids` from a loaded sidecar.

  Args:
    ids: image ids, in the order of the weight rows.
    sidecar: `load_objects_sidecar`'s dict (None: nothing known).
    use_boxes: False gives NaN boxes for all (e.g. queries, which are cropped
      to their query box before extraction, so the stored-image box does not
      apply).
    skip: ids to treat as unknown (e.g. images missing on disk, replaced by
      blank pictures).

  Returns:
    (kinds, boxes): kinds a list of str ('unknown' for ids absent from the
    sidecar), boxes [N, 4] float64 normalised (x0, y0, x1, y1) in [0, 1],
    NaN rows where there is no box.
  """
  images = (sidecar or {}).get("images", {})
  skip = set(skip)
  kinds, boxes = [], np.full((len(ids), 4), np.nan)
  for i, image_id in enumerate(ids):
    entry = None if image_id in skip else images.get(image_id)
    if entry is None:
      kinds.append(UNKNOWN_KIND)
      continue
    kinds.append(entry["kind"])
    if use_boxes:
      boxes[i] = normalised_box(entry)
  return kinds, boxes


def dataset_metadata(ds: Any) -> tuple[list[str], np.ndarray] | None:
  """Kinds and boxes of a revisited dataset's queries then database images.

  `ds` is a `RevisitedDataset` (or alike: `.data_dir`, `.qimlist`, `.imlist`;
  optional `.missing` paths with `.query_path(i)` / `.db_path(i)`). Reads
  `<ds.data_dir>/objects.json`; queries get kinds but NaN boxes (they are
  cropped to their gnd bbx), database images kinds and boxes. Images whose
  file is in `ds.missing` count as unknown.

  Returns:
    None when the dataset has no sidecar, else (kinds, boxes [Nq + Ndb, 4]).

  Raises:
    ValueError: a malformed sidecar.
  """
  sidecar = load_objects_sidecar(os.path.join(ds.data_dir, SIDECAR_NAME))
  if sidecar is None:
    return None
  missing = set(getattr(ds, "missing", None) or ())
  q_skip = {x for i, x in enumerate(ds.qimlist)
            if missing and ds.query_path(i) in missing}
  db_skip = {x for i, x in enumerate(ds.imlist)
             if missing and ds.db_path(i) in missing}
  q_kinds, q_boxes = metadata_for(ds.qimlist, sidecar, False, q_skip)
  db_kinds, db_boxes = metadata_for(ds.imlist, sidecar, True, db_skip)
  return q_kinds + db_kinds, np.concatenate([q_boxes, db_boxes])


# ------------------------------------------------------ adaptivity measures


def _check_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
  """[N, 4] normalised boxes, clipped to [0, 1]; NaN rows kept as NaN."""
  b = np.asarray(boxes, np.float64)
  if b.ndim != 2 or b.shape != (n, 4):
    raise ValueError(f"boxes of shape {b.shape}; expected [{n}, 4]")
  nan = np.isnan(b)
  partial = nan.any(axis=1) & ~nan.all(axis=1)
  bad = partial | np.isinf(b).any(axis=1)
  if bad.any():
    raise ValueError("boxes: each row must be 4 finite numbers or all NaN "
                     f"(bad rows {np.flatnonzero(bad)[:5].tolist()})")
  b = np.clip(b, 0.0, 1.0)
  ok = ~nan.any(axis=1)
  empty = ok & ((b[:, 2] - b[:, 0] <= _OVERLAP_EPS)
                | (b[:, 3] - b[:, 1] <= _OVERLAP_EPS))
  if empty.any():
    raise ValueError("boxes: rows with no area inside [0, 1]^2 "
                     f"{np.flatnonzero(empty)[:5].tolist()}")
  return b


def box_cells(boxes: np.ndarray, grid: int) -> np.ndarray:
  """[N, 4] normalised boxes -> [N, g^2] bool: cell i*g + j overlaps the box
  with positive area (cell (i, j) = x in [j/g, (j+1)/g], y in [i/g,
  (i+1)/g]; overlaps up to 1e-9 count as touching only)."""
  b = np.asarray(boxes, np.float64)
  edges = np.arange(grid + 1, dtype=np.float64) / grid
  lo, hi = edges[:-1], edges[1:]
  ox = np.minimum(b[:, 2:3], hi) - np.maximum(b[:, 0:1], lo)    # [N, g] cols
  oy = np.minimum(b[:, 3:4], hi) - np.maximum(b[:, 1:2], lo)    # [N, g] rows
  hit = (oy[:, :, None] > _OVERLAP_EPS) & (ox[:, None, :] > _OVERLAP_EPS)
  return hit.reshape(len(b), grid * grid)


def center_cells(boxes: np.ndarray, grid: int) -> np.ndarray:
  """[N, 4] normalised boxes -> [N] index i*g + j of the cell holding the box
  centre (cells half-open [j/g, (j+1)/g), the last one closed)."""
  b = np.asarray(boxes, np.float64)
  cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
  col = np.clip(np.floor(cx * grid), 0, grid - 1).astype(int)
  row = np.clip(np.floor(cy * grid), 0, grid - 1).astype(int)
  return row * grid + col


def region_follow(weights: np.ndarray, boxes: np.ndarray,
                  grid: int) -> dict[str, Any]:
  """Whether the largest regional weight falls on the object.

  Definitions, over the N images (rows of `weights` [N, K] and `boxes`
  [N, 4], normalised (x0, y0, x1, y1) clipped to [0, 1], all with a box):
  the top cell of an image is the argmax of its g^2 regional weights
  w[1:1+g^2]. Ties (cells within 1e-12 relative of the largest weight, as
  in the non-adaptive fusion modes) share the credit: the image scores the
  fraction of its tied top cells that hit (the expected hit of a random
  tie-break), so equal regional weights score exactly the chance level.
    region_follow = fraction of images whose top cell overlaps the box with
      positive area (`box_cells`);
    chance = mean over images of (#cells the box overlaps) / g^2, the hit
      rate of a uniformly random cell;
    region_follow_center = fraction of images whose top cell contains the
      box centre (`center_cells`); center_chance = 1 / g^2.
    best_fixed = the largest hit rate of one cell chosen for every image
      (max over cells c of the fraction of boxes overlapping c), with
      best_fixed_cell its index: the bar a fusion that does not look at the
      image can reach (objects placed uniformly overlap the centre cell more
      often than a corner), so adaptivity shows as region_follow above it.
  With N = 0 the rates are None.

  Returns:
    {"region_follow", "chance", "region_follow_center", "center_chance",
     "best_fixed", "best_fixed_cell", "num_images": N}.
  """
  w = np.asarray(weights, np.float64)
  if grid < 1 or w.ndim != 2 or w.shape[1] < 1 + grid * grid:
    raise ValueError(f"weights of shape {w.shape} have no {grid}x{grid} "
                     "regional cells")
  b = _check_boxes(boxes, w.shape[0])
  if np.isnan(b).any():
    raise ValueError("region_follow: every image needs a box (no NaN rows)")
  n = int(w.shape[0])
  if n == 0:
    return {"region_follow": None, "chance": None,
            "region_follow_center": None, "center_chance": None,
            "best_fixed": None, "best_fixed_cell": None, "num_images": 0}
  regional = w[:, 1:1 + grid * grid]
  best = regional.max(axis=1, keepdims=True)
  top = regional >= best - 1e-12 * np.abs(best)         # [N, g^2] tied tops
  n_top = top.sum(axis=1)
  cells = box_cells(b, grid)
  hits = (top & cells).sum(axis=1) / n_top
  centre = top[np.arange(n), center_cells(b, grid)] / n_top
  per_cell = cells.mean(axis=0)
  return {"region_follow": float(hits.mean()),
          "chance": float((cells.sum(axis=1) / (grid * grid)).mean()),
          "region_follow_center": float(centre.mean()),
          "center_chance": 1.0 / (grid * grid),
          "best_fixed": float(per_cell.max()),
          "best_fixed_cell": int(np.argmax(per_cell)),
          "num_images": n}


def weight_by_kind(weights: np.ndarray, kinds: Sequence[str],
                   grid: int) -> dict[str, dict[str, float | int]]:
  """Mean type totals per image kind.

  Returns:
    {kind: {"count": number of images of that kind, "global" / "regional" /
    "scale": mean over them of the image's total weight of that type}} for
    each kind present, in sorted order of kind.
  """
  w = np.asarray(weights, np.float64)
  if w.ndim != 2 or len(kinds) != w.shape[0]:
    raise ValueError(f"{len(kinds)} kinds for weights of shape {w.shape}")
  totals = type_totals(w, grid)
  kinds_arr = np.asarray([str(k) for k in kinds], dtype=object)
  out = {}
  for kind in sorted(set(kinds_arr.tolist())):
    rows = totals[kinds_arr == kind]
    out[kind] = {"count": int(len(rows)), **_by_type(rows.mean(axis=0))}
  return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  """Pearson correlation of two vectors; None with fewer than 3 values, when
  either is constant (range <= 1e-12 of its magnitude) or not finite."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 3 or x.shape != y.shape:
    return None
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    return None
  for v in (x, y):
    if np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())):
      return None
  dx, dy = x - x.mean(), y - y.mean()
  denom = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
  if not denom > 0:
    return None
  return float(np.clip(np.sum(dx * dy) / denom, -1.0, 1.0))


def box_sizes(boxes: np.ndarray) -> np.ndarray:
  """[N, 4] normalised boxes -> [N] sqrt of the box's area fraction (NaN for
  NaN rows)."""
  b = np.asarray(boxes, np.float64)
  return np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def scale_size_correlation(weights: np.ndarray, sizes: np.ndarray, grid: int,
                           scales: Sequence[float]) -> dict[str, Any]:
  """Does the weight on each scale follow the object's size?

  Over the images with a finite size (object images; `sizes` [N], e.g.
  `box_sizes`: sqrt of the box area fraction, NaN for the others):
    per_scale[label] = Pearson r of the scale feature's weight w_sj with
      size, one per scale (labels 'x0.5', ...);
    log_scale_centroid = Pearson r of the weight-averaged log scale factor
      c = sum_j w_sj log s_j / sum_j w_sj with size (images whose scale
      weights sum to 0 are left out of it).
  A correlation is None (never NaN) with fewer than 3 images or when either
  vector is constant (`pearson`); log_scale_centroid is None without scales.

  Returns:
    {"per_scale": {label: r or None}, "log_scale_centroid": r or None,
     "num_images": images with a size}.
  """
  w = _check(weights, grid, scales)
  s = np.asarray(sizes, np.float64).reshape(-1)
  if s.shape[0] != w.shape[0]:
    raise ValueError(f"{s.shape[0]} sizes for {w.shape[0]} images")
  if any(float(f) <= 0 for f in scales):
    raise ValueError(f"scales {tuple(scales)}: need positive factors")
  keep = np.isfinite(s)
  w, s = w[keep], s[keep]
  sw = w[:, 1 + grid * grid:]
  labels = feature_labels(grid, scales)[1 + grid * grid:]
  per_scale = {name: pearson(sw[:, j], s) for j, name in enumerate(labels)}
  centroid = None
  if len(scales):
    total = sw.sum(axis=1)
    ok = total > 0
    logs = np.log(np.asarray(scales, np.float64))
    c = (sw[ok] @ logs) / total[ok]
    centroid = pearson(c, s[ok])
  return {"per_scale": per_scale, "log_scale_centroid": centroid,
          "num_images": int(keep.sum())}


def adaptivity(weights: np.ndarray, grid: int, scales: Sequence[float], *,
               kinds: Sequence[str] | None = None,
               boxes: np.ndarray | None = None) -> dict[str, Any]:
  """The `adaptivity` section of `fusion_summary` (see there)."""
  w = _check(weights, grid, scales)
  n = w.shape[0]
  out: dict[str, Any] = {
      "region_follow": None, "region_follow_chance": None,
      "region_follow_center": None, "region_follow_center_chance": None,
      "region_follow_best_fixed": None, "num_box_images": 0, "by_kind": None, "global_weight_scene": None,
      "global_weight_object": None, "scale_size_corr": None,
      "max_component_std": float(w.std(axis=0).max()),
  }
  if boxes is not None:
    b = _check_boxes(boxes, n)
    has = ~np.isnan(b).any(axis=1)
    out["num_box_images"] = int(has.sum())
    if has.any() and grid >= 1:
      rf = region_follow(w[has], b[has], grid)
      out.update(region_follow=rf["region_follow"],
                 region_follow_chance=rf["chance"],
                 region_follow_center=rf["region_follow_center"],
                 region_follow_center_chance=rf["center_chance"],
                 region_follow_best_fixed=rf["best_fixed"])
    out["scale_size_corr"] = scale_size_correlation(w, box_sizes(b), grid,
                                                    scales)
  if kinds is not None:
    by_kind = weight_by_kind(w, kinds, grid)
    out["by_kind"] = by_kind
    for kind in ("scene", "object"):
      if kind in by_kind:
        out[f"global_weight_{kind}"] = by_kind[kind]["global"]
  return out


# ----------------------------------------------------------------- summary


def fusion_summary(weights: np.ndarray, grid: int, scales: Sequence[float],
                   *, kinds: Sequence[str] | None = None,
                   boxes: np.ndarray | None = None) -> dict[str, Any]:
  """Summarises fusion weights [N, K] (K = 1+g^2+S) of N images.

  Args:
    weights: per-image fusion weights, rows summing to 1.
    grid: g of the regional grid.
    scales: the S scale factors (config order), used for labels.
    kinds: optional per-image kind ('scene', 'object', 'distractor',
      'unknown', ...), N strings.
    boxes: optional [N, 4] normalised object boxes (x0, y0, x1, y1 in
      [0, 1]), NaN rows for images without one.

  Returns:
    A JSON-serialisable dict:
      num_images, num_features, grid, scales, labels (K names);
      type_mean / type_std: per feature type (global, regional, scale) the
        mean and the standard deviation across images of its total weight
        (the std measures how much the fusion adapts between images);
      component_mean / component_std: the same per feature (K lists);
      entropy_mean / entropy_std (nats), entropy_max = log K and
        entropy_ratio = entropy_mean / log K (1 = uniform weights);
      argmax_type_fraction: fraction of images whose largest type total is
        global / regional / scale (ties go to the earlier type);
      argmax_component_fraction: fraction of images whose single largest
        weight belongs to each type (ties go to the earlier feature);
      regional_map: g x g mean regional weights (row-major grid);
      max_component_std: max of component_std (0 = the same weights for
        every image, i.e. no adaptation at all).
    With `kinds` or `boxes`, also `adaptivity`:
      region_follow / region_follow_chance / region_follow_center /
        region_follow_center_chance / num_box_images: `region_follow` over
        the images with a box (None without any);
      by_kind: `weight_by_kind` (None without kinds);
      global_weight_scene / global_weight_object: mean global weight over
        the images of kind 'scene' / 'object' (None when there are none);
      scale_size_corr: `scale_size_correlation` with sizes `box_sizes`
        (None without boxes);
      max_component_std: as above.
  """
  w = _check(weights, grid, scales)
  n, k = w.shape
  totals = type_totals(w, grid)
  ent = entropy(w)
  feature_type = np.array([0] + [1] * grid * grid + [2] * len(scales))
  max_ent = math.log(k)
  mean = w.mean(axis=0)
  std = w.std(axis=0)
  summary = {
      "num_images": int(n),
      "num_features": int(k),
      "grid": int(grid),
      "scales": [float(s) for s in scales],
      "labels": feature_labels(grid, scales),
      "type_mean": _by_type(totals.mean(axis=0)),
      "type_std": _by_type(totals.std(axis=0)),
      "component_mean": [float(v) for v in mean],
      "component_std": [float(v) for v in std],
      "entropy_mean": float(ent.mean()),
      "entropy_std": float(ent.std()),
      "entropy_max": float(max_ent),
      "entropy_ratio": float(ent.mean() / max_ent) if max_ent > 0 else 1.0,
      "argmax_type_fraction": _fractions(np.argmax(totals, axis=1)),
      "argmax_component_fraction": _fractions(
          feature_type[np.argmax(w, axis=1)]),
      "regional_map": mean[1:1 + grid * grid].reshape(grid, grid).tolist(),
      "max_component_std": float(std.max()),
  }
  if kinds is not None or boxes is not None:
    summary["adaptivity"] = adaptivity(w, grid, scales, kinds=kinds,
                                       boxes=boxes)
  return summary


def format_fusion_summary(summary: dict[str, Any]) -> str:
  """A short Markdown rendering of `fusion_summary`'s dict."""
  g = summary["grid"]
  n_of = {"global": 1, "regional": g * g, "scale": len(summary["scales"])}
  lines = [
      f"Fusion weights of {summary['num_images']} images "
      f"(K = {summary['num_features']}: 1 global, {g}x{g} regional, "
      f"{n_of['scale']} scales).",
      "",
      "| type | features | mean | std across images | argmax (type total) "
      "| argmax (component) |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for t in TYPES:
    lines.append(
        f"| {t} | {n_of[t]} | {summary['type_mean'][t]:.4f} "
        f"| {summary['type_std'][t]:.4f} "
        f"| {summary['argmax_type_fraction'][t]:.1%} "
        f"| {summary['argmax_component_fraction'][t]:.1%} |")
  lines += [
      "",
      f"Entropy {summary['entropy_mean']:.4f} ± {summary['entropy_std']:.4f} "
      f"nats = {summary['entropy_ratio']:.1%} of the maximum "
      f"log K = {summary['entropy_max']:.4f}.",
      "",
  ]
  if "max_component_std" in summary:
    std = summary["component_std"]
    top = summary["labels"][int(np.argmax(std))] if std else "-"
    lines += [f"Largest per-feature std across images: "
              f"{summary['max_component_std']:.4f} ({top}).", ""]
  scale_labels = summary["labels"][1 + g * g:]
  if scale_labels:
    means = summary["component_mean"][1 + g * g:]
    lines += ["Scales: " + ", ".join(
        f"{name} {m:.4f}" for name, m in zip(scale_labels, means)) + ".", ""]
  lines += ["Mean regional weights (image grid):", "",
            "| | " + " | ".join(f"c{c}" for c in range(g)) + " |",
            "|---|" + "---:|" * g]
  for r, row in enumerate(summary["regional_map"]):
    lines.append(f"| r{r} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
  if summary.get("adaptivity"):
    lines += [""] + format_adaptivity(summary["adaptivity"])
  return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def _corr(value: float | None) -> str:
  return "n/a" if value is None else f"{value:+.3f}"


def format_adaptivity(a: dict[str, Any]) -> list[str]:
  """Markdown lines of `fusion_summary`'s `adaptivity` section."""
  lines = ["### Adaptivity", ""]
  n_box = a.get("num_box_images", 0)
  if n_box:
    lines += [
        f"Region follow over {n_box} images with an object box: the top "
        f"regional cell overlaps the box in {_pct(a['region_follow'])} "
        f"(chance {_pct(a['region_follow_chance'])}; the best single cell "
        f"for every image: {_pct(a.get('region_follow_best_fixed'))}) and holds its centre "
        f"in {_pct(a['region_follow_center'])} "
        f"(chance {_pct(a['region_follow_center_chance'])}).", ""]
  else:
    lines += ["Region follow: no images with an object box.", ""]
  by_kind = a.get("by_kind")
  if by_kind:
    lines += ["| kind | images | global | regional | scale |",
              "|---|---:|---:|---:|---:|"]
    for kind, row in by_kind.items():
      lines.append(f"| {kind} | {row['count']} | {row['global']:.4f} "
                   f"| {row['regional']:.4f} | {row['scale']:.4f} |")
    scene, obj = a.get("global_weight_scene"), a.get("global_weight_object")
    if scene is not None or obj is not None:
      lines += ["", f"Mean global weight: scene {_num(scene)}, object "
                f"{_num(obj)}."]
    lines.append("")
  corr = a.get("scale_size_corr")
  if corr is not None:
    per = ", ".join(f"{name} {_corr(r)}" for name, r in corr["per_scale"].items())
    lines += [f"Scale weight vs object size (Pearson r over "
              f"{corr['num_images']} images): {per or 'no scales'}; "
              f"log-scale centroid {_corr(corr['log_scale_centroid'])}.", ""]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def dataset_fusion_summary(config, q: dict, db: dict, ds: Any = None) -> dict:
  """QAFF fusion-weight statistics over the queries then database of a dataset.

  `q` / `db` hold the extracted `fusion_weights`. With `ds` whose folder holds
  `objects.json`, the summary gains the `adaptivity` section (kinds for all
  images, object boxes for the database only: queries are cropped to their gnd
  bbx; see `dataset_metadata`). Without a sidecar it is left out.
  """
  from qaff_jax.models import qaff  # noqa: PLC0415
  settings = qaff.settings_from_config(config.model)
  weights = np.concatenate([q["fusion_weights"], db["fusion_weights"]])
  meta = None if ds is None else dataset_metadata(ds)
  kinds, boxes = meta if meta is not None else (None, None)
  return fusion_summary(weights, settings.grid, settings.scales, kinds=kinds, boxes=boxes)
