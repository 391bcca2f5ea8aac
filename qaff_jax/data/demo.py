"""Deterministic, download-free demo dataset in the real GLDv2 / revisitop formats.

Each "landmark" is a procedural scene: a seeded mix of gradients, textured
polygons, buildings with window grids, stripes, blobs and lines. Its images are
views of the scene under random perspective warps, crops, scale changes,
lighting and colour changes, occluders, blur, noise and JPEG compression. A
view's `strength` in [0, 1] scales every one of these perturbations.

Two layouts (`DemoSpec.layout`):

* "landmarks" (the default, `DemoSpec()`): every class is a scene.
* "mixed" (`MIXED_SPEC`): classes are scenes (full-frame views, as above) or
  small objects. An object is a compact procedural sprite (a textured body
  with attached parts, decorations and an outline, on its own alpha mask),
  rendered once from its own seed. Each of its images pastes a perturbed view
  of it (mild perspective warp, tone and colour change, blur, noise, scaled by
  the view's strength; partly occluded at strength > 0.5) at a random place
  on a view of a background scene drawn from a pool shared by all classes, so
  the background never identifies the class.

  Object size rule: the longest side of the object box (the tight box of the
  object's non-transparent pixels in the stored image, before occlusion) is
  `frac * min(W, H)` with `frac` uniform in [0.10, 0.35] for training and
  database images and in [0.30, 0.60] for object queries, W x H the image
  size (`OBJECT_FRACTION`, `QUERY_OBJECT_FRACTION`; rounded to whole pixels
  that stay within the range). The box always lies inside the image.

Layout written under `root` (`<name>` is "demo" for landmarks, "mixed" for
mixed):
  train/train-%05d-of-%05d       GLDv2 TFRecords (DELF layout, labels 0..N-1).
                                 Mixed: scene classes take labels
                                 0..num_train_classes-1, object classes the
                                 next num_object_classes; object images also
                                 carry their box as
                                 `image/object/bbox/{xmin,ymin,xmax,ymax}`
                                 (normalised, see `records.parse_object_boxes`).
  test/<name>/gnd_<name>.pkl     revisitop ground truth (imlist, qimlist, gnd).
  test/<name>/jpg/<id>.jpg       database and query JPEGs.
  test/mixed/objects.json        mixed only: per-image kind and object box
                                 (see `load_objects`).
  DONE.json                      generation parameters; written last.

Training, test and distractor scenes, training and test objects and the
training and test background pools come from separate seed streams, so test
classes are disjoint from training classes by construction. The same seed
gives byte-identical files.

CLI: `python -m qaff_jax.data.demo --out demo_data [--layout mixed] [--seed 0]
[--force]` (other `DemoSpec` fields as flags; unset ones take the layout's
default from `spec_for`).
"""

from __future__ import annotations

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
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter

from qaff_jax import cli_util
from qaff_jax.data import records

VERSION = 1
TEST_NAME = "demo"  # the landmarks layout's test set
MARKER = "DONE.json"
SCENE_SIZE = 256
_PAD = 64  # reflected border around a scene, so warped views never sample void.

LAYOUTS = ("landmarks", "mixed")
TEST_NAMES = {"landmarks": TEST_NAME, "mixed": "mixed"}
OBJECTS_NAME = "objects.json"  # mixed layout: the per-image sidecar
OBJECTS_VERSION = 1
OBJECT_KINDS = ("scene", "object", "distractor")
OBJECT_SIZE = 128  # canvas side of a rendered object sprite
# Longest side of an object box / the image's shorter side.
OBJECT_FRACTION = (0.10, 0.35)        # training and database images
QUERY_OBJECT_FRACTION = (0.30, 0.60)  # object queries

# Seed streams: the first element after the seed.
_TRAIN, _TEST, _DISTRACTOR, _BACKGROUND = 0, 1, 2, 3
# Mixed layout only: object sprites and the shared background pools.
_OBJECT_TRAIN, _OBJECT_TEST, _BACKGROUND_TRAIN, _BACKGROUND_TEST = 4, 5, 6, 7
_KIND_NAMES = {_TRAIN: "train", _TEST: "test", _DISTRACTOR: "distractor",
               _BACKGROUND: "background", _OBJECT_TRAIN: "object-train",
               _OBJECT_TEST: "object-test", _BACKGROUND_TRAIN: "background-train",
               _BACKGROUND_TEST: "background-test"}
# DemoSpec fields only the mixed layout reads; the landmarks marker leaves
# them out, so its DONE.json is what it was before the mixed layout existed.
_MIXED_FIELDS = ("layout", "num_object_classes", "num_test_objects", "num_backgrounds")

