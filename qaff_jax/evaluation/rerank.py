r"""Re-ranking with global descriptors only: αQE, DBA and SuperGlobal.

All three work on L2-normalised float32 descriptors, so a dot product is the
cosine similarity. They take the candidate lists of a first search (`indices`,
[n_queries, k], best first, from `search.exact_search`, `ann.scann_search` or
anything else) and return new `(scores, indices)` as numpy arrays, like the
search functions. Everything heavy runs in jitted, fixed-shape kernels over
batches of queries (padded, so one compilation per batch size); the database
is used in place on the device and only the rows a batch needs are gathered,
so they scale to a 1M-image database.

Conventions (`n` neighbours, exponent `α`):

* αQE (Radenović et al., TPAMI 2019): the query itself (weight 1) plus its top-n
  retrieved database vectors x_i, each weighted by max(q·x_i, 0)^α:
  `q' = normalize(q + Σ_{i<=n} max(q·x_i, 0)^α x_i)`. α = 0 is average QE.
  Negative similarities are clipped so a non-integer α stays defined.
* DBA (Arandjelović & Zisserman, CVPR 2012; α-weighted as Radenović et al.):
  every database vector is replaced the same way by itself (weight 1) plus
  its top-n database neighbours other than itself:
  `x' = normalize(x + Σ_{i<=n} max(x·x_i, 0)^α x_i)`; queries are then searched
  against the augmented database (queries themselves are not augmented).
  Computing every neighbour list is an n_db x n_db search (offline work: about
  an hour for 1M x 512 on a 2-core CPU), so precomputed `neighbours` or an
  already `augmented_db` can be passed in.
* SuperGlobal (Shao et al., "Global Features are All You Need for Image
  Retrieval and Reranking", ICCV 2023), as in the authors' code
  (`modules/reranking/MDescAug.py`, `RerankwMDA.py`), for each query q with
  first-stage candidates c_1..c_M (M = 400):
    1. Candidate refinement. The neighbours of a candidate are searched among
       the M candidates only (a M x M similarity matrix per query, not the
       database). With s_1 >= s_2 >= ... the K+1 largest similarities of d
       (K = 9; s_1 is d with itself) and y_j those candidates:
       `d_r = (y_1 + Σ_{j=2..K+1} β s_j y_j) / (1 + Σ_{j=2..K+1} β s_j)`,
       β = 0.15 — a weighted mean with weights β·sim (not sim^β) and no
       re-normalisation.
    2. Query refinement: `q_r` = element-wise maximum of the K+1 refined
       candidates with the largest `q·d_r` (the query itself is not part of
       the max; the code's β-scaled weights for this step are never used).
    3. Score: `(q·d_r + q_r·d_r) / 2`; the M candidates are sorted by it
       (ties keep the first-stage order) and the rest of the ranking follows
       unchanged, with their first-stage similarities q·x as scores.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qaff_jax.evaluation import search

_HIGHEST = jax.lax.Precision.HIGHEST
SCOPES = ("full", "shortlist")

SearchFn = Callable[[Any, int], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _device_f32(x: Any, name: str) -> jax.Array:
  """A 2-D float32 device array (an existing float32 jax array is not copied)."""
  arr = x if isinstance(x, jax.Array) else jax.device_put(
      np.asarray(x, dtype=np.float32))
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D [n, D], got shape {arr.shape}")
  if arr.dtype != jnp.float32:
    arr = arr.astype(jnp.float32)
  return arr


def _check_indices(indices: Any, nq: int, n_db: int) -> np.ndarray:
  """Validates [nq, k] candidate indices; returns them as int32."""
  idx = np.asarray(indices)
  if idx.ndim != 2 or idx.shape[0] != nq:
    raise ValueError(f"indices must be [n_queries={nq}, k], got shape {idx.shape}")
  if idx.shape[1] == 0:
    raise ValueError("indices must hold at least one candidate per query")
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be integers, got {idx.dtype}")
  if idx.min() < 0 or idx.max() >= n_db:
    raise ValueError(f"indices must lie in [0, n_db={n_db}); missing results "
                     "(-1 from an ANN search) must be removed first")
  return idx.astype(np.int32)


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _batched(fn: Callable[..., Any], batch_size: int,
             *arrays: np.ndarray | jax.Array) -> list[np.ndarray]:
  """Applies `fn` to fixed-size slices of `arrays` (same leading dimension).

  The last slice is padded with copies of row 0 so every call has one shape;
  the padded rows are dropped from the (tuple of) outputs.
  """
  total = arrays[0].shape[0]
  batch = max(1, min(batch_size, total))
  pad = -total % batch
  if pad:
    arrays = tuple(
        jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if isinstance(
            a, jax.Array) else np.concatenate([a, np.repeat(a[:1], pad, axis=0)])
        for a in arrays)
  pending = [fn(*(a[s:s + batch] for a in arrays))
             for s in range(0, total + pad, batch)]
  if not isinstance(pending[0], tuple):
    pending = [(p,) for p in pending]
  return [np.concatenate([np.asarray(p[j]) for p in pending])[:total]
          for j in range(len(pending[0]))]


# ---------------------------------------------------------------------------
# Kernels (one query / row batch each)
# ---------------------------------------------------------------------------


@jax.jit
def _expand_kernel(v: jax.Array, nbr: jax.Array, db: jax.Array,
                   alpha: jax.Array) -> jax.Array:
  """normalize(v + Σ_j max(v·x_j, 0)^α x_j) with x_j = db[nbr[:, j]]."""
  x = jnp.take(db, nbr, axis=0)  # [b, n, D]
  sims = jnp.einsum("bd,bnd->bn", v, x, precision=_HIGHEST)
  weights = jnp.power(jnp.maximum(sims, 0.0), alpha)
  return _normalize(v + jnp.einsum("bn,bnd->bd", weights, x,
                                   precision=_HIGHEST))


@jax.jit
def _rescore_kernel(v: jax.Array, cand: jax.Array, db: jax.Array):
  """Scores v against its candidates and sorts them (stable, descending)."""
  x = jnp.take(db, cand, axis=0)
  s = jnp.einsum("bd,bkd->bk", v, x, precision=_HIGHEST)
  order = jnp.argsort(-s, axis=1, stable=True)
  return (jnp.take_along_axis(s, order, axis=1),
          jnp.take_along_axis(cand, order, axis=1))


@jax.jit
def _dot_kernel(v: jax.Array, cand: jax.Array, db: jax.Array) -> jax.Array:
  """v·db[cand] in the given candidate order (no sorting)."""
  return jnp.einsum("bd,bkd->bk", v, jnp.take(db, cand, axis=0),
                    precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("knn",))
def _superglobal_kernel(q: jax.Array, cand: jax.Array, db: jax.Array,
                        beta: jax.Array, *, knn: int):
  """SuperGlobal on one query batch; `cand` is [b, M] (see module docstring)."""
  x = jnp.take(db, cand, axis=0)  # [b, M, D]
  b, m, _ = x.shape
  gram = jnp.einsum("bid,bjd->bij", x, x, precision=_HIGHEST)  # [b, M, M]
  top_s, top_j = jax.lax.top_k(gram, knn + 1)  # best first: d itself
  # (Slicing top_s here makes XLA:CPU replace top_k by a full sort: 5x slower.)
  w = jnp.where(jnp.arange(knn + 1) == 0, 1.0, beta * top_s)
  # Weighted mean as one matmul: a dense [M, M] weight matrix per query.
  rows = jnp.arange(b)[:, None, None]
  cols = jnp.arange(m)[None, :, None]
  wmat = jnp.zeros((b, m, m), jnp.float32).at[rows, cols, top_j].add(w)
  refined = jnp.einsum("bij,bjd->bid", wmat, x, precision=_HIGHEST)
  refined = refined / jnp.sum(w, axis=-1, keepdims=True)
  s_q = jnp.einsum("bd,bmd->bm", q, refined, precision=_HIGHEST)
  _, best = jax.lax.top_k(s_q, knn + 1)
  q_r = jnp.max(jnp.take_along_axis(refined, best[..., None], axis=1), axis=1)
  s_r = jnp.einsum("bd,bmd->bm", q_r, refined, precision=_HIGHEST)
  fused = 0.5 * (s_q + s_r)
  order = jnp.argsort(-fused, axis=1, stable=True)
  return (jnp.take_along_axis(fused, order, axis=1),
          jnp.take_along_axis(cand, order, axis=1))


# ---------------------------------------------------------------------------
# Public building blocks
# ---------------------------------------------------------------------------


def alpha_query_expansion(queries: Any, db: Any, indices: Any, n: int = 2,
                          alpha: float = 3.0,
                          batch_size: int = 1024) -> jax.Array:
  """αQE: `normalize(q + Σ_{i<=n} max(q·x_i, 0)^α x_i)` over the top-n results.

  Args:
    queries: [nq, D] L2-normalised queries.
    db: [n_db, D] L2-normalised database.
    indices: [nq, k >= n] first-stage results, best first.
    n: neighbours added to the query (0 returns the queries, normalised).
    alpha: similarity exponent (0 gives average query expansion).
    batch_size: queries per kernel call.

  Returns:
    [nq, D] float32 expanded queries (device array).
  """
  q = _device_f32(queries, "queries")
  x = _device_f32(db, "db")
  idx = _check_indices(indices, q.shape[0], x.shape[0])
  if not 0 <= n <= idx.shape[1]:
    raise ValueError(f"n must be in [0, k={idx.shape[1]}], got {n}")
  if q.shape[0] == 0:
    return q
  a = jnp.float32(alpha)
  (out,) = _batched(lambda v, nb: _expand_kernel(v, nb, x, a), batch_size, q,
                    idx[:, :n])
  return jnp.asarray(out)


def _neighbours_without_self(nbr: np.ndarray, row_ids: np.ndarray,
                             n: int) -> np.ndarray:
  """The first n entries of each row that are not the row's own id."""
  nbr = np.asarray(nbr)
  other = nbr != row_ids[:, None]
  if (other.sum(axis=1) < n).any():
    raise ValueError(f"need at least n={n} neighbours besides the vector itself "
                     f"per row; got lists of width {nbr.shape[1]}")
  order = np.argsort(~other, axis=1, kind="stable")[:, :n]
  return np.take_along_axis(nbr, order, axis=1).astype(np.int32)


