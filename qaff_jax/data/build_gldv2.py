r"""GLDv2-clean images + train_clean.csv -> training records in the DELF layout, no TensorFlow.

python -m qaff_jax.data.build_gldv2 --images /data/gldv2/train \
    --csv /data/gldv2/metadata/train_clean.csv --out /data/gldv2/records \
    [--num_shards 128] [--workers 8] [--format tfrecord|arrayrecord] \
    [--validation_split 0.2] [--seed 0] [--allowlist RGLDV2_LIST]

Matches DELF's `build_image_dataset.py` (tensorflow/models research/delf/delf/python/
training/) run as its README does (`--train_clean_csv_path ... --num_shards=128
--generate_train_validation_splits --validation_split_size=0.2`):

* Clean subset: images keyed by id in the CSV's order (rows, then the space-separated
  ids of each row; an id listed twice keeps its first place and its last label, as a
  Python dict does). Labels are remapped to 0..N-1 by sorting the distinct landmark ids
  (`relabeling.csv`, header `new_label,old_label`, is written beside the shards).
* Split (`--validation_split` > 0): per label, in the order labels first appear, the
  label's images are shuffled by `np.random.RandomState(MT19937(SeedSequence(seed)))`
  (one generator for all labels) and the first max(1, int(fraction * n)) go to
  validation, the rest to train. 0 writes one train split (DELF without
  --generate_train_validation_splits).
* Shards: `train-00000-of-00128` ... and `validation-...`, shard i holding images
  linspace(0, n, num_shards + 1)[i:i+2] in order. Each record is a tf.train.Example
  with image/{height,width,colorspace,channels,format,id,encoded} and
  image/class/label; `encoded` is the JPEG file's bytes, height/width from decoding it.

Images are looked up as <images>/<a>/<b>/<c>/<id>.jpg (the GLDv2 tar layout), else
<images>/<id>.jpg. A missing or undecodable image stops the build (DELF would crash)
unless --allow_missing / --skip_bad_images, which leave it out and list it in
`build_report.json`. Shards are written by a process pool, each to a hidden temporary
file renamed when complete; a re-run with the same plan (`build_plan.json`) skips
finished shards. `--format arrayrecord` writes `<shard>.array_record` files (group
size 1) with the same Example bytes.

RGLDv2-clean (Song et al., "On Train-Test Class Overlap and Detection for Image
Retrieval", CVPR 2024; https://github.com/dealicious-inc/RGLDv2-clean): `--allowlist
FILE` writes `<out>/rgldv2_clean_labels.txt`, the remapped labels (one per line) that
configs/rgldv2.py takes as `config.data.class_allowlist`. FILE lists the kept classes:
a CSV in train_clean.csv's format (landmark_id,images) or one original GLDv2
landmark_id per line; `--exclude FILE` lists removed landmark ids instead. The authors'
list was announced but not yet published when this was written, so no list ships
here. With `--allowlist_only` only that file is written (no images needed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from qaff_jax import cli_util
from qaff_jax.data import download
from qaff_jax.data import records

log = logging.getLogger(__name__)

PLAN = "build_plan.json"
REPORT = "build_report.json"
RELABELING = "relabeling.csv"
ALLOWLIST = "rgldv2_clean_labels.txt"
ARRAY_RECORD_SUFFIX = ".array_record"
ARRAY_RECORD_OPTIONS = "group_size:1"
FORMATS = ("tfrecord", "arrayrecord")
SPLITS = ("train", "validation")


# ---------------------------------------------------------------------------
# train_clean.csv and the DELF remap.


@dataclasses.dataclass
class CleanCsv:
  """train_clean.csv as DELF reads it.

  Attributes:
    ids: image ids in DELF's order.
    landmarks: the original landmark id of each (same order).
    relabeling: original landmark id -> contiguous label (sorted ids -> 0..N-1).
    duplicates: ids listed more than once.
  """
  ids: list[str]
  landmarks: list[int]
  relabeling: dict[int, int]
  duplicates: list[str]

  @property
  def labels(self) -> list[int]:
    return [self.relabeling[lm] for lm in self.landmarks]

  def expected(self) -> dict[str, int]:
    """image id -> remapped label."""
    return dict(zip(self.ids, self.labels))


def read_clean_csv(path: str) -> CleanCsv:
  """Reads train_clean.csv (`landmark_id,images`, images space separated).

  Raises ValueError naming the file and line for a wrong header or a bad row.
  """
  images: dict[str, int] = {}
  duplicates = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip().lstrip("\ufeff") for h in header] != ["landmark_id",
                                                                         "images"]:
      raise ValueError(f"{path}: header {header!r}; expected landmark_id,images "
                       "(the GLDv2 train_clean.csv)")
    for lineno, row in enumerate(reader, 2):
      if not row:
        continue
      if len(row) != 2:
        raise ValueError(f"{path}:{lineno}: expected 2 fields, got {len(row)}")
      try:
        landmark = int(row[0])
      except ValueError:
        raise ValueError(f"{path}:{lineno}: landmark_id {row[0]!r} is not an "
                         "integer") from None
      for image_id in row[1].split(" "):
        if not image_id:
          continue
        if image_id in images:
          duplicates.append(image_id)
        images[image_id] = landmark
  if not images:
    raise ValueError(f"{path}: lists no images")
  relabeling = {lm: i for i, lm in enumerate(sorted(set(images.values())))}
  return CleanCsv(list(images), list(images.values()), relabeling, duplicates)


def write_relabeling(path: str, relabeling: dict[int, int]) -> None:
  """DELF's relabeling.csv: `new_label,old_label`, in old-label order."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["new_label", "old_label"])
    for old, new in relabeling.items():
      w.writerow([new, old])
  os.replace(tmp, path)


