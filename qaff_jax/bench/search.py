r"""Search benchmark: exact (JAX, one device and sharded) vs ScaNN on synthetic data.

python -m qaff_jax.bench.search --data clustered --n 1000000 --dim 512 \
    --target_recall 0.95,0.99

Data (`--data`, seeded): 'clustered' (default) is a two-level hierarchy of
clusters with fuzzy boundaries (`make_centres`); 'flat' is the older one
level of n // 100 random centres, the data of the earlier hand-tuned
measurements and the harder of the two: a query's cluster holds about k
vectors, so the tail of its exact top-k is nearly random points that only a
wide search finds (hand-picked settings reach recall ~0.95 at 1M, against
1.0 on 'clustered', where the tail sits in sibling clusters). Database,
evaluation queries and the held-out tuning / verification queries are
independent draws of the same distribution (queries are not database rows).
The ScaNN rows' batched queries/s are timed again at the end, round-robin
(`--rounds` rounds, best of each), so a load change on a shared machine
does not favour one row. One JSON line per row, then a
markdown table; every row has recall@k against exact search on the
evaluation queries, batched queries/s, single-query p50/p99 latency, build
time and bytes per image:

* exact: `search.exact_search` on one device.
* exact_sharded: `search.sharded_exact_search` over 8 fake CPU devices (a
  subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8), in
  float32 (its indices compared with the one-device result) and bf16 / int8
  scoring with an exact float32 re-score.
* scann_hand: the hand-picked ScaNN of the earlier measurements: 2 sqrt(n)
  leaves (2000 at 1M), 16% searched (320), AH 2 dims/block, anisotropic 0.2,
  reorder 500 (5 k); scann_hand_wide: the same index, 50% searched (1000),
  reorder 2000 (20 k), the issue's hand-picked setting for recall 0.99;
  scann_hand_oracle_<t> (with scann_target, the first two targets): the same
  index and reorders with the fewest leaves that reach the target on the
  evaluation queries themselves (`oracle_leaves`), the best that hand tuning
  of the leaves could do.
* scann_target: `ann.tune_for_recall` per `--target_recall` (its default
  builds, `ann.default_build_options`: 2 sqrt(n) leaves with SOAR spilling,
  AH at 2 and 4 dims/block; the scann_hand index is offered too), tuned on the
  tuning queries and verified on the verification queries; the row says
  whether exact search was chosen instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

from qaff_jax import cli_util
from qaff_jax import parallel
from qaff_jax.evaluation import ann, search


def define_flags():
  """Flags exist only when this runs as a program, so the library imports
  cleanly beside other modules' flags (e.g. qaff_jax.compare also has --data)."""
  global _DATA, _N, _DIM, _QUERIES, _TUNE_QUERIES, _K, _CLUSTERS, _NOISE, _SEED  # noqa: PLW0603
  global _BACKENDS, _TARGET, _TRAIN_SAMPLE, _CHUNK, _SINGLE, _SHARDED_DEVICES  # noqa: PLW0603
  global _SHARDED_QUERIES, _EXACT_FILE, _ROUNDS  # noqa: PLW0603
  _DATA = flags.DEFINE_enum("data", "clustered", ["clustered", "flat"],
                            "Synthetic data: hierarchical fuzzy clusters, or one level.")
  _N = flags.DEFINE_integer("n", 100_000, "Database size.")
  _DIM = flags.DEFINE_integer("dim", 512, "Descriptor dimension.")
  _QUERIES = flags.DEFINE_integer("queries", 1000, "Evaluation queries.")
  _TUNE_QUERIES = flags.DEFINE_integer(
      "tune_queries", 1000, "Tuning queries, and as many verification queries (both held "
      "out from the evaluation queries).")
  _K = flags.DEFINE_integer("k", 100, "Neighbours per query.")
  _CLUSTERS = flags.DEFINE_integer("clusters", None,
                                   "Cluster (sub-)centres (default n // 100, >= 1).")
  _NOISE = flags.DEFINE_float("noise", 1.0,
                              "Noise norm around a centre (1.0: cosine ~0.7).")
  _SEED = flags.DEFINE_integer("seed", 0, "Data seed.")
  _BACKENDS = flags.DEFINE_list(
      "backends", ["exact", "exact_sharded", "scann_hand", "scann_target"],
      "Rows to run: exact, exact_sharded, scann_hand, scann_target.")
  _TARGET = flags.DEFINE_list("target_recall", ["0.95", "0.99"],
                              "Recall@k targets of the scann_target rows.")
  _TRAIN_SAMPLE = flags.DEFINE_integer("training_sample_size", 250_000,
                                       "ScaNN training sample.")
  _CHUNK = flags.DEFINE_integer("chunk_size", 50_000,
                                "Exact search: database rows per step.")
  _SINGLE = flags.DEFINE_integer("single_queries", 200,
                                 "Queries timed one at a time (exact: at most 50).")
  _SHARDED_DEVICES = flags.DEFINE_integer(
      "sharded_devices", 8, "Fake CPU devices of the exact_sharded row (its subprocess).")
  _SHARDED_QUERIES = flags.DEFINE_integer(
      "sharded_queries", 200, "Evaluation queries of the exact_sharded rows (the first ones; "
      "bf16 / int8 matmuls are slow on CPU).")
  _ROUNDS = flags.DEFINE_integer(
      "rounds", 3, "Round-robin timing rounds of the ScaNN rows' batched queries/s.")
  _EXACT_FILE = flags.DEFINE_string(
      "exact_file", None, "Internal (exact_sharded subprocess): the one-device exact "
      "indices (.npy) to compare with.")

