"""Evaluation of a train state on revisitop-format datasets (end-of-training hook).

extract (multi-scale, bucketed, sharded) -> exact cosine ranking -> revisited
E/M/H mAP and mP@k -> report in `<workdir>/eval/`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from qaff_jax.data import revisited
from qaff_jax.evaluation import extract as extract_lib
from qaff_jax.evaluation import metrics
from qaff_jax.evaluation import report
from qaff_jax.evaluation import runner
from qaff_jax.evaluation import search


def extract_dataset(forward, ds: "revisited.RevisitedDataset", *, mesh, eval_cfg):
  """Query (bbox-cropped) and database outputs of one revisited dataset."""
  (q_loaders, q_sizes), (db_loaders, db_sizes) = runner.dataset_inputs(ds, missing=set())
  settings = runner.ExtractSettings.from_config(eval_cfg)
  kw = dict(forward=forward, mesh=mesh, settings=settings)
  return (runner.cached_extract(None, ds.qimlist, q_loaders, q_sizes, **kw),
          runner.cached_extract(None, ds.imlist, db_loaders, db_sizes, **kw))


def fusion_summary(config, q: dict, db: dict,
                   ds: "revisited.RevisitedDataset | None" = None) -> dict:
  """QAFF fusion-weight statistics over the queries then database of a dataset.

  With `ds` whose folder holds `objects.json`, the summary gains the
  `adaptivity` section (kinds for all images, object boxes for the database
  only: queries are cropped to their gnd bbx; see
  `fusion_stats.dataset_metadata`). Without a sidecar it is left out.
  """
  from qaff_jax.evaluation import fusion_stats
  from qaff_jax.models import qaff
  settings = qaff.settings_from_config(config.model)
  weights = np.concatenate([q["fusion_weights"], db["fusion_weights"]])
  meta = None if ds is None else fusion_stats.dataset_metadata(ds)
  kinds, boxes = meta if meta is not None else (None, None)
  return fusion_stats.fusion_summary(weights, settings.grid, settings.scales,
                                     kinds=kinds, boxes=boxes)


def evaluate_descriptors(q: np.ndarray, db: np.ndarray, gnd) -> dict:
  ranks = search.full_ranking(q, db)
  return metrics.evaluate_revisited(ranks, gnd)


def evaluate_state(config, graphdef, state, mesh, workdir: str) -> dict:
  """Evaluates the network in `state` on every dataset in `config.eval.datasets`."""
  from qaff_jax import state as state_lib
  net = state_lib.merge_model(graphdef, state, train=False)
  forward = extract_lib.make_forward(net, mesh, keys=("descriptor", "fusion_weights"))
  out_dir = os.path.join(workdir, "eval")
  results = {}
  for name in filter(None, config.eval.datasets.split(",")):
    ds = revisited.RevisitedDataset(config.eval.data_root, name.strip())
    t0 = time.perf_counter()
    q, db = extract_dataset(forward, ds, mesh=mesh, eval_cfg=config.eval)
    extract_s = time.perf_counter() - t0
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      np.save(os.path.join(out_dir, f"{name}_query.npy"), q["descriptor"])
      np.save(os.path.join(out_dir, f"{name}_db.npy"), db["descriptor"])
    results[name] = evaluate_descriptors(q["descriptor"], db["descriptor"], ds.gnd)
    # Wall time per image, compilations included (a handful of shape buckets).
    results[name]["extract_ms_per_image"] = 1e3 * extract_s / (ds.n_queries + ds.n_db)
    results[name]["descriptor_bytes"] = int(db["descriptor"].shape[1] * 4)
    if "fusion_weights" in db:
      results[name]["fusion"] = fusion_summary(config, q, db, ds)
    logging.info("%s: mAP E/M/H %.2f / %.2f / %.2f", name, 100 * results[name]["mAP_E"],
                 100 * results[name]["mAP_M"], 100 * results[name]["mAP_H"])
  if jax.process_index() == 0:
    report.write_report(results, out_dir, extra={"step": int(state.step)})
  return results
