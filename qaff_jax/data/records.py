"""TFRecord files and `tf.train.Example` records, without TensorFlow.

The TFRecord framing (per record):
  uint64 length | uint32 masked_crc32c(length) | bytes data | uint32 masked_crc32c(data)
with masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32).

The `tf.train.Example` protobuf comes from tensorflow-datasets' TensorFlow-free copy.
GLDv2 records follow the DELF `build_image_dataset.py` layout (see SPEC.md).
Optional object boxes use the TF Object Detection API features
`image/object/bbox/{xmin,ymin,xmax,ymax}` (float lists, normalised to [0, 1]
by the image width / height); readers that do not know them ignore them.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Callable, Iterable, Iterator, Sequence

import google_crc32c
import numpy as np
from tensorflow_datasets.core.example_parser import tf_example_pb2

Example = tf_example_pb2.Example

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
  """One record framed as TFRecord bytes."""
  length = struct.pack("<Q", len(data))
  return (length + _FOOTER.pack(masked_crc32c(length)) + data
          + _FOOTER.pack(masked_crc32c(data)))


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes `records` to a TFRecord file atomically; returns how many."""
  path = os.fspath(path)
  tmp = path + ".tmp"
  n = 0
  with open(tmp, "wb") as f:
    for data in records:
      f.write(encode_record(data))
      n += 1
  os.replace(tmp, path)
  return n


class CorruptRecordError(ValueError):
  """A record whose framing or checksum is wrong."""


class RecordChecksumError(CorruptRecordError):
  """A record whose data checksum is wrong while its framing is intact.

  The file position is already past the bad record, so reading can go on with
  the next one. Any other `CorruptRecordError` leaves the rest of the file
  unreadable (the length is unknown or the file is cut short).
  """


def read_record_at(f, path: str, verify_crc: bool = True) -> bytes | None:
  """Reads one record from the open file `f`; None at a clean end of file.

  Raises CorruptRecordError (naming the file and offset) for a truncated record
  or a checksum mismatch.
  """
  offset = f.tell()
  header = f.read(_HEADER.size)
  if not header:
    return None
  if len(header) != _HEADER.size:
    raise CorruptRecordError(f"{path}: truncated record header at byte {offset}")
  length, length_crc = _HEADER.unpack(header)
  if verify_crc and masked_crc32c(header[:8]) != length_crc:
    raise CorruptRecordError(f"{path}: bad length checksum at byte {offset}")
  body = f.read(length + _FOOTER.size)
  if len(body) != length + _FOOTER.size:
    raise CorruptRecordError(f"{path}: truncated record at byte {offset} "
                             f"(wanted {length} bytes)")
  data = body[:length]
  if verify_crc and masked_crc32c(data) != _FOOTER.unpack(body[length:])[0]:
    raise RecordChecksumError(f"{path}: bad data checksum at byte {offset}")
  return data


def iter_tfrecord(path: str | os.PathLike, verify_crc: bool = True) -> Iterator[bytes]:
  """Yields the records of one TFRecord file (raises on corruption)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    while (data := read_record_at(f, path, verify_crc)) is not None:
      yield data


def iter_tfrecord_skipping(
    path: str | os.PathLike,
    on_corrupt: Callable[[CorruptRecordError], None] | None = None,
) -> Iterator[bytes]:
  """Yields the intact records of one TFRecord file, skipping corrupt ones.

  A record with a bad data checksum is skipped and reading goes on after it; a
  truncated record or a bad length checksum ends the file. `on_corrupt` is
  called once per skipped record (a cut-off tail counts as one).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    while True:
      try:
        data = read_record_at(f, path)
      except RecordChecksumError as e:
        if on_corrupt is not None:
          on_corrupt(e)
        continue
      except CorruptRecordError as e:
        if on_corrupt is not None:
          on_corrupt(e)
        return
      if data is None:
        return
      yield data


