r"""Converts GLDv2 TFRecord shards to ArrayRecord shards (random access).

python -m qaff_jax.data.convert --input 'gs-or-local/train-*-of-*' \
    --output /data/gldv2_ar [--num_shards 128]

The ArrayRecord shards (`train-00000-of-00128.array_record`, ...) hold the same
serialised `tf.train.Example` bytes, so `pipeline.make_train_dataset` parses
them the same way. Records are dealt round-robin over the output shards. Each
record is written with `group_size:1` so a random read decodes one record.
Corrupt input records (bad CRC, truncated tail, not a GLDv2 Example, and with
`--check_images` undecodable images) are skipped, logged and counted.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import sys
from typing import Sequence

from array_record.python import array_record_module

from qaff_jax import cli_util
from qaff_jax.data import pipeline
from qaff_jax.data import records
from qaff_jax.data import transforms

log = logging.getLogger(__name__)

WRITER_OPTIONS = "group_size:1"
SUFFIX = ".array_record"


@dataclasses.dataclass
class ConvertStats:
  """What a conversion read and wrote."""
  input_files: int = 0
  records_written: int = 0
  records_skipped: int = 0
  output_files: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f"converted {self.input_files} TFRecord file(s): "
            f"{self.records_written} records written to "
            f"{len(self.output_files)} ArrayRecord shard(s), "
            f"{self.records_skipped} corrupt record(s) skipped")


def convert_tfrecords_to_arrayrecord(
    input_pattern: str, output_dir: str, num_shards: int | None = None, *,
    prefix: str = "train", check_images: bool = False,
    overwrite: bool = False) -> ConvertStats:
  """Converts TFRecord shards matching `input_pattern` into `output_dir`.

  Args:
    input_pattern: glob, comma list, or directory of `train-*-of-*` shards.
    output_dir: directory for the ArrayRecord shards (created if needed).
    num_shards: output shard count; default: as many as input files.
    prefix: output shard name prefix.
    check_images: also decode every image and skip undecodable ones (slow).
    overwrite: replace existing `{prefix}-*-of-*.array_record` shards.

  Returns:
    The conversion's `ConvertStats`.

  Raises:
    FileNotFoundError: no input shard matched.
    FileExistsError: `output_dir` already holds shards and not `overwrite`.
  """
  files = pipeline.resolve_files(input_pattern)
  num_shards = len(files) if num_shards is None else int(num_shards)
  if num_shards <= 0:
    raise ValueError(f"num_shards must be positive, got {num_shards}")
  os.makedirs(output_dir, exist_ok=True)
  existing = glob.glob(os.path.join(output_dir, f"{prefix}-*-of-*{SUFFIX}"))
  if existing and not overwrite:
    raise FileExistsError(f"{output_dir} already holds {len(existing)} "
                          f"{prefix}-*-of-*{SUFFIX} shard(s); pass overwrite")
  for path in existing:
    os.remove(path)

  stats = ConvertStats(input_files=len(files))
  final = [os.path.join(output_dir, records.shard_name(prefix, i, num_shards) + SUFFIX)
           for i in range(num_shards)]
  # Hidden temporary names: never matched by `train-*-of-*` while unfinished.
  tmp = [os.path.join(output_dir, "." + os.path.basename(path) + ".tmp")
         for path in final]
  writers = [array_record_module.ArrayRecordWriter(p, WRITER_OPTIONS) for p in tmp]

  def on_corrupt(error: records.CorruptRecordError):
    log.warning("skipping corrupt record: %s", error)
    stats.records_skipped += 1

  try:
    for path in files:
      for index, raw in enumerate(records.iter_tfrecord_skipping(path, on_corrupt)):
        try:
          rec = records.parse_gldv2_example(raw)
          if check_images:
            transforms.decode_image(rec.encoded)
        except ValueError as e:
          log.warning("skipping record %d of %s: %s", index, path, e)
          stats.records_skipped += 1
          continue
        writers[stats.records_written % num_shards].write(raw)
        stats.records_written += 1
  finally:
    for writer in writers:
      writer.close()
  for src, dst in zip(tmp, final):
    os.replace(src, dst)
  stats.output_files = final
  return stats


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.data.convert",
      description="Convert GLDv2 TFRecord shards to ArrayRecord shards.")
  parser.add_argument("--input", required=True,
                      help="TFRecord glob, comma list, or directory of train-*-of-* shards")
  parser.add_argument("--output", required=True, help="output directory")
  parser.add_argument("--num_shards", type=int, default=None,
                      help="output shards (default: number of input files)")
  parser.add_argument("--prefix", default="train", help="output shard name prefix")
  parser.add_argument("--check_images", action="store_true",
                      help="decode every image and skip undecodable ones")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace existing shards in --output")
  args = parser.parse_args(argv)
  if args.num_shards is not None and args.num_shards <= 0:
    parser.error(f"--num_shards {args.num_shards}: want a positive number")
  existing = glob.glob(os.path.join(args.output, f"{args.prefix}-*-of-*{SUFFIX}"))
  if existing and not args.overwrite:
    parser.error(f"--output {args.output} already holds {len(existing)} "
                 f"{args.prefix}-*-of-*{SUFFIX} shard(s); pass --overwrite to replace them")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    stats = convert_tfrecords_to_arrayrecord(
        args.input, args.output, args.num_shards, prefix=args.prefix,
        check_images=args.check_images, overwrite=args.overwrite)
  except FileNotFoundError as err:  # --input matched nothing
    parser.error(f"--input {args.input}: {err}")
  print(stats.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