def split_train_validation(items: Sequence[Any], labels: Sequence[int],
                           fraction: float, seed: int) -> tuple[list, list]:
  """DELF's `_build_train_and_validation_splits` on `items` (any per-image payload).

  Returns (validation, train).
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation split {fraction}: expected inside (0, 1)")
  by_label: dict[int, list[int]] = {}
  for index, label in enumerate(labels):
    by_label.setdefault(label, []).append(index)
  rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
  validation, train = [], []
  for indexes in by_label.values():
    order = np.arange(len(indexes))
    rs.shuffle(order)
    picked = [items[indexes[k]] for k in order]
    cutoff = max(1, int(fraction * len(indexes)))
    validation.extend(picked[:cutoff])
    train.extend(picked[cutoff:])
  return validation, train


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
  """DELF's `np.linspace(0, n, num_shards + 1, dtype=int)` shard ranges."""
  edges = np.linspace(0, n, num_shards + 1, dtype=int)
  return [(int(edges[i]), int(edges[i + 1])) for i in range(num_shards)]


def image_path(images_dir: str, image_id: str) -> str | None:
  """<images>/<a>/<b>/<c>/<id>.jpg, else <images>/<id>.jpg; None when neither exists."""
  nested = os.path.join(images_dir, image_id[0], image_id[1], image_id[2], image_id + ".jpg")
  if os.path.isfile(nested):
    return nested
  flat = os.path.join(images_dir, image_id + ".jpg")
  return flat if os.path.isfile(flat) else None


def shard_file(out: str, split: str, index: int, num_shards: int, fmt: str) -> str:
  name = records.shard_name(split, index, num_shards)
  return os.path.join(out, name + (ARRAY_RECORD_SUFFIX if fmt == "arrayrecord" else ""))


# ---------------------------------------------------------------------------
# Writing one shard (in a worker process).


def encode_image(path: str, image_id: str, label: int) -> bytes:
  """One DELF Example: the file's bytes; height/width from a full decode.

  Raises ValueError naming the file when it does not decode as an RGB-able image.
  """
  from PIL import Image  # noqa: PLC0415
  with open(path, "rb") as f:
    data = f.read()
  try:
    import io  # noqa: PLC0415
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      width, height = img.size
  except Exception as e:  # PIL raises many types for bad files
    raise ValueError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from None
  return records.make_gldv2_example(data, label, image_id, height, width)


