"""Deterministic, download-free demo dataset in the real GLDv2 / revisitop formats.

Each "landmark" is a procedural scene: a seeded mix of gradients, textured
polygons, buildings with window grids, stripes, blobs and lines. Its images are
views of the scene under random perspective warps, crops, scale changes,
lighting and colour changes, occluders, blur, noise and JPEG compression. A
view's `strength` in [0, 1] scales every one of these perturbations.

Layout written under `root`:
  train/train-%05d-of-%05d       GLDv2 TFRecords (DELF layout, labels 0..N-1).
  test/demo/gnd_demo.pkl         revisitop ground truth (imlist, qimlist, gnd).
  test/demo/jpg/<id>.jpg         database and query JPEGs.
  DONE.json                      generation parameters; written last.

Training, test and distractor scenes come from separate seed streams, so test
landmarks are disjoint from training landmarks by construction. The same seed
gives byte-identical files.

CLI: `python -m qaff_jax.data.demo --out demo_data [--seed 0] [--force]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from qaff_jax.data import records

VERSION = 1
TEST_NAME = "demo"
MARKER = "DONE.json"
SCENE_SIZE = 256
_PAD = 64  # reflected border around a scene, so warped views never sample void.

# Seed streams: the first element after the seed.
_TRAIN, _TEST, _DISTRACTOR, _BACKGROUND = 0, 1, 2, 3
_KIND_NAMES = {_TRAIN: "train", _TEST: "test", _DISTRACTOR: "distractor",
               _BACKGROUND: "background"}

# Difficulty levels of database views: strength ranges.
_LEVELS = {"easy": (0.05, 0.35), "hard": (0.5, 0.75), "junk": (0.9, 1.0)}
_TRAIN_STRENGTH = (0.0, 0.8)
_QUERY_STRENGTH = (0.05, 0.3)

# A shared palette: landmarks pick from the same colours, so colour alone
# does not identify a landmark.
_PALETTE = np.array([
    [200, 60, 50], [230, 140, 40], [235, 210, 70], [120, 170, 60],
    [50, 120, 70], [60, 160, 170], [50, 90, 170], [110, 80, 160],
    [180, 90, 150], [140, 100, 70], [210, 190, 160], [90, 90, 95],
    [170, 170, 175], [240, 240, 235], [30, 30, 40], [120, 150, 200],
], dtype=np.float64)


@dataclasses.dataclass
class DemoSpec:
  """Sizes of the demo dataset.

  Attributes:
    num_train_classes: training landmarks (labels 0..N-1).
    views_per_class: training images per landmark.
    num_test_landmarks: test landmarks (disjoint from training).
    db_views_per_landmark: database images per test landmark.
    queries_per_landmark: queries per test landmark.
    num_distractors: database images of unrelated scenes.
    train_size: longest side of a training image; sides are drawn in
      [3/4 * train_size, train_size]; database sides in
      [train_size, 25/16 * train_size].
    num_shards: training TFRecord shards.
    seed: master seed.
  """
  num_train_classes: int = 48
  views_per_class: int = 24
  num_test_landmarks: int = 10
  db_views_per_landmark: int = 12
  queries_per_landmark: int = 2
  num_distractors: int = 30
  train_size: int = 128
  num_shards: int = 4
  seed: int = 0


# --------------------------------------------------------------------------
# Randomness and ids.


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _image_id(seed: int, *key: Any) -> str:
  text = "/".join(str(k) for k in ("qaff-demo", seed) + key)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# Scenes.


def _colour(rng: np.random.Generator, palette: np.ndarray) -> tuple[int, int, int]:
  c = palette[rng.integers(len(palette))] + rng.normal(0.0, 12.0, 3)
  return tuple(int(v) for v in np.clip(c, 0, 255))


def _texture(rng: np.random.Generator, palette: np.ndarray,
             size: int) -> Image.Image:
  """A full-size texture: stripes, checks, dots or a gradient."""
  a, b = _colour(rng, palette), _colour(rng, palette)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  kind = rng.integers(4)
  theta = rng.uniform(0, math.pi)
  u = xx * math.cos(theta) + yy * math.sin(theta)
  v = -xx * math.sin(theta) + yy * math.cos(theta)
  period = rng.uniform(5.0, 22.0)
  if kind == 0:    # stripes
    m = (u / period) % 1.0 < rng.uniform(0.3, 0.7)
  elif kind == 1:  # checks
    m = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
  elif kind == 2:  # dots
    fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
    m = fu * fu + fv * fv < rng.uniform(0.04, 0.16)
  else:            # gradient
    t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
    arr = np.asarray(a)[None, None] * (1 - t[..., None]) + np.asarray(b)[None, None] * t[..., None]
    return Image.fromarray(arr.astype(np.uint8))
  arr = np.where(m[..., None], np.asarray(a, np.uint8), np.asarray(b, np.uint8))
  return Image.fromarray(arr.astype(np.uint8))


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float,
             n: int) -> list[tuple[float, float]]:
  angles = np.sort(rng.uniform(0, 2 * math.pi, n))
  radii = r * rng.uniform(0.5, 1.0, n)
  return [(float(cx + q * math.cos(t)), float(cy + q * math.sin(t)))
          for q, t in zip(radii, angles)]


def _render_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> Image.Image:
  """Renders one procedural scene (RGB, `size` x `size`)."""
  palette = _PALETTE[rng.choice(len(_PALETTE), 6, replace=False)]
  # Background: sky-to-ground gradient split at a horizon.
  horizon = rng.uniform(0.3, 0.7) * size
  top, low = _colour(rng, palette), _colour(rng, palette)
  ground = _colour(rng, palette)
  y = np.arange(size, dtype=np.float64)[:, None, None]
  t = np.clip(y / max(horizon, 1.0), 0, 1)
  sky = np.asarray(top)[None, None] * (1 - t) + np.asarray(low)[None, None] * t
  arr = np.where(y < horizon, sky, np.asarray(ground, np.float64)[None, None])
  arr = np.broadcast_to(arr, (size, size, 3))
  img = Image.fromarray(arr.astype(np.uint8))
  draw = ImageDraw.Draw(img)

  # Large textured polygons.
  for _ in range(rng.integers(2, 4)):
    mask = Image.new("L", (size, size), 0)
    pts = _polygon(rng, rng.uniform(0, size), rng.uniform(0, size),
                   rng.uniform(0.2, 0.45) * size, int(rng.integers(3, 7)))
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    img.paste(_texture(rng, palette, size), (0, 0), mask)

  # Buildings: a block with a grid of windows and maybe a roof.
  for _ in range(rng.integers(1, 4)):
    w, h = rng.uniform(0.15, 0.45) * size, rng.uniform(0.2, 0.6) * size
    x0 = rng.uniform(-0.1, 0.9) * size
    y1 = horizon + rng.uniform(-0.05, 0.25) * size
    box = (x0, y1 - h, x0 + w, y1)
    draw.rectangle(box, fill=_colour(rng, palette))
    if rng.uniform() < 0.6:
      apex = (x0 + w * rng.uniform(0.3, 0.7), y1 - h - rng.uniform(0.1, 0.4) * w)
      draw.polygon([(x0, y1 - h), apex, (x0 + w, y1 - h)], fill=_colour(rng, palette))
    nx, ny = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    win = _colour(rng, palette)
    fill = rng.uniform(0.35, 0.7)
    for i in range(nx):
      for j in range(ny):
        cx, cy = x0 + (i + 0.5) * w / nx, y1 - h + (j + 0.5) * h / ny
        hw, hh = 0.5 * fill * w / nx, 0.5 * fill * h / ny
        draw.rectangle((cx - hw, cy - hh, cx + hw, cy + hh), fill=win)

  # Blobs, small polygons and lines.
  for _ in range(rng.integers(3, 8)):
    cx, cy = rng.uniform(0, size, 2)
    rx, ry = rng.uniform(0.03, 0.12, 2) * size
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_colour(rng, palette))
  for _ in range(rng.integers(4, 10)):
    pts = _polygon(rng, rng.uniform(0, size), rng.uniform(0, size),
                   rng.uniform(0.04, 0.12) * size, int(rng.integers(3, 6)))
    draw.polygon(pts, fill=_colour(rng, palette))
  for _ in range(rng.integers(2, 7)):
    p = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(2)]
    draw.line(p, fill=_colour(rng, palette), width=int(rng.integers(2, 7)))
  return img


def scene_image(seed: int, kind: int, index: int) -> Image.Image:
  """The scene `index` of stream `kind` (0 train, 1 test, 2 distractor, 3 background)."""
  return _render_scene(_rng(seed, kind, index))


def _padded(scene: Image.Image) -> Image.Image:
  arr = np.asarray(scene)
  return Image.fromarray(np.pad(arr, ((_PAD, _PAD), (_PAD, _PAD), (0, 0)), mode="reflect"))


# --------------------------------------------------------------------------
# Views.


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
  """PIL PERSPECTIVE coefficients mapping output points `dst` to input `src`."""
  a = np.zeros((8, 8))
  b = np.zeros(8)
  for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
    a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
    a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    b[2 * i], b[2 * i + 1] = u, v
  return [float(c) for c in np.linalg.solve(a, b)]


def _lut(rng: np.random.Generator, s: float) -> list[int]:
  """Per-channel tone curve: gain, gamma, contrast and brightness."""
  gamma = math.exp(rng.normal(0.0, 0.08 + 0.25 * s))
  contrast = math.exp(rng.normal(0.0, 0.08 + 0.2 * s))
  bright = rng.normal(0.0, 0.04 + 0.12 * s)
  lut = []
  for gain in np.exp(rng.normal(0.0, 0.06 + 0.1 * s, 3)):
    for v in range(256):
      x = (v / 255.0) ** gamma
      x = (x - 0.5) * contrast + 0.5 + bright
      lut.append(int(min(max(round(255.0 * x * float(gain)), 0), 255)))
  return lut


def _occlude(img: Image.Image, rng: np.random.Generator, target: float) -> None:
  """Draws occluders in place until about `target` of the area is covered."""
  w, h = img.size
  mask = Image.new("L", (w, h), 0)
  draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
  for _ in range(16):
    if np.count_nonzero(np.asarray(mask)) >= target * w * h:
      break
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    bw = rng.uniform(0.1, 0.5) * w
    bh = rng.uniform(0.1, 0.6) * h
    x0, y0 = rng.uniform(-0.2 * w, w - 0.5 * bw), rng.uniform(-0.2 * h, h - 0.5 * bh)
    box = (x0, y0, x0 + bw, y0 + bh)
    shape = rng.integers(3)
    if shape == 0:
      draw.rectangle(box, fill=colour)
      mdraw.rectangle(box, fill=255)
    elif shape == 1:
      draw.ellipse(box, fill=colour)
      mdraw.ellipse(box, fill=255)
    else:
      pts = _polygon(rng, x0 + bw / 2, y0 + bh / 2, max(bw, bh) / 2, int(rng.integers(3, 7)))
      draw.polygon(pts, fill=colour)
      mdraw.polygon(pts, fill=255)


def _view(padded: Image.Image, rng: np.random.Generator, s: float,
          size: tuple[int, int]) -> Image.Image:
  """One view of a scene at strength `s`, as an RGB image of `size` (w, h)."""
  w, h = size
  # Geometry: crop scale, position, rotation, perspective, keystone.
  side = SCENE_SIZE * min(max(rng.uniform(0.6, 1.0) - 0.5 * s * rng.uniform(0.6, 1.0), 0.2), 1.0)
  aspect = w / h
  cw, ch = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
  cx = _PAD + rng.uniform(min(cw / 2, SCENE_SIZE / 2), max(SCENE_SIZE - cw / 2, SCENE_SIZE / 2))
  cy = _PAD + rng.uniform(min(ch / 2, SCENE_SIZE / 2), max(SCENE_SIZE - ch / 2, SCENE_SIZE / 2))
  corners = np.array([[-cw, -ch], [cw, -ch], [cw, ch], [-cw, ch]]) / 2
  edge = int(rng.integers(4))  # keystone: shrink one edge
  k = rng.uniform(0.0, 0.4 * s)
  i, j = edge, (edge + 1) % 4
  mid = (corners[i] + corners[j]) / 2
  corners[i] += (mid - corners[i]) * k
  corners[j] += (mid - corners[j]) * k
  corners += rng.normal(0.0, 0.08 * s * side, (4, 2))
  theta = math.radians(rng.normal(0.0, 3.0 + 15.0 * s))
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  src = corners @ rot.T + [cx, cy]
  src = np.clip(src, 0, SCENE_SIZE + 2 * _PAD - 1)
  dst = np.array([[0, 0], [2 * w, 0], [2 * w, 2 * h], [0, 2 * h]], np.float64)
  img = padded.transform((2 * w, 2 * h), Image.PERSPECTIVE,
                         _perspective_coeffs(src, dst), Image.BILINEAR)
  img = img.reduce(2)

  # Photometry: tone curve, saturation, hue, illumination ramp, shadow.
  img = img.point(_lut(rng, s))
  img = ImageEnhance.Color(img).enhance(math.exp(rng.normal(0.0, 0.1 + 0.3 * s)))
  shift = int(round(rng.normal(0.0, 6.0 + 12.0 * s))) % 256
  if shift:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
    img = Image.fromarray(hsv, "HSV").convert("RGB")
  arr = np.asarray(img).astype(np.float32)
  phi = rng.uniform(0, 2 * math.pi)
  amp = rng.uniform(0.0, 0.1 + 0.35 * s)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  ramp = (xx / w - 0.5) * math.cos(phi) + (yy / h - 0.5) * math.sin(phi)
  arr *= (1.0 + 2.0 * amp * ramp)[..., None]
  if rng.uniform() < 0.2 + 0.4 * s:
    shadow = Image.new("L", (w, h), 0)
    pts = _polygon(rng, rng.uniform(0, w), rng.uniform(0, h),
                   rng.uniform(0.3, 0.7) * max(w, h), int(rng.integers(3, 6)))
    ImageDraw.Draw(shadow).polygon(pts, fill=1)
    arr *= np.where(np.asarray(shadow)[..., None] > 0,
                    np.float32(rng.uniform(0.45, 0.8)), np.float32(1.0))
  arr += rng.normal(0.0, 1.0 + 5.0 * s, arr.shape).astype(np.float32)
  img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))

  # Occluders and blur.
  target = s * s * rng.uniform(0.3, 0.65) + rng.uniform(0.0, 0.04)
  _occlude(img, rng, target)
  if rng.uniform() < 0.15 + 0.35 * s:
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.6 + 1.0 * s)))
  return img


def _jpeg(img: Image.Image, rng: np.random.Generator, s: float) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=int(rng.integers(int(92 - 30 * s), 96)))
  return buf.getvalue()


def _size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
  return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _levels(n: int) -> list[str]:
  """Difficulty levels of a landmark's `n` database views (easy first)."""
  n_junk = round(n / 6)
  n_hard = round((n - n_junk) / 2)
  return ["easy"] * (n - n_junk - n_hard) + ["hard"] * n_hard + ["junk"] * n_junk


