"""Exact nearest-neighbour search on the accelerator.

`exact_search` scores queries against the database chunk by chunk (matrix product)
and keeps a running top-k per query, so only one (query_batch, chunk) score block
lives in memory at a time; the database itself is placed on the device once and is
never copied or padded (1M x 2048 float32 = 8 GB fits a 16 GB device).

Fixed shapes, one compilation: the chunk loop runs inside one jitted function. The
last chunk is a full-size window ending at the last database row; the rows of that
window that an earlier chunk already scored are masked out (score -inf, index -1),
so every chunk has the same shape and no row is counted twice. Query batches are
padded to a fixed size with zero rows that are dropped afterwards.

Ties are broken by the lower database index: `lax.top_k` prefers the lower
position among equal values, and the running buffer (earlier, lower indices) is
placed before the new chunk (rows in increasing index order). Scores must be finite;
if a masked entry ever reached the output (only possible with -inf/NaN scores), a
ValueError is raised rather than returning it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_METRICS = ("dot", "cosine")


def _as_device_matrix(x: Any, name: str) -> jax.Array:
  """A 2-D floating device array (float64 input becomes float32)."""
  if isinstance(x, jax.Array):
    arr = x
  else:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.float64:
      arr = arr.astype(np.float32)
    arr = jax.device_put(arr)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D [n, D], got shape {arr.shape}")
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    arr = arr.astype(jnp.float32)
  return arr


def _normalize_rows(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12).astype(x.dtype)


def _scores(q: jax.Array, rows: jax.Array, metric: str,
            precision: jax.lax.Precision) -> jax.Array:
  """[nq, n] similarities; cosine divides by row norms (queries pre-normalised)."""
  s = jnp.matmul(q, rows.T, precision=precision,
                 preferred_element_type=jnp.float32)
  if metric == "cosine":
    norms = jnp.linalg.norm(rows.astype(jnp.float32), axis=-1)
    s = s / jnp.maximum(norms, 1e-12)[None, :]
  return s


@functools.partial(jax.jit,
                   static_argnames=("k", "chunk", "metric", "precision"))
def _search_batch(q: jax.Array, db: jax.Array, *, k: int, chunk: int,
                  metric: str, precision: jax.lax.Precision):
  """Top-k of one query batch against the whole database, chunk by chunk."""
  n = db.shape[0]
  nb = q.shape[0]
  n_chunks = -(-n // chunk)
  offsets = jnp.arange(chunk, dtype=jnp.int32)

  def body(c, carry):
    best_s, best_i = carry
    begin = c * chunk
    start = jnp.minimum(begin, n - chunk)  # the last window ends at row n - 1
    rows = jax.lax.dynamic_slice_in_dim(db, start, chunk, axis=0)
    s = _scores(q, rows, metric, precision)
    idx = start + offsets
    fresh = idx >= begin  # rows not already scored by an earlier chunk
    s = jnp.where(fresh[None, :], s, -jnp.inf)
    idx = jnp.where(fresh, idx, -1)
    cat_s = jnp.concatenate([best_s, s], axis=1)
    cat_i = jnp.concatenate(
        [best_i, jnp.broadcast_to(idx[None, :], (nb, chunk))], axis=1)
    top_s, where = jax.lax.top_k(cat_s, k)
    return top_s, jnp.take_along_axis(cat_i, where, axis=1)

  init = (jnp.full((nb, k), -jnp.inf, jnp.float32),
          jnp.full((nb, k), -1, jnp.int32))
  return jax.lax.fori_loop(0, n_chunks, body, init)


def exact_search(
    queries: Any,
    db: Any,
    k: int,
    chunk_size: int = 65536,
    query_batch_size: int = 1024,
    metric: str = "dot",
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product or cosine similarity.

  Args:
    queries: [nq, D] query descriptors (numpy or jax).
    db: [n, D] database descriptors; a jax array is used in place (not copied).
    k: neighbours per query, 1 <= k <= n.
    chunk_size: database rows scored per step (clipped to n).
    query_batch_size: queries per device call (clipped to nq).
    metric: 'dot' (descriptors already L2-normalised: this IS cosine) or 'cosine'
      (normalises on the fly, without copying the database).
    precision: matmul precision; HIGHEST keeps float32 accuracy on TPU.

  Returns:
    (scores [nq, k] float32, indices [nq, k] int64) as numpy, best first; ties
    go to the lower database index.
  """
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
  q = _as_device_matrix(queries, "queries")
  x = _as_device_matrix(db, "db")
  n, d = x.shape
  nq = q.shape[0]
  if q.shape[1] != d:
    raise ValueError(f"queries have dim {q.shape[1]} but db has dim {d}")
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, n_db={n}], got {k}")
  if chunk_size < 1 or query_batch_size < 1:
    raise ValueError("chunk_size and query_batch_size must be >= 1")
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  chunk = min(chunk_size, n)
  batch = min(query_batch_size, nq)
  if metric == "cosine":
    q = _normalize_rows(q)
  q = q.astype(x.dtype)
  n_batches = math.ceil(nq / batch)
  pad = n_batches * batch - nq
  if pad:
    q = jnp.concatenate([q, jnp.zeros((pad, d), q.dtype)], axis=0)
  pending = []
  for b in range(n_batches):
    qb = q[b * batch:(b + 1) * batch]
    pending.append(_search_batch(qb, x, k=k, chunk=chunk, metric=metric,
                                 precision=precision))
  scores = np.concatenate([np.asarray(s) for s, _ in pending])[:nq]
  indices = np.concatenate([np.asarray(i) for _, i in pending])[:nq]
  if (indices < 0).any():
    raise ValueError("exact_search: fewer than k finite scores for some query "
                     "(non-finite descriptors?)")
  return scores, indices.astype(np.int64)


