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

import dataclasses
import json
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
    soar_lambda: float | None = None,
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
    soar_lambda: None (each row in one leaf), or SOAR spilling (Sun et al.,
      NeurIPS 2023): each row also goes to a second leaf chosen so that its
      residual there is near-orthogonal to the first (ScaNN's
      TWO_CENTER_ORTHOGONALITY_AMPLIFIED; lambda 1.5 is the paper's and
      ScaNN's default): a second AH code and token per row, far fewer leaves
      to search for the same recall on data whose neighbours straddle leaves.

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
  builder = builder.tree(leaves, to_search, training_sample_size=sample,
                         soar_lambda=None if soar_lambda is None else float(soar_lambda))
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


# ---------------------------------------------------------------------------
# Recall-targeted index: the build and the search settings chosen for the
# database at hand, the promised recall verified on held-out queries.
#
# 1. Queries: given tuning / verification sets, or (default) two disjoint
#    random samples of database rows searched leave-one-out: each row is
#    searched for k + 1 neighbours and itself is dropped from both the exact
#    and the approximate result, so a row never "finds itself".
# 2. Exact top-k of both sets with `search.exact_search`; the second call is
#    timed: exact search's batched queries/s on this database.
# 3. Builds (`default_build_options`): 2 sqrt(n) leaves with SOAR spilling,
#    AH (anisotropic 0.2) at 2 and at 4 dims per block, float32 re-ordering.
#    On the 1M x 512 flat benchmark SOAR halves the leaves a recall needs and
#    4 dims/block halves the scan per leaf at the price of more re-ordering;
#    which wins depends on the target, so both are built and walked.
# 4. Per build and target, on the tuning set: leaves_to_search doubles from
#    1% of the leaves at a generous fixed reorder until the target is met,
#    then bisects down; at that count and three larger ones the smallest
#    reorder still meeting it is bisected on a sqrt(2) grid. A setting meets
#    the target when its recall minus one standard error does. Recalls are
#    memoised, so a second target re-uses the first one's searches.
# 5. The candidates' batched queries/s are measured; the fastest ones are
#    checked on the verification set in turn (at most VERIFY_CANDIDATES; a
#    pass needs recall minus VERIFY_SE standard errors >= target); if all
#    miss, the fastest one step up (x1.25 leaves and reorder). The pick is
#    timed; exact search is chosen instead when it is faster or when nothing
#    met the target.

SETTINGS_FILE = "qaff_search_settings.json"
SETTINGS_FORMAT = 1
MAX_TRIALS = 40          # recall evaluations per (build, target)
LEAVES_START = 0.01      # first leaves_to_search, as a fraction of the leaves
REORDER_FACTOR_MAX = 20  # the fixed reorder of the leaves walk: 20 k
# Candidates (fastest first) checked on the verification queries before stepping up.
VERIFY_CANDIDATES = 4
# A candidate is verified when its recall on the verification queries less this
# many standard errors meets the target (the walk uses 1 on the tuning queries;
# at 1 the 1M flat benchmark's 0.99 pick verified 0.9907 and gave 0.9895 on
# fresh queries).
VERIFY_SE = 2.0
SOAR_LAMBDA = 1.5        # ScaNN's and the SOAR paper's default
# Leaves_to_search of the walk's candidates, as multiples of the fewest that
# meet the target at the widest reorder (finer near 1: verification at
# recall - 2 SE often rejects the first).
CANDIDATE_LEAVES = (1.0, 1.1, 1.25, 1.6)


def default_leaves_options(n: int) -> list[int]:
  """Leaf counts: sqrt(n) and 2 sqrt(n) (>= 20 rows a leaf)."""
  root = math.sqrt(n)
  return sorted({int(max(1, min(round(f * root), n // 20))) for f in (1, 2)})


def default_build_options(n: int) -> list[dict]:
  """The builds `tune_for_recall` tries: 2 sqrt(n) leaves with SOAR spilling,
  AH at 2 and at 4 dims per block (see the notes above `SETTINGS_FILE`)."""
  leaves = default_leaves_options(n)[-1]
  return [{"num_leaves": leaves, "dims_per_block": d, "soar_lambda": SOAR_LAMBDA}
          for d in (2, 4)]


def choose_backend(scann_qps: float | None, exact_qps: float, met_target: bool
                   ) -> tuple[str, str]:
  """('scann' | 'exact', why): ScaNN only if it met the target and is faster."""
  if not met_target or scann_qps is None:
    return "exact", "no ScaNN setting met the target recall"
  if exact_qps >= scann_qps:
    return "exact", (f"exact search is faster at this size ({exact_qps:.0f} vs "
                     f"{scann_qps:.0f} queries/s batched)")
  return "scann", f"ScaNN is {scann_qps / exact_qps:.2f}x faster than exact search"


def per_query_recall(approx_indices: Any, exact_indices: Any, k: int) -> np.ndarray:
  """[nq] fraction of each query's exact top-k in its approximate top-k."""
  a = np.asarray(approx_indices)[:, :k].astype(np.int64)
  e = np.asarray(exact_indices)[:, :k].astype(np.int64)
  both = np.sort(np.concatenate([a, e], axis=1), axis=1)
  hits = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
  return hits.sum(axis=1) / k


def drop_self(indices: np.ndarray, self_rows: np.ndarray | None, k: int) -> np.ndarray:
  """[nq, k]: each row of `indices` ([nq, k + 1]) without its query's own index
  (or without its last entry when the query's row is not among them)."""
  idx = np.asarray(indices)
  if self_rows is None:
    return idx[:, :k]
  hit = idx == np.asarray(self_rows)[:, None]
  first = hit & (np.cumsum(hit, axis=1) == 1)
  first[~first.any(axis=1), -1] = True
  return idx[~first].reshape(idx.shape[0], idx.shape[1] - 1)[:, :k]


def db_digest(db: np.ndarray) -> str:
  """A content hash of the database (shape + bytes), to tie saved settings to it."""
  import hashlib  # noqa: PLC0415
  h = hashlib.sha1(repr((db.shape, str(db.dtype))).encode())
  for start in range(0, db.shape[0], 65536):
    h.update(np.ascontiguousarray(db[start:start + 65536]).data)
  return h.hexdigest()[:16]


@dataclasses.dataclass
class TunedSearch:
  """The outcome of `tune_for_recall`: what to search with, and the evidence."""
  backend: str                 # 'scann' | 'exact'
  searcher: Any                # the ScaNN searcher (None for exact)
  settings: dict               # num_leaves, leaves_to_search, reorder, k, ...
  report: dict                 # recall, speed, sizes, tuning cost (see tune_for_recall)

  def search(self, queries: Any, k: int, exact_db: Any = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k with the tuned settings (exact search over `exact_db` if chosen)."""
    if self.backend == "exact":
      if exact_db is None:
        raise ValueError("the tuned backend is exact search: pass the database")
      from qaff_jax.evaluation import search as search_lib  # noqa: PLC0415
      return search_lib.exact_search(queries, exact_db, k)
    return scann_search(self.searcher, queries, k, self.settings["leaves_to_search"],
                        self.settings["reorder"])


def save_tuned(tuned: TunedSearch, directory: str | os.PathLike,
               write_index: bool = True) -> str:
  """The index (ScaNN only) and `SETTINGS_FILE` with settings + report in `directory`."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  if tuned.searcher is not None and write_index:
    save_scann(tuned.searcher, directory)
  body = {"format": SETTINGS_FORMAT, "backend": tuned.backend,
          "settings": tuned.settings, "report": tuned.report}
  tmp = os.path.join(directory, SETTINGS_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(body, f, indent=1, sort_keys=True, default=float)
  os.replace(tmp, os.path.join(directory, SETTINGS_FILE))
  return directory


def load_tuned(directory: str | os.PathLike) -> TunedSearch:
  """What `save_tuned` wrote: the searcher (if ScaNN) with its tuned settings."""
  directory = os.fspath(directory)
  path = os.path.join(directory, SETTINGS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tuned search settings ({SETTINGS_FILE}) in {directory}")
  with open(path, encoding="utf-8") as f:
    body = json.load(f)
  if body.get("format") != SETTINGS_FORMAT:
    raise ValueError(f"{path}: settings format {body.get('format')}, want {SETTINGS_FORMAT}")
  searcher = load_scann(directory) if body["backend"] == "scann" else None
  return TunedSearch(body["backend"], searcher, body["settings"], body["report"])


class _Trials:
  """Memoised recall evaluations of one searcher on one query set."""

  def __init__(self, searcher, queries, exact, self_rows, k: int):
    self.searcher, self.q, self.exact, self.self_rows, self.k = (
        searcher, queries, exact, self_rows, k)
    self.width = k + (0 if self_rows is None else 1)
    self.seen: dict[tuple[int, int], tuple[float, float]] = {}

  def __call__(self, leaves: int, reorder: int) -> tuple[float, float]:
    key = (int(leaves), int(reorder))
    if key not in self.seen:
      _, found = scann_search(self.searcher, self.q, self.width, *key)
      r = per_query_recall(drop_self(found, self.self_rows, self.k), self.exact, self.k)
      self.seen[key] = (float(r.mean()), float(r.std(ddof=1) / math.sqrt(max(1, len(r) - 1))))
    return self.seen[key]


def _walk(trials: _Trials, num_leaves: int, target: float, reorder_max: int,
          max_trials: int) -> list[tuple[int, int]]:
  """(leaves_to_search, reorder) candidates meeting `target` (at most
  len(CANDIDATE_LEAVES))."""
  def ok(leaves, reorder):
    mean, se = trials(leaves, reorder)
    return mean - se >= target

  budget = [max_trials]

  def test(leaves, reorder):
    if (leaves, reorder) not in trials.seen:
      if budget[0] <= 0:
        return False
      budget[0] -= 1
    return ok(leaves, reorder)

  # Leaves: double from 1% up to all, then bisect between the last miss and hit.
  lo, hi = 0, None
  leaves = max(1, math.ceil(LEAVES_START * num_leaves))
  while hi is None:
    if test(leaves, reorder_max):
      hi = leaves
    elif leaves >= num_leaves or budget[0] <= 0:
      return []
    else:
      lo, leaves = leaves, min(num_leaves, 2 * leaves)
  while hi - lo > max(1, hi // 20) and budget[0] > 0:
    mid = (lo + hi) // 2
    if test(mid, reorder_max):
      hi = mid
    else:
      lo = mid
  # Reorder: the smallest on a sqrt(2) grid still meeting the target, at the
  # minimal leaves and at larger counts (more leaves may allow less reorder).
  grid = sorted({min(reorder_max, math.ceil(trials.width * 2 ** (i / 2)))
                 for i in range(2 * math.ceil(math.log2(reorder_max / trials.width)) + 1)})
  found = []
  for leaves in sorted({min(num_leaves, math.ceil(f * hi)) for f in CANDIDATE_LEAVES}):
    lo_i, hi_i = -1, len(grid) - 1   # grid[hi_i] meets the target (monotone in leaves)
    while hi_i - lo_i > 1 and budget[0] > 0:
      mid = (lo_i + hi_i) // 2
      if test(leaves, grid[mid]):
        hi_i = mid
      else:
        lo_i = mid
    if ok(leaves, grid[hi_i]):
      found.append((leaves, grid[hi_i]))
  return found


def batched_qps(searcher, queries, k: int, leaves: int, reorder: int,
                repeats: int = 2) -> float:
  """Queries/s of multi-threaded batched search, the best of `repeats`."""
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    searcher.search_batched_parallel(queries, k, reorder, leaves)
    best = min(best, time.perf_counter() - t0)
  return queries.shape[0] / best


def tune_for_recall(
    db: Any,
    k: int,
    targets: float | Sequence[float],
    *,
    tune_queries: Any = None,
    verify_queries: Any = None,
    n_tune: int = 1000,
    n_verify: int = 1000,
    build_options: Sequence[dict] | None = None,
    leaves_options: Sequence[int] | None = None,
    training_sample_size: int | None = None,
    dims_per_block: int = 2,
    soar_lambda: float | None = SOAR_LAMBDA,
    anisotropic_quantization_threshold: float = 0.2,
    builds: Sequence[tuple] | None = None,
    exact_db: Any = None,
    max_trials: int = MAX_TRIALS,
    index_dir: str | os.PathLike | None = None,
    num_single: int = 200,
    seed: int = 0,
) -> TunedSearch | list[TunedSearch]:
  """The fastest search (ScaNN or exact) meeting each recall@k target.

  Args:
    db: [n, D] L2-normalised database.
    k: neighbours per query.
    targets: recall@k to promise (one float: one result; a list: one each,
      sharing the builds and the exact ground truth).
    tune_queries, verify_queries: held-out query sets (default: `n_tune` and
      `n_verify` disjoint random database rows, searched leave-one-out).
    build_options: the indexes to build, each a dict with num_leaves and
      optionally dims_per_block, soar_lambda, anisotropic_quantization_threshold
      (default: `leaves_options` if given, else `default_build_options(n)`).
    leaves_options: tree sizes to build, each with `dims_per_block`,
      `soar_lambda` and `anisotropic_quantization_threshold`.
    training_sample_size: k-means / AH training sample (default min(n, 250k)).
    dims_per_block, soar_lambda, anisotropic_quantization_threshold: the
      build settings of `leaves_options` and the defaults of `build_options`.
    builds: already built searchers as (num_leaves, searcher, build_s) or
      (num_leaves, searcher, build_s, build option dict), used instead of
      building (they must have re-ordering on).
    exact_db: the database already on the device (for the exact searches).
    max_trials: recall evaluations per (build, target); the settings tried are
      at most max_trials * builds * targets, plus 3 timed candidates each.
    index_dir: where the index and `SETTINGS_FILE` are written (only with a
      single target; default: a temporary folder, for bytes per image only).
    num_single: queries timed one by one for the latency percentiles.
    seed: query sampling seed.

  Returns:
    `TunedSearch` (or a list of them). Its report: target_recall, backend,
    reason, verified_recall (on the verification set, against exact search),
    verified, stepped_up (every candidate missed: the fastest, 1.25x wider),
    verify_checks (settings searched on the verification set: the fastest
    candidates in turn, at most VERIFY_CANDIDATES, + 1 step up),
    tuning_recall (+ its standard error), qps_batched
    (multi-threaded batched ScaNN), qps_one_thread, single_ms_p50/p99,
    exact_qps, build_s, builds_s_total, bytes_per_image, tuning_s,
    settings_tried, settings_bound, candidates (every build's best), queries.
  """
  import tempfile  # noqa: PLC0415
  from qaff_jax.evaluation import search as search_lib  # noqa: PLC0415
  import jax  # noqa: PLC0415

  single = isinstance(targets, (int, float))
  targets = [float(targets)] if single else [float(t) for t in targets]
  if not targets or not all(0.0 < t <= 1.0 for t in targets):
    raise ValueError(f"target recalls must be in (0, 1], got {targets}")
  if index_dir is not None and not single:
    raise ValueError("index_dir needs a single target")
  x = _f32_matrix(db, "db")
  n, dim = x.shape
  k = max(1, min(int(k), n - 1 if n > 1 else 1))
  t_start = time.perf_counter()

  # Queries: given, or held-out database rows searched leave-one-out.
  rng = np.random.default_rng(seed)
  if tune_queries is None or verify_queries is None:
    m = min(n_tune + n_verify, n)
    rows = rng.choice(n, size=m, replace=False)
    n_t = max(1, min(n_tune, m // 2))
    tune_self, verify_self = rows[:n_t], rows[n_t:]
    tq, vq = x[tune_self], x[verify_self]
    source = "database rows, leave-one-out"
  else:
    tune_self = verify_self = None
    tq, vq = _f32_matrix(tune_queries, "tune_queries"), _f32_matrix(verify_queries,
                                                                    "verify_queries")
    source = "given"
  width = k + (0 if tune_self is None else 1)
  width = min(width, n)

  # Exact ground truth, and exact search's speed on the same queries.
  dev = jax.device_put(x) if exact_db is None else exact_db
  batch = max(len(tq), len(vq))
  exact = lambda q: search_lib.exact_search(q, dev, width, query_batch_size=batch)[1]
  tune_exact = drop_self(exact(tq), tune_self, k)
  t0 = time.perf_counter()
  verify_exact = drop_self(exact(vq), verify_self, k)
  exact_s = time.perf_counter() - t0
  if len(vq) < batch:   # a smaller set compiled a new shape: time it again
    t0 = time.perf_counter()
    exact(vq)
    exact_s = time.perf_counter() - t0
  exact_qps = len(vq) / exact_s
  common = {"n": n, "dim": dim, "k": k, "queries": source, "n_tune": len(tq),
            "n_verify": len(vq), "exact_qps": exact_qps}

  def exact_result(target, reason, extra=None) -> TunedSearch:
    report = {**common, "target_recall": target, "backend": "exact", "reason": reason,
              "verified_recall": 1.0, "verified": True, "qps_batched": exact_qps,
              "bytes_per_image": 4 * dim, **(extra or {})}
    return TunedSearch("exact", None, {"backend": "exact", "k": k}, report)

  if n < BRUTE_FORCE_BELOW:
    reason = f"n={n} < {BRUTE_FORCE_BELOW}: too small to partition"
    out = [exact_result(t, reason, {"tuning_s": time.perf_counter() - t_start,
                                    "settings_tried": 0}) for t in targets]
    if index_dir is not None:
      save_tuned(out[0], index_dir)
    return out[0] if single else out

  # Builds.
  sample = min(n, DEFAULT_TRAINING_SAMPLE if training_sample_size is None
               else int(training_sample_size))
  reorder_max = min(n, REORDER_FACTOR_MAX * width)
  base = {"dims_per_block": dims_per_block, "soar_lambda": soar_lambda,
          "anisotropic_quantization_threshold": anisotropic_quantization_threshold}
  if builds is None:
    if build_options is None:
      build_options = ([{"num_leaves": leaves} for leaves in leaves_options]
                       if leaves_options else default_build_options(n))
    builds = []
    for option in build_options:
      option = {**base, **option}
      t0 = time.perf_counter()
      searcher = build_scann(x, training_sample_size=sample, reorder=reorder_max, k=width,
                             **option)
      builds.append((num_leaves_of(searcher), searcher, time.perf_counter() - t0,
                     {**option, "num_leaves": num_leaves_of(searcher)}))
  builds = [(b[0], b[1], b[2], {**(b[3] if len(b) > 3 else {}), "num_leaves": b[0]})
            for b in builds]
  builds_s = sum(b[2] for b in builds)

  # Walks and candidate timings per (build, target).
  t_tune = time.perf_counter()
  per_build = [_Trials(b[1], tq, tune_exact, tune_self, k) for b in builds]
  timed: dict[tuple[int, int, int], float] = {}
  results = []
  for target in targets:
    options = []
    for b, (leaves, searcher, _, _) in enumerate(builds):
      for cand in _walk(per_build[b], leaves, target, reorder_max, max_trials):
        key = (b, *cand)
        if key not in timed:
          timed[key] = batched_qps(searcher, tq, width, *cand)
        options.append((timed[key], b, cand))
    results.append((target, options))
  tuning_s = time.perf_counter() - t_tune
  tried = sum(len(t.seen) for t in per_build)
  # Each walk: max_trials budgeted searches + a closing check per candidate.
  bound = (max_trials + len(CANDIDATE_LEAVES)) * len(builds) * len(targets)

  out = []
  for target, options in results:
    common_t = {"tuning_s": tuning_s, "settings_tried": tried, "settings_timed": len(timed),
                "settings_bound": bound, "builds_s_total": builds_s,
                "candidates": [{**builds[b][3], "leaves_to_search": c[0],
                                "reorder": c[1], "tuning_qps": qps,
                                "tuning_recall": per_build[b](*c)[0]}
                               for qps, b, c in sorted(options, reverse=True)]}
    if not options:
      out.append(exact_result(target, "no ScaNN setting met the target recall", common_t))
      continue
    # Verification on the other held-out set: the fastest candidates in turn
    # (at most VERIFY_CANDIDATES), the first whose recall less VERIFY_SE
    # standard errors meets the target, else one step up from the fastest
    # (kept if its measured recall meets the target).
    checks = {}
    ranked = sorted(options, reverse=True)
    for _, b, (leaves, reorder) in ranked[:VERIFY_CANDIDATES]:
      if b not in checks:
        checks[b] = _Trials(builds[b][1], vq, verify_exact, verify_self, k)
      verified_recall, verified_se = checks[b](leaves, reorder)
      if verified_recall - VERIFY_SE * verified_se >= target:
        stepped_up = False
        break
    else:
      _, b, (leaves, reorder) = ranked[0]
      leaves = min(builds[b][0], math.ceil(1.25 * leaves))
      reorder = min(reorder_max, math.ceil(1.25 * reorder))
      (verified_recall, verified_se), stepped_up = checks[b](leaves, reorder), True
    num_leaves, searcher, build_s, option = builds[b]
    verify_checks = sum(len(c.seen) for c in checks.values())
    lat = measure_latency(searcher, vq, width, leaves, reorder, num_single=num_single)
    met = verified_recall >= target
    backend, reason = choose_backend(lat["parallel_qps"], exact_qps, met)
    settings = {**option, "backend": backend, "k": k, "num_leaves": num_leaves,
                "leaves_to_search": leaves, "reorder": reorder,
                "training_sample_size": sample}
    report = {**common, **common_t, "target_recall": target, "backend": backend,
              "reason": reason, "verified_recall": verified_recall,
              "verified_recall_se": verified_se, "verified": met,
              "stepped_up": stepped_up, "verify_checks": verify_checks,
              "tuning_recall": per_build[b](leaves, reorder)[0],
              "tuning_recall_se": per_build[b](leaves, reorder)[1],
              "qps_batched": lat["parallel_qps"], "qps_one_thread": lat["batched_qps"],
              "single_ms_p50": lat["single_ms_p50"], "single_ms_p99": lat["single_ms_p99"],
              "build_s": build_s, "scann_settings": settings}
    if backend == "exact":
      report.update(scann_qps_batched=report.pop("qps_batched"), qps_batched=exact_qps,
                    scann_verified_recall=verified_recall, verified_recall=1.0,
                    verified=True)
    out.append(TunedSearch(backend, searcher if backend == "scann" else None,
                           settings if backend == "scann" else {"backend": "exact", "k": k},
                           report))
  # Bytes per image of each chosen index on disk (written once per build).
  if index_dir is not None:
    save_tuned(out[0], index_dir)
    if out[0].backend == "scann":
      out[0].report["bytes_per_image"] = bytes_per_image(index_dir, n)
  else:
    sizes: dict[int, float] = {}
    for t in out:
      if t.backend == "scann":
        if id(t.searcher) not in sizes:
          with tempfile.TemporaryDirectory() as tmp:
            sizes[id(t.searcher)] = bytes_per_image(save_scann(t.searcher, tmp), n)
        t.report["bytes_per_image"] = sizes[id(t.searcher)]
  for t in out:
    t.report["total_s"] = time.perf_counter() - t_start
  if index_dir is not None:
    save_tuned(out[0], index_dir, write_index=False)   # with the measured size
  return out[0] if single else out


def format_report(report: dict) -> str:
  """One line of a `tune_for_recall` report, for the command lines."""
  s = report.get("scann_settings") or {}
  parts = [f"target recall@{report['k']} {report['target_recall']:g}: {report['backend']}",
           f"verified {report['verified_recall']:.4f} on {report['n_verify']} held-out "
           f"queries ({report['queries']})"]
  if report["backend"] == "scann":
    parts.append(f"{report['qps_batched']:.0f} q/s batched (exact {report['exact_qps']:.0f}), "
                 f"single p50/p99 {report['single_ms_p50']:.2f}/{report['single_ms_p99']:.2f}"
                 f" ms, {report['bytes_per_image']:.0f} B/image, build {report['build_s']:.1f} s")
  else:
    parts.append(f"{report['qps_batched']:.0f} q/s batched")
  if s:
    soar = s.get("soar_lambda")
    parts.append(f"leaves {s['leaves_to_search']}/{s['num_leaves']}, reorder {s['reorder']}, "
                 f"AH {s.get('dims_per_block', 2)} dims/block"
                 + (f", SOAR {soar:g}" if soar is not None else ""))
  if "settings_tried" in report:
    parts.append(f"{report['settings_tried']} settings tried (bound "
                 f"{report.get('settings_bound', 0)}) in {report.get('tuning_s', 0):.1f} s")
  parts.append(report["reason"])
  return "; ".join(parts)
