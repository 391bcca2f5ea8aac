"""A searchable index of a folder of images, built and updated incrementally.

`update_index(index_dir, images_root, workdir=...)` walks `images_root`
(recursively; .jpg .jpeg .png .webp in any case), and extracts descriptors of
the files that are new or changed since the last run (same relative path,
size and mtime = unchanged) with the run's network, multi-scale and
shape-bucketed over all devices (`evaluation.extract`, settings from the
run's `config.eval`). Deleted files drop out. A file that does not decode is
listed with its error (and not retried until it changes); it never stops the
run.

Resumable: images are extracted in chunks of `CHUNK_IMAGES`; each finished
chunk is written at once (temp file + `os.replace`) under `chunks/`, so a
killed run (even `kill -9`) loses at most the chunk in flight, and the next
run merges the chunks and extracts only what is still missing. A finished run
writes one consolidated generation and then removes the chunks.

The index folder (one generation G is current; `index.json` names it and is
always replaced last, so a reader sees a whole generation or the previous
one):
  index.json          version, generation, images root, model (workdir,
                      checkpoint step, fingerprint, extraction settings,
                      QAFF grid / scales), counts, unreadable files
  config.json         the run's config (what the network was built from)
  descriptors-G.npz   paths (relative, posix), sizes (bytes), mtimes (ns),
                      descriptor [N, D] float32 (L2-normalised), and for QAFF
                      runs fusion_weights [N, 1+g^2+S]; rows sorted by path
                      (row number = image id)
  scann-G/            a ScaNN index over the descriptors, only when the
                      collection holds at least `SCANN_MIN_IMAGES` images
                      (exact search below that)
  chunks/             work in progress of an unfinished run
  thumbs/             thumbnails the web page caches

Descriptors of one index always come from one model: the fingerprint hashes
the run's config, the checkpoint step and its commit time, and the extraction
settings; re-indexing with another one raises `IndexMismatchError` unless
`rebuild=True` (then everything is re-extracted).

Query images go through the same decoding as indexed ones (`read_image`):
EXIF orientation applied, the long side capped at `config.eval.max_side`
(JPEGs are decoded at a reduced DCT scale when that is enough), an optional
box crop in pixels of the upright image first. So a database image's own
file as the query gives its stored descriptor (score 1).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The one switch between exact and approximate search: collections with at
# least this many images get a ScaNN index (exact NumPy search of a single
# query over 20k x 2048 floats takes ~10 ms; ScaNN's build and its recall
# loss start to pay off above that).
SCANN_MIN_IMAGES = 20_000
# Images decoded and extracted per saved chunk: the work a kill can lose, and
# (x max_side^2 x 3 bytes) the decoded images held in memory at once, twice
# (the next chunk is decoded while this one is extracted).
CHUNK_IMAGES = 64

INDEX_FILE = "index.json"
CONFIG_FILE = "config.json"
CHUNKS_DIR = "chunks"
THUMBS_DIR = "thumbs"
LOCK_FILE = ".lock"


class IndexMismatchError(ValueError):
  """The index was built with another model, settings or images folder."""


# ---------------------------------------------------------------------------
# Files.


@dataclasses.dataclass(frozen=True)
class FileStat:
  path: str      # relative to the images root, '/'-separated
  size: int      # bytes
  mtime_ns: int


def _inside(path: str, root: str) -> bool:
  real, base = os.path.realpath(path), os.path.realpath(root)
  return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def scan_images(root: str, exclude: Sequence[str] = ()) -> list[FileStat]:
  """Every image file under `root` (recursive, extension case-insensitive),
  sorted by relative path. Folders in `exclude` (e.g. an index folder inside
  the images folder) and links leading outside `root` are skipped; hidden
  files and folders (a leading '.') too."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root}: not a folder")
  skip = {os.path.realpath(p) for p in exclude}
  found = []
  for here, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and os.path.realpath(os.path.join(here, d)) not in skip)
    for name in files:
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      full = os.path.join(here, name)
      if not _inside(full, root):
        continue
      try:
        st = os.stat(full)
      except OSError:  # vanished or a dangling link
        continue
      rel = os.path.relpath(full, root).replace(os.sep, "/")
      found.append(FileStat(rel, int(st.st_size), int(st.st_mtime_ns)))
  return sorted(found, key=lambda f: f.path)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
  """'x0,y0,x1,y1' -> 4 floats with x0 < x1, y0 < y1 (None -> None)."""
  if text is None or not str(text).strip():
    return None
  try:
    box = tuple(float(v) for v in str(text).split(","))
  except ValueError:
    box = ()
  if len(box) != 4 or not all(math.isfinite(v) for v in box):
    raise ValueError(f"box {text!r}: expected x0,y0,x1,y1 (4 numbers)")
  if not (box[0] < box[2] and box[1] < box[3]):
    raise ValueError(f"box {text!r}: need x0 < x1 and y0 < y1")
  return box


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    arr = np.asarray(img, np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    img = Image.fromarray(np.clip(arr * (255.0 / hi if hi > 255 else 1.0), 0, 255)
                          .round().astype(np.uint8))
  return img if img.mode == "RGB" else img.convert("RGB")


def read_image(source: str | bytes, *, max_side: int,
               box: Sequence[float] | None = None,
               nbox: Sequence[float] | None = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
  """Decodes an image the way the index sees it.

  Args:
    source: a file path or the file's bytes.
    max_side: the long side is capped at this (never enlarged).
    box: crop (x0, y0, x1, y1) in pixels of the upright full image, rounded
      as the revisited query crop rounds (`revisited.crop_box`).
    nbox: the same box as fractions of the width / height (the web page).
  Returns:
    (uint8 RGB [h, w, 3] with h, w = `extract.scaled_size(...)` of the
    (cropped) upright image, (H, W) of the upright full image).
  Raises:
    ValueError: not a decodable image, or a box with no pixels inside.
  """
  from qaff_jax.data import revisited
  from qaff_jax.evaluation import extract as extract_lib
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
      turned = _orientation(im) in (5, 6, 7, 8)
      full = (im.height, im.width) if turned else im.size   # upright (W, H)
      if box is None and nbox is None and im.format == "JPEG":
        cap = min(1.0, max_side / max(im.size))
        im.draft("RGB", (math.ceil(im.width * cap), math.ceil(im.height * cap)))
      im.load()
      img = _to_rgb(_upright(im))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
          Image.UnidentifiedImageError) as e:
    raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
  width, height = full
  if nbox is not None:
    box = (nbox[0] * width, nbox[1] * height, nbox[2] * width, nbox[3] * height)
  if box is not None:
    x0, y0, x1, y1 = revisited.crop_box(box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width, x1), min(height, y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
      raise ValueError(f"box {tuple(box)} has no pixels inside the "
                       f"{width}x{height} image")
    img = img.crop((x0, y0, x1, y1))
    width, height = x1 - x0, y1 - y0
  h, w = extract_lib.scaled_size(height, width, max_side, 1.0)
  if img.size != (w, h):
    img = img.resize((w, h), Image.Resampling.BILINEAR)
  return np.asarray(img, np.uint8), (full[1], full[0])


def _orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(0x0112, 1))
  except Exception:  # a broken EXIF block is no reason to drop the image
    return 1


def _upright(im: Image.Image) -> Image.Image:
  if _orientation(im) == 1:
    return im
  try:
    return ImageOps.exif_transpose(im)
  except Exception:
    return im


# ---------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class ModelInfo:
  """What identifies the descriptors a run gives (no weights loaded)."""
  workdir: str
  step: int
  config: Any                 # ml_collections.ConfigDict
  settings: Any               # runner.ExtractSettings
  fingerprint: str
  fusion: dict | None         # QAFF: {"grid": g, "scales": [...], "labels": [...]}

  def describe(self) -> str:
    return f"{self.workdir} step {self.step} (extraction {self.settings.key()})"


def model_info(workdir: str, step: int | None = None) -> ModelInfo:
  """The run's config, checkpoint step (default: latest) and fingerprint."""
  from qaff_jax import checkpoint as ckpt_lib
  from qaff_jax import state as state_lib
  from qaff_jax.evaluation import runner
  workdir = os.path.abspath(workdir)
  config = state_lib.load_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if step is None:
    if not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoints (is --workdir a training run?)")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=10**6, async_save=False)
    try:
      step = ckpt.latest_step()
    finally:
      ckpt.close()
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint")
  meta_path = os.path.join(ckpt_dir, str(step), "_CHECKPOINT_METADATA")
  if not os.path.isdir(os.path.join(ckpt_dir, str(step))):
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint of step {step}")
  commit = b""
  if os.path.isfile(meta_path):
    with open(meta_path, "rb") as f:
      commit = f.read()
  settings = runner.ExtractSettings.from_config(config.eval)
  digest = hashlib.sha1()
  for part in (json.dumps(config.to_dict(), sort_keys=True, default=str).encode(),
               str(step).encode(), commit, settings.key().encode()):
    digest.update(part)
    digest.update(b"\0")
  fusion = None
  if config.model.head == "qaff":
    from qaff_jax.evaluation import fusion_stats
    from qaff_jax.models import qaff
    qs = qaff.settings_from_config(config.model)
    fusion = {"grid": int(qs.grid), "scales": [float(s) for s in qs.scales],
              "labels": fusion_stats.feature_labels(qs.grid, qs.scales)}
  return ModelInfo(workdir=workdir, step=int(step), config=config, settings=settings,
                   fingerprint=digest.hexdigest()[:20], fusion=fusion)


class Extractor:
  """The run's network, loaded once: images -> descriptors (+ fusion weights)."""

  def __init__(self, info: ModelInfo):
    from qaff_jax.evaluation import extract as extract_lib
    from qaff_jax.evaluation import runner
    self.info = info
    _, net, self.mesh, _ = runner.load_network(info.workdir, config=info.config,
                                               step=info.step)
    self._forward = extract_lib.make_forward(net, self.mesh,
                                             keys=("descriptor", "fusion_weights"))
    self.images_extracted = 0   # counts images run through the network

  def __call__(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """{"descriptor": [n, D], maybe "fusion_weights": [n, K]} of decoded images."""
    from qaff_jax.evaluation import extract as extract_lib
    s = self.info.settings
    out = extract_lib.extract(self._forward, [lambda x=x: x for x in images],
                              [x.shape[:2] for x in images], mesh=self.mesh,
                              max_side=s.max_side, scales=s.scales,
                              batch_size=s.batch_size, bucket=s.bucket,
                              scale_reduce=s.scale_reduce)
    self.images_extracted += len(images)
    return out

  def describe(self, source: str | bytes, *, box=None, nbox=None) -> dict[str, Any]:
    """One query image -> {"descriptor" [D], "fusion_weights" [K] or None,
    "size" (H, W) of the upright full image}."""
    img, size = read_image(source, max_side=self.info.settings.max_side, box=box,
                           nbox=nbox)
    out = self([img])
    fw = out.get("fusion_weights")
    return {"descriptor": out["descriptor"][0],
            "fusion_weights": None if fw is None else fw[0], "size": size}


# ---------------------------------------------------------------------------
# Tables of extracted images.


@dataclasses.dataclass
class Table:
  """Rows of extracted images, and the files that failed."""
  paths: list[str]
  sizes: np.ndarray         # int64 [n]
  mtimes: np.ndarray        # int64 [n]
  descriptor: np.ndarray    # float32 [n, D]
  fusion: np.ndarray | None  # float32 [n, K]
  failed: list[dict]        # {"path", "size", "mtime_ns", "error"}

  def arrays(self) -> dict[str, np.ndarray]:
    out = {"paths": np.asarray(self.paths, dtype=str).reshape(-1),
           "sizes": np.asarray(self.sizes, np.int64), "mtimes": np.asarray(self.mtimes, np.int64),
           "descriptor": np.asarray(self.descriptor, np.float32),
           "failed_paths": np.asarray([f["path"] for f in self.failed], dtype=str).reshape(-1),
           "failed_sizes": np.asarray([f["size"] for f in self.failed], np.int64),
           "failed_mtimes": np.asarray([f["mtime_ns"] for f in self.failed], np.int64),
           "failed_errors": np.asarray([f["error"] for f in self.failed], dtype=str).reshape(-1)}
    if self.fusion is not None:
      out["fusion_weights"] = np.asarray(self.fusion, np.float32)
    return out


def _read_table(path: str) -> tuple[Table, str]:
  with np.load(path, allow_pickle=False) as z:
    failed = [{"path": str(p), "size": int(s), "mtime_ns": int(m), "error": str(e)}
              for p, s, m, e in zip(z["failed_paths"], z["failed_sizes"],
                                    z["failed_mtimes"], z["failed_errors"])]
    table = Table(paths=[str(p) for p in z["paths"]], sizes=z["sizes"], mtimes=z["mtimes"],
                  descriptor=z["descriptor"],
                  fusion=z["fusion_weights"] if "fusion_weights" in z.files else None,
                  failed=failed)
    return table, str(z["key"])


def _save_npz(path: str, **arrays) -> None:
  """Temp file + os.replace: a reader or a resumed run never sees half a file."""
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _write_json(path: str, obj: Any) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, default=float)
    f.write("\n")
  os.replace(tmp, path)


def read_meta(index_dir: str) -> dict | None:
  path = os.path.join(index_dir, INDEX_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("version") != VERSION:
    raise IndexMismatchError(f"{path}: index version {meta.get('version')!r}; this "
                             f"program reads version {VERSION} (pass --rebuild)")
  return meta


# ---------------------------------------------------------------------------
# Indexing.


@dataclasses.dataclass
class IndexSummary:
  index_dir: str
  total: int                 # images in the index now
  extracted: list[str]       # relative paths extracted by this run
  reused: int                # unchanged images kept from before
  resumed: int               # images taken from chunks of an unfinished run
  removed: list[str]         # deleted (or changed-to-unreadable) files dropped
  failed: list[dict]         # all unreadable files: {"path", "error", ...}
  searcher: str              # "exact" or "scann"
  seconds: float

  def lines(self) -> list[str]:
    out = [f"index {self.index_dir}: {self.total} images ({len(self.extracted)} "
           f"extracted, {self.reused} unchanged, {self.resumed} resumed, "
           f"{len(self.removed)} removed), {len(self.failed)} unreadable, "
           f"{self.searcher} search, {self.seconds:.1f} s"]
    out += [f"unreadable: {f['path']}: {f['error']}" for f in self.failed]
    return out


@contextlib.contextmanager
def _locked(index_dir: str):
  import fcntl  # noqa: PLC0415 (POSIX only)
  with open(os.path.join(index_dir, LOCK_FILE), "w", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"{index_dir} is being updated by another process") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _decode_all(pool, files: Sequence[FileStat], root: str, max_side: int):
  def one(f: FileStat):
    try:
      return read_image(os.path.join(root, f.path), max_side=max_side)[0], None
    except (ValueError, OSError) as e:
      return None, " ".join(str(e).split()) or type(e).__name__
  return [pool.submit(one, f) for f in files]


def update_index(index_dir: str, images_root: str, *, workdir: str | None = None,
                 step: int | None = None, info: ModelInfo | None = None,
                 extractor: Extractor | None = None, rebuild: bool = False,
                 chunk_images: int = CHUNK_IMAGES,
                 scann_min_images: int = SCANN_MIN_IMAGES,
                 progress: bool = True,
                 on_chunk: Callable[[int, list[str]], None] | None = None
                 ) -> IndexSummary:
  """Brings the index of `images_root` up to date (see the module docstring).

  Args:
    index_dir: the index folder (created).
    images_root: the folder of images.
    workdir, step: the training run and checkpoint (default: latest); or
      `info` / `extractor` of it, already made (the network is loaded only
      when something needs extracting).
    rebuild: re-extract everything when the index was made with another
      model, extraction settings or images folder (otherwise that raises
      `IndexMismatchError`).
    chunk_images: images per saved chunk.
    scann_min_images: collections at least this big get a ScaNN index.
    progress: show a tqdm bar.
    on_chunk: called as `on_chunk(chunk_number, relative_paths)` after each
      chunk is safely on disk (tests raise from it to simulate a kill).
  """
  t0 = time.perf_counter()
  if extractor is not None:
    info = extractor.info
  if info is None:
    if workdir is None:
      raise ValueError("update_index needs workdir, info or extractor")
    info = model_info(workdir, step)
  index_dir = os.path.abspath(index_dir)
  root = os.path.abspath(images_root)
  os.makedirs(index_dir, exist_ok=True)
  with _locked(index_dir):
    return _update(index_dir, root, info, extractor, rebuild, chunk_images,
                   scann_min_images, progress, on_chunk, t0)


def _chunk_key(info: ModelInfo, root: str) -> str:
  return hashlib.sha1(f"{info.fingerprint}\0{root}".encode()).hexdigest()[:20]


def _update(index_dir, root, info, extractor, rebuild, chunk_images, scann_min_images,
            progress, on_chunk, t0) -> IndexSummary:
  from tqdm import tqdm
  meta = None if rebuild else _checked_meta(index_dir, root, info)
  key = _chunk_key(info, root)
  chunk_dir = os.path.join(index_dir, CHUNKS_DIR)

  # Everything known: the current generation, then unfinished chunks (newer).
  known: dict[str, tuple] = {}       # path -> (size, mtime, descriptor, fusion | None)
  known_failed: dict[str, dict] = {}
  from_chunks: set[str] = set()
  if meta is not None:
    base, _ = _read_table(os.path.join(index_dir, meta["descriptors"]))
    _absorb(base, known, known_failed)
  if os.path.isdir(chunk_dir):
    for name in sorted(os.listdir(chunk_dir)):
      path = os.path.join(chunk_dir, name)
      if not name.endswith(".npz"):
        if name.endswith(".tmp"):
          os.remove(path)   # the chunk a kill interrupted
        continue
      table, chunk_key = _read_table(path)
      if chunk_key != key:
        os.remove(path)     # from a run with another model / folder
        continue
      _absorb(table, known, known_failed)
      from_chunks.update(table.paths)
      from_chunks.update(f["path"] for f in table.failed)

  # What the folder holds now.
  files = scan_images(root, exclude=[index_dir])
  current = {f.path: f for f in files}
  same = lambda f, entry: entry[0] == f.size and entry[1] == f.mtime_ns  # noqa: E731
  todo = [f for f in files
          if not (f.path in known and same(f, known[f.path]))
          and not (f.path in known_failed
                   and same(f, (known_failed[f.path]["size"],
                                known_failed[f.path]["mtime_ns"])))]
  before = set(meta_paths(index_dir, meta)) if meta is not None else set()
  removed = sorted(p for p in before if p not in current)
  todo_paths = {f.path for f in todo}
  resumed = sum(1 for f in files if f.path in from_chunks and f.path not in todo_paths)
  reused = len(files) - len(todo) - resumed

  # Extract what is missing, one saved chunk at a time.
  extracted: list[str] = []
  if todo:
    if extractor is None:
      extractor = Extractor(info)
    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress,
               dynamic_ncols=True)
    chunks = [todo[i:i + chunk_images] for i in range(0, len(todo), chunk_images)]
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      pending = _decode_all(pool, chunks[0], root, info.settings.max_side)
      for n, chunk in enumerate(chunks):
        decoded = [f.result() for f in pending]
        if n + 1 < len(chunks):  # decode the next chunk while this one runs
          pending = _decode_all(pool, chunks[n + 1], root, info.settings.max_side)
        table = _extract_chunk(extractor, chunk, decoded)
        _save_npz(os.path.join(chunk_dir, f"chunk-{time.time_ns()}-{uuid.uuid4().hex[:6]}.npz"),
                  key=np.asarray(key), **table.arrays())
        _absorb(table, known, known_failed)
        extracted.extend(table.paths)
        extracted.extend(f["path"] for f in table.failed)
        bar.update(len(chunk))
        bar.set_postfix(unreadable=sum(1 for p in known_failed if p in current))
        if on_chunk is not None:
          on_chunk(n, [f.path for f in chunk])
    bar.close()

  # One new generation with exactly the files there now.
  ok = [f for f in files if f.path in known and same(f, known[f.path])]
  ok_paths = {f.path for f in ok}
  failed = [known_failed.get(f.path) for f in files if f.path not in ok_paths]
  failed = [x for x in failed
            if x is not None and same(current[x["path"]], (x["size"], x["mtime_ns"]))]
  removed += sorted(p for p in before if p in current and p not in ok_paths)
  table = _table_of(ok, known, info, failed)
  generation = (meta["generation"] + 1) if meta is not None else _next_generation(index_dir)
  desc_name = f"descriptors-{generation}.npz"
  _save_npz(os.path.join(index_dir, desc_name), key=np.asarray(key), **table.arrays())
  scann_name = None
  if len(ok) >= scann_min_images and len(ok) > 0:
    scann_name = f"scann-{generation}"
    _build_scann(table.descriptor, os.path.join(index_dir, scann_name), info.config)
  with open(os.path.join(index_dir, CONFIG_FILE + ".tmp"), "w", encoding="utf-8") as f:
    f.write(info.config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(os.path.join(index_dir, CONFIG_FILE + ".tmp"),
             os.path.join(index_dir, CONFIG_FILE))
  new_meta = {
      "version": VERSION, "generation": generation, "descriptors": desc_name,
      "scann": scann_name, "scann_min_images": scann_min_images,
      "images_root": root, "count": len(ok),
      "model": {"workdir": info.workdir, "step": info.step, "fingerprint": info.fingerprint,
                "head": info.config.model.head, "backbone": info.config.model.backbone,
                "dim": int(table.descriptor.shape[1]) if len(ok) else None,
                "settings": dataclasses.asdict(info.settings),
                "settings_key": info.settings.key(), "fusion": info.fusion},
      "failed": [{"path": x["path"], "error": x["error"]} for x in failed],
      "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  _write_json(os.path.join(index_dir, INDEX_FILE), new_meta)

  # Only now is the old generation and the chunks' work redundant.
  for name in os.listdir(index_dir):
    if name.startswith(("descriptors-", "scann-")) and name not in (desc_name, scann_name):
      path = os.path.join(index_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  if os.path.isdir(chunk_dir):
    shutil.rmtree(chunk_dir)
  return IndexSummary(index_dir=index_dir, total=len(ok), extracted=extracted, reused=reused,
                      resumed=resumed, removed=removed, failed=failed,
                      searcher="scann" if scann_name else "exact",
                      seconds=time.perf_counter() - t0)


def meta_paths(index_dir: str, meta: dict) -> list[str]:
  with np.load(os.path.join(index_dir, meta["descriptors"]), allow_pickle=False) as z:
    return [str(p) for p in z["paths"]]


def _next_generation(index_dir: str) -> int:
  gens = [int(n.split("-")[1].split(".")[0]) for n in os.listdir(index_dir)
          if n.startswith("descriptors-") and n.split("-")[1].split(".")[0].isdigit()]
  return max(gens, default=0) + 1


def _checked_meta(index_dir: str, root: str, info: ModelInfo) -> dict | None:
  meta = read_meta(index_dir)
  if meta is None:
    return None
  m = meta["model"]
  problems = []
  if meta["images_root"] != root:
    problems.append(f"images folder {meta['images_root']} (now {root})")
  if m["fingerprint"] != info.fingerprint:
    what = f"{m['workdir']} step {m['step']} extraction {m['settings_key']}"
    problems.append(f"model {what} (now {info.describe()})")
  if problems:
    raise IndexMismatchError(
        f"{index_dir} was built from {' and '.join(problems)}; its descriptors cannot be "
        "mixed with new ones: pass --rebuild to re-extract every image, or use another "
        "--index folder")
  return meta


def _absorb(table: Table, known: dict, known_failed: dict) -> None:
  for i, p in enumerate(table.paths):
    fw = None if table.fusion is None else table.fusion[i]
    known[p] = (int(table.sizes[i]), int(table.mtimes[i]), table.descriptor[i], fw)
    known_failed.pop(p, None)
  for f in table.failed:
    known_failed[f["path"]] = f
    known.pop(f["path"], None)


def _extract_chunk(extractor: Extractor, chunk: Sequence[FileStat], decoded) -> Table:
  good = [(f, img) for f, (img, err) in zip(chunk, decoded) if err is None]
  failed = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "error": err}
            for f, (_, err) in zip(chunk, decoded) if err is not None]
  for f in failed:
    logging.warning("unreadable image %s: %s", f["path"], f["error"])
  if good:
    out = extractor([img for _, img in good])
    desc, fusion = out["descriptor"], out.get("fusion_weights")
  else:
    desc, fusion = np.zeros((0, 0), np.float32), None
  return Table(paths=[f.path for f, _ in good],
               sizes=np.asarray([f.size for f, _ in good], np.int64),
               mtimes=np.asarray([f.mtime_ns for f, _ in good], np.int64),
               descriptor=desc, fusion=fusion, failed=failed)


def _table_of(ok: Sequence[FileStat], known: dict, info: ModelInfo, failed) -> Table:
  if ok:
    desc = np.stack([known[f.path][2] for f in ok]).astype(np.float32)
    fus = [known[f.path][3] for f in ok]
    fusion = None if any(x is None for x in fus) else np.stack(fus).astype(np.float32)
  else:
    desc, fusion = np.zeros((0, info.config.model.dim), np.float32), None
  return Table(paths=[f.path for f in ok], sizes=np.asarray([f.size for f in ok], np.int64),
               mtimes=np.asarray([f.mtime_ns for f in ok], np.int64), descriptor=desc,
               fusion=fusion, failed=list(failed))


def _build_scann(descriptor: np.ndarray, directory: str, config) -> None:
  from qaff_jax.evaluation import ann, runner
  params = runner.search_kwargs(config)["scann_params"]
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  ann.save_scann(ann.build_scann(descriptor, k=100, **params), tmp)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)


# ---------------------------------------------------------------------------
# Searching.


class FolderIndex:
  """A loaded index (read-only): descriptors, paths and the searcher."""

  def __init__(self, index_dir: str):
    self.dir = os.path.abspath(index_dir)
    meta = read_meta(self.dir)
    if meta is None:
      raise FileNotFoundError(f"{self.dir}: no {INDEX_FILE} (run `python -m "
                              "qaff_jax.search index` first)")
    self.meta = meta
    table, _ = _read_table(os.path.join(self.dir, meta["descriptors"]))
    self.paths = table.paths
    self.sizes, self.mtimes = table.sizes, table.mtimes
    self.descriptor = np.ascontiguousarray(table.descriptor, np.float32)
    self.fusion = table.fusion
    self.failed = meta["failed"]
    self.root = meta["images_root"]
    self.searcher = None
    if meta.get("scann"):
      from qaff_jax.evaluation import ann
      self.searcher = ann.load_scann(os.path.join(self.dir, meta["scann"]))

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def fusion_layout(self) -> dict | None:
    return self.meta["model"]["fusion"]

  def file_of(self, image_id: int) -> str:
    """The file of image `image_id`; never a path outside the images root."""
    if not 0 <= int(image_id) < len(self.paths):
      raise KeyError(image_id)
    path = os.path.join(self.root, *self.paths[int(image_id)].split("/"))
    if not _inside(path, self.root):
      raise KeyError(image_id)
    return path

  def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [k'], ids [k']) best first, k' = min(k, images)."""
    q = np.asarray(query, np.float32).reshape(-1)
    k = max(0, min(int(k), len(self.paths)))
    if k == 0:
      return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if self.searcher is not None:
      from qaff_jax.evaluation import ann
      scores, ids = ann.scann_search(self.searcher, q[None], k)
      keep = ids[0] >= 0
      return scores[0][keep], ids[0][keep]
    scores = self.descriptor @ q
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.lexsort((top, -scores[top]))]   # by score, then lower id
    return scores[top].astype(np.float32), top.astype(np.int64)

  def results(self, query: np.ndarray, k: int) -> list[dict]:
    scores, ids = self.search(query, k)
    return [{"rank": r + 1, "id": int(i), "path": self.paths[int(i)], "score": float(s)}
            for r, (s, i) in enumerate(zip(scores, ids))]


def open_model(index: FolderIndex) -> Extractor:
  """The network the index was built with; an error if the run changed since."""
  m = index.meta["model"]
  info = model_info(m["workdir"], m["step"])
  if info.fingerprint != m["fingerprint"]:
    raise IndexMismatchError(
        f"{index.dir} was built with {m['workdir']} step {m['step']} as it was then; the "
        "run's config or checkpoint has changed since: re-index with --rebuild")
  return Extractor(info)


def split_fusion(weights: np.ndarray | None, layout: dict | None) -> dict | None:
  """QAFF weights [1+g^2+S] -> {"global", "regional" [g][g], "scales" [S], ...}."""
  if weights is None or layout is None:
    return None
  w = np.asarray(weights, np.float64).reshape(-1)
  g, scales = layout["grid"], layout["scales"]
  return {"grid": g, "scales": scales, "global": float(w[0]),
          "regional": w[1:1 + g * g].reshape(g, g).tolist(),
          "regional_total": float(w[1:1 + g * g].sum()),
          "scale_weights": w[1 + g * g:].tolist(),
          "scale_total": float(w[1 + g * g:].sum())}