def write_shard(task: dict) -> dict:
  """Writes one shard atomically; returns {'path', 'records', 'bad': [[id, error]]}."""
  path, fmt, skip_bad = task["path"], task["format"], task["skip_bad"]
  bad = []

  def examples() -> Iterable[bytes]:
    for image_path_, image_id, label in task["items"]:
      try:
        yield encode_image(image_path_, image_id, label)
      except (ValueError, OSError) as e:
        if not skip_bad:
          raise ValueError(f"image {image_id}: {e}") from None
        bad.append([image_id, str(e)])

  tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
  try:
    if fmt == "arrayrecord":
      from array_record.python import array_record_module  # noqa: PLC0415
      writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
      n = 0
      try:
        for raw in examples():
          writer.write(raw)
          n += 1
      finally:
        writer.close()
    else:
      n = 0
      with open(tmp, "wb") as f:
        for raw in examples():
          f.write(records.encode_record(raw))
          n += 1
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
  return {"path": path, "records": n, "bad": bad}


# ---------------------------------------------------------------------------
# The build.


def _plan_hash(plan: dict) -> str:
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def build(images_dir: str, csv_path: str, out: str, *, num_shards: int = 128,
          workers: int = 1, fmt: str = "tfrecord", validation_split: float = 0.2,
          seed: int = 0, allow_missing: bool = False, skip_bad_images: bool = False,
          overwrite: bool = False, progress: bool | None = None) -> dict:
  """Builds the records; returns the build report (also written to `<out>/build_report.json`).

  Raises:
    FileNotFoundError: images missing (without `allow_missing`), listing them.
    FileExistsError: `out` holds shards of a different plan (without `overwrite`).
    ValueError: a bad CSV or, without `skip_bad_images`, an undecodable image.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: choose from {list(FORMATS)}")
  if num_shards <= 0:
    raise ValueError(f"num_shards {num_shards}: want a positive number")
  clean = read_clean_csv(csv_path)
  labels = clean.labels
  found, missing = [], []
  for image_id, label in zip(clean.ids, labels):
    p = image_path(images_dir, image_id)
    if p is None:
      missing.append(image_id)
    else:
      found.append((p, image_id, label))
  if missing and not allow_missing:
    shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10
                                       else "")
    raise FileNotFoundError(
        f"{len(missing)} of {len(clean.ids)} images listed in {csv_path} are not under "
        f"{images_dir} (as <a>/<b>/<c>/<id>.jpg or <id>.jpg): {shown}; download them "
        "(python -m qaff_jax.data.download gldv2-clean) or pass --allow_missing")
  if validation_split > 0:
    validation, train = split_train_validation(found, [f[2] for f in found],
                                               validation_split, seed)
    splits = {"validation": validation, "train": train}
  else:
    splits = {"train": found}

  plan = {"format": fmt, "num_shards": num_shards, "validation_split": validation_split,
          "seed": seed, "csv_sha256": download.file_digest(csv_path),
          "splits": {name: [[i, lab] for _, i, lab in items] for name, items in
                     splits.items()}}
  digest = _plan_hash(plan)
  os.makedirs(out, exist_ok=True)
  plan_path = os.path.join(out, PLAN)
  if os.path.isfile(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      old = json.load(f).get("plan_sha256")
    if old != digest:
      if not overwrite:
        raise FileExistsError(f"{out} holds records of another build plan ({plan_path}: "
                              "different CSV, images, split, seed, shards or format); "
                              "pass --overwrite to replace them, or another --out")
      for name in os.listdir(out):
        if name.startswith(SPLITS) and "-of-" in name:
          os.remove(os.path.join(out, name))
  _write_json(plan_path, {"plan_sha256": digest, "format": fmt, "num_shards": num_shards,
                          "validation_split": validation_split, "seed": seed,
                          "counts": {k: len(v) for k, v in splits.items()}})
  write_relabeling(os.path.join(out, RELABELING), clean.relabeling)

  tasks, done = [], []
  for name, items in splits.items():
    for index, (lo, hi) in enumerate(shard_bounds(len(items), num_shards)):
      path = shard_file(out, name, index, num_shards, fmt)
      if os.path.isfile(path):
        done.append(path)
        continue
      tasks.append({"path": path, "format": fmt, "skip_bad": skip_bad_images,
                    "items": items[lo:hi]})
  log.info("%d shard(s) to write, %d already finished", len(tasks), len(done))
  results = _run_tasks(tasks, workers, progress)

  bad = [b for r in results for b in r["bad"]]
  old_report = read_json(os.path.join(out, REPORT)) or {}
  if old_report.get("plan_sha256") == digest:
    bad = old_report.get("bad_images", []) + bad
  bad_ids = {b[0] for b in bad}
  report = {
      "plan_sha256": digest, "csv": os.path.abspath(csv_path), "images": os.path.abspath(
          images_dir), "format": fmt, "num_shards": num_shards,
      "validation_split": validation_split, "seed": seed,
      "csv_images": len(clean.ids), "classes": len(clean.relabeling),
      "duplicates_in_csv": clean.duplicates[:1000], "num_duplicates_in_csv":
          len(clean.duplicates),
      "missing_images": missing[:1000], "num_missing_images": len(missing),
      "bad_images": bad, "num_bad_images": len(bad),
      "split_images": {k: len(v) for k, v in splits.items()},
      "records": {k: sum(1 for _, i, _ in v if i not in bad_ids)
                  for k, v in splits.items()},
      "shards_written": len(results), "shards_skipped": len(done),
  }
  _write_json(os.path.join(out, REPORT), report)
  return report


def read_json(path: str) -> dict | None:
  """A JSON file's object, or None when it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _run_tasks(tasks: list[dict], workers: int, progress: bool | None) -> list[dict]:
  from tqdm import tqdm  # noqa: PLC0415
  bar = tqdm(total=len(tasks), unit="shard", desc="build_gldv2", dynamic_ncols=True,
             disable=None if progress is None else not progress)
  results = []
  try:
    if workers <= 1 or len(tasks) <= 1:
      for task in tasks:
        results.append(write_shard(task))
        bar.update(1)
      return results
    # spawn: the parent may hold threads (jax, tqdm) that fork would copy mid-state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      futures = [pool.submit(write_shard, t) for t in tasks]
      try:
        for fut in concurrent.futures.as_completed(futures):
          results.append(fut.result())
          bar.update(1)
      except BaseException:
        for fut in futures:
          fut.cancel()
        raise
    return results
  finally:
    bar.close()