# Difficulty levels of database views: strength ranges.
_LEVELS = {"easy": (0.05, 0.35), "hard": (0.5, 0.75), "junk": (0.9, 1.0)}
_TRAIN_STRENGTH = (0.0, 0.8)
_QUERY_STRENGTH = (0.05, 0.3)
_BACKGROUND_STRENGTH = (0.1, 0.6)  # mixed: views of the shared backgrounds

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
    num_train_classes: training landmarks (labels 0..N-1); mixed: training
      scene classes (labels 0..N-1).
    views_per_class: training images per class.
    num_test_landmarks: test landmarks (disjoint from training); mixed: test
      scene classes.
    db_views_per_landmark: database images per test class.
    queries_per_landmark: queries per test class.
    num_distractors: database images of no class: unrelated scenes; mixed:
      half (rounded down) are views of test backgrounds alone, the rest
      unrelated scenes.
    train_size: longest side of a training image; sides are drawn in
      [3/4 * train_size, train_size]; database sides in
      [train_size, 25/16 * train_size]; query sides in
      [3/2 * train_size, 2 * train_size].
    num_shards: training TFRecord shards.
    seed: master seed.
    layout: "landmarks" or "mixed" (see the module docstring).
    num_object_classes: mixed only: training object classes (labels after
      the scene classes).
    num_test_objects: mixed only: test object classes (disjoint from
      training).
    num_backgrounds: mixed only: size of each shared background pool (one
      for training images, another for test images).
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
  layout: str = "landmarks"
  num_object_classes: int = 24
  num_test_objects: int = 8
  num_backgrounds: int = 16

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"unknown demo layout {self.layout!r}; choices: {list(LAYOUTS)}")


# The default spec of the mixed layout: 24 scene + 24 object training classes
# x 20 views; 8 + 8 test classes x 10 database views and 2 queries each.
MIXED_SPEC = DemoSpec(num_train_classes=24, views_per_class=20, num_test_landmarks=8,
                      db_views_per_landmark=10, queries_per_landmark=2,
                      num_distractors=30, train_size=128, num_shards=4, seed=0,
                      layout="mixed", num_object_classes=24, num_test_objects=8,
                      num_backgrounds=16)


def spec_for(layout: str) -> DemoSpec:
  """The default spec of `layout` ("landmarks": `DemoSpec()`, "mixed": `MIXED_SPEC`).

  Returns a fresh copy, safe to modify. Raises ValueError for an unknown
  layout (naming it and the choices).
  """
  if layout == "landmarks":
    return DemoSpec()
  if layout == "mixed":
    return dataclasses.replace(MIXED_SPEC)
  raise ValueError(f"unknown demo layout {layout!r}; choices: {list(LAYOUTS)}")


def layout_test_name(spec: DemoSpec) -> str:
  """The revisitop test-set name of `spec`'s layout ("demo" or "mixed")."""
  return TEST_NAMES[spec.layout]


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


def _scene_db_views(spec: "DemoSpec", lm: int, padded: Image.Image, lo: int, hi: int
                    ) -> Iterator[tuple[str, Image.Image, bytes, str]]:
  """The database views of test scene `lm`: (image_id, image, JPEG bytes, level)."""
  for v, level in enumerate(_levels(spec.db_views_per_landmark)):
    rng = _rng(spec.seed, 100 + _TEST, lm, v)
    s = rng.uniform(*_LEVELS[level])
    img = _view(padded, rng, s, _size(rng, lo, hi))
    yield _image_id(spec.seed, "db", lm, v), img, _jpeg(img, rng, s), level


def _paste_query_view(padded: Image.Image, bg: Image.Image, rng: np.random.Generator
                      ) -> tuple[float, tuple[int, int, int, int]]:
  """Pastes a query-strength view of a scene, 45-75% of each side, onto `bg` in place.

  Returns the view's strength and (x0, y0, width, height) of the pasted region.
  """
  bw, bh = bg.size
  s = rng.uniform(*_QUERY_STRENGTH)
  vw = int(rng.integers(round(0.45 * bw), round(0.75 * bw) + 1))
  vh = int(rng.integers(round(0.45 * bh), round(0.75 * bh) + 1))
  view = _view(padded, rng, s, (vw, vh))
  x0, y0 = int(rng.integers(0, bw - vw + 1)), int(rng.integers(0, bh - vh + 1))
  bg.paste(view, (x0, y0))
  return s, (x0, y0, vw, vh)


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
# Objects (mixed layout).


