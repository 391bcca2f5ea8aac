"""Evaluation jobs: checkpoint -> descriptors -> search -> re-rank -> metrics -> report.

Everything `python -m qaff_jax.evaluate` does lives here, importable and tested:
  * `load_network(workdir, ...)`: the eval-mode network of a run's checkpoint;
  * `cached_extract(...)`: descriptors saved with their image ids and reused;
  * `search_and_rerank(...)`: exact or ScaNN search, optional re-ranking, with
    latency, recall against exact search and index bytes per image;
  * `score(...)`: the revisitop metrics of a ranking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from qaff_jax import checkpoint as ckpt_lib
from qaff_jax import parallel
from qaff_jax.data import revisited
from qaff_jax.evaluation import extract as extract_lib
from qaff_jax.evaluation import metrics
from qaff_jax.evaluation import search

BACKENDS = ("exact", "scann")
RERANK_METHODS = ("none", "superglobal", "aqe", "dba")


# ---------------------------------------------------------------------------
# Model.


def load_state(workdir: str, config=None, step: int | None = None):
  """(config, graphdef, restored params + model state, mesh, step) of a run.

  The config defaults to the run's saved `config.json`; the step to the latest.
  """
  from qaff_jax import state as state_lib
  config = config if config is not None else state_lib.load_config(workdir)
  mesh = parallel.make_mesh(config.mesh.model)
  tx, _ = state_lib.make_optimizer(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10**6,
                               async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
    graphdef, abstract, _ = state_lib.abstract_train_state(config, mesh, tx)
    state = ckpt.restore_model(step, abstract)
  finally:
    ckpt.close()
  return config, graphdef, state, mesh, step


def load_network(workdir: str, config=None, step: int | None = None):
  """(config, eval-mode network, mesh, step) from the run in `workdir`."""
  from qaff_jax import state as state_lib
  config, graphdef, state, mesh, step = load_state(workdir, config, step)
  return config, state_lib.merge_model(graphdef, state, train=False), mesh, step


# ---------------------------------------------------------------------------
# Descriptors.


@dataclasses.dataclass
class ExtractSettings:
  max_side: int = 1024
  scales: tuple[float, ...] = extract_lib.DEFAULT_SCALES
  batch_size: int = 8
  bucket: int = 64
  scale_reduce: str = "mean"

  @classmethod
  def from_config(cls, eval_cfg) -> "ExtractSettings":
    """The extraction fields of `config.eval`."""
    return cls(max_side=eval_cfg.max_side, scales=tuple(eval_cfg.scales),
               batch_size=eval_cfg.batch_size, bucket=eval_cfg.bucket,
               scale_reduce=eval_cfg.scale_reduce)

  def key(self) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True)
                        .encode()).hexdigest()[:10]


def _save_npz(path: str, **arrays) -> None:
  """Writes atomically: a reader never sees half a file."""
  d = os.path.dirname(path) or "."
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
  os.close(fd)
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def cached_extract(path: str | None, ids: Sequence[str], loaders, sizes, *, forward,
                   mesh, settings: ExtractSettings) -> dict[str, np.ndarray]:
  """Extracts (or reloads from `path`) outputs for images `ids`.

  The file holds `ids`, `descriptor` and other per-image outputs (e.g.
  `fusion_weights`); it is reused only when its ids, settings and image sizes
  match (sizes: another copy of the images, or a --skip_missing run's blank
  stand-ins, is not mistaken for the cached one; same-sized files whose pixels
  changed are not detected).
  """
  sizes_key = hashlib.sha256(np.asarray(sizes, np.int64).tobytes()).hexdigest()[:16]
  meta = ("ids", "settings", "sizes_key")
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      if (list(z["ids"]) == list(ids) and str(z["settings"]) == settings.key()
          and "sizes_key" in z.files and str(z["sizes_key"]) == sizes_key):
        logging.info("reusing descriptors %s", path)
        return {k: z[k] for k in z.files if k not in meta}
  out = extract_lib.extract(forward, loaders, sizes, mesh=mesh, max_side=settings.max_side,
                            scales=settings.scales, batch_size=settings.batch_size,
                            bucket=settings.bucket, scale_reduce=settings.scale_reduce)
  if path and jax.process_index() == 0:
    _save_npz(path, ids=np.asarray(ids, dtype=str), settings=settings.key(),
              sizes_key=sizes_key, **out)
  return out


def _blank_loader(size):
  return lambda: np.zeros((*size, 3), np.uint8)


def dataset_inputs(ds: revisited.RevisitedDataset, missing: set[str]):
  """Loaders and sizes for the queries (bbox-cropped) and database of `ds`.

  Missing images (allowed by --skip_missing) become black images of 64x64: they
  keep their index so the ground truth stays aligned, and they are counted.
  """
  q_loaders, q_sizes = [], []
  for i in range(ds.n_queries):
    if ds.query_path(i) in missing:
      q_loaders.append(_blank_loader((64, 64)))
      q_sizes.append((64, 64))
      continue
    img = ds.load_query(i, crop=True)
    q_loaders.append(lambda img=img: img)
    q_sizes.append(img.shape[:2])
  db_loaders, db_sizes = [], []
  for i in range(ds.n_db):
    path = ds.db_path(i)
    if path in missing:
      db_loaders.append(_blank_loader((64, 64)))
      db_sizes.append((64, 64))
      continue
    db_loaders.append(lambda i=i: ds.load_db(i))
    db_sizes.append(image_size(path))
  return (q_loaders, q_sizes), (db_loaders, db_sizes)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) from the file header, after EXIF-free RGB conversion."""
  with Image.open(path) as im:
    return im.height, im.width