# ---------------------------------------------------------------------------
# RGLDv2-clean allowlist.


def _read_landmark_list(path: str) -> list[int]:
  """Original landmark ids from a train_clean-format CSV or a one-id-per-line file."""
  with open(path, encoding="utf-8") as f:
    first = f.readline().strip().lstrip("\ufeff")
  if first.replace(" ", "") == "landmark_id,images":
    clean = read_clean_csv(path)
    return sorted(set(clean.landmarks))
  ids = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip().split(",")[0].strip()
      if not line or line == "landmark_id":
        continue
      try:
        ids.append(int(line))
      except ValueError:
        raise ValueError(f"{path}:{lineno}: not a landmark id: {line!r}") from None
  if not ids:
    raise ValueError(f"{path}: lists no landmark ids")
  return sorted(set(ids))


def write_allowlist(csv_path: str, out_path: str, *, keep: str | None = None,
                    exclude: str | None = None) -> dict:
  """Writes the remapped labels of the kept classes, one per line.

  `keep` lists the kept original landmark ids (train_clean CSV format or one per
  line), `exclude` the removed ones (exactly one of them). Returns counts.
  """
  if (keep is None) == (exclude is None):
    raise ValueError("give exactly one of keep (an allowlist) or exclude")
  clean = read_clean_csv(csv_path)
  listed = _read_landmark_list(keep or exclude)
  known = set(clean.relabeling)
  unknown = sorted(set(listed) - known)
  kept = sorted(set(listed) & known) if keep else sorted(known - set(listed))
  labels = sorted(clean.relabeling[lm] for lm in kept)
  if not labels:
    raise ValueError(f"{keep or exclude}: no class of {csv_path} is kept")
  kept_set = set(kept)
  images = sum(1 for lm in clean.landmarks if lm in kept_set)
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(f"# RGLDv2-clean allowlist: {len(labels)} of {len(clean.relabeling)} "
            f"GLDv2-clean classes ({images} of {len(clean.ids)} images), as the remapped "
            f"labels of {os.path.basename(csv_path)}; from "
            f"{'kept' if keep else 'removed'} landmark ids in "
            f"{os.path.basename(keep or exclude)}\n")
    for lab in labels:
      f.write(f"{lab}\n")
  os.replace(tmp, out_path)
  return {"path": out_path, "classes": len(labels), "removed_classes":
          len(clean.relabeling) - len(labels), "images": images,
          "removed_images": len(clean.ids) - images, "unknown_landmarks": unknown[:100]}