# --------------------------------------------------------------------------
# Writers.


def _train_examples(spec: DemoSpec) -> Iterator[tuple[int, bytes]]:
  lo, hi = round(0.75 * spec.train_size), spec.train_size
  for label in range(spec.num_train_classes):
    padded = _padded(scene_image(spec.seed, _TRAIN, label))
    for v in range(spec.views_per_class):
      rng = _rng(spec.seed, 100 + _TRAIN, label, v)
      s = rng.uniform(*_TRAIN_STRENGTH)
      img = _view(padded, rng, s, _size(rng, lo, hi))
      data = _jpeg(img, rng, s)
      image_id = _image_id(spec.seed, "train", label, v)
      yield label, records.make_gldv2_example(data, label, image_id, img.height, img.width)


def _write_train(out: str, spec: DemoSpec) -> list[str]:
  os.makedirs(out)
  examples = list(_train_examples(spec))
  order = _rng(spec.seed, 900).permutation(len(examples))
  paths = []
  for i, chunk in enumerate(np.array_split(order, spec.num_shards)):
    path = os.path.join(out, records.shard_name("train", i, spec.num_shards))
    records.write_tfrecord(path, (examples[k][1] for k in chunk))
    paths.append(path)
  return paths


def _write_test(out: str, spec: DemoSpec) -> dict[str, Any]:
  jpg_dir = os.path.join(out, "jpg")
  os.makedirs(jpg_dir)
  db_lo, db_hi = spec.train_size, round(spec.train_size * 25 / 16)
  q_lo, q_hi = round(1.5 * spec.train_size), 2 * spec.train_size

  def save(image_id: str, data: bytes) -> None:
    with open(os.path.join(jpg_dir, image_id + ".jpg"), "wb") as f:
      f.write(data)

  db = []  # (image_id, landmark or -1, level)
  queries = []  # (image_id, landmark, bbx)
  for lm in range(spec.num_test_landmarks):
    padded = _padded(scene_image(spec.seed, _TEST, lm))
    for v, level in enumerate(_levels(spec.db_views_per_landmark)):
      rng = _rng(spec.seed, 100 + _TEST, lm, v)
      s = rng.uniform(*_LEVELS[level])
      img = _view(padded, rng, s, _size(rng, db_lo, db_hi))
      image_id = _image_id(spec.seed, "db", lm, v)
      save(image_id, _jpeg(img, rng, s))
      db.append((image_id, lm, level))
    for q in range(spec.queries_per_landmark):
      rng = _rng(spec.seed, 200 + _TEST, lm, q)
      bw, bh = _size(rng, q_lo, q_hi)
      bg_index = lm * spec.queries_per_landmark + q
      bg = _view(_padded(scene_image(spec.seed, _BACKGROUND, bg_index)), rng,
                 rng.uniform(0.2, 0.5), (bw, bh))
      s = rng.uniform(*_QUERY_STRENGTH)
      vw = int(rng.integers(round(0.45 * bw), round(0.75 * bw) + 1))
      vh = int(rng.integers(round(0.45 * bh), round(0.75 * bh) + 1))
      view = _view(padded, rng, s, (vw, vh))
      x0, y0 = int(rng.integers(0, bw - vw + 1)), int(rng.integers(0, bh - vh + 1))
      bg.paste(view, (x0, y0))
      image_id = _image_id(spec.seed, "query", lm, q)
      save(image_id, _jpeg(bg, rng, s))
      queries.append((image_id, lm, [float(x0), float(y0), float(x0 + vw), float(y0 + vh)]))
  for d in range(spec.num_distractors):
    rng = _rng(spec.seed, 100 + _DISTRACTOR, d)
    s = rng.uniform(0.05, 0.6)
    img = _view(_padded(scene_image(spec.seed, _DISTRACTOR, d)), rng, s,
                _size(rng, db_lo, db_hi))
    image_id = _image_id(spec.seed, "distractor", d)
    save(image_id, _jpeg(img, rng, s))
    db.append((image_id, -1, "distractor"))

  db = [db[k] for k in _rng(spec.seed, 901).permutation(len(db))]
  imlist = [d[0] for d in db]
  gnd = []
  for _, lm, bbx in queries:
    entry = {level: [k for k, d in enumerate(db) if d[1] == lm and d[2] == level]
             for level in ("easy", "hard", "junk")}
    entry["bbx"] = bbx
    gnd.append(entry)
  cfg = {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}
  ids = imlist + cfg["qimlist"]
  if len(set(ids)) != len(ids):
    raise RuntimeError("demo image ids collide; pick another seed")
  with open(os.path.join(out, f"gnd_{TEST_NAME}.pkl"), "wb") as f:
    pickle.dump(cfg, f, protocol=4)
  return cfg