def path_inputs(paths: Sequence[str], missing: set[str]):
  """Loaders and sizes for plain image files (R1M distractors)."""
  from qaff_jax.data import transforms
  loaders, sizes = [], []
  for p in paths:
    if p in missing:
      loaders.append(_blank_loader((64, 64)))
      sizes.append((64, 64))
      continue

    def load(p=p):
      with open(p, "rb") as f:
        return transforms.decode_image(f.read())

    loaders.append(load)
    sizes.append(image_size(p))
  return loaders, sizes


# ---------------------------------------------------------------------------
# Search and re-ranking.


@dataclasses.dataclass
class SearchResult:
  indices: np.ndarray          # [nq, k] best first
  scores: np.ndarray           # [nq, k]
  info: dict                   # backend, latency, recall, bytes/image


def search_and_rerank(q: np.ndarray, db: np.ndarray, *, backend: str = "exact",
                      k: int | None = None, rerank: str = "none",
                      rerank_params: dict | None = None, scann_params: dict | None = None,
                      scann_dir: str | None = None,
                      target_recall: float = 0.0) -> SearchResult:
  """First-stage search (exact or ScaNN) then optional global re-ranking.

  `k` defaults to the whole database for exact search (the revisitop protocol
  scores full rankings) and to min(n_db, 1000) for ScaNN; a truncated ranking
  counts positives beyond k as not retrieved.

  `target_recall` > 0 (ScaNN only): `ann.tune_for_recall` chooses the build and
  the search settings for this database (or exact search, when that is faster
  or ScaNN cannot reach the target); its report is `info['scann_tuning']`.
  With `scann_dir`, the index and its settings are saved there and re-used by
  a later call on the same database, k and target.
  """
  if backend not in BACKENDS:
    raise ValueError(f"--search={backend!r}; choose one of {BACKENDS}")
  if rerank not in RERANK_METHODS:
    raise ValueError(f"--rerank={rerank!r}; choose one of {RERANK_METHODS}")
  q = np.ascontiguousarray(q, np.float32)
  db = np.ascontiguousarray(db, np.float32)
  n_db = db.shape[0]
  info: dict[str, Any] = {"backend": backend, "n_db": n_db, "n_queries": q.shape[0],
                          "dim": db.shape[1]}

  t0 = time.perf_counter()
  exact_k = n_db if k is None else min(k, n_db)
  ex_scores, ex_idx = _exact(q, db, exact_k)
  exact_s = time.perf_counter() - t0
  info["exact_ms_per_query"] = 1e3 * exact_s / max(1, q.shape[0])
  info["exact_bytes_per_image"] = db.shape[1] * 4

  search_fn: Callable | None = None
  if backend == "exact":
    scores, idx = ex_scores, ex_idx
  else:
    from qaff_jax.evaluation import ann
    k_ann = min(n_db, 1000) if k is None else min(k, n_db)
    if target_recall:
      tuned = _tuned_search(db, k_ann, target_recall, scann_dir)
      info["scann_tuning"] = tuned.report
    if target_recall and tuned.backend == "exact":
      info["search_used"] = "exact"   # tuned: exact search is faster or ScaNN misses
      scores, idx = ex_scores, ex_idx
    else:
      if target_recall:
        searcher = tuned.searcher
        leaves, reorder = tuned.settings["leaves_to_search"], tuned.settings["reorder"]
        if scann_dir:
          info["scann_bytes_per_image"] = tuned.report["bytes_per_image"]
      else:
        searcher = ann.build_scann(db, k=k_ann, **(scann_params or {}))
        leaves = reorder = None
        if scann_dir:
          ann.save_scann(searcher, scann_dir)
          info["scann_bytes_per_image"] = ann.bytes_per_image(scann_dir, n_db)
      info["search_used"] = "scann"
      t0 = time.perf_counter()
      scores, idx = ann.scann_search(searcher, q, k_ann, leaves, reorder)
      info["scann_ms_per_query"] = 1e3 * (time.perf_counter() - t0) / max(1, q.shape[0])
      kr = min(100, k_ann)
      info[f"scann_recall@{kr}"] = ann.recall_at_k(idx, ex_idx, kr)
      search_fn = lambda queries, kk: ann.scann_search(searcher, queries, kk, leaves,
                                                       reorder)

  if rerank != "none":
    from qaff_jax.evaluation import rerank as rerank_lib
    params = dict(rerank_params or {})
    if search_fn is not None and rerank in ("aqe",):
      params.setdefault("search_fn", search_fn)
    t0 = time.perf_counter()
    scores, idx = rerank_lib.rerank(rerank, q, db, idx, k=idx.shape[1], **params)
    info["rerank"] = rerank
    info["rerank_ms_per_query"] = 1e3 * (time.perf_counter() - t0) / max(1, q.shape[0])
  return SearchResult(indices=np.asarray(idx), scores=np.asarray(scores), info=info)


