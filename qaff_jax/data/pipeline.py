"""GLDv2 training input pipeline on Grain (no TensorFlow).

    ds = make_train_dataset(config.data, local_batch_size=32, seed=0,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
    it = iter(ds)   # checkpointable: grain.checkpoint.CheckpointSave(it)
    batch = next(it)  # {'image': uint8 [B,S,S,3], 'label': int32 [B], 'skipped': int32 [B]}

TFRecord shards: this process's files (files[process_index::process_count]),
read by checkpointable per-file readers that verify CRCs, interleaved across
files, repeated forever (file order reshuffled each epoch with seed + epoch),
window-shuffled, then parsed, decoded and augmented, then batched.

ArrayRecord shards: one random-access source over all files, globally
shuffled (reshuffled each epoch), repeated, sliced per process, then the same
parse/decode/augment and batching.

Corrupt records (bad CRC, truncated file, not a tf.train.Example, missing
features, undecodable image) never stop training: each is logged once and
skipped; `skipped[i]` counts the corrupt records dropped just before element i
in its stream, so summing `skipped` over all batches gives the total. Records
dropped by the class allowlist are not counted. Data that can never yield an
element fails instead of looping: shards without a single readable record
(zero-length files, e.g. an interrupted copy) when the dataset is built, and
`MAX_CONSECUTIVE_SKIPS` bad records in a row while iterating.

Images are uint8; normalise on device with `transforms.normalize_jnp`.
Paths are local (or FUSE-mounted) files. Memory: the TFRecord shuffle window
holds `shuffle_buffer` encoded records per worker process.
"""

from __future__ import annotations

import bisect
import glob
import logging
import os
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np

from qaff_jax.data import records
from qaff_jax.data import transforms

log = logging.getLogger(__name__)

ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
SHARD_GLOB = "train-*-of-*"
DEFAULT_CYCLE_LENGTH = 16
# A stream that yields this many corrupt/dropped records in a row without one
# usable element is broken (e.g. every record fails): raise instead of looping.
MAX_CONSECUTIVE_SKIPS = 10_000
_MAX_NAMED_FILES = 4  # shards named in error messages

_OK, _CORRUPT, _DROPPED = 0, 1, 2


# --------------------------------------------------------------------------
# Files and config.


def resolve_files(pattern: str) -> list[str]:
  """Expands `pattern` into a sorted list of shard files.

  Args:
    pattern: a glob, a comma-separated list of globs/paths, or a directory
      holding `train-*-of-*` shards.

  Raises:
    FileNotFoundError: nothing matched.
  """
  files = set()
  for part in (p.strip() for p in str(pattern or "").split(",")):
    if not part:
      continue
    if os.path.isdir(part):
      matches = glob.glob(os.path.join(part, SHARD_GLOB))
    else:
      matches = glob.glob(part)
    # `.tmp` files are unfinished writes (records.write_tfrecord).
    files.update(m for m in matches if os.path.isfile(m) and not m.endswith(".tmp"))
  if not files:
    raise FileNotFoundError(
        f"no shard matched train_files={pattern!r} (expected a glob, a comma "
        f"list of files, or a directory holding {SHARD_GLOB} shards)")
  return sorted(files)


def detect_format(files: Sequence[str], fmt: str = "auto") -> str:
  """'tfrecord' or 'arrayrecord'; 'auto' decides by the file extension."""
  fmt = (fmt or "auto").lower().replace("_", "")
  if fmt in ("tfrecord", "arrayrecord"):
    return fmt
  if fmt != "auto":
    raise ValueError(f"unknown data format {fmt!r}: "
                     "expected 'tfrecord', 'arrayrecord' or 'auto'")
  is_ar = [f.endswith(ARRAY_RECORD_SUFFIXES) for f in files]
  if all(is_ar):
    return "arrayrecord"
  if any(is_ar):
    raise ValueError("train_files mixes ArrayRecord and TFRecord shards: "
                     f"{list(files)[:4]}...")
  return "tfrecord"


