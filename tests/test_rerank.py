"""Re-ranking (αQE, DBA, SuperGlobal) against loop-based float64 references."""

import numpy as np
import pytest

from qaff_jax.evaluation import metrics, rerank, search


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _clustered(seed, n, nq, d=32, clusters=12, noise=0.8):
  """Unit vectors around a few centres, so neighbours have positive similarity."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(clusters, d)))
  def draw(m):
    pick = rng.integers(0, clusters, size=m)
    return _unit(centres[pick] + noise * rng.normal(size=(m, d)) / np.sqrt(d))
  return draw(nq).astype(np.float32), draw(n).astype(np.float32)


# --- straightforward references (float64, explicit loops) ------------------


def _ref_expand(vec, neighbours, alpha):
  total = vec.astype(np.float64).copy()
  for nb in neighbours:
    sim = float(np.dot(vec, nb))
    total += (max(sim, 0.0) ** alpha) * nb
  return total / np.sqrt(np.sum(total * total))


def _ref_aqe(q, x, idx, n, alpha):
  q, x = q.astype(np.float64), x.astype(np.float64)
  return np.stack([_ref_expand(q[i], [x[j] for j in idx[i, :n]], alpha)
                   for i in range(len(q))])


def _ref_dba(x, n, alpha):
  x = x.astype(np.float64)
  out = []
  for r in range(len(x)):
    sims = x @ x[r]
    order = sorted(range(len(x)), key=lambda j: (-sims[j], j))
    others = [j for j in order if j != r][:n]
    out.append(_ref_expand(x[r], [x[j] for j in others], alpha))
  return np.stack(out)


def _ref_superglobal(q, x, idx, m, knn, beta):
  """Per query: refine each of the top-m, max-pool the best knn+1, fuse."""
  q, x = q.astype(np.float64), x.astype(np.float64)
  all_scores, all_ids = [], []
  for i in range(len(q)):
    cand = list(idx[i, :m])
    refined = []
    for c in cand:
      sims = [float(np.dot(x[c], x[o])) for o in cand]
      best = sorted(range(len(cand)), key=lambda t: (-sims[t], t))[:knn + 1]
      num = x[cand[best[0]]].copy()
      den = 1.0
      for t in best[1:]:
        num += beta * sims[t] * x[cand[t]]
        den += beta * sims[t]
      refined.append(num / den)
    s_q = [float(np.dot(q[i], r)) for r in refined]
    top = sorted(range(len(cand)), key=lambda t: (-s_q[t], t))[:knn + 1]
    q_r = refined[top[0]].copy()
    for t in top[1:]:
      q_r = np.maximum(q_r, refined[t])
    fused = [(s_q[t] + float(np.dot(q_r, refined[t]))) / 2 for t in
             range(len(cand))]
    order = sorted(range(len(cand)), key=lambda t: (-fused[t], t))
    tail = list(idx[i, m:])
    all_ids.append([cand[t] for t in order] + tail)
    all_scores.append([fused[t] for t in order] +
                      [float(np.dot(q[i], x[j])) for j in tail])
  return np.asarray(all_scores), np.asarray(all_ids)


def _ref_topk(v, x, k):
  s = v.astype(np.float64) @ x.astype(np.float64).T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, axis=1), order


def _assert_ranking(scores, ids, ref_scores, ref_ids, atol=2e-5):
  """Same scores in order; ids equal wherever the reference has no near tie."""
  assert scores.dtype == np.float32 and ids.dtype == np.int64
  np.testing.assert_allclose(scores, ref_scores, atol=atol, rtol=0)
  gaps = np.abs(np.diff(ref_scores, axis=1))
  clear = np.ones(ref_ids.shape, bool)
  clear[:, 1:] &= gaps > atol
  clear[:, :-1] &= gaps > atol
  np.testing.assert_array_equal(ids[clear], ref_ids[clear])
  for a, b in zip(ids, ref_ids):
    assert sorted(a.tolist()) == sorted(b.tolist())


# --- αQE --------------------------------------------------------------------


@pytest.mark.parametrize("n,alpha", [(2, 3.0), (5, 3.0), (3, 0.0), (4, 2.5),
                                     (0, 3.0)])
def test_aqe_vectors_match_reference(n, alpha):
  q, x = _clustered(1, 300, 9)
  _, idx = search.exact_search(q, x, 20)
  got = np.asarray(rerank.alpha_query_expansion(q, x, idx, n=n, alpha=alpha,
                                                batch_size=4))
  np.testing.assert_allclose(got, _ref_aqe(q, x, idx, n, alpha), atol=1e-6)


def test_aqe_clips_negative_similarity():
  x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], np.float32)
  q = np.array([[1.0, 0.0]], np.float32)
  got = np.asarray(rerank.alpha_query_expansion(q, x, np.array([[1, 2]]),
                                                n=2, alpha=2.5))
  np.testing.assert_allclose(got, [[1.0, 0.0]], atol=1e-7)  # weights 0, 0


def test_aqe_full_and_shortlist_rerank():
  q, x = _clustered(2, 400, 7)
  _, idx = search.exact_search(q, x, 50)
  expanded = _ref_aqe(q, x, idx, 2, 3.0)
  s, i = rerank.rerank("aqe", q, x, idx, k=30)
  _assert_ranking(s, i, *_ref_topk(expanded, x, 30))
  s, i = rerank.rerank("aqe", q, x, idx, scope="shortlist", k=50)
  ref = expanded @ x.astype(np.float64).T
  cand_scores = np.take_along_axis(ref, idx, axis=1)
  order = np.argsort(-cand_scores, axis=1, kind="stable")
  _assert_ranking(s, i, np.take_along_axis(cand_scores, order, axis=1),
                  np.take_along_axis(idx, order, axis=1))


def test_aqe_with_custom_search_fn():
  q, x = _clustered(3, 200, 4)
  _, idx = search.exact_search(q, x, 10)
  calls = []

  def fn(v, k):
    calls.append(k)
    return search.exact_search(v, x, k)

  s1, i1 = rerank.rerank("aqe", q, x, idx, search_fn=fn)
  s2, i2 = rerank.rerank("aqe", q, x, idx)
  assert calls == [10]
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(s1, s2)


# --- DBA --------------------------------------------------------------------


@pytest.mark.parametrize("n,alpha", [(2, 3.0), (4, 1.0)])
def test_dba_vectors_match_reference(n, alpha):
  _, x = _clustered(4, 150, 1)
  got = np.asarray(rerank.database_side_augmentation(x, n, alpha, batch_size=7))
  np.testing.assert_allclose(got, _ref_dba(x, n, alpha), atol=1e-6)
  rows = np.array([5, 0, 149, 5])
  part = np.asarray(rerank.database_side_augmentation(x, n, alpha, rows=rows))
  np.testing.assert_allclose(part, got[rows], atol=1e-6)


def test_dba_skips_self_among_duplicates():
  _, x = _clustered(5, 60, 1)
  x[40] = x[10]  # exact duplicate: row 40's list starts with row 10 (lower id)
  x[41] = x[10]
  got = np.asarray(rerank.database_side_augmentation(x, 3, 3.0))
  np.testing.assert_allclose(got, _ref_dba(x, 3, 3.0), atol=1e-6)


def test_dba_with_given_neighbours():
  _, x = _clustered(6, 100, 1)
  _, nbr = search.exact_search(x, x, 6)
  a = np.asarray(rerank.database_side_augmentation(x, 3, 3.0, neighbours=nbr))
  b = np.asarray(rerank.database_side_augmentation(x, 3, 3.0))
  np.testing.assert_allclose(a, b, atol=1e-7)
  with pytest.raises(ValueError, match="besides the vector itself"):
    rerank.database_side_augmentation(x, 3, 3.0, neighbours=nbr[:, :3])


def test_dba_rerank_full_and_shortlist():
  q, x = _clustered(7, 250, 6)
  _, idx = search.exact_search(q, x, 40)
  aug = _ref_dba(x, 2, 3.0)
  s, i = rerank.rerank("dba", q, x, idx, k=25)
  _assert_ranking(s, i, *_ref_topk(q, aug, 25))
  s2, i2 = rerank.rerank("dba", q, x, idx, k=25,
                         augmented_db=rerank.database_side_augmentation(x))
  np.testing.assert_array_equal(i2, i)
  s, i = rerank.rerank("dba", q, x, idx, scope="shortlist")
  ref = q.astype(np.float64) @ aug.T
  cand = np.take_along_axis(ref, idx, axis=1)
  order = np.argsort(-cand, axis=1, kind="stable")
  _assert_ranking(s, i, np.take_along_axis(cand, order, axis=1),
                  np.take_along_axis(idx, order, axis=1))


# --- SuperGlobal ------------------------------------------------------------


@pytest.mark.parametrize("k_in,m,knn,beta,batch", [
    (450, 400, 9, 0.15, 16),  # the paper's defaults
    (80, 50, 4, 0.3, 2),      # tail after m unchanged; padded last batch
    (30, 400, 9, 0.15, 4),    # m clipped to the candidates
    (12, 3, 9, 0.15, 3),      # knn clipped to m - 1
])
def test_superglobal_matches_reference(k_in, m, knn, beta, batch):
  q, x = _clustered(8, 600, 5)
  _, idx = search.exact_search(q, x, k_in)
  s, i = rerank.superglobal_rerank(q, x, idx, m=m, knn=knn, beta=beta,
                                   batch_size=batch)
  ref_s, ref_i = _ref_superglobal(q, x, idx, min(m, k_in),
                                  min(knn, min(m, k_in) - 1), beta)
  _assert_ranking(s, i, ref_s, ref_i)
  m_eff = min(m, k_in)
  np.testing.assert_array_equal(i[:, m_eff:], idx[:, m_eff:])


def test_superglobal_batch_size_invariant():
  q, x = _clustered(9, 500, 7)
  _, idx = search.exact_search(q, x, 420)
  a = rerank.rerank("superglobal", q, x, idx, batch_size=3)
  b = rerank.rerank("superglobal", q, x, idx, batch_size=7)
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)


# --- the entry point --------------------------------------------------------


def _labelled_clusters(seed, clusters=8, per_cluster=30, queries_per=2, d=32,
                       db_noise=1.2, q_noise=1.5):
  """Database members near a few centres, queries noisier than the members.

  A noisy query ranks some members of other clusters high; expanding it with
  its (mostly right) neighbours, or averaging each member with its neighbours,
  pulls both towards the centre: every re-ranker should raise the mAP.
  """
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(clusters, d)))
  db_label = np.repeat(np.arange(clusters), per_cluster)
  q_label = np.repeat(np.arange(clusters), queries_per)
  x = _unit(centres[db_label] +
            db_noise * rng.normal(size=(db_label.size, d)) / np.sqrt(d))
  q = _unit(centres[q_label] +
            q_noise * rng.normal(size=(q_label.size, d)) / np.sqrt(d))
  gnd = [{"ok": np.flatnonzero(db_label == c)} for c in q_label]
  return q.astype(np.float32), x.astype(np.float32), gnd


def _shortlist_ref(v, x, idx):
  """The candidates `idx` re-sorted by v·x (float64, ties: first-stage order)."""
  s = np.take_along_axis(v.astype(np.float64) @ x.astype(np.float64).T, idx,
                         axis=1)
  order = np.argsort(-s, axis=1, kind="stable")
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(idx, order,
                                                                  axis=1)


def test_every_reranker_changes_the_ranking_and_raises_map():
  q, x, gnd = _labelled_clusters(0)
  n_db = x.shape[0]
  _, idx = search.exact_search(q, x, n_db)  # complete first-stage ranking
  base_map, base_aps, *_ = metrics.compute_map(search.ranks_from_indices(idx),
                                               gnd)
  expanded = _ref_aqe(q, x, idx, 2, 3.0)
  augmented = _ref_dba(x, 2, 3.0)
  cases = {  # method, params -> the float64 reference ranking
      ("aqe", "full"): _ref_topk(expanded, x, n_db),
      ("aqe", "shortlist"): _shortlist_ref(expanded, x, idx),
      ("dba", "full"): _ref_topk(q, augmented, n_db),
      ("dba", "shortlist"): _shortlist_ref(q, augmented.astype(np.float32), idx),
      ("superglobal", 100): _ref_superglobal(q, x, idx, 100, 9, 0.15),
  }
  for (method, arg), (ref_s, ref_i) in cases.items():
    params = {"m": arg} if method == "superglobal" else {"scope": arg}
    s, i = rerank.rerank(method, q, x, idx, **params)
    name = f"{method}/{arg}"
    assert i.shape == (len(q), n_db), name
    assert all(len(set(row)) == n_db for row in i.tolist()), name
    _assert_ranking(s, i, ref_s, ref_i)
    changed = (i != idx).any(axis=1)
    assert changed.sum() >= len(q) // 2, (name, changed.sum())
    m, aps, *_ = metrics.compute_map(search.ranks_from_indices(i), gnd)
    # No re-ranking: mAP 0.725; αQE 0.794, DBA 0.790, SuperGlobal (M=100) 0.850.
    assert m >= base_map + 0.04, (name, m, base_map)
    assert (aps > base_aps).sum() > 2 * (aps < base_aps).sum(), name


def test_rerank_none_keeps_order():
  q, x = _clustered(11, 100, 3)
  s0, idx = search.exact_search(q, x, 20)
  s, i = rerank.rerank("none", q, x, idx, k=10)
  np.testing.assert_array_equal(i, idx[:, :10])
  np.testing.assert_allclose(s, s0[:, :10], atol=1e-6)


def test_rerank_errors():
  q, x = _clustered(12, 50, 2)
  _, idx = search.exact_search(q, x, 10)
  with pytest.raises(ValueError, match="unknown method"):
    rerank.rerank("diffusion", q, x, idx)
  bad = idx.copy()
  bad[0, 3] = -1
  with pytest.raises(ValueError, match="-1"):
    rerank.rerank("superglobal", q, x, bad)
  with pytest.raises(ValueError, match="scope"):
    rerank.rerank("aqe", q, x, idx, scope="everything")
  with pytest.raises(ValueError, match="at most"):
    rerank.rerank("superglobal", q, x, idx, k=11)