def _render_object(rng: np.random.Generator, size: int = OBJECT_SIZE) -> Image.Image:
  """Renders one procedural object: RGBA, `size` x `size`, transparent around it.

  A textured body (ellipse, polygon or rounded box) with 1-3 attached parts,
  2-4 decorations clipped to the body and usually a dark outline. It stays
  within 0.45 * `size` of the canvas centre, so warped views keep all of it.
  """
  palette = _PALETTE[rng.choice(len(_PALETTE), 6, replace=False)]
  c = size / 2
  rx, ry = rng.uniform(0.2, 0.3, 2) * size
  body = Image.new("L", (size, size), 0)
  bdraw = ImageDraw.Draw(body)
  shape = int(rng.integers(3))
  if shape == 0:
    bdraw.ellipse((c - rx, c - ry, c + rx, c + ry), fill=255)
  elif shape == 1:
    n = int(rng.integers(5, 9))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n
    radii = rng.uniform(0.75, 1.0, n)
    bdraw.polygon([(float(c + rx * q * math.cos(t)), float(c + ry * q * math.sin(t)))
                   for q, t in zip(radii, angles)], fill=255)
  else:
    bdraw.rounded_rectangle((c - rx, c - ry, c + rx, c + ry),
                            radius=float(rng.uniform(0.1, 0.5) * min(rx, ry)), fill=255)
  img = Image.new("RGB", (size, size), _colour(rng, palette))
  # A coarse texture: its pattern survives the object's small size.
  half = _texture(rng, palette, size // 2)
  img.paste(half.resize((size, size), Image.NEAREST), (0, 0), body)

  # Decorations inside the body: a band, a ring, a disc or a small polygon.
  for _ in range(rng.integers(2, 5)):
    deco = Image.new("L", (size, size), 0)
    ddraw = ImageDraw.Draw(deco)
    kind = int(rng.integers(4))
    cx, cy = c + rng.uniform(-0.6, 0.6) * rx, c + rng.uniform(-0.6, 0.6) * ry
    r = rng.uniform(0.25, 0.55) * min(rx, ry)
    if kind == 0:
      t = rng.uniform(0, math.pi)
      dx, dy = size * math.cos(t), size * math.sin(t)
      ddraw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255,
                 width=int(rng.uniform(0.06, 0.16) * size))
    elif kind == 1:
      ddraw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255,
                    width=int(rng.integers(3, 9)))
    elif kind == 2:
      ddraw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
      ddraw.polygon(_polygon(rng, cx, cy, r, int(rng.integers(3, 6))), fill=255)
    img.paste(_colour(rng, palette), (0, 0), ImageChops.multiply(deco, body))

  # Attached parts on the body's edge: ears, handles, feet.
  mask = body.copy()
  draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
  for _ in range(rng.integers(1, 4)):
    t = rng.uniform(0, 2 * math.pi)
    px, py = c + rx * math.cos(t), c + ry * math.sin(t)
    pr = rng.uniform(0.06, 0.12) * size
    colour = _colour(rng, palette)
    if rng.uniform() < 0.5:
      box = (px - pr, py - pr, px + pr, py + pr)
      draw.ellipse(box, fill=colour)
      mdraw.ellipse(box, fill=255)
    else:
      pts = _polygon(rng, px, py, pr, int(rng.integers(3, 6)))
      draw.polygon(pts, fill=colour)
      mdraw.polygon(pts, fill=255)

  if rng.uniform() < 0.7:
    edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(5)))
    dark = np.asarray(_colour(rng, palette), np.float64) * rng.uniform(0.1, 0.4)
    img.paste(tuple(int(v) for v in dark), (0, 0), edge)
  img.putalpha(mask)
  return img


def object_image(seed: int, kind: int, index: int) -> Image.Image:
  """The object sprite `index` of stream `kind` (4 train, 5 test), RGBA."""
  return _render_object(_rng(seed, kind, index))