def read_class_allowlist(path: str) -> list[int]:
  """Reads a label allowlist: one integer per line ('#' comments, blanks ok).

  Returns the sorted unique labels.
  """
  labels = set()
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      try:
        labels.add(int(line))
      except ValueError:
        raise ValueError(f"{path}:{lineno}: not an integer label: {line!r}") from None
  if not labels:
    raise ValueError(f"class allowlist {path} lists no labels")
  return sorted(labels)


def num_classes(data_cfg: Any) -> int:
  """Classes the model must predict: the allowlist size when relabelling."""
  path = _get(data_cfg, "class_allowlist", "")
  if path and _get(data_cfg, "relabel", False):
    return len(read_class_allowlist(path))
  return int(data_cfg.num_classes)


def _name_files(files: Sequence[str]) -> str:
  """The first few of `files`, comma separated, then how many more."""
  named = ", ".join(files[:_MAX_NAMED_FILES])
  more = len(files) - _MAX_NAMED_FILES
  return named + (f" (+{more} more)" if more > 0 else "")


def _no_record_error(files: Sequence[str], context: str = "") -> ValueError:
  return ValueError(f"no record in any of the {len(files)} shards{context}: "
                    f"{_name_files(files)}")


def _warn_empty(files: Sequence[str]) -> list[str]:
  """Logs the zero-length files among `files` (a cheap stat); returns them."""
  empty = [f for f in files if os.path.getsize(f) == 0]
  if empty:
    log.warning("%d of %d shards are empty (zero-length; an interrupted copy?): %s",
                len(empty), len(files), _name_files(empty))
  return empty


def _tfrecord_has_record(path: str) -> bool:
  """Whether the TFRecord file `path` holds at least one intact record.

  Reads up to the first intact record, normally just the first one: records
  with a bad data checksum are stepped over, while a clean end of file, a
  cut-off or garbled header, or a truncated record mean the reader would
  never yield anything from this file.
  """
  if os.path.getsize(path) == 0:
    return False
  with open(path, "rb") as f:
    while True:
      try:
        return records.read_record_at(f, path) is not None
      except records.RecordChecksumError:
        continue
      except records.CorruptRecordError:
        return False


def check_tfrecord_shards(files: Sequence[str], context: str = "") -> None:
  """Fails at once when not one of `files` holds a readable record.

  Without this, training on only empty shards spins forever: the repeated
  interleave yields nothing, so no skip counter ever fires. Stops at the first
  shard with a record, so a healthy dataset costs one stat per file and one
  record read.

  Raises:
    ValueError: "no record in any of the N shards: <first few files>".
  """
  _warn_empty(files)
  if not any(_tfrecord_has_record(f) for f in files):
    raise _no_record_error(files, context)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  value = getattr(cfg, name, default)
  return default if value is None else value


def _derived_seeds(seed: int, n: int) -> list[int]:
  """`n` independent 31-bit seeds from one seed (room for + epoch/window)."""
  state = np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)
  return [int(s) >> 1 for s in state]


# --------------------------------------------------------------------------
# TFRecord: a checkpointable per-file reader.


class TFRecordFileDataset(grain.IterDataset):
  """One TFRecord file as an `IterDataset` of `{'raw', 'source'}` dicts.

  CRCs are verified. A record with a bad data CRC yields `raw=None` and
  reading continues after it; a truncated record or a bad length CRC yields
  one `raw=None` and ends the file. Each such record is logged. The iterator
  state is the byte offset, so restoring seeks straight back.
  """

  def __init__(self, path: str):
    super().__init__()
    self._path = os.fspath(path)

  def __iter__(self) -> "_TFRecordFileIterator":
    return _TFRecordFileIterator(self._path)

  def __str__(self) -> str:
    return f"TFRecordFileDataset({self._path})"