def ranks_from_indices(indices: np.ndarray, n_db: int | None = None) -> np.ndarray:
  """[nq, k] search indices -> revisitop ranks [k, nq] (column = one query).

  Args:
    indices: per-query ranked database indices, as from `exact_search`.
    n_db: if given, require a complete ranking (k == n_db).

  Returns:
    int64 array of shape (k, n_queries) (a transposed, Fortran-ordered view:
    each query's ranking is contiguous). With k < n_db the ranking is truncated:
    `metrics.compute_map` then counts unranked positives as misses.
  """
  indices = np.asarray(indices)
  if indices.ndim != 2:
    raise ValueError(f"indices must be [nq, k], got shape {indices.shape}")
  if n_db is not None and indices.shape[1] != n_db:
    raise ValueError(f"need a full ranking: k={indices.shape[1]} != n_db={n_db}")
  return indices.astype(np.int64).T  # F-ordered view: each query contiguous


@functools.partial(jax.jit, static_argnames=("metric", "precision"))
def _rank_batch(q: jax.Array, db: jax.Array, *, metric: str,
                precision: jax.lax.Precision) -> jax.Array:
  s = _scores(q, db, metric, precision)
  # Stable ascending sort of -s: descending similarity, lower index first on ties.
  return jnp.argsort(-s, axis=1, stable=True).astype(jnp.int32)