BACKENDS = ("exact", "exact_sharded", "scann_hand", "scann_target")
SHARDED_MODES = (("float32", False), ("bfloat16", True), ("int8", True))


def clustered_unit_vectors(rng: np.random.Generator, centres: np.ndarray,
                           count: int, noise: float, block: int = 100_000,
                           noise_spread: float = 0.0) -> np.ndarray:
  """`count` float32 unit vectors: centre + noise * N(0, I/D), normalised.

  `noise_spread` > 0 scales each vector's noise by a log-normal factor
  (sigma = noise_spread): some vectors sit tight around their centre, others
  far out between clusters (fuzzy cluster boundaries).
  """
  d = centres.shape[1]
  out = np.empty((count, d), np.float32)
  scale = np.float32(noise / math.sqrt(d))
  for start in range(0, count, block):
    stop = min(count, start + block)
    pick = rng.integers(0, centres.shape[0], size=stop - start)
    step = scale * rng.standard_normal((stop - start, d), dtype=np.float32)
    if noise_spread > 0:
      step *= rng.lognormal(0.0, noise_spread, size=(stop - start, 1)).astype(np.float32)
    v = centres[pick] + step
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    out[start:stop] = v
  return out


def unit_centres(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
  c = rng.standard_normal((count, dim), dtype=np.float32)
  return c / np.linalg.norm(c, axis=1, keepdims=True)


def make_centres(rng: np.random.Generator, kind: str, n: int, dim: int,
                 clusters: int | None) -> np.ndarray:
  """Cluster centres of the synthetic database.

  'flat': `clusters` (default n // 100) independent random unit centres.
  'clustered': a two-level hierarchy: n // 10,000 (>= 2) top-level directions,
  and `clusters` (default n // 100) sub-centres scattered around them at
  noise 1.0 (cosine ~0.7 to their top centre); vectors then scatter around the
  sub-centres with log-normal noise (`make_data`), so clusters overlap within
  a top-level group and the boundaries are fuzzy.
  """
  clusters = max(1, n // 100) if clusters is None else clusters
  if kind == "flat":
    return unit_centres(rng, clusters, dim)
  if kind != "clustered":
    raise ValueError(f"data kind {kind!r}: choose clustered or flat")
  top = unit_centres(rng, max(2, n // 10_000), dim)
  return clustered_unit_vectors(rng, top, clusters, 1.0)


def make_data(n: int, dim: int, n_queries: int, n_tune: int,
              clusters: int | None, noise: float, seed: int,
              kind: str = "clustered", noise_spread: float | None = None):
  """(db, evaluation queries, tuning queries, centre count): all drawn alike,
  the queries fresh draws (not database rows)."""
  rng = np.random.default_rng(seed)
  centres = make_centres(rng, kind, n, dim, clusters)
  spread = (0.25 if kind == "clustered" else 0.0) if noise_spread is None else noise_spread
  draw = lambda count: clustered_unit_vectors(rng, centres, count, noise,
                                              noise_spread=spread)
  db = draw(n)
  queries = draw(n_queries)
  tune = draw(n_tune)
  return db, queries, tune, len(centres)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _latency(fn, queries: np.ndarray, count: int) -> dict:
  """p50/p99 (ms) of `fn(one query)` over `count` queries, after a warm-up."""
  fn(queries[:1])
  times = [_timed(lambda i=i: fn(queries[i:i + 1]))[1]
           for i in range(min(count, len(queries)))]
  return {"single_ms_p50": 1e3 * float(np.median(times)),
          "single_ms_p99": 1e3 * float(np.percentile(times, 99))}


def bench_exact(db_dev: jax.Array, queries: np.ndarray, k: int, chunk: int,
                n_single: int) -> tuple[dict, np.ndarray]:
  """Exact batched throughput and single-query latency; returns exact indices."""
  nq = queries.shape[0]
  run = lambda q: search.exact_search(q, db_dev, k, chunk_size=chunk,
                                      query_batch_size=nq)
  _, compile_s = _timed(lambda: run(queries))
  (_, exact), batch_s = _timed(lambda: run(queries))
  lat = _latency(lambda q: search.exact_search(q, db_dev, k, chunk_size=chunk),
                 queries, min(n_single, 50))
  n, dim = db_dev.shape
  return {
      "row": "exact", "device": jax.devices()[0].device_kind, "devices": 1,
      "n": n, "dim": dim, "queries": nq, "k": k, "recall_at_k": 1.0,
      "qps": nq / batch_s, "first_call_s": compile_s, **lat,
      "build_s": 0.0, "bytes_per_image": 4 * dim,
  }, exact


def bench_sharded(db: np.ndarray, queries: np.ndarray, k: int, chunk: int,
                  exact: np.ndarray | None) -> list[dict]:
  """Sharded exact search over all devices of this process (float32, bf16 and
  int8 + float32 re-score); recall against `exact` (or the float32 row)."""
  mesh = parallel.make_mesh(1)
  rows, ref = [], exact
  n, dim = db.shape
  nq = len(queries)
  placed = {}
  for score_dtype, rescore in SHARDED_MODES:
    storage = "float32"
    if storage not in placed:
      placed[storage], place_s = _timed(lambda: search.place_database(db, mesh))
    sdb = placed[storage]
    run = lambda q, sd=score_dtype, rs=rescore: search.sharded_exact_search(
        q, sdb, k, score_dtype=sd, rescore=rs, chunk_size=chunk, query_batch_size=nq)
    _, compile_s = _timed(lambda: run(queries))
    (_, found), batch_s = _timed(lambda: run(queries))
    if ref is None:
      ref = found
    row = {"row": f"exact_sharded_{score_dtype}" + ("_rescore" if rescore else ""),
           "devices": jax.device_count(), "n": n, "dim": dim, "queries": nq, "k": k,
           "recall_at_k": ann.recall_at_k(found, ref, k), "qps": nq / batch_s,
           "first_call_s": compile_s, "build_s": place_s, "bytes_per_image": 4 * dim}
    row["settings"] = f"{jax.device_count()} devices, rows split"
    if exact is not None and score_dtype == "float32":
      # Orders can differ only where two float32 scores are within rounding
      # (different matmul shapes sum in a different order).
      row["same_indices_as_one_device"] = bool((found == exact).all())
      row["same_position_fraction"] = float((found == exact).mean())
      row["settings"] += (f"; vs 1 device: same top-k sets {row['recall_at_k']:.4f}, "
                          f"same positions {row['same_position_fraction']:.4f}")
    rows.append(row)
  return rows


def _run_sharded_child(exact: np.ndarray) -> list[dict]:
  """The exact_sharded rows from a subprocess with fake CPU devices."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "exact.npy")
    np.save(path, exact)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                        f"{_SHARDED_DEVICES.value}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    same = {f.name: f.value for f in (_DATA, _N, _DIM, _QUERIES, _TUNE_QUERIES, _K, _NOISE,
                                      _SEED, _CHUNK, _CLUSTERS, _SHARDED_QUERIES)
            if f.value is not None}
    args = [sys.executable, "-m", "qaff_jax.bench.search", "--backends=exact_sharded",
            f"--exact_file={path}"] + [f"--{name}={v}" for name, v in same.items()]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"exact_sharded subprocess failed: {proc.stderr[-2000:]}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def build_scann_for(db: np.ndarray, num_leaves: int, train_sample: int, k: int,
                    dims_per_block: int = 2, soar_lambda: float | None = None) -> tuple:
  """(num_leaves, searcher, build_s, build option): tree (SOAR spilling with
  `soar_lambda`) + AH (anisotropic 0.2) + re-ordering."""
  option = {"num_leaves": num_leaves, "dims_per_block": dims_per_block,
            "soar_lambda": soar_lambda, "anisotropic_quantization_threshold": 0.2}
  searcher, build_s = _timed(lambda: ann.build_scann(
      db, training_sample_size=train_sample, k=k,
      reorder=min(len(db), ann.REORDER_FACTOR_MAX * (k + 1)), **option))
  return ann.num_leaves_of(searcher), searcher, build_s, option


def build_label(settings: dict) -> str:
  """', SOAR, AH 4 dims/block' and the like, for the table."""
  soar = settings.get("soar_lambda")
  return ((f", SOAR {soar:g}" if soar is not None else "")
          + f", AH {settings.get('dims_per_block', 2)} dims/block")


def index_size(searcher, n: int) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    return ann.bytes_per_image(ann.save_scann(searcher, tmp), n)


def scann_row(name: str, searcher, queries: np.ndarray, exact: np.ndarray, k: int,
              leaves: int, reorder: int, n_single: int) -> dict:
  _, found = ann.scann_search(searcher, queries, k, leaves, reorder)
  lat = ann.measure_latency(searcher, queries, k, leaves, reorder, num_single=n_single)
  return {"row": name, "k": k, "queries": len(queries),
          "recall_at_k": ann.recall_at_k(found, exact, k),
          "qps": lat["parallel_qps"], "qps_one_thread": lat["batched_qps"],
          "single_ms_p50": lat["single_ms_p50"], "single_ms_p99": lat["single_ms_p99"],
          "leaves_to_search": leaves, "reorder": reorder,
          "num_leaves": ann.num_leaves_of(searcher)}


def hand_settings(n: int, k: int, wide: bool = False) -> tuple[int, int, int]:
  """(num_leaves, leaves_to_search, reorder) of the hand-picked ScaNN: 2 sqrt(n)
  leaves, 16% searched, reorder 5 k (at 1M: 2000, 320, 500); `wide`: 50%
  searched, reorder 20 k (at 1M: 2000, 1000, 2000)."""
  leaves = max(1, min(round(2 * math.sqrt(n)), n // 20))
  if wide:
    return leaves, max(1, round(0.5 * leaves)), min(n, ann.REORDER_FACTOR_MAX * k)
  return leaves, max(1, round(0.16 * leaves)), 5 * k


def format_table(rows: list[dict]) -> str:
  head = ("| row | recall@k | QPS batched | p50 ms | p99 ms | build s | bytes/image | "
          "settings |\n|---|---|---|---|---|---|---|---|")
  lines = [head]
  num = lambda v, fmt: "-" if v is None else format(v, fmt)
  for r in rows:
    lines.append(
        f"| {r['row']} | {r['recall_at_k']:.4f} | {r['qps']:.0f} | "
        f"{num(r.get('single_ms_p50'), '.2f')} | {num(r.get('single_ms_p99'), '.2f')} | "
        f"{r.get('build_s', 0):.1f} | {num(r.get('bytes_per_image'), '.0f')} | "
        f"{r.get('settings', '')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = sorted(set(_BACKENDS.value) - set(BACKENDS))
  if unknown:
    raise cli_util.UsageError(f"--backends: unknown {unknown}; choose from "
                              f"{', '.join(BACKENDS)}")
  try:
    targets = [float(t) for t in _TARGET.value]
  except ValueError:
    raise cli_util.UsageError(f"--target_recall={_TARGET.value}: give numbers") from None
  n, dim, k = _N.value, _DIM.value, _K.value
  t0 = time.perf_counter()
  db, queries, held_out, clusters = make_data(
      n, dim, _QUERIES.value, 2 * _TUNE_QUERIES.value, _CLUSTERS.value, _NOISE.value,
      _SEED.value, kind=_DATA.value)
  tune, verify = held_out[:_TUNE_QUERIES.value], held_out[_TUNE_QUERIES.value:]
  common = {"data": _DATA.value, "n": n, "dim": dim, "clusters": clusters,
            "noise": _NOISE.value, "seed": _SEED.value, "cpu_count": os.cpu_count(),
            "data_s": time.perf_counter() - t0}
  if _EXACT_FILE.value:   # the exact_sharded subprocess
    m = _SHARDED_QUERIES.value
    for row in bench_sharded(db, queries[:m], k, _CHUNK.value, np.load(_EXACT_FILE.value)[:m]):
      print(json.dumps({**row, **common}), flush=True)
    return
  rows = []
  retime = []   # (row, searcher, leaves, reorder) of the ScaNN rows

  def emit(row, searcher=None):
    rows.append(row)
    if searcher is not None:
      retime.append((row, searcher, row["leaves_to_search"], row["reorder"]))
    print(json.dumps({**row, **common}), flush=True)

  db_dev = jax.device_put(db)
  exact_row, exact = bench_exact(db_dev, queries, k, _CHUNK.value, _SINGLE.value)
  if "exact" in _BACKENDS.value:
    emit(exact_row)
  if "exact_sharded" in _BACKENDS.value:
    for row in _run_sharded_child(exact):
      emit({key: v for key, v in row.items() if key not in common})
  builds = []
  hand = hand_settings(n, k)
  if "scann_hand" in _BACKENDS.value:
    builds.append(build_scann_for(db, hand[0], _TRAIN_SAMPLE.value, k))
    leaves, searcher, build_s, _ = builds[0]
    row = scann_row("scann_hand", searcher, queries, exact, k, hand[1], hand[2],
                    _SINGLE.value)
    size = index_size(searcher, n)
    emit({**row, "build_s": build_s, "bytes_per_image": size,
          "settings": f"{leaves} leaves, {hand[1]} searched, reorder {hand[2]}"}, searcher)
    wide = hand_settings(n, k, wide=True)
    row = scann_row("scann_hand_wide", searcher, queries, exact, k, wide[1], wide[2],
                    _SINGLE.value)
    emit({**row, "build_s": build_s, "bytes_per_image": size,
          "settings": f"same index, {wide[1]} searched, reorder {wide[2]}"}, searcher)
    if "scann_target" in _BACKENDS.value:
      for target, (_, _, reorder) in zip(targets, [hand, wide]):
        fewest = oracle_leaves(searcher, queries, exact, k, leaves, reorder, target)
        if fewest is None:
          continue
        row = scann_row(f"scann_hand_oracle_{target:g}", searcher, queries, exact, k,
                        fewest, reorder, _SINGLE.value)
        emit({**row, "build_s": build_s, "bytes_per_image": size,
              "settings": f"same index, reorder {reorder}, fewest leaves meeting "
                          f"{target:g} on the evaluation queries: {fewest} (oracle)"},
             searcher)
  if "scann_target" in _BACKENDS.value:
    for option in ann.default_build_options(n):
      builds.append(build_scann_for(db, option["num_leaves"], _TRAIN_SAMPLE.value, k,
                                    option["dims_per_block"], option["soar_lambda"]))
    tuned = ann.tune_for_recall(
        db, k, targets, tune_queries=tune, verify_queries=verify,
        builds=builds, exact_db=db_dev,
        training_sample_size=_TRAIN_SAMPLE.value, num_single=_SINGLE.value)
    for target, t in zip(targets, tuned):
      rep = t.report
      print(json.dumps({"tuning_report": rep}, default=str), flush=True)
      name = f"scann_target_{target:g}"
      if t.backend == "exact":
        emit({**{key: exact_row[key] for key in ("recall_at_k", "qps", "single_ms_p50",
                                                 "single_ms_p99", "bytes_per_image")},
              "row": f"{name} (chose exact)", "build_s": 0.0, "settings": rep["reason"]})
        continue
      s = t.settings
      row = scann_row(name, t.searcher, queries, exact, k, s["leaves_to_search"],
                      s["reorder"], _SINGLE.value)
      emit({**row, "build_s": rep["build_s"], "bytes_per_image": rep["bytes_per_image"],
            "verified_recall": rep["verified_recall"], "tuning_s": rep["tuning_s"],
            "settings_tried": rep["settings_tried"], "settings_bound": rep["settings_bound"],
            "settings": f"{s['num_leaves']} leaves{build_label(s)}, "
                        f"{s['leaves_to_search']} searched, "
                        f"reorder {s['reorder']}; verified {rep['verified_recall']:.4f}; "
                        f"{rep['settings_tried']} tried (bound {rep['settings_bound']}), "
                        f"tuning {rep['tuning_s']:.0f} s"}, t.searcher)
  if retime:
    retime_rows(retime, queries, k, _ROUNDS.value)
    for row, *_ in retime:
      print(json.dumps({"retimed": row["row"], "qps": row["qps"],
                        "qps_in_place": row["qps_in_place"]}), flush=True)
  print(format_table(rows), flush=True)


def oracle_leaves(searcher, queries: np.ndarray, exact: np.ndarray, k: int,
                  num_leaves: int, reorder: int, target: float) -> int | None:
  """The fewest leaves to search, at this reorder, whose recall@k on the
  evaluation queries themselves reaches `target` (bisection; None if even all
  leaves miss): hand tuning with the answers known, a bound no tuner that
  holds the evaluation queries out can beat except by another build or
  reorder."""
  recall = lambda leaves: ann.recall_at_k(
      ann.scann_search(searcher, queries, k, leaves, reorder)[1], exact, k)
  if recall(num_leaves) < target:
    return None
  lo, hi = 0, num_leaves    # recall(lo) < target <= recall(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if recall(mid) >= target:
      hi = mid
    else:
      lo = mid
  return hi


def retime_rows(retime: list, queries: np.ndarray, k: int, rounds: int) -> None:
  """Sets each row's 'qps' to its best batched rate over `rounds` round-robin
  rounds (the first measurement kept as 'qps_in_place')."""
  best = [0.0] * len(retime)
  for _ in range(max(1, rounds)):
    for i, (_, searcher, leaves, reorder) in enumerate(retime):
      best[i] = max(best[i], ann.batched_qps(searcher, queries, k, leaves, reorder,
                                             repeats=1))
  for (row, *_), qps in zip(retime, best):
    row["qps_in_place"], row["qps"] = row["qps"], qps


if __name__ == "__main__":
  define_flags()
  cli_util.run(main)
