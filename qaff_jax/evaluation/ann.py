"""Approximate nearest-neighbour search with ScaNN (dot product = cosine).

The index is ScaNN's tree (k-means partitioning into `num_leaves` leaves) +
asymmetric hashing (anisotropic quantisation, 4-bit codes per block of
`dims_per_block` dimensions) + exact float32 re-ordering of the best `reorder`
candidates. Databases smaller than `BRUTE_FORCE_BELOW` get an exact brute-force
searcher instead, behind the same API (partitioning a few hundred vectors is
pointless and k-means would leave empty leaves).

Everything stays float32: NumPy 2 promotes float32 arrays combined with float64
scalars or arrays to float64, and a float64 query batch makes ScaNN convert it
on every call (about 15x slower searches), so inputs are cast once here.

Settings (1M clustered D=512 vectors, top-100, 2-core CPU; see NOTES.md):
2000 leaves / 250k training sample; recall 0.95 at leaves_to_search=320,
reorder=500. Recall depends on the data: tune with `tune_scann`.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from typing import Any, Sequence

import numpy as np
import scann

BRUTE_FORCE_BELOW = 1000
DEFAULT_TRAINING_SAMPLE = 250_000
DEFAULT_SEARCH_FRACTION = 0.16  # leaves searched by default
DEFAULT_REORDER_FACTOR = 5  # reorder = 5 * k by default


def _f32_matrix(x: Any, name: str) -> np.ndarray:
  """A C-contiguous float32 [n, D] numpy array (1-D input becomes one row)."""
  arr = np.asarray(x)
  if arr.ndim == 1:
    arr = arr[None, :]
  if arr.ndim != 2:
    raise ValueError(f"{name} must be [n, D], got shape {arr.shape}")
  return np.ascontiguousarray(arr, dtype=np.float32)


def default_num_leaves(n: int) -> int:
  """About sqrt(n) leaves, at least 1 and at most n // 20 (>= 20 per leaf)."""
  return int(max(1, min(round(math.sqrt(n)), n // 20)))


def build_scann(
    db: Any,
    *,
    num_leaves: int | None = None,
    num_leaves_to_search: int | None = None,
    training_sample_size: int | None = None,
    dims_per_block: int = 2,
    anisotropic_quantization_threshold: float = 0.2,
    reorder: int | None = None,
    k: int = 100,
    brute_force_below: int = BRUTE_FORCE_BELOW,
    training_threads: int = 0,
) -> Any:
  """Builds a ScaNN dot-product searcher over L2-normalised descriptors.

  Args:
    db: [n, D] database (converted to float32).
    num_leaves: tree leaves (default `default_num_leaves(n)`, clipped to n).
    num_leaves_to_search: default leaves searched per query (default 16% of
      the leaves, at least 1).
    training_sample_size: vectors sampled to train the tree and the quantiser
      (default min(n, 250k)).
    dims_per_block: AH dimensions per 4-bit code (2 -> D/2 codes; saved one
      byte per code, i.e. D/2 bytes/image, plus the float32 re-ordering copy).
    anisotropic_quantization_threshold: AH anisotropic (noise shaping) threshold.
    reorder: default candidates re-scored exactly (default 5 * k; 0 disables
      re-ordering: AH scores only).
    k: default number of neighbours (clipped to n).
    brute_force_below: databases with fewer rows get an exact brute-force
      searcher (all tree/AH arguments are then ignored).
    training_threads: threads for training (0: all cores).

  Returns:
    A `scann.scann_ops_pybind.ScannSearcher`.
  """
  x = _f32_matrix(db, "db")
  n = x.shape[0]
  if n == 0:
    raise ValueError("cannot build an index over an empty database")
  k = max(1, min(int(k), n))
  builder = scann.scann_ops_pybind.builder(x, k, "dot_product")
  if n < brute_force_below:
    return builder.score_brute_force().build()
  leaves = default_num_leaves(n) if num_leaves is None else int(num_leaves)
  leaves = max(1, min(leaves, n))
  if num_leaves_to_search is None:
    num_leaves_to_search = math.ceil(DEFAULT_SEARCH_FRACTION * leaves)
  to_search = max(1, min(int(num_leaves_to_search), leaves))
  sample = min(n, DEFAULT_TRAINING_SAMPLE if training_sample_size is None
               else int(training_sample_size))
  builder = builder.tree(leaves, to_search, training_sample_size=sample)
  builder = builder.score_ah(
      dims_per_block,
      anisotropic_quantization_threshold=anisotropic_quantization_threshold,
      training_sample_size=sample)
  reorder = DEFAULT_REORDER_FACTOR * k if reorder is None else int(reorder)
  if reorder > 0:
    builder = builder.reorder(max(reorder, k))
  if training_threads:
    builder = builder.set_n_training_threads(training_threads)
  return builder.build()


def save_scann(searcher: Any, directory: str | os.PathLike) -> str:
  """Serialises `searcher` into `directory` (created; relocatable paths)."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  searcher.serialize(directory, relative_path=True)
  return directory


def load_scann(directory: str | os.PathLike) -> Any:
  """Loads a searcher written by `save_scann`."""
  directory = os.fspath(directory)
  if not os.path.isfile(os.path.join(directory, "scann_assets.pbtxt")):
    raise FileNotFoundError(f"no ScaNN index (scann_assets.pbtxt) in {directory}")
  return scann.scann_ops_pybind.load_searcher(directory)


def num_leaves_of(searcher: Any) -> int | None:
  """The searcher's number of tree leaves (None for brute force)."""
  found = re.search(r"num_children:\s*(\d+)", str(searcher.config()))
  return int(found.group(1)) if found else None


def scann_search(
    searcher: Any,
    queries: Any,
    k: int,
    leaves_to_search: int | None = None,
    reorder: int | None = None,
    parallel: bool = True,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k by (approximate) dot product.

  Args:
    searcher: from `build_scann` / `load_scann`.
    queries: [nq, D] (or one [D] query) L2-normalised queries.
    k: neighbours per query.
    leaves_to_search: leaves searched (None: the searcher's default).
    reorder: candidates re-scored exactly (None: the searcher's default).
    parallel: use ScaNN's multi-threaded batched search.
    batch_size: queries per thread task when `parallel`.

  Returns:
    (scores [nq, k] float32, indices [nq, k] int64) as numpy, best first.
    Slots ScaNN could not fill (fewer than k candidates in the leaves searched,
    or k > n) hold index -1 and score -inf.
  """
  q = _f32_matrix(queries, "queries")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  nq = q.shape[0]
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  if parallel:
    found, dist = searcher.search_batched_parallel(
        q, k, reorder, leaves_to_search, batch_size=batch_size)
  else:
    found, dist = searcher.search_batched(q, k, reorder, leaves_to_search)
  found = np.asarray(found).astype(np.int64).reshape(nq, -1)
  dist = np.asarray(dist, dtype=np.float32).reshape(nq, -1)
  indices = np.full((nq, k), -1, np.int64)
  scores = np.full((nq, k), -np.inf, np.float32)
  width = min(k, found.shape[1])
  valid = np.isfinite(dist[:, :width])
  indices[:, :width] = np.where(valid, found[:, :width], -1)
  scores[:, :width] = np.where(valid, dist[:, :width], -np.inf)
  return scores, indices


def recall_at_k(approx_indices: Any, exact_indices: Any, k: int) -> float:
  """Mean fraction of the exact top-k found in the approximate top-k.

  Rows must not repeat an index (true for any search result); -1 slots never
  match.
  """
  a = np.asarray(approx_indices)[:, :k].astype(np.int64)
  e = np.asarray(exact_indices)[:, :k].astype(np.int64)
  if a.shape[0] != e.shape[0]:
    raise ValueError(f"{a.shape[0]} approximate vs {e.shape[0]} exact rows")
  if e.shape[1] < k:
    raise ValueError(f"exact_indices has only {e.shape[1]} columns, k={k}")
  if a.shape[0] == 0:
    return float("nan")
  both = np.sort(np.concatenate([a, e], axis=1), axis=1)
  hits = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
  return float(hits.sum(axis=1).mean() / k)


def index_bytes(directory: str | os.PathLike, per_file: bool = False
                ) -> int | dict[str, int]:
  """Bytes on disk of a saved index (total, or {relative path: bytes})."""
  sizes = {}
  for root, _, files in os.walk(os.fspath(directory)):
    for name in files:
      path = os.path.join(root, name)
      sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
  return sizes if per_file else sum(sizes.values())


def bytes_per_image(directory: str | os.PathLike, n: int) -> float:
  """Index bytes on disk divided by the number of database images."""
  return index_bytes(directory) / max(1, n)


def measure_latency(
    searcher: Any,
    queries: Any,
    k: int,
    leaves_to_search: int | None = None,
    reorder: int | None = None,
    num_single: int = 200,
    repeats: int = 3,
) -> dict[str, float]:
  """Single-query latency and batched throughput of a searcher.

  Args:
    searcher: a ScaNN searcher.
    queries: [nq, D] queries (all used for the batched timings).
    k, leaves_to_search, reorder: search settings (None: searcher defaults).
    num_single: queries timed one at a time (one warm-up search first).
    repeats: batched runs; the fastest is reported.

  Returns:
    {'single_ms_mean', 'single_ms_p50', 'single_ms_p99', 'batched_ms_per_query',
     'batched_qps', 'parallel_qps'}: one-thread `search` per query, one-thread
    `search_batched`, and multi-threaded `search_batched_parallel`.
  """
  q = _f32_matrix(queries, "queries")
  leaves = -1 if leaves_to_search is None else int(leaves_to_search)
  pre = -1 if reorder is None else int(reorder)
  singles = q[:max(1, min(num_single, q.shape[0]))]
  searcher.search(singles[0], k, pre, leaves)  # warm-up
  times = []
  for row in singles:
    t0 = time.perf_counter()
    searcher.search(row, k, pre, leaves)
    times.append(time.perf_counter() - t0)
  times_ms = np.asarray(times) * 1e3

  def best_of(fn) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t0)
    return min(runs)

  reorder_arg = None if reorder is None else int(reorder)
  leaves_arg = None if leaves_to_search is None else int(leaves_to_search)
  batched_s = best_of(
      lambda: searcher.search_batched(q, k, reorder_arg, leaves_arg))
  parallel_s = best_of(
      lambda: searcher.search_batched_parallel(q, k, reorder_arg, leaves_arg))
  return {
      "single_ms_mean": float(times_ms.mean()),
      "single_ms_p50": float(statistics.median(times_ms.tolist())),
      "single_ms_p99": float(np.percentile(times_ms, 99)),
      "batched_ms_per_query": 1e3 * batched_s / q.shape[0],
      "batched_qps": q.shape[0] / batched_s,
      "parallel_qps": q.shape[0] / parallel_s,
  }


def tune_scann(
    searcher: Any,
    queries: Any,
    exact_indices: Any,
    k: int,
    target_recall: float = 0.95,
    leaves_grid: Sequence[int] | None = None,
    reorder_grid: Sequence[int] | None = None,
) -> dict[str, Any]:
  """Fastest (leaves_to_search, reorder) reaching `target_recall` at k.

  Use tuning queries distinct from the evaluation queries. For each reorder
  value the leaves are increased until the target is met (more leaves only
  cost time); among those settings the one with the best measured parallel
  throughput wins.

  Args:
    searcher: a tree searcher from `build_scann` (built with reordering if
      reorder values > 0 are to be tried).
    queries: [nq, D] tuning queries.
    exact_indices: [nq, >= k] their exact top-k.
    k: neighbours.
    target_recall: recall@k to reach.
    leaves_grid: leaves_to_search values (default: 1 to all leaves, x1.25
      steps).
    reorder_grid: reorder values (default k, 2k, 5k, 10k, 20k).

  Returns:
    {'leaves_to_search', 'reorder', 'recall', 'qps', 'met_target', 'trials'}
    where trials lists every setting tried; if nothing reaches the target the
    most accurate setting is returned with met_target False.
  """
  q = _f32_matrix(queries, "queries")
  n_leaves = num_leaves_of(searcher)
  if n_leaves is None:
    raise ValueError("tune_scann needs a tree searcher (this is brute force)")
  if leaves_grid is None:  # geometric, ratio ~1.25, from 1 leaf to all
    steps = math.ceil(math.log(n_leaves) / math.log(1.25)) if n_leaves > 1 else 0
    leaves_grid = [round(1.25**i) for i in range(steps)] + [n_leaves]
  leaves_grid = sorted({max(1, min(int(v), n_leaves)) for v in leaves_grid})
  if reorder_grid is None:
    reorder_grid = [f * k for f in (1, 2, 5, 10, 20)]
  trials = []
  for reorder in sorted({int(r) for r in reorder_grid}):
    for leaves in leaves_grid:
      t0 = time.perf_counter()
      _, found = scann_search(searcher, q, k, leaves, reorder)
      qps = q.shape[0] / (time.perf_counter() - t0)
      rec = recall_at_k(found, exact_indices, k)
      trials.append({"leaves_to_search": leaves, "reorder": reorder,
                     "recall": rec, "qps": qps})
      if rec >= target_recall:
        break
  good = [t for t in trials if t["recall"] >= target_recall]
  if good:
    best = max(good, key=lambda t: t["qps"])
  else:
    best = max(trials, key=lambda t: (t["recall"], t["qps"]))
  return {**best, "met_target": bool(good), "trials": trials}