def _paths(root: str, spec: DemoSpec) -> dict[str, Any]:
  train = os.path.join(root, "train")
  test_root = os.path.join(root, "test")
  return {
      "root": root,
      "train_files": train,
      "train_shards": [os.path.join(train, records.shard_name("train", i, spec.num_shards))
                       for i in range(spec.num_shards)],
      "test_root": test_root,
      "test_name": TEST_NAME,
      "gnd_path": os.path.join(test_root, TEST_NAME, f"gnd_{TEST_NAME}.pkl"),
      "image_dir": os.path.join(test_root, TEST_NAME, "jpg"),
      "marker": os.path.join(root, MARKER),
  }


def _marker(spec: DemoSpec) -> dict[str, Any]:
  def keys(kind: int, n: int) -> list[list[int]]:
    return [[spec.seed, kind, i] for i in range(n)]
  return {
      "version": VERSION,
      "spec": dataclasses.asdict(spec),
      "scenes": {
          "train": keys(_TRAIN, spec.num_train_classes),
          "test": keys(_TEST, spec.num_test_landmarks),
          "distractor": keys(_DISTRACTOR, spec.num_distractors),
          "background": keys(_BACKGROUND, spec.num_test_landmarks * spec.queries_per_landmark),
      },
      "counts": {
          "train": spec.num_train_classes * spec.views_per_class,
          "db": spec.num_test_landmarks * spec.db_views_per_landmark + spec.num_distractors,
          "queries": spec.num_test_landmarks * spec.queries_per_landmark,
      },
  }


