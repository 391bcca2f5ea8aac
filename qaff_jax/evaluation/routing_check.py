r"""Does QAFF's routing target point at the object? A check on training images.

python -m qaff_jax.evaluation.routing_check --workdir workdirs/run \
    --train_files demo_data_mixed/train --max_images 96

Routing distillation (`model.qaff.route_weight`) teaches the fusion network
to put weight on the feature whose own margin loss is lowest. That can only
make the weights follow an object if the lowest-loss regional cell is the one
holding it. This reads training records that carry an object box
(`image/object/bbox/*`), runs the run's network on them (resized to the
training crop size, no augmentation), and reports for the regional cells:

  target_hit   fraction of images whose lowest-loss cell overlaps the box;
  router_hit   the same for the cell with the largest fusion weight;
  chance       the hit rate of a uniformly random cell;
  best_fixed   the hit rate of the best single cell chosen for every image;
  loss_spread  mean over images of the std of the cell losses (nats);
  mean_loss    the mean loss of each of the 1+g^2+S features.

The per-feature loss is ArcFace (or CosFace) with the run's scale and margin,
against the trained class matrix and the record's label.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from qaff_jax.evaluation import fusion_stats


def hits(feature_losses: np.ndarray, weights: np.ndarray, boxes: np.ndarray,
         grid: int) -> dict[str, Any]:
  """The check's numbers from per-feature losses and weights (both [N, K]).

  Args:
    feature_losses: [N, 1+g^2+S] each feature's margin loss.
    weights: [N, 1+g^2+S] fusion weights.
    boxes: [N, 4] normalised (x0, y0, x1, y1) object boxes.
    grid: g.
  """
  losses = np.asarray(feature_losses, np.float64)
  w = np.asarray(weights, np.float64)
  b = np.asarray(boxes, np.float64)
  n_reg = grid * grid
  cells = fusion_stats.box_cells(b, grid)                    # [N, g^2] bool
  rows = np.arange(len(b))
  target = np.argmin(losses[:, 1:1 + n_reg], axis=1)
  router = np.argmax(w[:, 1:1 + n_reg], axis=1)
  return {
      "num_images": int(len(b)),
      "target_hit": float(cells[rows, target].mean()),
      "router_hit": float(cells[rows, router].mean()),
      "chance": float(cells.mean()),
      "best_fixed": float(cells.mean(axis=0).max()),
      "loss_spread": float(losses[:, 1:1 + n_reg].std(axis=1).mean()),
      "mean_loss": [float(v) for v in losses.mean(axis=0)],
  }


def _records_with_boxes(train_files: str, max_images: int, size: int):
  from PIL import Image
  from qaff_jax.data import records
  files = (sorted(glob.glob(os.path.join(train_files, "*"))) if os.path.isdir(train_files)
           else sorted(glob.glob(train_files)))
  if not files:
    raise FileNotFoundError(f"--train_files {train_files}: no files")
  images, labels, boxes = [], [], []
  for path in files:
    for raw in records.iter_tfrecord(path):
      box = records.parse_object_boxes(raw)
      if len(box) == 0:
        continue
      rec = records.parse_gldv2_example(raw)
      with Image.open(io.BytesIO(rec.encoded)) as im:
        images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
      labels.append(rec.label)
      boxes.append(box[0])
      if len(images) >= max_images:
        return np.stack(images), np.asarray(labels), np.stack(boxes)
  if not images:
    raise ValueError(f"--train_files {train_files}: no record carries an object box "
                     "(image/object/bbox/*)")
  return np.stack(images), np.asarray(labels), np.stack(boxes)


def check_run(workdir: str, train_files: str, max_images: int = 96) -> dict[str, Any]:
  """Loads the run's latest checkpoint and computes `hits` on boxed training records."""
  import jax.numpy as jnp
  from flax import nnx
  from qaff_jax import losses
  from qaff_jax import state as state_lib
  from qaff_jax.evaluation import runner
  from qaff_jax.data import transforms
  from qaff_jax.models import qaff

  config = state_lib.load_config(workdir)
  if config.model.head != "qaff":
    raise ValueError(f"{workdir}: model.head={config.model.head!r}; the check needs a QAFF run")
  config, graphdef, state, _, step = runner.load_state(workdir, config)
  module = nnx.merge(graphdef, state.params, state.model_state)
  module.net.eval()
  images, labels, boxes = _records_with_boxes(train_files, max_images, config.data.image_size)
  out = module.net(transforms.normalize_jnp(jnp.asarray(images)))
  aux = out["aux_descriptors"]
  feats = jnp.concatenate([aux["global"][:, None], aux["regional"], aux["scale"]], axis=1)
  n, k, d = feats.shape
  name = config.loss.name if config.loss.name in ("arcface", "cosface") else "arcface"
  per_feature = losses.margin_softmax_loss(
      feats.reshape(n * k, d), module.classifier.weight[...],
      jnp.repeat(jnp.asarray(labels), k), num_classes=config.data.num_classes, name=name,
      scale=config.loss.scale, margin=config.loss.margin)[0].reshape(n, k)
  grid = qaff.settings_from_config(config.model).grid
  result = hits(np.asarray(per_feature), np.asarray(out["fusion_weights"]), boxes, grid)
  return {"workdir": workdir, "step": int(step), **result}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a QAFF training run's folder")
  parser.add_argument("--train_files", required=True,
                      help="folder or glob of TFRecords with image/object/bbox/* boxes")
  parser.add_argument("--max_images", type=int, default=96,
                      help="boxed records to read (default 96)")
  args = parser.parse_args(argv)
  print(json.dumps(check_run(args.workdir, args.train_files, args.max_images), indent=1))


if __name__ == "__main__":
  main()