def _tuned_search(db: np.ndarray, k: int, target: float, scann_dir: str | None):
  """`ann.tune_for_recall` for `db`, or the tuned index saved in `scann_dir`
  when it was tuned for the same database (content hash), k and target."""
  from qaff_jax.evaluation import ann
  digest = ann.db_digest(db) if scann_dir else None
  if scann_dir and os.path.isfile(os.path.join(scann_dir, ann.SETTINGS_FILE)):
    saved = ann.load_tuned(scann_dir)
    rep = saved.report
    if (rep.get("db_digest") == digest and rep.get("k") == min(k, db.shape[0] - 1)
        and rep.get("target_recall") == target):
      logging.info("re-using the tuned index in %s", scann_dir)
      return saved
  tuned = ann.tune_for_recall(db, k, target, index_dir=scann_dir)
  if scann_dir:
    tuned.report["db_digest"] = digest
    ann.save_tuned(tuned, scann_dir, write_index=False)
  return tuned


def _exact(q, db, k):
  if k == db.shape[0]:
    ranks = search.full_ranking(q, db)           # [n_db, nq]
    idx = np.ascontiguousarray(ranks.T)
    scores = np.take_along_axis(q @ db.T, idx, axis=1)
    return scores, idx
  return search.exact_search(q, db, k)


def search_kwargs(config, *, search: str | None = None, rerank: str | None = None,
                  k: int | None = None, scann_dir: str | None = None) -> dict:
  """`search_and_rerank` arguments from `config.eval` (the CLI's flags on top)."""
  ev = config.eval
  method = rerank or ev.rerank
  params = {}
  if method == "superglobal":
    params = dict(m=ev.superglobal.m, knn=ev.superglobal.knn, beta=ev.superglobal.beta)
  elif method in ("aqe", "dba"):
    params = dict(n=ev.qe.n, alpha=ev.qe.alpha)
  sc = ev.scann
  scann = {key: v for key, v in dict(
      num_leaves=sc.num_leaves or None, num_leaves_to_search=sc.num_leaves_to_search or None,
      reorder=sc.reorder or None, training_sample_size=sc.training_sample_size,
      dims_per_block=sc.dims_per_block,
      anisotropic_quantization_threshold=sc.anisotropic_quantization_threshold).items()
           if v is not None}
  return dict(backend=search or ev.search, k=k, rerank=method, rerank_params=params,
              scann_params=scann, scann_dir=scann_dir, target_recall=sc.target_recall)