def _object_view(sprite: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
  """A perturbed view of an RGBA sprite, cropped tight to its alpha.

  Mild perspective (rotation, anisotropic scale, corner jitter) and tone /
  colour changes, all scaled by the strength `s`.
  """
  size = sprite.width
  out = size * 3 // 2  # room for the warped object
  theta = math.radians(rng.normal(0.0, 4.0 + 16.0 * s))
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  scale = np.exp(rng.normal(0.0, 0.03 + 0.08 * s, 2))
  dst = np.array([[0, 0], [out, 0], [out, out], [0, out]], np.float64)
  src = ((dst - out / 2) * scale) @ rot.T + size / 2
  src += rng.normal(0.0, 0.04 * s * size, (4, 2))
  img = sprite.transform((out, out), Image.PERSPECTIVE,
                         _perspective_coeffs(src, dst), Image.BILINEAR)
  alpha = img.getchannel("A").point(lambda a: 0 if a < 8 else a)
  rgb = img.convert("RGB").point(_lut(rng, 0.6 * s))
  rgb = ImageEnhance.Color(rgb).enhance(math.exp(rng.normal(0.0, 0.05 + 0.2 * s)))
  rgb.putalpha(alpha)
  return rgb.crop(alpha.getbbox())


def _paste_object(background: Image.Image, sprite: Image.Image, rng: np.random.Generator,
                  s: float, frac: tuple[float, float]
                  ) -> tuple[Image.Image, tuple[int, int, int, int]]:
  """Pastes a view of `sprite` on a copy of `background`.

  The object's longest side is `f * min(W, H)` pixels, `f` uniform in `frac`
  (rounded, kept within `frac`); it lies wholly inside the image. At strength
  > 0.5 an occluder may cover part of it (drawn inside its box only).

  Returns:
    (image, box): the composite and the object box (x0, y0, x1, y1) in
    pixels, x1 / y1 exclusive: the tight box of the object's non-transparent
    pixels before occlusion. Pixels outside the box equal `background`.
  """
  w, h = background.size
  m = min(w, h)
  lo_px, hi_px = math.ceil(frac[0] * m - 1e-9), math.floor(frac[1] * m + 1e-9)
  target = int(min(max(round(rng.uniform(*frac) * m), lo_px), hi_px))
  obj = _object_view(sprite, rng, s)
  for _ in range(4):  # the tight crop after resizing may lose a pixel or two
    k = target / max(obj.size)
    small = obj.resize((max(1, round(obj.width * k)), max(1, round(obj.height * k))),
                       Image.BILINEAR)
    alpha = small.getchannel("A").point(lambda a: 0 if a < 8 else a)
    bbox = alpha.getbbox()
    small, alpha = small.crop(bbox), alpha.crop(bbox)
    if max(small.size) >= lo_px:
      break
    target = min(target + lo_px - max(small.size), hi_px)
  bw, bh = small.size

  rgb = small.convert("RGB")
  if rng.uniform() < 0.1 + 0.3 * s:
    rgb = rgb.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.5 + 0.8 * s)))
  fg = np.asarray(rgb, np.float32) + rng.normal(0.0, 1.0 + 4.0 * s, (bh, bw, 3)).astype(np.float32)
  a = np.asarray(alpha, np.float32)[..., None] / 255.0
  x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
  arr = np.array(background, np.uint8)
  region = arr[y0:y0 + bh, x0:x0 + bw].astype(np.float32)
  blend = np.clip(region * (1.0 - a) + fg * a + 0.5, 0, 255).astype(np.uint8)
  arr[y0:y0 + bh, x0:x0 + bw] = np.where(a > 0, blend, arr[y0:y0 + bh, x0:x0 + bw])
  img = Image.fromarray(arr)

  if s > 0.5 and rng.uniform() < 1.6 * (s - 0.5):
    # An occluder entering from one side of the box, over up to ~45% of it.
    f = rng.uniform(0.15, 0.45) * min(2.0 * (s - 0.5), 1.0)
    t1, t2 = f * rng.uniform(0.5, 1.5, 2)
    x1, y1 = x0 + bw - 1, y0 + bh - 1  # last pixel inside the box
    side = int(rng.integers(4))
    if side == 0:    # left
      pts = [(x0, y0), (x0 + t1 * bw, y0), (x0 + t2 * bw, y1), (x0, y1)]
    elif side == 1:  # right
      pts = [(x1, y0), (x1 - t1 * bw, y0), (x1 - t2 * bw, y1), (x1, y1)]
    elif side == 2:  # top
      pts = [(x0, y0), (x0, y0 + t1 * bh), (x1, y0 + t2 * bh), (x1, y0)]
    else:            # bottom
      pts = [(x0, y1), (x0, y1 - t1 * bh), (x1, y1 - t2 * bh), (x1, y1)]
    pts = [(float(min(max(px, x0), x1)), float(min(max(py, y0), y1))) for px, py in pts]
    ImageDraw.Draw(img).polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  return img, (x0, y0, x0 + bw, y0 + bh)


class _Assets:
  """Lazily rendered object sprites and padded background scenes of one seed."""

  def __init__(self, seed: int):
    self.seed = seed
    self._sprites: dict[tuple[int, int], Image.Image] = {}
    self._padded: dict[tuple[int, int], Image.Image] = {}

  def sprite(self, kind: int, index: int) -> Image.Image:
    key = (kind, index)
    if key not in self._sprites:
      self._sprites[key] = object_image(self.seed, kind, index)
    return self._sprites[key]

  def padded(self, kind: int, index: int) -> Image.Image:
    key = (kind, index)
    if key not in self._padded:
      self._padded[key] = _padded(scene_image(self.seed, kind, index))
    return self._padded[key]


