r"""Search your own photos with a trained run.

python -m qaff_jax.search index --workdir RUN --images DIR --index INDEX [--step N] [--rebuild]
python -m qaff_jax.search query --index INDEX --image q.jpg [--box x0,y0,x1,y1] [-k 20] [--json]
python -m qaff_jax.search serve --index INDEX [--port 8080] [--host 127.0.0.1]

`index` adds new and changed images, drops deleted ones and resumes a killed
run (see `qaff_jax.search.index`); `query` prints the top-k (`--box` crops
the query, in pixels, as the revisited protocol crops its queries); `serve`
opens a local web page (needs the `search` extra: pip install -e '.[search]').
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from qaff_jax import cli_util


def _parser() -> cli_util.ArgumentParser:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.search",
      description="Index a folder of images with a trained run and search it.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{index,query,serve}")

  p = sub.add_parser("index", help="extract descriptors of a folder (incremental)")
  p.add_argument("--workdir", required=True, help="training run (its checkpoints)")
  p.add_argument("--images", required=True, help="folder of images (searched recursively)")
  p.add_argument("--index", required=True, help="index folder (created)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--rebuild", action="store_true",
                 help="re-extract everything when the model, settings or folder changed")
  p.add_argument("--chunk", type=int, default=None,
                 help="images per saved chunk (default %(default)s: see the module)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")

  p = sub.add_parser("query", help="the most similar indexed images to one image")
  p.add_argument("--index", required=True, help="index folder")
  p.add_argument("--image", required=True, help="query image file")
  p.add_argument("--box", default=None, help="crop x0,y0,x1,y1 in pixels of the query")
  p.add_argument("-k", type=int, default=20, help="results (default %(default)s)")
  p.add_argument("--json", action="store_true", help="print one JSON object")

  p = sub.add_parser("serve", help="a local web page to search the index")
  p.add_argument("--index", required=True, help="index folder")
  p.add_argument("--host", default="127.0.0.1", help="address (default %(default)s)")
  p.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  cli_util.quiet_backend_probe()
  from qaff_jax.search import index as lib
  try:
    if args.command == "index":
      _index(args, lib)
    elif args.command == "query":
      _query(args, lib)
    else:
      _serve(args, lib)
  except (FileNotFoundError, lib.IndexMismatchError, cli_util.UsageError) as e:
    cli_util.usage_error(str(e))
  except (ValueError, RuntimeError) as e:  # a bad query image, a locked index
    sys.stderr.write(f"error: {cli_util.one_line(str(e))}\n")
    sys.exit(1)


def _index(args, lib) -> None:
  if not os.path.isdir(args.images):
    raise cli_util.UsageError(f"--images {args.images}: not a folder")
  if args.chunk is not None and args.chunk < 1:
    raise cli_util.UsageError(f"--chunk={args.chunk}: need at least 1")
  summary = lib.update_index(args.index, args.images, workdir=args.workdir, step=args.step,
                             rebuild=args.rebuild, progress=not args.quiet,
                             chunk_images=args.chunk or lib.CHUNK_IMAGES)
  print("\n".join(summary.lines()))


def _query(args, lib) -> None:
  if not os.path.isfile(args.image):
    raise cli_util.UsageError(f"--image {args.image}: no such file")
  if args.k < 1:
    raise cli_util.UsageError(f"-k {args.k}: need at least 1")
  try:
    box = lib.parse_box(args.box)
  except ValueError as e:
    raise cli_util.UsageError(f"--{e}") from None
  index = lib.FolderIndex(args.index)
  model = lib.open_model(index)
  q = model.describe(args.image, box=box)
  results = index.results(q["descriptor"], args.k)
  if args.json:
    print(json.dumps({"query": os.path.abspath(args.image), "box": box,
                      "images_root": index.root, "results": results,
                      "fusion": lib.split_fusion(q["fusion_weights"], index.fusion_layout)}))
    return
  print(f"{len(results)} of {len(index)} images in {index.root}")
  for r in results:
    print(f"{r['rank']:4d}  {r['score']:.4f}  {r['path']}")


def _serve(args, lib) -> None:
  try:
    from qaff_jax.search import server
  except ImportError as e:
    raise cli_util.UsageError(f"serve needs the 'search' extra ({e}); "
                              "pip install -e '.[search]'") from None
  server.serve(args.index, host=args.host, port=args.port)


if __name__ == "__main__":
  main()