def generate(root: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> dict[str, Any]:
  """Writes the demo dataset under `root` (replacing `train/` and `test/demo/`).

  Files are built in a temporary folder, moved into place, and the marker
  `DONE.json` is written last, so a present marker means complete data.

  Returns:
    The paths (see `ensure_demo_data`).
  """
  root = os.path.abspath(os.fspath(root))
  os.makedirs(root, exist_ok=True)
  paths = _paths(root, spec)
  with contextlib.suppress(FileNotFoundError):
    os.remove(paths["marker"])
  tmp = tempfile.mkdtemp(prefix=".demo-gen-", dir=root)
  try:
    _write_train(os.path.join(tmp, "train"), spec)
    _write_test(os.path.join(tmp, TEST_NAME), spec)
    moves = [(os.path.join(tmp, "train"), paths["train_files"]),
             (os.path.join(tmp, TEST_NAME), os.path.join(paths["test_root"], TEST_NAME))]
    os.makedirs(paths["test_root"], exist_ok=True)
    for src, dst in moves:
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.rename(src, dst)
    marker_tmp = os.path.join(tmp, MARKER)
    with open(marker_tmp, "w") as f:
      json.dump(_marker(spec), f, indent=1, sort_keys=True)
    os.replace(marker_tmp, paths["marker"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return paths


def _is_complete(paths: dict[str, Any], spec: DemoSpec) -> bool:
  try:
    with open(paths["marker"]) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return False
  if marker.get("version") != VERSION or marker.get("spec") != dataclasses.asdict(spec):
    return False
  return all(os.path.isfile(p) for p in paths["train_shards"] + [paths["gnd_path"]])


@contextlib.contextmanager
def _lock(root: str) -> Iterator[None]:
  """An exclusive lock on `root` across processes (no-op without fcntl)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield
    return
  with open(os.path.join(root, ".demo.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_data(root: str | os.PathLike,
                     spec: DemoSpec = DemoSpec()) -> dict[str, Any]:
  """Generates the demo data unless `root` already holds it for `spec`.

  Returns:
    A dict with `train_files` (the folder of TFRecord shards), `test_root`
    (the revisitop root), `test_name` ('demo'), plus `train_shards`,
    `gnd_path`, `image_dir`, `marker` and `root`.
  """
  root = os.path.abspath(os.fspath(root))
  paths = _paths(root, spec)
  if _is_complete(paths, spec):
    return paths
  os.makedirs(root, exist_ok=True)
  with _lock(root):
    if not _is_complete(paths, spec):
      generate(root, spec)
  return paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="root folder of the demo data")
  parser.add_argument("--force", action="store_true", help="regenerate even if present")
  for field in dataclasses.fields(DemoSpec):
    parser.add_argument("--" + field.name, type=int, default=field.default)
  args = parser.parse_args(argv)
  spec = DemoSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSpec)})
  start = time.perf_counter()
  paths = generate(args.out, spec) if args.force else ensure_demo_data(args.out, spec)
  print(json.dumps({k: paths[k] for k in ("train_files", "test_root", "test_name")}))
  print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
