r"""Reconciles built GLDv2 records with train_clean.csv.

python -m qaff_jax.data.check /data/gldv2/records --csv train_clean.csv [--json] [--decode]

Reads every `train-*-of-*` and `validation-*-of-*` shard (TFRecord or ArrayRecord) in
RECORDS and reports:

  unreadable       records with a bad CRC, a truncated tail, bytes that are not a GLDv2
                   tf.train.Example, or (with --decode) an image that does not decode
  missing          images the CSV lists that no record holds
  unexpected       records whose image id the CSV does not list
  duplicates       image ids held by more than one record
  label mismatch   records whose label is not the CSV's landmark remapped as DELF does
                   (sorted landmark ids -> 0..N-1; see qaff_jax.data.build_gldv2)
  label counts     classes whose record count differs from the CSV's image count
  shard sets       `-of-N` sets with shards absent, or more than one N per split

A table on stdout (or one JSON object with --json; `--out FILE` writes the JSON too).
Exit status 1 when any problem is found, 0 when the records match the CSV, 2 for a
usage error.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
from typing import Any, Iterator, Sequence

from qaff_jax import cli_util
from qaff_jax.data import build_gldv2
from qaff_jax.data import records

_SHARD = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})(\.array_record)?$")
_SHOW = 1000   # list entries kept in the JSON per problem
_TABLE = 5     # examples shown per table row


def shard_files(folder: str) -> list[str]:
  """The train/validation shards in `folder`, sorted."""
  return sorted(p for p in glob.glob(os.path.join(folder, "*"))
                if _SHARD.match(os.path.basename(p)))


def _read_shard(path: str, unreadable: list) -> Iterator[tuple[str, bytes]]:
  """(location, raw record) of the intact records; bad ones go to `unreadable`."""
  if path.endswith(".array_record"):
    from array_record.python import array_record_module  # noqa: PLC0415
    try:
      reader = array_record_module.ArrayRecordReader(path)
    except Exception as e:  # a file that is not ArrayRecord at all
      unreadable.append({"where": path, "error": f"{type(e).__name__}: {e}"})
      return
    try:
      for i in range(reader.num_records()):
        try:
          raw = reader.read([i])[0]
        except Exception as e:  # a corrupt chunk
          unreadable.append({"where": f"{path} record {i}",
                             "error": f"{type(e).__name__}: {e}"})
          continue
        yield f"{path} record {i}", raw
    finally:
      reader.close()
    return
  index = 0

  def on_corrupt(err: records.CorruptRecordError):
    unreadable.append({"where": f"{path} record {index}", "error": str(err)})

  for raw in records.iter_tfrecord_skipping(path, on_corrupt):
    yield f"{path} record {index}", raw
    index += 1


def _shard_sets(files: Sequence[str]) -> list[str]:
  """Problems of the `-of-N` naming: absent shards, mixed N within a split."""
  problems = []
  by_split: dict[str, dict[int, set[int]]] = collections.defaultdict(
      lambda: collections.defaultdict(set))
  for p in files:
    m = _SHARD.match(os.path.basename(p))
    by_split[m.group(1)][int(m.group(3))].add(int(m.group(2)))
  for split, sets in sorted(by_split.items()):
    if len(sets) > 1:
      problems.append(f"{split}: shards of several sets ({sorted(sets)} shards)")
    for n, have in sorted(sets.items()):
      absent = sorted(set(range(n)) - have)
      if absent:
        problems.append(f"{split}-*-of-{n:05d}: {len(absent)} shard(s) absent, e.g. "
                        f"{records.shard_name(split, absent[0], n)}")
  return problems


def reconcile(folder: str, csv_path: str, *, decode: bool = False) -> dict[str, Any]:
  """Checks the records in `folder` against `csv_path`; the findings as a dict.

  `problems` is the number of findings; 0 means the records match the CSV.
  """
  files = shard_files(folder)
  if not files:
    raise FileNotFoundError(f"{folder}: no train-*-of-* or validation-*-of-* shards")
  clean = build_gldv2.read_clean_csv(csv_path)
  expected = clean.expected()
  unreadable: list[dict] = []
  seen: dict[str, list[str]] = collections.defaultdict(list)
  mismatched, unexpected = [], []
  counts: collections.Counter = collections.Counter()
  per_split: collections.Counter = collections.Counter()
  for path in files:
    split = _SHARD.match(os.path.basename(path)).group(1)
    for where, raw in _read_shard(path, unreadable):
      try:
        rec = records.parse_gldv2_example(raw)
        if decode:
          from qaff_jax.data import transforms  # noqa: PLC0415
          transforms.decode_image(rec.encoded)
      except ValueError as e:
        unreadable.append({"where": where, "error": str(e)})
        continue
      per_split[split] += 1
      seen[rec.image_id].append(where)
      counts[rec.label] += 1
      want = expected.get(rec.image_id)
      if want is None:
        unexpected.append({"id": rec.image_id, "where": where, "label": rec.label})
      elif want != rec.label:
        mismatched.append({"id": rec.image_id, "where": where, "label": rec.label,
                           "expected": want})
  duplicates = [{"id": i, "where": w} for i, w in seen.items() if len(w) > 1]
  missing = [i for i in clean.ids if i not in seen]
  want_counts = collections.Counter(expected.values())
  label_counts = [{"label": lab, "records": counts.get(lab, 0), "csv": n}
                  for lab, n in sorted(want_counts.items()) if counts.get(lab, 0) != n]
  label_counts += [{"label": lab, "records": n, "csv": 0}
                   for lab, n in sorted(counts.items()) if lab not in want_counts]
  shard_problems = _shard_sets(files)
  report = build_gldv2.read_json(os.path.join(folder, build_gldv2.REPORT)) or {}
  known_missing = set(report.get("missing_images", [])) | {
      b[0] for b in report.get("bad_images", [])}
  findings = {
      "unreadable": unreadable, "missing": missing, "unexpected": unexpected,
      "duplicates": duplicates, "label_mismatch": mismatched,
      "label_counts": label_counts, "shard_sets": shard_problems}
  out = {"records_folder": os.path.abspath(folder), "csv": os.path.abspath(csv_path),
         "shards": len(files), "records": sum(per_split.values()),
         "records_per_split": dict(per_split), "csv_images": len(clean.ids),
         "csv_classes": len(clean.relabeling),
         "csv_duplicate_ids": len(clean.duplicates),
         "missing_known_at_build": sum(1 for i in missing if i in known_missing)}
  out["counts"] = {k: len(v) for k, v in findings.items()}
  out["problems"] = sum(out["counts"].values())
  out.update({k: v[:_SHOW] for k, v in findings.items()})
  return out


def _example(kind: str, item: Any) -> str:
  if isinstance(item, str):
    return item
  if kind == "duplicates":
    return f"{item['id']} x{len(item['where'])}"
  if kind == "label_mismatch":
    return f"{item['id']} ({item['label']} != {item['expected']})"
  if kind == "label_counts":
    return f"label {item['label']}: {item['records']} != {item['csv']}"
  if kind == "unexpected":
    return item["id"]
  return f"{item['where']}: {item['error']}"


def table(result: dict) -> str:
  """The findings as a fixed-width table (one row per check)."""
  lines = [f"records {result['records']} in {result['shards']} shard(s) "
           f"({', '.join(f'{k} {v}' for k, v in sorted(result['records_per_split'].items()))}"
           f"); CSV {result['csv_images']} images, {result['csv_classes']} classes",
           f"{'check':<16} {'count':>8}  examples", "-" * 72]
  for kind, n in result["counts"].items():
    examples = "; ".join(_example(kind, x) for x in result[kind][:_TABLE])
    lines.append(f"{kind:<16} {n:>8}  {examples if n else 'ok'}")
  if result["missing_known_at_build"]:
    lines.append(f"({result['missing_known_at_build']} of the missing images were left "
                 "out by the build: see build_report.json)")
  lines.append("OK: the records match the CSV" if not result["problems"]
               else f"PROBLEMS: {result['problems']}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.data.check",
      description="Reconcile GLDv2 records with train_clean.csv (exit 1 on problems).")
  parser.add_argument("records", help="folder of train-*/validation-* shards")
  parser.add_argument("--csv", required=True, help="train_clean.csv the records came from")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--out", default=None, help="also write the JSON to this file")
  parser.add_argument("--decode", action="store_true",
                      help="decode every image too (slow)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.records):
    parser.error(f"{args.records}: no such folder")
  if not os.path.isfile(args.csv):
    parser.error(f"--csv {args.csv}: no such file")
  try:
    result = reconcile(args.records, args.csv, decode=args.decode)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {cli_util.one_line(str(e))}", file=sys.stderr)
    return 1
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result) if args.json else table(result))
  return 1 if result["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