def database_side_augmentation(
    db: Any,
    n: int = 2,
    alpha: float = 3.0,
    *,
    rows: Any = None,
    neighbours: Any = None,
    batch_size: int = 1024,
    search_kwargs: dict[str, Any] | None = None,
) -> jax.Array:
  """DBA: `x' = normalize(x + Σ_{i<=n} max(x·x_i, 0)^α x_i)`, x_i ≠ x.

  Args:
    db: [n_db, D] L2-normalised database.
    n: neighbours per vector (besides the vector itself); n < n_db.
    alpha: similarity exponent.
    rows: database rows to augment (default: all, in order).
    neighbours: optional precomputed neighbour lists, one row per augmented row
      (best first; the vector's own id may appear and is skipped). Default:
      computed with `search.exact_search` (rows x n_db, chunked).
    batch_size: rows per kernel call.
    search_kwargs: extra arguments for `search.exact_search`.

  Returns:
    [len(rows), D] float32 augmented vectors (device array).
  """
  x = _device_f32(db, "db")
  n_db = x.shape[0]
  row_ids = (np.arange(n_db) if rows is None else
             np.asarray(rows, dtype=np.int64).reshape(-1))
  if not 0 <= n < n_db:
    raise ValueError(f"n must be in [0, n_db={n_db}), got {n}")
  if row_ids.size == 0:
    return jnp.zeros((0, x.shape[1]), jnp.float32)
  if row_ids.min() < 0 or row_ids.max() >= n_db:
    raise ValueError(f"rows must lie in [0, n_db={n_db})")
  if neighbours is None:
    vectors = x if rows is None else jnp.take(x, jnp.asarray(row_ids), axis=0)
    _, neighbours = search.exact_search(vectors, x, min(n + 1, n_db),
                                        **(search_kwargs or {}))
  neighbours = np.asarray(neighbours)
  if neighbours.ndim != 2 or neighbours.shape[0] != row_ids.size:
    raise ValueError(f"neighbours must be [{row_ids.size}, >= n], got shape "
                     f"{neighbours.shape}")
  nbr = _neighbours_without_self(neighbours, row_ids, n)
  a = jnp.float32(alpha)
  (out,) = _batched(
      lambda r, nb: _expand_kernel(jnp.take(x, r, axis=0), nb, x, a),
      batch_size, row_ids.astype(np.int32), nbr)
  return jnp.asarray(out)