class _TFRecordFileIterator(grain.DatasetIterator):
  """Reads records one by one; state = (byte offset, record index, done)."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path
    self._file = None
    self._offset = 0
    self._index = 0
    self._done = False

  def _open(self):
    if self._file is None:
      self._file = open(self._path, "rb")
      self._file.seek(self._offset)
    return self._file

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    f = self._open()
    source = f"{self._path} record {self._index} (byte {self._offset})"
    try:
      data = records.read_record_at(f, self._path)
      if data is None:  # clean end of file
        self._done = True
        self._close_file()
        raise StopIteration
    except records.RecordChecksumError as e:  # framing intact: go on after it
      log.warning("skipping corrupt record: %s", e)
      self._offset = f.tell()
      self._index += 1
      return {"raw": None, "source": source, "error": str(e)}
    except records.CorruptRecordError as e:  # rest of the file unreadable
      log.warning("skipping the rest of a corrupt file (counted as 1 record): %s", e)
      self._done = True
      self._close_file()
      return {"raw": None, "source": source, "error": str(e)}
    self._offset = f.tell()
    self._index += 1
    return {"raw": data, "source": source}

  def get_state(self) -> dict[str, Any]:
    return {"offset": self._offset, "index": self._index, "done": int(self._done)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._offset = int(state["offset"])
    self._index = int(state["index"])
    self._done = bool(state["done"])
    if self._file is not None:
      self._file.seek(self._offset)

  def _close_file(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> None:
    self._close_file()
    super().close()

  def __str__(self) -> str:
    return f"TFRecordFileIterator({self._path})"


# --------------------------------------------------------------------------
# ArrayRecord: a random-access source that never raises on a bad record.


class ArrayRecordSource:
  """ArrayRecord shards as a random-access source of `{'raw', 'source'}` dicts.

  A record that cannot be read yields `raw=None` (logged) instead of raising.
  """

  def __init__(self, paths: Sequence[str]):
    # pylint: disable=g-import-not-at-top
    from array_record.python import array_record_module
    # pylint: enable=g-import-not-at-top
    self._paths = [os.fspath(p) for p in paths]
    self._source = grain.sources.ArrayRecordDataSource(self._paths)
    self._starts = [0]
    for path in self._paths:
      reader = array_record_module.ArrayRecordReader(path)
      self._starts.append(self._starts[-1] + reader.num_records())
      reader.close()
    if self._starts[-1] != len(self._source):
      raise RuntimeError(f"ArrayRecord record count mismatch over {self._paths}")

  def __len__(self) -> int:
    return self._starts[-1]

  def _where(self, index: int) -> str:
    i = bisect.bisect_right(self._starts, index) - 1
    return f"{self._paths[i]} record {index - self._starts[i]}"

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    try:
      raw = self._source[index]
    except Exception as e:  # a corrupt chunk: skip, never crash the run
      log.warning("skipping unreadable record %s: %s: %s", self._where(index),
                  type(e).__name__, e)
      return {"raw": None, "source": self._where(index),
              "error": f"{type(e).__name__}: {e}"}
    return {"raw": raw, "source": self._where(index)}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self._paths)} files, {len(self)} records)"


# --------------------------------------------------------------------------
# Parse + decode + augment, and the skip counter.


class TrainTransform:
  """`random_map` function: raw record → augmented uint8 image and label.

  Returns a dict with 'status' (_OK, _CORRUPT or _DROPPED); corrupt records
  are logged here (parse or decode failures) or were logged by the reader, and
  carry 'source' and 'error' so that a stream of nothing but bad records can
  name the last one.
  """

  def __init__(self, image_size: int, min_scale: float = 0.2,
               color_jitter: float = 0.0,
               allowed_labels: Sequence[int] | None = None,
               relabel: bool = False):
    self.image_size = int(image_size)
    self.min_scale = float(min_scale)
    self.color_jitter = float(color_jitter)
    self.allowed = None if allowed_labels is None else frozenset(allowed_labels)
    self.label_map = None
    if allowed_labels is not None and relabel:
      self.label_map = {lab: i for i, lab in enumerate(sorted(self.allowed))}

  def __call__(self, element: dict[str, Any],
               rng: np.random.Generator) -> dict[str, Any]:
    raw, source = element["raw"], element["source"]
    if raw is None:
      return _corrupt(source, element.get("error", "unreadable record"))
    try:
      rec = records.parse_gldv2_example(raw)
    except ValueError as e:
      log.warning("skipping corrupt record %s: %s", source, e)
      return _corrupt(source, e)
    label = rec.label
    if self.allowed is not None and label not in self.allowed:
      return {"status": _DROPPED}
    if label < 0:
      log.warning("skipping record %s (id %r): negative label %d", source,
                  rec.image_id, label)
      return _corrupt(source, f"id {rec.image_id!r}: negative label {label}")
    if self.label_map is not None:
      label = self.label_map[label]
    try:
      img = transforms.decode_image(rec.encoded)
    except ValueError as e:
      log.warning("skipping record %s (id %r): %s", source, rec.image_id, e)
      return _corrupt(source, f"id {rec.image_id!r}: {e}")
    img = transforms.random_resized_crop(img, self.image_size, rng,
                                         scale=(self.min_scale, 1.0))
    img = transforms.random_flip(img, rng)
    if self.color_jitter > 0:
      s = self.color_jitter
      img = transforms.color_jitter(img, rng, brightness=s, contrast=s, saturation=s)
    return {"status": _OK, "image": img, "label": np.int32(label)}


def _corrupt(source: str, error: Any) -> dict[str, Any]:
  return {"status": _CORRUPT, "source": source, "error": str(error)}


class SkipCountIterDataset(grain.IterDataset):
  """Drops non-OK elements; attaches to each kept one how many corrupt preceded it.

  Output elements: `{'image', 'label', 'skipped'}`. Corrupt records still
  pending when a finite stream ends are not reported. `files` (the shards the
  stream reads) are named when `MAX_CONSECUTIVE_SKIPS` bad records in a row
  stop it.
  """

  def __init__(self, parent: grain.IterDataset, files: Sequence[str] = ()):
    super().__init__(parent)
    self._files = list(files)

  def __iter__(self) -> "_SkipCountIterator":
    return _SkipCountIterator(self._parent.__iter__(), self._files)

  def __str__(self) -> str:
    return "SkipCountIterDataset"


class _SkipCountIterator(grain.DatasetIterator):
  """Stateless beyond its parent: nothing is pending between elements."""

  def __init__(self, parent: grain.DatasetIterator, files: Sequence[str] = ()):
    super().__init__(parent)
    self._files = list(files)

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    last_bad = None
    for _ in range(MAX_CONSECUTIVE_SKIPS):
      element = next(self._parent)
      status = element["status"]
      if status == _OK:
        return {"image": element["image"], "label": element["label"],
                "skipped": np.int32(skipped)}
      if status == _CORRUPT:
        skipped += 1
        last_bad = element
    dropped = MAX_CONSECUTIVE_SKIPS - skipped
    if last_bad is None:
      last = "no corrupt record: all were dropped by the class allowlist"
    else:
      last = (f"last corrupt record: {last_bad.get('source', '?')}: "
              f"{last_bad.get('error', '?')}")
    files = (f"; {len(self._files)} shard(s): {_name_files(self._files)}"
             if self._files else "")
    raise RuntimeError(
        f"{MAX_CONSECUTIVE_SKIPS} records in a row were corrupt ({skipped}) or "
        f"dropped by the class allowlist ({dropped}); {last}{files}; check the "
        "data files and the allowlist")

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return "SkipCountIterator"


# --------------------------------------------------------------------------
# The training dataset.


def make_train_dataset(data_cfg: Any, *, local_batch_size: int, seed: int,
                       process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The infinite, checkpointable GLDv2 training dataset of this process.

  Args:
    data_cfg: attribute-accessible config with `train_files`, `format`,
      `image_size`, `shuffle_buffer`, `min_scale`, `color_jitter`,
      `num_workers`, `class_allowlist` ('' for none) and `relabel`; optional
      `cycle_length` (files read concurrently, TFRecord only).
    local_batch_size: batch size of this process.
    seed: pipeline seed; the same seed gives identical batches.
    process_index: this process's index (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    An `IterDataset` of `{'image': uint8 [B,S,S,3], 'label': int32 [B],
    'skipped': int32 [B]}`; its iterator works with `grain.checkpoint`.

  Process count: with ArrayRecord (random access) the global batches, i.e.
  the union of all processes' batch t, are the same examples with the same
  augmentation for any process count (while no record is skipped as corrupt:
  a skipped record shifts only its own process's stream). TFRecord files are
  streamed, and each process reads its own files, so there the global order
  depends on the process count; convert with `python -m qaff_jax.data.convert`
  where a run must give the same batches on slices of different sizes.

  Raises:
    FileNotFoundError: no shard matched `train_files`.
    ValueError: a process got no TFRecord file, not one of its shards holds a
      readable record ("no record in any of the N shards: ..."; checked here,
      before any step), or a bad config value.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if local_batch_size <= 0:
    raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")
  pattern = _get(data_cfg, "train_files", "")
  files = resolve_files(pattern)
  fmt = detect_format(files, _get(data_cfg, "format", "auto"))

  allowlist_path = _get(data_cfg, "class_allowlist", "")
  allowed = read_class_allowlist(allowlist_path) if allowlist_path else None
  transform = TrainTransform(
      image_size=int(data_cfg.image_size),
      min_scale=float(_get(data_cfg, "min_scale", 0.2)),
      color_jitter=float(_get(data_cfg, "color_jitter", 0.0)),
      allowed_labels=allowed,
      relabel=bool(_get(data_cfg, "relabel", False)))
  seed = int(seed) % 2**32
  window_seed, aug_seed = _derived_seeds(seed, 2)

  if fmt == "tfrecord":
    my_files = files[process_index::process_count]
    if not my_files:
      raise ValueError(
          f"process {process_index} of {process_count} got no TFRecord file: "
          f"train_files={pattern!r} matched only {len(files)} file(s); use at "
          "least as many shards as processes")
    check_tfrecord_shards(my_files, context=(
        f" of process {process_index} of {process_count}" if process_count > 1 else ""))
    readers = (grain.MapDataset.source(my_files)
               .shuffle(seed=seed)  # per-epoch seed = seed + epoch
               .repeat()
               .map(TFRecordFileDataset))
    cycle = int(_get(data_cfg, "cycle_length", DEFAULT_CYCLE_LENGTH))
    ds = grain.experimental.InterleaveIterDataset(
        readers, cycle_length=max(1, min(cycle, len(my_files))))
    window = int(_get(data_cfg, "shuffle_buffer", 0))
    if window > 1:
      ds = grain.experimental.WindowShuffleIterDataset(
          ds, window_size=window, seed=window_seed)
    ds = ds.random_map(transform, seed=aug_seed)
    stream_files = my_files
  else:
    # A zero-length ArrayRecord file cannot even be opened; it holds nothing.
    empty = set(_warn_empty(files))
    if len(empty) == len(files):
      raise _no_record_error(files)
    source = ArrayRecordSource([f for f in files if f not in empty])
    if len(source) == 0:
      raise _no_record_error(files)
    stream_files = files
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed)  # per-epoch seed = seed + epoch
          .repeat())
    # Augmentation before the process split: its rng is keyed by the element's
    # index in the global stream, so global batch t is the same examples with
    # the same crops for any process count (process p takes elements
    # p, p + P, ...; its batch t holds global elements t*G .. (t+1)*G - 1 for
    # global batch G = P * local batch).
    ds = ds.random_map(transform, seed=aug_seed)
    ds = ds[process_index::process_count]
    # Threads decode ahead; bound the buffer of decoded images (Grain's
    # default of 500 is ~400 MB per worker at 512 px).
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=16, prefetch_buffer_size=max(64, 2 * local_batch_size)))

  ds = SkipCountIterDataset(ds, stream_files)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  num_workers = int(_get(data_cfg, "num_workers", 0))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker start-up reads its absl flags; outside an absl app
      # (notebooks, tests) use their defaults instead of crashing.
      log.info("absl flags not parsed; using defaults for Grain's flags")
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds
