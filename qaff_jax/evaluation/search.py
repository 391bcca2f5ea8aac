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
