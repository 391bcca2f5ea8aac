r"""Search benchmark: exact (JAX) vs ScaNN on synthetic clustered unit vectors.

python -m qaff_jax.bench.search --n 1000000 --dim 512 --queries 1000 --k 100

The database and queries are drawn (seeded) around `--clusters` random unit
centres (default n // 100: ~100 vectors per centre, so a top-100 crosses
clusters) and L2-normalised; queries are fresh draws, not database rows. The
data's difficulty sets the leaves ScaNN must search: fewer, larger clusters
(e.g. `--clusters` n // 1000) make it easier. Prints one JSON line per backend:

* exact_jax: `search.exact_search` queries/s on the whole query batch (after a
  compile run), single-query latency, and bytes/image of the raw float32
  descriptors.
* scann: build time, bytes/image of the saved index, and — at the fastest
  (leaves_to_search, reorder) reaching `--target_recall` on separate tuning
  queries — recall@k vs exact on the evaluation queries, queries/s (one thread
  and multi-threaded) and single-query latency.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import jax
import numpy as np
from absl import flags

from qaff_jax import cli_util
from qaff_jax.evaluation import ann, search

_N = flags.DEFINE_integer("n", 100_000, "Database size.")
_DIM = flags.DEFINE_integer("dim", 512, "Descriptor dimension.")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Evaluation queries.")
_TUNE_QUERIES = flags.DEFINE_integer("tune_queries", 1000,
                                     "Separate queries used to tune ScaNN.")
_K = flags.DEFINE_integer("k", 100, "Neighbours per query.")
_CLUSTERS = flags.DEFINE_integer("clusters", None,
                                 "Cluster centres (default n // 100, >= 1).")
_NOISE = flags.DEFINE_float("noise", 1.0,
                            "Noise norm around a centre (1.0: cosine ~0.7).")
_SEED = flags.DEFINE_integer("seed", 0, "Data seed.")
_BACKENDS = flags.DEFINE_list("backends", ["exact", "scann"],
                              "Backends to run: exact, scann.")
_TARGET = flags.DEFINE_float("target_recall", 0.95, "Recall@k to tune for.")
_MARGIN = flags.DEFINE_float(
    "tune_margin", 0.01,
    "Tune for target + margin on the tuning queries, so that the evaluation "
    "queries still reach the target (per-query recall is heavy-tailed: its "
    "standard error is ~0.005 at 1000 queries on the default data).")
_NUM_LEAVES = flags.DEFINE_integer("num_leaves", None,
                                   "ScaNN leaves (default ~2 sqrt(n)).")
_TRAIN_SAMPLE = flags.DEFINE_integer("training_sample_size", 250_000,
                                     "ScaNN training sample.")
_CHUNK = flags.DEFINE_integer("chunk_size", 50_000,
                              "Exact search: database rows per step.")
_SINGLE = flags.DEFINE_integer("single_queries", 100,
                               "Queries timed one at a time.")


def clustered_unit_vectors(rng: np.random.Generator, centres: np.ndarray,
                           count: int, noise: float,
                           block: int = 100_000) -> np.ndarray:
  """`count` float32 unit vectors: centre + noise * N(0, I/D), normalised."""
  d = centres.shape[1]
  out = np.empty((count, d), np.float32)
  scale = np.float32(noise / math.sqrt(d))
  for start in range(0, count, block):
    stop = min(count, start + block)
    pick = rng.integers(0, centres.shape[0], size=stop - start)
    v = centres[pick] + scale * rng.standard_normal((stop - start, d),
                                                    dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    out[start:stop] = v
  return out


def make_data(n: int, dim: int, n_queries: int, n_tune: int,
              clusters: int | None, noise: float, seed: int):
  rng = np.random.default_rng(seed)
  clusters = max(1, n // 100) if clusters is None else clusters
  centres = rng.standard_normal((clusters, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  db = clustered_unit_vectors(rng, centres, n, noise)
  queries = clustered_unit_vectors(rng, centres, n_queries, noise)
  tune = clustered_unit_vectors(rng, centres, n_tune, noise)
  return db, queries, tune, clusters


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def bench_exact(db_dev: jax.Array, queries: np.ndarray, k: int, chunk: int,
                n_single: int) -> tuple[dict, np.ndarray]:
  """Exact batched throughput and single-query latency; returns exact indices."""
  nq = queries.shape[0]
  run = lambda q: search.exact_search(q, db_dev, k, chunk_size=chunk,
                                      query_batch_size=nq)
  _, compile_s = _timed(lambda: run(queries))
  (_, exact), batch_s = _timed(lambda: run(queries))
  single = lambda q: search.exact_search(q, db_dev, k, chunk_size=chunk)
  single(queries[:1])  # compile the one-query shape
  times = [_timed(lambda i=i: single(queries[i:i + 1]))[1]
           for i in range(min(n_single, 20, nq))]
  n, dim = db_dev.shape
  return {
      "backend": "exact_jax",
      "device": jax.devices()[0].device_kind,
      "n": n, "dim": dim, "queries": nq, "k": k,
      "qps": nq / batch_s,
      "batch_s": batch_s,
      "first_call_s": compile_s,
      "single_ms_mean": 1e3 * float(np.mean(times)),
      "single_ms_p50": 1e3 * float(np.median(times)),
      "recall_at_k": 1.0,
      "bytes_per_image": 4 * dim,
  }, exact


def bench_scann(db: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                tune: np.ndarray, tune_exact: np.ndarray, k: int,
                target: float, margin: float, num_leaves: int | None,
                train_sample: int, n_single: int) -> dict:
  n, dim = db.shape
  if num_leaves is None:
    num_leaves = ann.default_num_leaves(n) * 2  # ~2000 at 1M, as the anchors
    num_leaves = max(1, min(num_leaves, n // 20))
  searcher, build_s = _timed(lambda: ann.build_scann(
      db, num_leaves=num_leaves, training_sample_size=train_sample, k=k,
      reorder=10 * k))
  with tempfile.TemporaryDirectory() as tmp:
    ann.save_scann(searcher, tmp)
    files = ann.index_bytes(tmp, per_file=True)
  total = sum(files.values())
  reorder_copy = files.get("dataset.npy", 0)
  out = {"backend": "scann", "n": n, "dim": dim, "queries": len(queries),
         "k": k, "build_s": build_s, "num_leaves": ann.num_leaves_of(searcher),
         "training_sample_size": min(n, train_sample),
         "bytes_per_image": total / n,
         "bytes_per_image_without_reorder_copy": (total - reorder_copy) / n}
  if out["num_leaves"] is None:  # brute force (tiny n)
    leaves, reorder, tuned = None, None, {"met_target": True}
  else:
    tuned = ann.tune_scann(searcher, tune, tune_exact, k,
                           target_recall=min(1.0, target + margin))
    leaves, reorder = tuned["leaves_to_search"], tuned["reorder"]
  _, found = ann.scann_search(searcher, queries, k, leaves, reorder)
  lat = ann.measure_latency(searcher, queries, k, leaves, reorder,
                            num_single=n_single)
  out.update({
      "leaves_to_search": leaves, "reorder": reorder,
      "target_recall": target, "tuning_met_target": tuned["met_target"],
      "tuning_recall": tuned.get("recall"),
      "recall_at_k": ann.recall_at_k(found, exact, k),
      "qps": lat["parallel_qps"],
      "qps_one_thread": lat["batched_qps"],
      "single_ms_mean": lat["single_ms_mean"],
      "single_ms_p50": lat["single_ms_p50"],
      "single_ms_p99": lat["single_ms_p99"],
  })
  return out


def main(argv):
  del argv
  unknown = sorted(set(_BACKENDS.value) - {"exact", "scann"})
  if unknown:
    raise cli_util.UsageError(f"--backends: unknown {unknown}; choose from exact, scann")
  t0 = time.perf_counter()
  db, queries, tune, clusters = make_data(
      _N.value, _DIM.value, _QUERIES.value, _TUNE_QUERIES.value,
      _CLUSTERS.value, _NOISE.value, _SEED.value)
  data_s = time.perf_counter() - t0
  common = {"clusters": clusters, "noise": _NOISE.value, "seed": _SEED.value,
            "cpu_count": os.cpu_count(), "data_s": data_s}
  k = _K.value
  db_dev = jax.device_put(db)
  exact_out, exact = bench_exact(db_dev, queries, k, _CHUNK.value,
                                 _SINGLE.value)
  if "exact" in _BACKENDS.value:
    print(json.dumps({**exact_out, **common}), flush=True)
  if "scann" in _BACKENDS.value:
    _, tune_exact = search.exact_search(tune, db_dev, k,
                                        chunk_size=_CHUNK.value)
    del db_dev
    out = bench_scann(db, queries, exact, tune, tune_exact, k, _TARGET.value,
                      _MARGIN.value, _NUM_LEAVES.value, _TRAIN_SAMPLE.value,
                      _SINGLE.value)
    print(json.dumps({**out, **common}), flush=True)


if __name__ == "__main__":
  cli_util.run(main)