def superglobal_rerank(queries: Any, db: Any, indices: Any, m: int = 400,
                       knn: int = 9, beta: float = 0.15,
                       batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """SuperGlobal re-ranking of the top-m candidates (see the module docstring).

  Args:
    queries: [nq, D] L2-normalised queries.
    db: [n_db, D] L2-normalised database.
    indices: [nq, k] first-stage results, best first; m is clipped to k.
    m: candidates re-ranked (M).
    knn: neighbours per candidate (K; clipped to m - 1); the query refinement
      max-pools the knn + 1 best refined candidates, as the authors' code.
    beta: weight factor of the neighbours' similarities.
    batch_size: queries per kernel call (memory ~ batch * m * (m + 2 D) floats).

  Returns:
    (scores [nq, k] float32, indices [nq, k] int64): the top-m re-ranked with
    their fused scores, then the remaining first-stage candidates unchanged
    with their similarity q·x.
  """
  q = _device_f32(queries, "queries")
  x = _device_f32(db, "db")
  idx = _check_indices(indices, q.shape[0], x.shape[0])
  if m < 1 or knn < 0:
    raise ValueError(f"need m >= 1 and knn >= 0, got m={m}, knn={knn}")
  nq, k = idx.shape
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  m = min(m, k)
  knn = min(knn, m - 1)
  b = jnp.float32(beta)
  head_s, head_i = _batched(
      lambda v, c: _superglobal_kernel(v, c, x, b, knn=knn), batch_size, q,
      idx[:, :m])
  if m == k:
    return head_s.astype(np.float32), head_i.astype(np.int64)
  (tail_s,) = _batched(lambda v, c: _dot_kernel(v, c, x), max(1, batch_size),
                       q, idx[:, m:])
  scores = np.concatenate([head_s, tail_s], axis=1).astype(np.float32)
  return scores, np.concatenate([head_i, idx[:, m:]], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------


def _search_or_rescore(v: jax.Array, x: jax.Array, idx: np.ndarray, k: int,
                       scope: str, search_fn: SearchFn | None,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Ranks the database `x` for the (new) query vectors `v`."""
  if scope == "full":
    if search_fn is not None:
      scores, found = search_fn(v, k)
    else:
      scores, found = search.exact_search(v, x, k)
    return np.asarray(scores, np.float32), np.asarray(found, np.int64)
  if k > idx.shape[1]:
    raise ValueError(f"scope='shortlist' returns at most the {idx.shape[1]} "
                     f"given candidates, asked for k={k}")
  scores, found = _batched(lambda a, c: _rescore_kernel(a, c, x), batch_size,
                           v, idx)
  return scores[:, :k].astype(np.float32), found[:, :k].astype(np.int64)


def _check_scope(scope: str) -> None:
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _rerank_none(q: jax.Array, x: jax.Array, idx: np.ndarray, k: int, *,
                 batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the first-stage order; scores are recomputed as q·x."""
  (scores,) = _batched(lambda v, c: _dot_kernel(v, c, x), batch_size, q, idx)
  return scores[:, :k].astype(np.float32), idx[:, :k].astype(np.int64)


def _rerank_aqe(q: jax.Array, x: jax.Array, idx: np.ndarray, k: int, *,
                n: int = 2, alpha: float = 3.0, scope: str = "full",
                search_fn: SearchFn | None = None,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """αQE, then a new search ('full') or a re-scored shortlist."""
  _check_scope(scope)
  expanded = alpha_query_expansion(q, x, idx, n=n, alpha=alpha,
                                   batch_size=batch_size)
  return _search_or_rescore(expanded, x, idx, k, scope, search_fn, batch_size)


def _rerank_dba(q: jax.Array, x: jax.Array, idx: np.ndarray, k: int, *,
                n: int = 2, alpha: float = 3.0, scope: str = "full",
                neighbours: Any = None, augmented_db: Any = None,
                search_fn: SearchFn | None = None,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Original queries against the DBA-augmented database."""
  _check_scope(scope)
  if augmented_db is not None:
    aug = _device_f32(augmented_db, "augmented_db")
    if aug.shape != x.shape:
      raise ValueError(f"augmented_db has shape {aug.shape}, db {x.shape}")
    return _search_or_rescore(q, aug, idx, k, scope, search_fn, batch_size)
  if scope == "full":
    aug = database_side_augmentation(x, n, alpha, neighbours=neighbours,
                                     batch_size=batch_size)
    return _search_or_rescore(q, aug, idx, k, scope, search_fn, batch_size)
  # Shortlist: augment only the candidates, then score against them.
  uniq, local = np.unique(idx, return_inverse=True)
  local = local.reshape(idx.shape).astype(np.int32)
  nbr = None if neighbours is None else np.asarray(neighbours)[uniq]
  aug = database_side_augmentation(x, n, alpha, rows=uniq, neighbours=nbr,
                                   batch_size=batch_size)
  scores, found = _search_or_rescore(q, aug, local, k, scope, None, batch_size)
  return scores, uniq[found].astype(np.int64)


def _rerank_superglobal(q: jax.Array, x: jax.Array, idx: np.ndarray, k: int,
                        *, m: int = 400, knn: int = 9, beta: float = 0.15,
                        batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """SuperGlobal on the top-m; the first k results."""
  scores, found = superglobal_rerank(q, x, idx, m=m, knn=knn, beta=beta,
                                     batch_size=batch_size)
  return scores[:, :k], found[:, :k]


RERANKERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "none": _rerank_none,
    "aqe": _rerank_aqe,
    "dba": _rerank_dba,
    "superglobal": _rerank_superglobal,
}


def rerank(method: str, queries: Any, db: Any, indices: Any,
           k: int | None = None, **params: Any) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranks first-stage results with global descriptors.

  Args:
    method: one of `RERANKERS`:
      'none' — first-stage order, scores q·x;
      'aqe' — αQE (n=2, alpha=3.0), then a new search;
      'dba' — DBA (n=2, alpha=3.0; optional `neighbours` or a precomputed
        `augmented_db`), then a new search with the original queries;
      'superglobal' — SuperGlobal (m=400, knn=9, beta=0.15).
      'aqe'/'dba' take `scope`: 'full' (default; search the whole database
      again, with `search.exact_search` or a given `search_fn(queries, k) ->
      (scores, indices)`, e.g. a ScaNN index — for DBA it must index the
      augmented database) or 'shortlist' (only re-score the given candidates:
      cheap, but nothing new can enter the list).
    queries: [nq, D] L2-normalised float32 queries.
    db: [n_db, D] L2-normalised float32 database (numpy or device array).
    indices: [nq, k_in] first-stage indices, best first (any search backend;
      for revisitop ranks [n_db, nq] pass `ranks.T`).
    k: results to return (default k_in; 'full' scope may ask for more).
    **params: method parameters (above) and `batch_size`.

  Returns:
    (scores [nq, k] float32, indices [nq, k] int64), best first;
    `search.ranks_from_indices` turns the indices into revisitop ranks.
  """
  if method not in RERANKERS:
    raise ValueError(f"unknown method {method!r}; expected one of "
                     f"{sorted(RERANKERS)}")
  q = _device_f32(queries, "queries")
  x = _device_f32(db, "db")
  if q.shape[1] != x.shape[1]:
    raise ValueError(f"queries have dim {q.shape[1]} but db has dim {x.shape[1]}")
  idx = _check_indices(indices, q.shape[0], x.shape[0])
  k = idx.shape[1] if k is None else int(k)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if method in ("none", "superglobal") and k > idx.shape[1]:
    raise ValueError(f"{method!r} returns at most the {idx.shape[1]} given "
                     f"candidates, asked for k={k}")
  if q.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return RERANKERS[method](q, x, idx, k, **params)
