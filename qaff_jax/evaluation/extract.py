"""Descriptor extraction at full resolution, multi-scale, shape-bucketed and sharded.

Each image is first capped to `max_side` on its long side (never enlarged), then
resized by each scale s (default {1/sqrt2, 1, sqrt2}); each scale's descriptor
is L2-normalised, the scales are averaged and the mean is L2-normalised again.

Images of arbitrary sizes are padded up to a bucket (multiples of `bucket`
pixels per side) with a validity mask that the pooling respects, so a whole
dataset costs a handful of compilations instead of one per image. Every
process walks the same global schedule of batches and loads only its own rows;
batches become global arrays split over all devices.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from qaff_jax import parallel
from qaff_jax.data import transforms

DEFAULT_SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))
SCALE_REDUCES = ("mean", "max")   # over scales: the average, or SuperGlobal's max


def scaled_size(h: int, w: int, max_side: int, scale: float) -> tuple[int, int]:
  """Size after capping the long side at `max_side` and resizing by `scale`."""
  cap = min(1.0, max_side / max(h, w))
  return max(1, round(h * cap * scale)), max(1, round(w * cap * scale))


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if img.shape[:2] == tuple(size):
    return img
  return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))


def bucket_of(size: tuple[int, int], bucket: int) -> tuple[int, int]:
  return tuple(-(-s // bucket) * bucket for s in size)


def padded_rows(n: int, batch: int, devices: int) -> int:
  """Rows of a batch holding `n` jobs: a power-of-two multiple of the device
  count (at most `batch`), so a nearly empty bucket does not pay for a full
  batch and only a few batch sizes are ever compiled."""
  rows = devices
  while rows < n and rows < batch:
    rows *= 2
  return min(max(rows, devices), max(batch, devices))


def forward_program(graphdef, keys: Sequence[str] = ("descriptor",)):
  """The jitted extraction step `(net state, uint8 images [B,H,W,3], mask [B,H,W])
  -> {key: float32 [B, ...]}` of the network `graphdef` (compiled ahead of time
  for a TPU topology by `qaff_jax.aot`, run by `make_forward`)."""

  @jax.jit
  def fwd(state, images, mask):
    model = nnx.merge(graphdef, state)
    out = model(transforms.normalize_jnp(images), mask=mask)
    return {k: out[k].astype(jnp.float32) for k in keys if k in out}

  return fwd


def make_forward(net: nnx.Module, mesh, keys: Sequence[str] = ("descriptor",)):
  """A jitted `(uint8 images [B,H,W,3], mask [B,H,W]) -> {key: [B, ...]}` for `net`."""
  graphdef, state = nnx.split(net)
  # Inference replicates the weights on the mesh that splits the batches.
  state = jax.device_put(state, parallel.replicated(mesh))
  fwd = forward_program(graphdef, keys)
  return lambda images, mask: fwd(state, images, mask)


def batch_rows(batch_size: int, devices: int) -> int:
  """Rows of a full extraction batch: `batch_size` rounded up to the device count."""
  return -(-batch_size // devices) * devices


def _to_host(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def extract(forward: Callable, loaders: Sequence[Callable[[], np.ndarray]],
            sizes: Sequence[tuple[int, int]], *, mesh, max_side: int = 1024,
            scales: Sequence[float] = DEFAULT_SCALES, batch_size: int = 8,
            bucket: int = 64, scale_reduce: str = "mean") -> dict[str, np.ndarray]:
  """Multi-scale descriptors (and any other per-image outputs) for every image.

  `scale_reduce` combines the per-scale (L2-normalised) descriptors: "mean"
  (the field's standard) or "max", SuperGlobal's Scale-GeM (element-wise max
  over scales); either is L2-normalised at the end.

  Args:
    forward: from `make_forward`.
    loaders: `loaders[i]()` returns image i as uint8 HxWx3.
    sizes: `sizes[i]` = (height, width) of image i as the loader returns it.
  Returns:
    {key: [N, ...]} with "descriptor" L2-normalised; other keys are averaged
    over scales.
  """
  n = len(loaders)
  if scale_reduce not in SCALE_REDUCES:
    raise ValueError(f"scale_reduce={scale_reduce!r}; choose 'mean' or 'max'")
  if len(sizes) != n:
    raise ValueError(f"{len(sizes)} sizes for {n} images")
  devices = jax.device_count()
  global_bs = batch_rows(batch_size, devices)
  me = jax.process_index()

  # One job = (image, scale); group jobs of equal bucket into global batches.
  groups = defaultdict(list)
  for i, (h, w) in enumerate(sizes):
    for s in scales:
      size = scaled_size(h, w, max_side, s)
      groups[bucket_of(size, bucket)].append((i, size))

  sums: dict[str, np.ndarray] = {}
  cache: dict[int, np.ndarray] = {}
  for shape in sorted(groups):
    jobs = groups[shape]
    for start in range(0, len(jobs), global_bs):
      chunk = jobs[start:start + global_bs]
      rows = padded_rows(len(chunk), global_bs, devices)
      per_process = rows // jax.process_count()
      mine = range(me * per_process, (me + 1) * per_process)
      images = np.zeros((per_process, *shape, 3), np.uint8)
      mask = np.zeros((per_process, *shape), np.float32)
      for row, j in enumerate(mine):
        if j >= len(chunk):
          break
        i, (h, w) = chunk[j]
        if i not in cache:
          # One decoded image is kept: it serves the rare case of two scales of
          # one image in the same bucket. Usually the scales of an image land
          # in different buckets, so an image is decoded once per scale; that
          # keeps memory bounded by one batch instead of the whole dataset.
          cache.clear()
          cache[i] = loaders[i]()
        img = resize_to(cache[i], (h, w))
        images[row, :h, :w] = img
        mask[row, :h, :w] = 1.0
      batch = parallel.global_batch({"image": images, "mask": mask}, mesh)
      out = {k: _to_host(v) for k, v in forward(batch["image"], batch["mask"]).items()}
      for k, v in out.items():
        take_max = k == "descriptor" and scale_reduce == "max"
        if k not in sums:
          sums[k] = np.full((n, *v.shape[1:]), -np.inf if take_max else 0.0, np.float64)
        for j, (i, _) in enumerate(chunk):
          if take_max:
            np.maximum(sums[k][i], v[j], out=sums[k][i])
          else:
            sums[k][i] += v[j]
  result = {k: (v if k == "descriptor" and scale_reduce == "max" else v / len(scales)
                ).astype(np.float32) for k, v in sums.items()}
  if "descriptor" in result:
    d = result["descriptor"]
    result["descriptor"] = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
  return result