# ---------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.data.build_gldv2",
      description="Build GLDv2-clean training records (DELF layout) without TensorFlow.")
  parser.add_argument("--images", help="folder of the extracted train images "
                      "(<a>/<b>/<c>/<id>.jpg)")
  parser.add_argument("--csv", required=True, help="train_clean.csv")
  parser.add_argument("--out", required=True, help="output folder for the shards")
  parser.add_argument("--num_shards", type=int, default=128,
                      help="shards per split (DELF: 128)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="processes writing shards")
  parser.add_argument("--format", choices=FORMATS, default="tfrecord",
                      help="tfrecord (DELF) or arrayrecord (random access)")
  parser.add_argument("--validation_split", type=float, default=0.2,
                      help="fraction per class to validation-* shards (DELF README: 0.2); "
                      "0 = train only")
  parser.add_argument("--seed", type=int, default=0, help="split seed (DELF default 0)")
  parser.add_argument("--allow_missing", action="store_true",
                      help="leave out images that are not on disk (listed in the report)")
  parser.add_argument("--skip_bad_images", action="store_true",
                      help="leave out undecodable images (listed in the report)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace shards of a different build plan in --out")
  parser.add_argument("--allowlist", default=None,
                      help="RGLDv2-clean kept classes (train_clean-format CSV or one "
                      "landmark_id per line): writes <out>/rgldv2_clean_labels.txt")
  parser.add_argument("--exclude", default=None,
                      help="removed landmark ids (one per line), instead of --allowlist")
  parser.add_argument("--allowlist_only", action="store_true",
                      help="only write the allowlist file (no images needed)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.allowlist and args.exclude:
    parser.error("--allowlist and --exclude: give one of them")
  if args.allowlist_only and not (args.allowlist or args.exclude):
    parser.error("--allowlist_only needs --allowlist or --exclude")
  if not args.allowlist_only and not args.images:
    parser.error("missing --images (the folder of extracted train images)")
  if args.images and not os.path.isdir(args.images) and not args.allowlist_only:
    parser.error(f"--images {args.images}: no such folder")
  if not os.path.isfile(args.csv):
    parser.error(f"--csv {args.csv}: no such file")
  if args.num_shards <= 0:
    parser.error(f"--num_shards {args.num_shards}: want a positive number")
  if not 0.0 <= args.validation_split < 1.0:
    parser.error(f"--validation_split {args.validation_split}: want 0 <= x < 1")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if not args.allowlist_only:
      report = build(args.images, args.csv, args.out, num_shards=args.num_shards,
                     workers=args.workers, fmt=args.format,
                     validation_split=args.validation_split, seed=args.seed,
                     allow_missing=args.allow_missing,
                     skip_bad_images=args.skip_bad_images, overwrite=args.overwrite,
                     progress=False if args.no_progress else None)
      print(f"{sum(report['records'].values())} records in {args.out} "
            f"({', '.join(f'{k} {v}' for k, v in report['records'].items())}; "
            f"{report['classes']} classes; "
            f"{report['shards_written']} shard(s) written, {report['shards_skipped']} "
            f"already there; {report['num_missing_images']} missing and "
            f"{report['num_bad_images']} bad image(s) left out)")
    if args.allowlist or args.exclude:
      os.makedirs(args.out, exist_ok=True)
      info = write_allowlist(args.csv, os.path.join(args.out, ALLOWLIST),
                             keep=args.allowlist, exclude=args.exclude)
      print(f"allowlist {info['path']}: {info['classes']} classes kept, "
            f"{info['removed_classes']} removed ({info['removed_images']} images); "
            f"train with --config configs/rgldv2.py "
            f"--config.data.class_allowlist={info['path']}")
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {cli_util.one_line(str(e))}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