def full_ranking(
    queries: Any,
    db: Any,
    query_batch_size: int = 64,
    metric: str = "dot",
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> np.ndarray:
  """Complete ranking of the database for every query, revisitop convention.

  Args:
    queries: [nq, D].
    db: [n, D].
    query_batch_size: queries sorted per device call ([batch, n] scores in memory).
    metric: 'dot' or 'cosine' (see `exact_search`).
    precision: matmul precision.

  Returns:
    int64 ranks of shape (n_db, n_queries) (Fortran-ordered): column i lists all
    database indices by descending similarity to query i (stable: ties keep the
    lower index first).
  """
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
  q = _as_device_matrix(queries, "queries")
  x = _as_device_matrix(db, "db")
  if q.shape[1] != x.shape[1]:
    raise ValueError(f"queries have dim {q.shape[1]} but db has dim {x.shape[1]}")
  nq = q.shape[0]
  if nq == 0:
    return np.zeros((x.shape[0], 0), np.int64)
  if metric == "cosine":
    q = _normalize_rows(q)
  q = q.astype(x.dtype)
  batch = max(1, min(query_batch_size, nq))
  n_batches = math.ceil(nq / batch)
  pad = n_batches * batch - nq
  if pad:
    q = jnp.concatenate([q, jnp.zeros((pad, q.shape[1]), q.dtype)], axis=0)
  parts = [
      _rank_batch(q[b * batch:(b + 1) * batch], x, metric=metric,
                  precision=precision)
      for b in range(n_batches)
  ]
  order = np.concatenate([np.asarray(p) for p in parts])[:nq]
  return order.astype(np.int64).T  # F-ordered view: each query contiguous


# ---------------------------------------------------------------------------
# Exact search over a database split by rows across the device mesh.
#
# Each device holds n_pad / S rows (S = devices on the row axes; the padding
# rows are zeros that are never returned), scores every query against its own
# rows chunk by chunk, keeps its local top-k, and the only communication is
# the merge: per mesh axis, an all-gather of k (score, index) pairs per shard
# and query along that axis, then a top-k (a (16, 16) mesh moves 32 k pairs
# per query to each device, not 256 k). Scoring may be cheaper than float32: bfloat16 (the MXU's native type)
# or int8 (per-row / per-query symmetric scales, int32 accumulation), with an
# optional exact float32 re-score of each shard's best `candidates` rows (needs
# float32 storage: the re-score reads the stored rows).

SCORE_DTYPES = ("float32", "bfloat16", "int8")
ROW_AXES = ("data", "model")   # the database is split over every device


@dataclasses.dataclass(frozen=True)
class ShardedDatabase:
  """A database placed on the mesh by `place_database`."""
  rows: jax.Array              # [n_pad, D] float32 | bfloat16 | int8, split by rows
  scales: jax.Array | None     # [n_pad] float32 per-row scales (int8 storage only)
  n: int                       # real rows; rows n..n_pad-1 are padding
  mesh: jax.sharding.Mesh
  axes: tuple[str, ...]

  @property
  def dtype(self) -> str:
    return jnp.dtype(self.rows.dtype).name

  @property
  def num_shards(self) -> int:
    return int(math.prod(self.mesh.shape[a] for a in self.axes))


def padded_rows(n: int, num_shards: int) -> int:
  """Rows after padding `n` up to a multiple of `num_shards`."""
  return -(-max(n, 1) // num_shards) * num_shards


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8 codes and float32 scales: x ~ codes * scale."""
  x = np.asarray(x, np.float32)
  scale = np.abs(x).max(axis=1) / np.float32(127.0)
  scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
  codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
  return codes, scale


def _quantize_int8_jnp(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(x / scale[:, None]), -127, 127).astype(jnp.int8)
  return codes, scale


def place_database(db: Any, mesh: jax.sharding.Mesh, *, dtype: str = "float32",
                   axes: tuple[str, ...] = ROW_AXES) -> ShardedDatabase:
  """Splits a host [n, D] database by rows over the mesh axes `axes`.

  Every process passes the same global array (a `np.memmap` works: each
  process reads only the rows of its own devices). Rows are padded with zeros
  to a multiple of the shard count; `dtype` is the stored type (int8 stores
  per-row scales beside the codes).
  """
  if dtype not in SCORE_DTYPES:
    raise ValueError(f"dtype must be one of {SCORE_DTYPES}, got {dtype!r}")
  if db.ndim != 2:
    raise ValueError(f"db must be [n, D], got shape {db.shape}")
  n, d = db.shape
  if n == 0:
    raise ValueError("cannot place an empty database")
  shards = int(math.prod(mesh.shape[a] for a in axes))
  n_pad = padded_rows(n, shards)

  def host_rows(index) -> np.ndarray:
    rows = index[0]
    start, stop, _ = rows.indices(n_pad)
    out = np.zeros((stop - start, d), np.float32)
    if start < n:
      out[:min(stop, n) - start] = db[start:min(stop, n)]
    return out

  row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes, None))
  vec_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  scales = None
  if dtype == "int8":
    rows = jax.make_array_from_callback(
        (n_pad, d), row_sharding, lambda idx: quantize_int8(host_rows(idx))[0])
    scales = jax.make_array_from_callback(
        (n_pad,), vec_sharding, lambda idx: quantize_int8(host_rows(idx))[1])
  else:
    cast = jnp.bfloat16 if dtype == "bfloat16" else np.float32
    rows = jax.make_array_from_callback(
        (n_pad, d), row_sharding, lambda idx: host_rows(idx).astype(cast))
  return ShardedDatabase(rows=rows, scales=scales, n=n, mesh=mesh, axes=tuple(axes))


def abstract_database(n: int, dim: int, mesh: jax.sharding.Mesh, *,
                      dtype: str = "float32", axes: tuple[str, ...] = ROW_AXES
                      ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct | None]:
  """(rows, scales) as sharded `ShapeDtypeStruct`s: `place_database` without data."""
  if dtype not in SCORE_DTYPES:
    raise ValueError(f"dtype must be one of {SCORE_DTYPES}, got {dtype!r}")
  shards = int(math.prod(mesh.shape[a] for a in axes))
  n_pad = padded_rows(n, shards)
  spec = jax.sharding.PartitionSpec
  rows = jax.ShapeDtypeStruct(
      (n_pad, dim), jnp.dtype(dtype),
      sharding=jax.sharding.NamedSharding(mesh, spec(axes, None)))
  scales = None
  if dtype == "int8":
    scales = jax.ShapeDtypeStruct((n_pad,), jnp.float32,
                                  sharding=jax.sharding.NamedSharding(mesh, spec(axes)))
  return rows, scales


def _check_score_dtype(storage: str, score_dtype: str | None, rescore: bool) -> str:
  score_dtype = storage if score_dtype is None else score_dtype
  if score_dtype not in SCORE_DTYPES:
    raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
  if storage != "float32" and score_dtype != storage:
    raise ValueError(f"a {storage} database is scored in {storage}, not {score_dtype}")
  if rescore and storage != "float32":
    raise ValueError("an exact float32 re-score needs the database stored in float32 "
                     f"(this one is {storage})")
  return score_dtype


@functools.lru_cache(maxsize=32)
def sharded_search_program(mesh: jax.sharding.Mesh, axes: tuple[str, ...], *, n: int,
                           k: int, candidates: int, chunk: int, score_dtype: str,
                           rescore: bool):
  """The jitted program `(queries [nb, D] f32 replicated, rows, scales) ->
  (scores [nb, k] f32, indices [nb, k] int32)`, both replicated.

  `n` real rows (global indices >= n are padding); each shard keeps
  `candidates` rows by the `score_dtype` score, re-scores them in float32 if
  `rescore`, and contributes its best k to the merge.
  """
  spec = jax.sharding.PartitionSpec
  keep = candidates if rescore else k

  def score(q, qi, qs, rows, rs):
    if score_dtype == "float32":
      return jnp.matmul(q, rows.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    if score_dtype == "bfloat16":
      return jnp.matmul(q.astype(jnp.bfloat16), rows.astype(jnp.bfloat16).T,
                        preferred_element_type=jnp.float32)
    if rs is None:   # float32 storage, int8 scoring: quantise the chunk here
      rows, rs = _quantize_int8_jnp(rows)
    dots = jax.lax.dot_general(qi, rows, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
    return dots.astype(jnp.float32) * qs[:, None] * rs[None, :]

  def local(q, rows, scales):
    n_local = rows.shape[0]
    nb = q.shape[0]
    width = min(chunk, n_local)
    n_chunks = -(-n_local // width)
    base = jax.lax.axis_index(axes) * n_local
    offsets = jnp.arange(width, dtype=jnp.int32)
    qi, qs = _quantize_int8_jnp(q) if score_dtype == "int8" else (None, None)

    def body(c, carry):
      best_s, best_i = carry
      begin = c * width
      start = jnp.minimum(begin, n_local - width)
      block = jax.lax.dynamic_slice_in_dim(rows, start, width, axis=0)
      rs = None if scales is None else jax.lax.dynamic_slice_in_dim(scales, start, width)
      s = score(q, qi, qs, block, rs)
      idx = start + offsets
      fresh = (idx >= begin) & (base + idx < n)   # not scored before, not padding
      s = jnp.where(fresh[None, :], s, -jnp.inf)
      idx = jnp.where(fresh, idx, -1)
      cat_s = jnp.concatenate([best_s, s], axis=1)
      cat_i = jnp.concatenate([best_i, jnp.broadcast_to(idx[None, :], (nb, width))], axis=1)
      top_s, where = jax.lax.top_k(cat_s, keep)
      return top_s, jnp.take_along_axis(cat_i, where, axis=1)

    init = (jnp.full((nb, keep), -jnp.inf, jnp.float32), jnp.full((nb, keep), -1, jnp.int32))
    s, i = jax.lax.fori_loop(0, n_chunks, body, init)
    if rescore:   # exact float32 scores of the shard's candidates
      got = rows[jnp.maximum(i, 0)].astype(jnp.float32)            # [nb, keep, D]
      exact = jnp.einsum("bd,bkd->bk", q, got, precision=jax.lax.Precision.HIGHEST)
      exact = jnp.where(i >= 0, exact, -jnp.inf)
      s, where = jax.lax.top_k(exact, k)
      i = jnp.take_along_axis(i, where, axis=1)
    i = jnp.where(i >= 0, i + base, -1)
    # Merge one mesh axis at a time, the fastest-varying (neighbouring row
    # blocks) first: a device receives sum(axis sizes) * k candidates per query,
    # not S * k. Gathered in index order, so among equal scores the lower index
    # stays first.
    for axis in reversed(axes):
      if mesh.shape[axis] == 1:
        continue
      s = jax.lax.all_gather(s, axis, axis=1, tiled=True)          # [nb, size * k]
      i = jax.lax.all_gather(i, axis, axis=1, tiled=True)
      s, where = jax.lax.top_k(s, k)
      i = jnp.take_along_axis(i, where, axis=1)
    return s, i

  def program(q, rows, scales):
    scale_spec = None if scales is None else spec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(axes, None), scale_spec),
                         out_specs=(spec(), spec()), check_vma=False)(q, rows, scales)

  replicated = jax.sharding.NamedSharding(mesh, spec())
  return jax.jit(program, out_shardings=(replicated, replicated))


def sharded_exact_search(
    queries: Any,
    db: ShardedDatabase,
    k: int,
    *,
    score_dtype: str | None = None,
    rescore: bool = False,
    candidates: int | None = None,
    chunk_size: int = 65536,
    query_batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k by dot product against a database split over the mesh.

  Args:
    queries: [nq, D] query descriptors (numpy; the same on every process).
    db: from `place_database`.
    k: neighbours per query, 1 <= k <= db.n.
    score_dtype: 'float32' (exact; the default for a float32 database),
      'bfloat16' or 'int8' (the stored type for a bf16 / int8 database).
    rescore: re-score each shard's best `candidates` rows in float32 (float32
      storage only); the returned scores are then exact float32 dot products.
    candidates: rows per shard kept for the re-score (default 2 * k).
    chunk_size: rows scored per step on each device.
    query_batch_size: queries per device call.

  Returns:
    (scores [nq, k] float32, indices [nq, k] int64) as numpy, best first; in
    float32 the same as `exact_search` (ties go to the lower index).
  """
  score_dtype = _check_score_dtype(db.dtype, score_dtype, rescore)
  if score_dtype == "float32":
    rescore = False   # already exact
  q = np.ascontiguousarray(queries, np.float32)
  if q.ndim != 2 or q.shape[1] != db.rows.shape[1]:
    raise ValueError(f"queries must be [nq, {db.rows.shape[1]}], got shape {q.shape}")
  if not 1 <= k <= db.n:
    raise ValueError(f"k must be in [1, n_db={db.n}], got {k}")
  candidates = max(k, 2 * k if candidates is None else int(candidates))
  nq = q.shape[0]
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  program = sharded_search_program(db.mesh, db.axes, n=db.n, k=k, candidates=candidates,
                                   chunk=max(1, chunk_size), score_dtype=score_dtype,
                                   rescore=rescore)
  batch = max(1, min(query_batch_size, nq))
  n_batches = math.ceil(nq / batch)
  q = np.concatenate([q, np.zeros((n_batches * batch - nq, q.shape[1]), np.float32)])
  replicated = jax.sharding.NamedSharding(db.mesh, jax.sharding.PartitionSpec())
  pending = []
  for b in range(n_batches):
    qb = q[b * batch:(b + 1) * batch]
    qb = jax.make_array_from_callback(qb.shape, replicated, lambda idx, qb=qb: qb[idx])
    pending.append(program(qb, db.rows, db.scales))
  # Replicated results: every process reads its own copy.
  scores = np.concatenate([np.asarray(s.addressable_data(0)) for s, _ in pending])[:nq]
  indices = np.concatenate([np.asarray(i.addressable_data(0)) for _, i in pending])[:nq]
  if (indices < 0).any():
    raise ValueError("sharded_exact_search: fewer than k finite scores for some query "
                     "(non-finite descriptors?)")
  return scores, indices.astype(np.int64)