# --------------------------------------------------------------------------
# tf.train.Example in the GLDv2 (DELF) layout.


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One parsed GLDv2 training record."""
  encoded: bytes
  label: int
  image_id: str
  height: int = 0
  width: int = 0


def _bytes(feature, value: bytes):
  feature.bytes_list.value.append(value)


def _int(feature, value: int):
  feature.int64_list.value.append(int(value))


BOX_KEYS = ("image/object/bbox/xmin", "image/object/bbox/ymin",
            "image/object/bbox/xmax", "image/object/bbox/ymax")


def _check_boxes(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
  arr = np.asarray(boxes, np.float64)
  if arr.size == 0:
    return arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise ValueError(f"boxes must be [n, 4] (xmin, ymin, xmax, ymax), got shape {arr.shape}")
  if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
    raise ValueError(f"boxes must be normalised to [0, 1], got {arr.tolist()}")
  if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
    raise ValueError(f"boxes need xmin <= xmax and ymin <= ymax, got {arr.tolist()}")
  return arr


def make_gldv2_example(encoded: bytes, label: int, image_id: str,
                       height: int, width: int, channels: int = 3,
                       image_format: str = "JPEG",
                       colorspace: str = "RGB", *,
                       boxes: Sequence[Sequence[float]] | np.ndarray | None = None) -> bytes:
  """Serialises one image the way DELF's `build_image_dataset.py` does.

  Args:
    boxes: optional object boxes, [n, 4] (xmin, ymin, xmax, ymax) normalised
      to [0, 1] by the width / height, written as the TF Object Detection
      features `image/object/bbox/*` (float32). None (the default) writes no
      box features: the same bytes as without the argument.

  Raises:
    ValueError: malformed boxes.
  """
  ex = Example()
  feat = ex.features.feature
  _int(feat["image/height"], height)
  _int(feat["image/width"], width)
  _bytes(feat["image/colorspace"], colorspace.encode())
  _int(feat["image/channels"], channels)
  _bytes(feat["image/format"], image_format.encode())
  _bytes(feat["image/id"], image_id.encode())
  _bytes(feat["image/encoded"], encoded)
  _int(feat["image/class/label"], label)
  if boxes is not None:
    arr = _check_boxes(boxes)
    for column, key in enumerate(BOX_KEYS):
      feat[key].float_list.value.extend(float(v) for v in arr[:, column])
  return ex.SerializeToString(deterministic=True)  # map order fixed: same bytes every run


def parse_object_boxes(raw: bytes) -> np.ndarray:
  """The object boxes of a serialised Example (see `make_gldv2_example`).

  Returns:
    float32 [n, 4] (xmin, ymin, xmax, ymax) normalised; [0, 4] when the
    record has no box features.

  Raises:
    ValueError: not an Example, or box features of unequal lengths.
  """
  try:
    ex = Example.FromString(raw)
  except Exception as e:  # protobuf's DecodeError and friends
    raise ValueError(f"not a tf.train.Example ({type(e).__name__}: {e})") from None
  feat = ex.features.feature
  columns = [list(feat[k].float_list.value) if k in feat else [] for k in BOX_KEYS]
  lengths = {len(c) for c in columns}
  if len(lengths) != 1:
    raise ValueError("object box features have unequal lengths: " + ", ".join(
        f"{k}={len(c)}" for k, c in zip(BOX_KEYS, columns)))
  if not columns[0]:
    return np.zeros((0, 4), np.float32)
  return np.stack([np.asarray(c, np.float32) for c in columns], axis=1)


def parse_gldv2_example(raw: bytes) -> ImageRecord:
  """Parses a serialised GLDv2 `tf.train.Example`.

  Raises ValueError when the bytes are not an Example or required features
  (`image/encoded`, `image/class/label`) are missing.
  """
  try:
    ex = Example.FromString(raw)
  except Exception as e:  # protobuf's DecodeError and friends
    raise ValueError(f"not a tf.train.Example ({type(e).__name__}: {e})") from None
  feat = ex.features.feature

  def first(key, kind, default=None):
    if key not in feat or not getattr(feat[key], kind).value:
      if default is None:
        raise ValueError(f"record has no feature {key!r}")
      return default
    return getattr(feat[key], kind).value[0]

  image_id = first("image/id", "bytes_list", b"")
  return ImageRecord(
      encoded=first("image/encoded", "bytes_list"),
      label=int(first("image/class/label", "int64_list")),
      image_id=image_id.decode("utf-8", "replace"),
      height=int(first("image/height", "int64_list", 0)),
      width=int(first("image/width", "int64_list", 0)),
  )


def shard_name(prefix: str, index: int, num_shards: int) -> str:
  """DELF shard naming: `train-00003-of-00128`."""
  return f"{prefix}-{index:05d}-of-{num_shards:05d}"
