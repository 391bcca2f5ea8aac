"""Tests for exact chunked top-k search and full rankings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qaff_jax.evaluation import metrics, search


def _int_data(seed, nq, n, d):
  """Small-integer descriptors: dot products are exact in float32 and tie often."""
  rng = np.random.default_rng(seed)
  q = rng.integers(-2, 3, size=(nq, d)).astype(np.float32)
  x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
  return q, x


def _reference_topk(q, x, k):
  s = q.astype(np.float64) @ x.astype(np.float64).T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # ties: lower index first
  return np.take_along_axis(s, order, axis=1), order


def _float64_scores(q, x, chunk=65536):
  """q @ x.T in float64 on the host, chunk by chunk (x numpy or jax)."""
  q = np.asarray(q, np.float64)
  return np.concatenate(
      [q @ np.asarray(x[a:a + chunk], np.float64).T
       for a in range(0, x.shape[0], chunk)], axis=1)


def _assert_topk_is_reference(scores, idx, q, x, atol):
  """(scores, idx) is the float64 top-k of q against x, up to near ties.

  The returned ids must be distinct, carry their own dot products as scores,
  and those true scores must be the k best of the float64 ranking in order;
  where the reference has a clear gap on both sides the id itself is checked.
  """
  exact = _float64_scores(q, x)
  k = idx.shape[1]
  order = np.argsort(-exact, axis=1, kind="stable")[:, :k + 1]
  ref = np.take_along_axis(exact, order, axis=1)
  got = np.take_along_axis(exact, idx, axis=1)
  assert all(len(set(row)) == k for row in idx.tolist())
  np.testing.assert_allclose(scores, got, atol=atol, rtol=0)
  np.testing.assert_allclose(got, ref[:, :k], atol=atol, rtol=0)
  gaps = np.diff(ref, axis=1) < -2 * atol       # [nq, k]: gap after position j
  clear = gaps.copy()
  clear[:, 1:] &= gaps[:, :-1]                  # and a gap before it
  np.testing.assert_array_equal(idx[clear], order[:, :k][clear])
  return clear.mean()


@pytest.mark.parametrize(
    "n,chunk,k,batch",
    [
        (1000, 64, 1, 5),     # many chunks, last one overlaps the previous
        (1000, 64, 10, 13),   # one query batch, not a multiple of anything
        (1000, 64, 100, 4),   # k > chunk
        (1000, 64, 1000, 6),  # k == n: complete ranking
        (1000, 250, 17, 3),   # n a multiple of chunk
        (130, 129, 130, 7),   # last chunk overlaps all but one row
        (50, 4096, 20, 100),  # chunk clipped to n
        (1, 8, 1, 2),
    ])
def test_exact_search_matches_stable_argsort(n, chunk, k, batch):
  q, x = _int_data(n + chunk, 13, n, 6)
  scores, idx = search.exact_search(q, x, k, chunk_size=chunk,
                                    query_batch_size=batch)
  ref_scores, ref_idx = _reference_topk(q, x, k)
  assert scores.shape == (13, k) and idx.shape == (13, k)
  assert idx.dtype == np.int64 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
  # Padded/overlap rows never come back: valid and unique per query.
  assert idx.min() >= 0 and idx.max() < n
  assert all(len(set(row)) == k for row in idx.tolist())


def test_exact_search_float_and_jax_inputs():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(9, 32))  # float64 input is converted to float32
  x = rng.normal(size=(777, 32))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  scores, idx = search.exact_search(jnp.asarray(q, jnp.float32),
                                    jnp.asarray(x, jnp.float32), 25,
                                    chunk_size=100, query_batch_size=4)
  ref_scores, ref_idx = _reference_topk(q, x, 25)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_cosine_metric_normalises_on_the_fly():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(5, 16)).astype(np.float32) * 3.0
  x = rng.normal(size=(300, 16)).astype(np.float32)
  x *= rng.uniform(0.1, 10.0, size=(300, 1)).astype(np.float32)
  scores, idx = search.exact_search(q, x, 30, chunk_size=64, metric="cosine")
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  ref_scores, ref_idx = _reference_topk(qn, xn, 30)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_exact_search_argument_errors():
  q, x = _int_data(0, 2, 10, 4)
  with pytest.raises(ValueError, match="k must be"):
    search.exact_search(q, x, 11)
  with pytest.raises(ValueError, match="dim"):
    search.exact_search(q[:, :3], x, 2)
  with pytest.raises(ValueError, match="metric"):
    search.exact_search(q, x, 2, metric="l2")
  s, i = search.exact_search(q[:0], x, 3)
  assert s.shape == (0, 3) and i.shape == (0, 3)


def test_one_compilation_serves_all_chunks_and_batches():
  q, x = _int_data(3, 20, 500, 8)
  search._search_batch.clear_cache()
  search.exact_search(q, x, 7, chunk_size=64, query_batch_size=6)  # 4 batches
  assert search._search_batch._cache_size() == 1


def test_full_ranking_and_ranks_from_indices():
  q, x = _int_data(7, 11, 200, 5)
  ranks = search.full_ranking(q, x, query_batch_size=4)
  s = q.astype(np.float64) @ x.astype(np.float64).T
  ref = np.argsort(-s, axis=1, kind="stable").T
  assert ranks.shape == (200, 11) and ranks.dtype == np.int64
  np.testing.assert_array_equal(ranks, ref)
  _, idx = search.exact_search(q, x, 200, chunk_size=48, query_batch_size=5)
  np.testing.assert_array_equal(search.ranks_from_indices(idx, n_db=200), ranks)
  with pytest.raises(ValueError, match="full ranking"):
    search.ranks_from_indices(idx[:, :10], n_db=200)
  assert search.ranks_from_indices(idx[:, :10]).shape == (10, 11)


def test_search_to_revisited_metrics_end_to_end():
  # q0 = e0, q1 = e1; database rows on e0 / e1 at chosen lengths, every other
  # row lives on e2..e7 (score 0 for both queries, ranked after by index).
  rng = np.random.default_rng(5)
  x = np.zeros((40, 8), np.float32)
  x[:, 2:] = rng.normal(size=(40, 6))
  x[[0, 6, 1, 2], :] = 0
  x[[0, 6, 1, 2], 0] = [3.0, 2.5, 2.0, 1.0]    # q0: 0 6 1 2, then the rest
  x[[3, 4, 5], :] = 0
  x[[3, 4, 5], 1] = [3.0, 2.0, 1.0]            # q1: 3 4 5, then the rest
  q = np.eye(2, 8, dtype=np.float32)
  gnd = [{"easy": [0, 1], "hard": [2], "junk": []},
         {"easy": [3], "hard": [4, 5], "junk": []}]
  ranks = search.full_ranking(q, x, metric="dot")
  assert ranks[:4, 0].tolist() == [0, 6, 1, 2] and ranks[:3, 1].tolist() == [3, 4, 5]
  res = metrics.evaluate_revisited(ranks, gnd, kappas=(1, 5))
  # q0 (q1 is perfect: AP 1, P 1 everywhere):
  #   E: ok {0, 1} at 0, 2 (junk 2 after them): 1/2 + (1/2 + 2/3)/4 = 19/24;
  #      1-based [1, 3]: P@1 = 1, P@5 = 2/3 (kk = 3).
  #   M: ok {0, 1, 2} at 0, 2, 3: 1/3 + (1/2 + 2/3)/6 + (2/3 + 3/4)/6 = 55/72;
  #      P@1 = 1, P@5 = 3/4 (kk = 4).
  #   H: ok {2}, junk {0, 1} removed -> 6 2: position 1, AP 1/4; P@1 = 0,
  #      P@5 = 1/2 (kk = 2).
  expected = {"mAP_E": (19 / 24 + 1) / 2, "mAP_M": (55 / 72 + 1) / 2,
              "mAP_H": (1 / 4 + 1) / 2, "mP@1_E": 1.0, "mP@1_M": 1.0,
              "mP@1_H": 0.5, "mP@5_E": (2 / 3 + 1) / 2, "mP@5_M": (3 / 4 + 1) / 2,
              "mP@5_H": (1 / 2 + 1) / 2}
  for key, value in expected.items():
    assert res[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.accelerator
def test_large_database_on_accelerator():
  # 1M x 2048 float32 (8 GB) kept on the device; k = 100, 70 queries.
  n, d = 1_000_000, 2048
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (n, d), jnp.float32)
  q = x[jnp.array([5, 999_999, 123_456])] + 0.01
  scores, idx = search.exact_search(q, x, 100, chunk_size=65536)
  assert idx[:, 0].tolist() == [5, 999_999, 123_456]
  # Against float64 on the host, 65536 rows at a time (float32 sums of 2048
  # products: ~1e-3 off for scores ~200, ~1e-2 for the planted row's ~2048).
  _assert_topk_is_reference(scores, idx, np.asarray(q), x, atol=5e-2)


# ---------------------------------------------------------------------------
# Sharded exact search (8 fake CPU devices, a (4, 2) mesh).


@pytest.fixture(scope="module")
def sharded_case():
  from qaff_jax import parallel
  rng = np.random.default_rng(11)
  x = rng.standard_normal((3001, 32)).astype(np.float32)   # not a multiple of 8
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = rng.standard_normal((37, 32)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  mesh = parallel.make_mesh(2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  ref_s, ref_i = _reference_topk(q, x, 50)   # float64 NumPy
  return q, x, mesh, ref_s, ref_i


def test_sharded_float32_is_the_single_device_ranking(sharded_case):
  q, x, mesh, ref_s, ref_i = sharded_case
  db = search.place_database(x, mesh)
  assert db.rows.shape == (3008, 32) and db.num_shards == 8 and db.n == 3001
  assert db.rows.sharding.spec == jax.sharding.PartitionSpec(("data", "model"), None)
  s, i = search.sharded_exact_search(q, db, 50, chunk_size=128, query_batch_size=16)
  assert i.dtype == np.int64 and s.dtype == np.float32 and i.shape == (37, 50)
  assert _assert_topk_is_reference(s, i, q, x, atol=1e-6) > 0.99
  np.testing.assert_allclose(s, ref_s, atol=1e-6)
  assert i.max() < 3001   # padding rows never come back


def test_sharded_ties_go_to_the_lower_index():
  # Small-integer descriptors: exact float32 scores and many ties, which the
  # per-shard top-k and the merge across the 8 shards must break by index.
  from qaff_jax import parallel
  q, x = _int_data(21, 9, 1001, 6)
  db = search.place_database(x, parallel.make_mesh(2))
  # k = 130 > 126 rows per shard; 3 chunks of 48 per shard, the last overlapping.
  s, i = search.sharded_exact_search(q, db, 130, chunk_size=48, query_batch_size=4)
  ref_s, ref_i = _reference_topk(q, x, 130)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_array_equal(s, ref_s.astype(np.float32))


@pytest.mark.parametrize("storage,score_dtype,rescore,bound", [
    ("float32", "bfloat16", True, 0.99),
    ("float32", "int8", True, 0.99),
    ("float32", "bfloat16", False, 0.95),
    ("int8", "int8", False, 0.95),
])
def test_cheap_scoring_keeps_recall(sharded_case, storage, score_dtype, rescore, bound):
  q, x, mesh, _, ref_i = sharded_case
  db = search.place_database(x, mesh, dtype=storage)
  _, i = search.sharded_exact_search(q, db, 50, score_dtype=score_dtype, rescore=rescore,
                                     chunk_size=512)
  recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(i.tolist(), ref_i.tolist())])
  assert recall >= bound, recall


def test_rescore_returns_exact_float32_scores(sharded_case):
  q, x, mesh, _, _ = sharded_case
  db = search.place_database(x, mesh)
  exact = lambda i: np.einsum("qd,qkd->qk", q.astype(np.float64), x[i].astype(np.float64))
  s, i = search.sharded_exact_search(q, db, 50, score_dtype="bfloat16")
  assert np.abs(s - exact(i)).max() > 1e-4          # bf16 scores are approximate
  s, i = search.sharded_exact_search(q, db, 50, score_dtype="bfloat16", rescore=True)
  assert np.abs(s - exact(i)).max() < 1e-6          # re-scored: float32 dot products
  assert (np.diff(s, axis=1) <= 0).all()


def test_sharded_argument_errors(sharded_case):
  q, x, mesh, _, _ = sharded_case
  bf16 = search.place_database(x[:100], mesh, dtype="bfloat16")
  with pytest.raises(ValueError, match="float32"):
    search.sharded_exact_search(q, bf16, 5, rescore=True)
  with pytest.raises(ValueError, match="scored in"):
    search.sharded_exact_search(q, bf16, 5, score_dtype="float32")
  with pytest.raises(ValueError, match="k must be"):
    search.sharded_exact_search(q, bf16, 101)
  rows, scales = search.abstract_database(1000, 16, mesh, dtype="int8")
  assert rows.shape == (1000, 16) and rows.dtype == jnp.int8 and scales.shape == (1000,)
  assert rows.sharding.spec == jax.sharding.PartitionSpec(("data", "model"), None)


def test_sharded_search_compiles_for_a_tpu_slice():
  pytest.importorskip("libtpu")
  from qaff_jax.evaluation import search_aot
  r = search_aot.compile_sharded_search("v5e:2x2", n=10_000, dim=64, queries=16, k=10)
  assert r["devices"] == 4 and r["rows_per_device"] == 2500 and r["fits"]
  assert r["memory_gib"]["argument"] > 0 and r["ideal_ms_per_1000_queries"] > 0
  assert r["flops_per_device"] == pytest.approx(2 * 16 * 2500 * 64 + 2 * 16 * 20 * 64)
  assert r["collectives"]["all-gather"]["count"] >= 2   # the merge, per mesh axis