# ---------------------------------------------------------------------------
# One evaluation of a network: the training hook and `python -m qaff_jax.evaluate
# --workdir` both run this.


def dataset_names(text: str) -> list[str]:
  """'roxford5k, rparis6k' -> ['roxford5k', 'rparis6k'] (`eval.datasets`, --datasets)."""
  return [n.strip() for n in text.split(",") if n.strip()]


def descriptor_cache(workdir: str) -> str:
  """Where a run's descriptors live: `<set>_<query|db>_step<S>_<settings>.npz`,
  each with the image `ids`, the `settings` key, `descriptor` and any other
  per-image output (QAFF: `fusion_weights`)."""
  return os.path.join(workdir, "eval", "descriptors")


def report_name(step: int, settings: ExtractSettings, kwargs: dict, *,
                r1m: int = 0) -> str:
  """`step<S>_<search>_<rerank>[_k<K>][_r1m]_<extraction settings key>`."""
  parts = [f"step{step}", kwargs.get("backend", "exact"), kwargs.get("rerank", "none")]
  if kwargs.get("k"):
    parts.append(f"k{kwargs['k']}")
  if kwargs.get("target_recall") and kwargs.get("backend") == "scann":
    parts.append(f"recall{kwargs['target_recall']:g}")
  if r1m:
    parts.append("r1m")
  return "_".join(parts + [settings.key()])


def evaluate_network(config, net, mesh, *, step: int, workdir: str | None,
                     data_root: str, datasets: Sequence[str], kwargs: dict,
                     distractors: tuple[list, list, list] | None = None,
                     skip_missing: bool = False, on_ranking=None,
                     views: dict | None = None) -> tuple[dict, dict]:
  """Extract (cached in the run's descriptor cache), search, re-rank, score.

  Args:
    config: the run's config (`eval.*` extraction settings, `model` for QAFF).
    net: the eval-mode network; `step` its checkpoint step.
    workdir: the run folder (its descriptor cache), or None for no cache.
    data_root, datasets: revisitop root and dataset names.
    kwargs: `search_and_rerank` arguments (`search_kwargs`).
    distractors: (paths, ids, missing) of R1M images added to each database.
    on_ranking: called as `on_ranking(name, indices)` per dataset.
    views: a dict to fill with what the HTML report shows, per dataset: the
      `dataset`, the first `HTML_TOP` ranked `ranks` and the queries' `fusion`
      weights (QAFF); pass it on to `write_run_report`.
  Returns:
    (results {dataset: revisitop metrics}, info {dataset: search info, step,
    extraction time, descriptor bytes, missing images, QAFF fusion summary}).
  """
  forward = extract_lib.make_forward(net, mesh, keys=("descriptor", "fusion_weights"))
  settings = ExtractSettings.from_config(config.eval)
  cache = descriptor_cache(workdir) if workdir else None
  tag = f"step{step}_{settings.key()}"

  def cached(kind: str, ids, loaders, sizes):
    path = os.path.join(cache, f"{kind}_{tag}.npz") if cache else None
    return cached_extract(path, ids, loaders, sizes, forward=forward, mesh=mesh,
                          settings=settings)

  extra_db = None
  if distractors is not None:
    paths, ids, missing = distractors
    loaders, sizes = path_inputs(paths, set(missing))
    extra_db = cached("r1m", ids, loaders, sizes)["descriptor"]
    logging.info("R1M: %d distractors (%d missing)", len(paths), len(missing))

  results, info = {}, {}
  for name in datasets:
    ds = revisited.RevisitedDataset(data_root, name)
    missing = set(ds.check_images(skip_missing=skip_missing))
    (ql, qs), (dl, dsz) = dataset_inputs(ds, missing)
    t0 = time.perf_counter()
    q = cached(f"{name}_query", ds.qimlist, ql, qs)
    db = cached(f"{name}_db", ds.imlist, dl, dsz)
    extract_s = time.perf_counter() - t0
    db_desc = db["descriptor"] if extra_db is None else np.concatenate([db["descriptor"],
                                                                        extra_db])
    res = search_and_rerank(q["descriptor"], db_desc, **kwargs)
    results[name] = score(res.indices, ds.gnd)
    info[name] = {**res.info, "step": step, "missing_images": len(missing),
                  "r1m": 0 if extra_db is None else len(extra_db),
                  # Wall time per image, compilations included (a handful of
                  # shape buckets); near 0 when the descriptors came from the cache.
                  "extract_ms_per_image": 1e3 * extract_s / (ds.n_queries + ds.n_db),
                  "descriptor_bytes": int(db["descriptor"].shape[1] * 4)}
    if "fusion_weights" in db:
      from qaff_jax.evaluation import fusion_stats  # noqa: PLC0415
      info[name]["fusion"] = fusion_stats.dataset_fusion_summary(config, q, db, ds)
    if on_ranking is not None:
      on_ranking(name, res.indices)
    if views is not None:
      views[name] = {"dataset": ds, "ranks": np.asarray(res.indices)[:, :HTML_TOP],
                     "fusion": q.get("fusion_weights")}
    logging.info("%s (step %d): mAP E/M/H %.2f / %.2f / %.2f", name, step,
                 100 * results[name]["mAP_E"], 100 * results[name]["mAP_M"],
                 100 * results[name]["mAP_H"])
  return results, info


