"""Image transforms shared by the train and eval pipelines (numpy + PIL).

Images are `uint8` arrays of shape [H, W, 3] in RGB order. Random transforms
take a `np.random.Generator` (Grain's `random_map` hands one per element), so
they are deterministic given the pipeline seed.

Normalisation uses the ImageNet statistics on the 0-255 scale:
`(x - IMAGENET_MEAN) / IMAGENET_STD` with `x` the raw uint8 pixel values, which
equals torchvision's `ToTensor()` + `Normalize(mean=(0.485, ...), std=...)`.
The train pipeline yields uint8 images; the trainer normalises on device with
`normalize_jnp`, eval code on the host may use `normalize`.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

# ImageNet mean / std of RGB pixel values on the 0-255 scale.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # (123.675, 116.28, 103.53)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)   # (58.395, 57.12, 57.375)

_BILINEAR = Image.Resampling.BILINEAR
# ITU-R 601-2 luma, as PIL's "L" conversion and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def decode_image(data: bytes) -> np.ndarray:
  """Decodes JPEG/PNG/... bytes to a uint8 [H, W, 3] RGB array.

  Grayscale, palette, CMYK and RGBA/LA images are converted to RGB (alpha is
  dropped). EXIF orientation is not applied, as in TensorFlow's `decode_jpeg`
  that the GLDv2 reference pipelines use.

  Raises:
    ValueError: the bytes are not a decodable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _high_bit_depth_to_l(img)
      if img.mode != "RGB":
        img = img.convert("RGB")
      arr = np.asarray(img, dtype=np.uint8)
  except Image.UnidentifiedImageError:
    raise ValueError("undecodable image (unrecognised format)") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBomb...
    raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
  if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"decoded image has unexpected shape {arr.shape}")
  return arr


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
  """Rescales a 16/32-bit or float grayscale image to 8-bit "L"."""
  arr = np.asarray(img, dtype=np.float64)
  hi = float(arr.max()) if arr.size else 0.0
  scale = 255.0 / hi if hi > 255.0 else 1.0
  return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))


def _resize(img: np.ndarray, width: int, height: int,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """PIL bilinear resize (antialiased when shrinking) of `img` or a box of it."""
  pil = Image.fromarray(img).resize((width, height), _BILINEAR, box=box)
  return np.asarray(pil, dtype=np.uint8)


def random_resized_crop_params(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop box (top, left, h, w) with torchvision's semantics.

  Up to 10 tries for a box with area fraction in `scale` and aspect ratio
  (w/h, log-uniform) in `ratio` that fits in the image; otherwise a centre
  crop of the whole image clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: np.ndarray, size: int, rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision `RandomResizedCrop`: random box, bilinear resize to size×size."""
  top, left, h, w = random_resized_crop_params(
      img.shape[0], img.shape[1], rng, scale, ratio)
  return _resize(img, size, size, box=(left, top, left + w, top + h))


def random_flip(img: np.ndarray, rng: np.random.Generator,
                p: float = 0.5) -> np.ndarray:
  """Mirrors the image left-right with probability `p`."""
  if rng.uniform() < p:
    return np.ascontiguousarray(img[:, ::-1])
  return img


def _blend(img: np.ndarray, other: Any, factor: float) -> np.ndarray:
  return np.clip(factor * img + (1.0 - factor) * other, 0.0, 255.0)


def color_jitter(img: np.ndarray, rng: np.random.Generator,
                 brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0) -> np.ndarray:
  """torchvision `ColorJitter` without hue, in random order.

  Each factor is uniform in [max(0, 1 - s), 1 + s]; a strength of 0 leaves
  that property unchanged. Brightness blends with black, contrast with the
  mean grey level, saturation with the grayscale image.
  """
  ops = []
  if brightness > 0:
    ops.append(("brightness", rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
  if contrast > 0:
    ops.append(("contrast", rng.uniform(max(0.0, 1 - contrast), 1 + contrast)))
  if saturation > 0:
    ops.append(("saturation", rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
  if not ops:
    return img
  x = img.astype(np.float32)
  for i in rng.permutation(len(ops)):
    name, factor = ops[i]
    if name == "brightness":
      x = _blend(x, 0.0, factor)
    elif name == "contrast":
      x = _blend(x, float((x @ _LUMA).mean()), factor)
    else:
      x = _blend(x, (x @ _LUMA)[..., None], factor)
  return np.round(x).astype(np.uint8)


def resize_long_side(img: np.ndarray, max_side: int,
                     upscale: bool = False) -> np.ndarray:
  """Resizes (bilinear) so the longer side is `max_side`, keeping aspect.

  Images already within `max_side` are returned unchanged unless `upscale`.
  """
  h, w = img.shape[:2]
  long_side = max(h, w)
  if long_side == max_side or (long_side < max_side and not upscale):
    return img
  s = max_side / long_side
  return _resize(img, max(1, int(round(w * s))), max(1, int(round(h * s))))


def center_crop_resize(img: np.ndarray, size: int,
                       crop_fraction: float = 1.0) -> np.ndarray:
  """Crops the central square (side = crop_fraction × short side), resizes to size×size."""
  h, w = img.shape[:2]
  side = max(1, int(round(min(h, w) * crop_fraction)))
  top, left = (h - side) // 2, (w - side) // 2
  return _resize(img, size, size, box=(left, top, left + side, top + side))


def normalize(img: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] → float32 `(x - IMAGENET_MEAN) / IMAGENET_STD` (numpy)."""
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return (np.asarray(img, np.float32) - mean) / std


def normalize_jnp(x, dtype=None):
  """Same as `normalize` with jax.numpy, for use on device inside `jax.jit`.

  Args:
    x: uint8 (or float, on the 0-255 scale) array with trailing RGB axis.
    dtype: result dtype (default float32); computed in float32 first.
  """
  # Imported here so Grain worker processes, which import this module, do not
  # pay for importing jax.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  y = (jnp.asarray(x).astype(jnp.float32) - mean) / std
  return y if dtype is None else y.astype(dtype)
