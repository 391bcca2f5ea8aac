r"""Extraction throughput: multi-scale, shape-bucketed descriptor extraction.

python -m qaff_jax.bench.extract --config configs/gldv2.py:backbone=resnet50,head=gem \
    --images 32 --max_side 512

Random-weight model, synthetic images with varied aspect ratios (long side =
max_side, like ROxf at 1024). A first pass compiles every shape bucket; the
second pass is timed. Prints one JSON line: images/s, ms/image, buckets.
"""

import json
import time

import jax
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from qaff_jax import cli_util

FLAGS = flags.FLAGS



def run(config, n_images: int, max_side: int, scales) -> dict:
  from qaff_jax import models, parallel
  from qaff_jax.evaluation import extract

  mesh = parallel.make_mesh(config.mesh.model)
  net = models.build_model(config.model, rngs=nnx.Rngs(0))
  net.eval()
  forward = extract.make_forward(net, mesh)
  rng = np.random.default_rng(0)
  aspects = rng.choice([0.75, 0.667, 1.0, 1.333, 1.5], size=n_images)
  sizes = [(max_side, int(max_side / a)) if a > 1 else (int(max_side * a), max_side)
           for a in aspects]
  images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
  loaders = [lambda im=im: im for im in images]
  kw = dict(mesh=mesh, max_side=max_side, scales=scales, batch_size=config.eval.batch_size,
            bucket=config.eval.bucket)
  t0 = time.perf_counter()
  extract.extract(forward, loaders, sizes, **kw)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = extract.extract(forward, loaders, sizes, **kw)
  jax.block_until_ready(out["descriptor"])
  timed = time.perf_counter() - t0
  buckets = {extract.bucket_of(extract.scaled_size(h, w, max_side, s), config.eval.bucket)
             for h, w in sizes for s in scales}
  return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "backbone": config.model.backbone, "head": config.model.head,
          "max_side": max_side, "scales": list(scales), "images": n_images,
          "shape_buckets": len(buckets), "first_pass_s": round(first, 2),
          "img_per_s": round(n_images / timed, 3),
          "ms_per_image": round(1e3 * timed / n_images, 2)}


def main(argv):
  del argv
  config = FLAGS.config
  scales = tuple(float(s) for s in FLAGS.scales) if FLAGS.scales else tuple(config.eval.scales)
  print(json.dumps(run(config, FLAGS.images, FLAGS.max_side or config.eval.max_side, scales)))


def define_flags():
  """Flags exist only when this runs as a program (the library imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_integer("images", 32, "Images per pass.")
  flags.DEFINE_integer("max_side", None, "Long side (default config.eval.max_side).")
  flags.DEFINE_list("scales", None, "Scales (default config.eval.scales).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  cli_util.run(main, example="python -m qaff_jax.bench.extract --config configs/demo.py:quick")