LATEST = "LATEST"   # eval/LATEST names the newest report folder
HTML_TOP = 10       # retrieved images per query in report.html


def write_run_report(results: dict, info: dict, workdir: str, name: str,
                     extra: dict | None = None, views: dict | None = None,
                     config=None) -> str:
  """`<workdir>/eval/<name>/report.{json,md}` (and `report.html` with `views`
  from `evaluate_network`), then `eval/report.*` <- copies of them and
  `eval/LATEST` <- name. Process 0 only; returns the folder."""
  from qaff_jax.evaluation import report  # noqa: PLC0415
  eval_dir = os.path.join(workdir, "eval")
  out = os.path.join(eval_dir, name)
  if jax.process_index() != 0:
    return out
  report.write_report(results, out, extra={"info": info, **(extra or {})})
  if views:
    grid, scales = None, ()
    if config is not None and config.model.head == "qaff":
      from qaff_jax.models import qaff  # noqa: PLC0415
      settings = qaff.settings_from_config(config.model)
      grid, scales = settings.grid, settings.scales
    fusion = {k: v["fusion"] for k, v in views.items() if v["fusion"] is not None}
    kw = dict(datasets={k: v["dataset"] for k, v in views.items()},
              ranks={k: v["ranks"] for k, v in views.items()},
              fusion=fusion if fusion and grid else None, grid=grid, scales=scales,
              top=HTML_TOP, title=f"Retrieval report: {name}")
    report.write_html_report(results, out, **kw)
  for file in ("report.json", "report.md", "report.html"):
    if os.path.exists(os.path.join(out, file)):
      shutil.copyfile(os.path.join(out, file), os.path.join(eval_dir, file))
    elif os.path.exists(os.path.join(eval_dir, file)):
      os.remove(os.path.join(eval_dir, file))   # an older evaluation's page
  fd, tmp = tempfile.mkstemp(dir=eval_dir, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(name + "\n")
  os.replace(tmp, os.path.join(eval_dir, LATEST))
  return out


def latest_report(workdir: str) -> str | None:
  """The newest report folder of a run (from `eval/LATEST`), or None."""
  path = os.path.join(workdir, "eval", LATEST)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return os.path.join(workdir, "eval", f.read().strip())


# ---------------------------------------------------------------------------
# Metrics.


def score(indices: np.ndarray, gnd) -> dict:
  """Revisitop metrics of `indices` [nq, k] (best first)."""
  return metrics.evaluate_revisited(search.ranks_from_indices(np.asarray(indices)), gnd)


def flat_metrics(result: dict) -> dict:
  """Only the headline numbers (no per-query lists), for --json and tables."""
  return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.number))}