@dataclasses.dataclass(frozen=True)
class ObjectView:
  """One object image of the mixed layout, as the generator makes it.

  Attributes:
    image_id: its id (TFRecord `image/id` or test JPEG name).
    image: the composite, before JPEG compression.
    background: the same background view without the object.
    box: the object box (x0, y0, x1, y1) in pixels, x1 / y1 exclusive.
    encoded: the JPEG bytes as stored.
    strength: the view's strength.
  """
  image_id: str
  image: Image.Image
  background: Image.Image
  box: tuple[int, int, int, int]
  encoded: bytes
  strength: float


_OBJECT_ROLES = ("train", "db", "query")


def _db_sides(spec: DemoSpec) -> tuple[int, int]:
  return spec.train_size, round(spec.train_size * 25 / 16)


def _query_sides(spec: DemoSpec) -> tuple[int, int]:
  return round(1.5 * spec.train_size), 2 * spec.train_size


def _object_sample(spec: DemoSpec, role: str, index: int, view: int,
                   assets: _Assets) -> ObjectView:
  if role == "train":
    rng = _rng(spec.seed, 100 + _OBJECT_TRAIN, index, view)
    s = rng.uniform(*_TRAIN_STRENGTH)
    size = _size(rng, round(0.75 * spec.train_size), spec.train_size)
    sprite_kind, pool, frac = _OBJECT_TRAIN, _BACKGROUND_TRAIN, OBJECT_FRACTION
    image_id = _image_id(spec.seed, "train-object", index, view)
  elif role == "db":
    level = _levels(spec.db_views_per_landmark)[view]
    rng = _rng(spec.seed, 100 + _OBJECT_TEST, index, view)
    s = rng.uniform(*_LEVELS[level])
    size = _size(rng, *_db_sides(spec))
    sprite_kind, pool, frac = _OBJECT_TEST, _BACKGROUND_TEST, OBJECT_FRACTION
    image_id = _image_id(spec.seed, "db-object", index, view)
  else:
    rng = _rng(spec.seed, 200 + _OBJECT_TEST, index, view)
    s = rng.uniform(*_QUERY_STRENGTH)
    size = _size(rng, *_query_sides(spec))
    sprite_kind, pool, frac = _OBJECT_TEST, _BACKGROUND_TEST, QUERY_OBJECT_FRACTION
    image_id = _image_id(spec.seed, "query-object", index, view)
  bg_index = int(rng.integers(spec.num_backgrounds))
  background = _view(assets.padded(pool, bg_index), rng,
                     rng.uniform(*_BACKGROUND_STRENGTH), size)
  image, box = _paste_object(background, assets.sprite(sprite_kind, index), rng, s, frac)
  return ObjectView(image_id=image_id, image=image, background=background, box=box,
                    encoded=_jpeg(image, rng, s), strength=float(s))


def object_view(spec: DemoSpec, role: str, index: int, view: int) -> ObjectView:
  """Re-renders one object image of the mixed layout exactly as `generate` does.

  Args:
    spec: a mixed-layout spec.
    role: "train" (training object class `index`, view `view`), "db" (test
      object `index`, database view `view`) or "query" (test object `index`,
      query `view`).

  Returns:
    The image, its background alone, the box and the stored JPEG bytes
    (see `ObjectView`).

  Raises:
    ValueError: not a mixed spec, an unknown role, or an index out of range.
  """
  if spec.layout != "mixed":
    raise ValueError(f"object_view needs a mixed-layout spec, got layout {spec.layout!r}")
  limits = {"train": (spec.num_object_classes, spec.views_per_class),
            "db": (spec.num_test_objects, spec.db_views_per_landmark),
            "query": (spec.num_test_objects, spec.queries_per_landmark)}
  if role not in limits:
    raise ValueError(f"unknown role {role!r}; choices: {list(_OBJECT_ROLES)}")
  n_index, n_view = limits[role]
  if not (0 <= index < n_index and 0 <= view < n_view):
    raise ValueError(f"{role} object ({index}, {view}) out of range "
                     f"[0, {n_index}) x [0, {n_view})")
  return _object_sample(spec, role, index, view, _Assets(spec.seed))


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
  examples = list(_train_examples(spec) if spec.layout == "landmarks"
                  else _mixed_train_examples(spec))
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
    for image_id, img, data, level in _scene_db_views(spec, lm, padded, db_lo, db_hi):
      save(image_id, data)
      db.append((image_id, lm, level))
    for q in range(spec.queries_per_landmark):
      rng = _rng(spec.seed, 200 + _TEST, lm, q)
      bw, bh = _size(rng, q_lo, q_hi)
      bg_index = lm * spec.queries_per_landmark + q
      bg = _view(_padded(scene_image(spec.seed, _BACKGROUND, bg_index)), rng,
                 rng.uniform(0.2, 0.5), (bw, bh))
      s, (x0, y0, vw, vh) = _paste_query_view(padded, bg, rng)
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

  return _save_ground_truth(out, TEST_NAME, db, queries, spec.seed)


def _save_ground_truth(out: str, name: str, db: list, queries: list,
                       seed: int) -> dict[str, Any]:
  """Shuffles the database, builds the revisitop gnd and writes `gnd_<name>.pkl`.

  `db` rows are (image_id, class key, level), `queries` rows (image_id,
  class key, bbx); a query's easy/hard/junk are the database images of its
  class at that level.
  """
  db = [db[k] for k in _rng(seed, 901).permutation(len(db))]
  imlist = [d[0] for d in db]
  gnd = []
  for _, key, bbx in queries:
    entry = {level: [k for k, d in enumerate(db) if d[1] == key and d[2] == level]
             for level in ("easy", "hard", "junk")}
    entry["bbx"] = bbx
    gnd.append(entry)
  cfg = {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}
  ids = imlist + cfg["qimlist"]
  if len(set(ids)) != len(ids):
    raise RuntimeError("demo image ids collide; pick another seed")
  with open(os.path.join(out, f"gnd_{name}.pkl"), "wb") as f:
    pickle.dump(cfg, f, protocol=4)
  return cfg


def _mixed_train_examples(spec: DemoSpec) -> Iterator[tuple[int, bytes]]:
  """Scene classes (labels 0..S-1, as landmarks) then object classes (S..S+O-1)."""
  yield from _train_examples(spec)
  assets = _Assets(spec.seed)
  for j in range(spec.num_object_classes):
    label = spec.num_train_classes + j
    for v in range(spec.views_per_class):
      ov = _object_sample(spec, "train", j, v, assets)
      w, h = ov.image.size
      x0, y0, x1, y1 = ov.box
      yield label, records.make_gldv2_example(
          ov.encoded, label, ov.image_id, h, w, boxes=[[x0 / w, y0 / h, x1 / w, y1 / h]])


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _write_test_mixed(out: str, spec: DemoSpec) -> dict[str, Any]:
  """The mixed test set: scene and object classes, distractors, the sidecar."""
  name = layout_test_name(spec)
  jpg_dir = os.path.join(out, "jpg")
  os.makedirs(jpg_dir)
  db_lo, db_hi = _db_sides(spec)
  q_lo, q_hi = _query_sides(spec)
  assets = _Assets(spec.seed)
  sidecar: dict[str, dict[str, Any]] = {}

  def save(image_id: str, data: bytes, img: Image.Image, kind: str,
           box: tuple[int, int, int, int] | None = None) -> None:
    with open(os.path.join(jpg_dir, image_id + ".jpg"), "wb") as f:
      f.write(data)
    sidecar[image_id] = {"kind": kind, "box": None if box is None else [int(v) for v in box],
                         "width": img.width, "height": img.height}

  db = []  # (image_id, class key or None, level)
  queries = []  # (image_id, class key, bbx)
  for lm in range(spec.num_test_landmarks):
    key = ("scene", lm)
    padded = _padded(scene_image(spec.seed, _TEST, lm))
    for image_id, img, data, level in _scene_db_views(spec, lm, padded, db_lo, db_hi):
      save(image_id, data, img, "scene")
      db.append((image_id, key, level))
    for q in range(spec.queries_per_landmark):
      rng = _rng(spec.seed, 200 + _TEST, lm, q)
      bw, bh = _size(rng, q_lo, q_hi)
      bg_index = int(rng.integers(spec.num_backgrounds))
      bg = _view(assets.padded(_BACKGROUND_TEST, bg_index), rng,
                 rng.uniform(*_BACKGROUND_STRENGTH), (bw, bh))
      s, (x0, y0, vw, vh) = _paste_query_view(padded, bg, rng)
      image_id = _image_id(spec.seed, "query", lm, q)
      save(image_id, _jpeg(bg, rng, s), bg, "scene")
      queries.append((image_id, key, [float(x0), float(y0), float(x0 + vw), float(y0 + vh)]))
  for o in range(spec.num_test_objects):
    key = ("object", o)
    for v, level in enumerate(_levels(spec.db_views_per_landmark)):
      ov = _object_sample(spec, "db", o, v, assets)
      save(ov.image_id, ov.encoded, ov.image, "object", ov.box)
      db.append((ov.image_id, key, level))
    for q in range(spec.queries_per_landmark):
      ov = _object_sample(spec, "query", o, q, assets)
      save(ov.image_id, ov.encoded, ov.image, "object", ov.box)
      queries.append((ov.image_id, key, [float(v) for v in ov.box]))
  n_background = spec.num_distractors // 2
  for d in range(spec.num_distractors - n_background):  # unrelated scenes
    rng = _rng(spec.seed, 100 + _DISTRACTOR, d)
    s = rng.uniform(0.05, 0.6)
    img = _view(_padded(scene_image(spec.seed, _DISTRACTOR, d)), rng, s,
                _size(rng, db_lo, db_hi))
    image_id = _image_id(spec.seed, "distractor", d)
    save(image_id, _jpeg(img, rng, s), img, "distractor")
    db.append((image_id, None, "distractor"))
  for d in range(n_background):  # test backgrounds alone
    rng = _rng(spec.seed, 100 + _BACKGROUND_TEST, d)
    s = rng.uniform(0.05, 0.6)
    padded = assets.padded(_BACKGROUND_TEST, int(rng.integers(spec.num_backgrounds)))
    img = _view(padded, rng, s, _size(rng, db_lo, db_hi))
    image_id = _image_id(spec.seed, "distractor-background", d)
    save(image_id, _jpeg(img, rng, s), img, "distractor")
    db.append((image_id, None, "distractor"))

  cfg = _save_ground_truth(out, name, db, queries, spec.seed)
  _write_json_atomic(os.path.join(out, OBJECTS_NAME),
                     {"version": OBJECTS_VERSION, "images": sidecar})
  return cfg


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_coord(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def load_objects(path: str | os.PathLike) -> dict[str, Any]:
  """Loads and validates a mixed test set's sidecar `objects.json`.

  Format: {"version": 1, "images": {"<image_id>": {"kind": "scene" | "object"
  | "distractor", "box": [x0, y0, x1, y1] or null, "width": W, "height": H}}}
  where W, H are the stored JPEG's size and `box` the object box in its
  pixels (x1 / y1 exclusive, 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H); "object"
  entries have a box, "scene" and "distractor" entries null.

  Returns:
    The parsed dict, unchanged.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable JSON or a malformed entry (names the file and the
      entry).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a JSON objects sidecar ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  if data.get("version") != OBJECTS_VERSION or isinstance(data.get("version"), bool):
    raise ValueError(f"{path}: version {data.get('version')!r}; expected {OBJECTS_VERSION}")
  images = data.get("images")
  if not isinstance(images, dict):
    raise ValueError(f"{path}: 'images' must be an object of id -> entry, "
                     f"got {type(images).__name__}")
  for image_id, entry in images.items():
    where = f"{path}: images[{image_id!r}]"
    if not isinstance(entry, dict):
      raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in ("kind", "box", "width", "height") if k not in entry]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing}")
    kind, box = entry["kind"], entry["box"]
    if kind not in OBJECT_KINDS:
      raise ValueError(f"{where}: kind {kind!r}; expected one of {list(OBJECT_KINDS)}")
    w, h = entry["width"], entry["height"]
    if not (_is_count(w) and _is_count(h)):
      raise ValueError(f"{where}: width / height {w!r} x {h!r}; expected positive integers")
    if kind != "object":
      if box is not None:
        raise ValueError(f"{where}: a {kind!r} entry has box {box!r}; expected null")
      continue
    if not (isinstance(box, list) and len(box) == 4 and all(_is_coord(v) for v in box)):
      raise ValueError(f"{where}: box {box!r}; expected [x0, y0, x1, y1] (4 numbers)")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
      raise ValueError(f"{where}: box {box!r} is empty or not inside the {w}x{h} image")
  return data


def _paths(root: str, spec: DemoSpec) -> dict[str, Any]:
  train = os.path.join(root, "train")
  test_root = os.path.join(root, "test")
  name = layout_test_name(spec)
  return {
      "root": root,
      "train_files": train,
      "train_shards": [os.path.join(train, records.shard_name("train", i, spec.num_shards))
                       for i in range(spec.num_shards)],
      "test_root": test_root,
      "test_name": name,
      "gnd_path": os.path.join(test_root, name, f"gnd_{name}.pkl"),
      "image_dir": os.path.join(test_root, name, "jpg"),
      "objects_path": (os.path.join(test_root, name, OBJECTS_NAME)
                       if spec.layout == "mixed" else None),
      "marker": os.path.join(root, MARKER),
  }


def marker_spec(spec: DemoSpec) -> dict[str, Any]:
  """The spec as the marker records it: every field for the mixed layout;
  for landmarks, without the mixed-only fields (they do not change its data,
  and leaving them out keeps its DONE.json as before the mixed layout)."""
  fields = dataclasses.asdict(spec)
  if spec.layout == "landmarks":
    for name in _MIXED_FIELDS:
      del fields[name]
  return fields


def _marker(spec: DemoSpec) -> dict[str, Any]:
  def keys(kind: int, n: int) -> list[list[int]]:
    return [[spec.seed, kind, i] for i in range(n)]
  if spec.layout == "mixed":
    n_background = spec.num_distractors // 2
    return {
        "version": VERSION,
        "spec": marker_spec(spec),
        "test_name": layout_test_name(spec),
        "scenes": {
            "train": keys(_TRAIN, spec.num_train_classes),
            "test": keys(_TEST, spec.num_test_landmarks),
            "distractor": keys(_DISTRACTOR, spec.num_distractors - n_background),
            "background_train": keys(_BACKGROUND_TRAIN, spec.num_backgrounds),
            "background_test": keys(_BACKGROUND_TEST, spec.num_backgrounds),
        },
        "objects": {
            "train": keys(_OBJECT_TRAIN, spec.num_object_classes),
            "test": keys(_OBJECT_TEST, spec.num_test_objects),
        },
        "labels": {
            "scene": [0, spec.num_train_classes],
            "object": [spec.num_train_classes,
                       spec.num_train_classes + spec.num_object_classes],
        },
        "counts": {
            "train": (spec.num_train_classes + spec.num_object_classes) * spec.views_per_class,
            "db": ((spec.num_test_landmarks + spec.num_test_objects)
                   * spec.db_views_per_landmark + spec.num_distractors),
            "queries": (spec.num_test_landmarks + spec.num_test_objects)
                       * spec.queries_per_landmark,
        },
    }
  return {
      "version": VERSION,
      "spec": marker_spec(spec),
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
  """Writes the demo dataset under `root` (replacing `train/` and `test/<name>/`,
  <name> "demo" for the landmarks layout, "mixed" for the mixed one).

  Files are built in a temporary folder, moved into place, and the marker
  `DONE.json` is written last, so a present marker means complete data.

  Returns:
    The paths (see `ensure_demo_data`).
  """
  root = os.path.abspath(os.fspath(root))
  os.makedirs(root, exist_ok=True)
  paths = _paths(root, spec)
  name = paths["test_name"]
  with contextlib.suppress(FileNotFoundError):
    os.remove(paths["marker"])
  tmp = tempfile.mkdtemp(prefix=".demo-gen-", dir=root)
  try:
    _write_train(os.path.join(tmp, "train"), spec)
    if spec.layout == "mixed":
      _write_test_mixed(os.path.join(tmp, name), spec)
    else:
      _write_test(os.path.join(tmp, name), spec)
    moves = [(os.path.join(tmp, "train"), paths["train_files"]),
             (os.path.join(tmp, name), os.path.join(paths["test_root"], name))]
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
  if marker.get("version") != VERSION or marker.get("spec") != marker_spec(spec):
    return False
  files = paths["train_shards"] + [paths["gnd_path"]]
  if paths.get("objects_path"):
    files.append(paths["objects_path"])
  return all(os.path.isfile(p) for p in files)


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

  Args:
    root: the data folder.
    spec: what to generate; `spec_for(layout)` gives each layout's default.

  Returns:
    A dict with `train_files` (the folder of TFRecord shards), `test_root`
    (the revisitop root), `test_name` ('demo' for landmarks, 'mixed' for the
    mixed layout), plus `train_shards`, `gnd_path`, `image_dir`,
    `objects_path` (the sidecar; None for landmarks), `marker` and `root`.
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
  parser = cli_util.ArgumentParser(prog="python -m qaff_jax.data.demo",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="root folder of the demo data")
  parser.add_argument("--force", action="store_true", help="regenerate even if present")
  for field in dataclasses.fields(DemoSpec):
    if field.name == "layout":
      parser.add_argument("--layout", choices=LAYOUTS, default="landmarks",
                          help="dataset layout (default: landmarks)")
      continue
    kind = type(field.default)  # int or str; annotations are strings here
    parser.add_argument("--" + field.name, type=kind, default=None,
                        help="default: the layout's (see spec_for)")
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSpec)
               if f.name != "layout" and getattr(args, f.name) is not None}
  spec = dataclasses.replace(spec_for(args.layout), **overrides)
  start = time.perf_counter()
  paths = generate(args.out, spec) if args.force else ensure_demo_data(args.out, spec)
  print(json.dumps({k: paths[k] for k in ("train_files", "test_root", "test_name")}))
  print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
