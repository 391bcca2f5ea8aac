"""ScaNN index: recall vs exact search, save/load, brute-force fallback."""

import math
import os
import shutil
import time

import numpy as np
import pytest

from qaff_jax.evaluation import ann, rerank, search


def _exact_top(q, x, k):
  """Independent exact top-k: float64 NumPy scores, best first."""
  s = np.asarray(q, np.float64) @ np.asarray(x, np.float64).T
  top = np.argpartition(-s, k, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
  return np.take_along_axis(top, order, axis=1)


def _dir_bytes(directory):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def _unit_vectors(seed, n, d):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
  """20k random unit vectors (D=64): the hard, unclustered case."""
  x = _unit_vectors(0, 20_000, 64)
  q = _unit_vectors(1, 200, 64)
  return q, x, _exact_top(q, x, 100)


@pytest.fixture(scope="module")
def index(data):
  _, x, _ = data
  return ann.build_scann(x, num_leaves=50, num_leaves_to_search=45,
                         training_sample_size=20_000, reorder=1000, k=100)


def test_recall_at_100(data, index):
  q, _, exact = data
  scores, found = ann.scann_search(index, q, 100)
  assert scores.dtype == np.float32 and found.dtype == np.int64
  assert found.shape == (200, 100)
  assert ann.num_leaves_of(index) == 50
  assert ann.recall_at_k(found, exact, 100) >= 0.95
  # Re-ordered scores are exact dot products, best first.
  _, x, _ = data
  ref = np.einsum("qd,qkd->qk", q, x[found])
  np.testing.assert_allclose(scores, ref, atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_query_time_settings_change_recall(data, index):
  q, _, exact = data
  _, few = ann.scann_search(index, q, 100, leaves_to_search=2, reorder=100,
                            parallel=False)
  _, many = ann.scann_search(index, q, 100, leaves_to_search=50, reorder=2000)
  # 2 of 50 leaves hold about 2/50 of the neighbours (random data); all 50 hold all.
  assert ann.recall_at_k(few, exact, 100) < 0.5
  assert ann.recall_at_k(many, exact, 100) >= 0.99


def test_float64_queries_and_single_query(data, index):
  q, _, _ = data
  s64, i64 = ann.scann_search(index, q[:5].astype(np.float64), 10)
  s32, i32 = ann.scann_search(index, q[:5], 10)
  assert s64.dtype == np.float32
  np.testing.assert_array_equal(i64, i32)
  s1, i1 = ann.scann_search(index, q[3], 10)
  np.testing.assert_array_equal(i1, i32[3:4])


def test_save_load_round_trip(data, index, tmp_path):
  q, x, _ = data
  ann.save_scann(index, tmp_path / "built")
  shutil.move(tmp_path / "built", tmp_path / "moved")  # paths are relative
  loaded = ann.load_scann(tmp_path / "moved")
  for kwargs in ({}, {"leaves_to_search": 10, "reorder": 300}):
    a = ann.scann_search(index, q, 100, **kwargs)
    b = ann.scann_search(loaded, q, 100, **kwargs)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
  sizes = ann.index_bytes(tmp_path / "moved", per_file=True)
  total = _dir_bytes(tmp_path / "moved")
  assert sum(sizes.values()) == ann.index_bytes(tmp_path / "moved") == total
  assert sizes["dataset.npy"] == 128 + len(x) * 64 * 4   # .npy header + float32 rows
  # Per image: the float32 re-ordering copy (D*4), D/2 one-byte AH codes
  # (dims_per_block=2) and an int32 leaf token; tree and codebooks add < 4 bytes.
  per_image = ann.bytes_per_image(tmp_path / "moved", len(x))
  assert per_image == pytest.approx(total / len(x))
  assert 64 * 4 + 32 + 4 <= per_image <= 64 * 4 + 32 + 4 + 4
  with pytest.raises(FileNotFoundError):
    ann.load_scann(tmp_path / "nothing")


def test_brute_force_fallback_is_exact(tmp_path):
  x = _unit_vectors(2, 300, 16)
  q = _unit_vectors(3, 7, 16)
  searcher = ann.build_scann(x, k=50)
  assert ann.num_leaves_of(searcher) is None
  scores, found = ann.scann_search(searcher, q, 50, leaves_to_search=3)
  ref_s, ref_i = search.exact_search(q, x, 50)
  np.testing.assert_array_equal(found, ref_i)
  np.testing.assert_allclose(scores, ref_s, atol=1e-6)
  # k beyond n: missing slots are -1 / -inf.
  scores, found = ann.scann_search(searcher, q, 310)
  assert (found[:, 300:] == -1).all() and np.isneginf(scores[:, 300:]).all()
  assert ann.recall_at_k(found, search.exact_search(q, x, 300)[1], 300) == 1.0
  ann.save_scann(searcher, tmp_path)
  again = ann.scann_search(ann.load_scann(tmp_path), q, 50)
  np.testing.assert_array_equal(again[1], ref_i)


def test_tiny_database():
  x = _unit_vectors(4, 3, 8)
  scores, found = ann.scann_search(ann.build_scann(x), x, 3)
  np.testing.assert_array_equal(found[:, 0], [0, 1, 2])


def test_recall_at_k_by_hand():
  exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  approx = np.array([[4, 3, 9, 1], [-1, 8, -1, 0]])
  assert ann.recall_at_k(approx, exact, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
  assert ann.recall_at_k(approx, exact, 2) == pytest.approx((0 + 0) / 2)
  assert ann.recall_at_k(exact, exact, 3) == 1.0


def test_default_leaves():
  assert ann.default_num_leaves(1) == 1
  assert ann.default_num_leaves(1000) == 32
  assert ann.default_num_leaves(1_000_000) == 1000


def test_tune_and_latency(data, index):
  q, _, exact = data
  best = ann.tune_scann(index, q, exact, 100, target_recall=0.9,
                        reorder_grid=[500, 1000])
  assert best["met_target"] and best["recall"] >= 0.9
  # The default leaves grid, by hand: round(1.25^i) for i < ceil(log 50 / log 1.25)
  # = 18, then all 50 leaves. Per reorder value the walk climbs it and stops at
  # the first setting meeting the target.
  grid = [1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 18, 23, 28, 36, 44, 50]
  for reorder in (500, 1000):
    walk = [t for t in best["trials"] if t["reorder"] == reorder]
    assert [t["leaves_to_search"] for t in walk] == grid[:len(walk)]
    assert all(t["recall"] < 0.9 for t in walk[:-1]) and walk[-1]["recall"] >= 0.9
  good = [t for t in best["trials"] if t["recall"] >= 0.9]
  assert best["qps"] == max(t["qps"] for t in good)
  _, found = ann.scann_search(index, q, 100, best["leaves_to_search"],
                              best["reorder"])
  recall = np.mean([len(set(a) & set(e)) / 100 for a, e in zip(found.tolist(), exact.tolist())])
  assert recall == pytest.approx(best["recall"])
  t0 = time.perf_counter()
  lat = ann.measure_latency(index, q[:50], 100, num_single=10, repeats=1)
  wall_ms = 1e3 * (time.perf_counter() - t0)
  assert lat["single_ms_p50"] <= lat["single_ms_p99"]
  assert 0 < 10 * lat["single_ms_mean"] < wall_ms
  assert lat["batched_ms_per_query"] * lat["batched_qps"] == pytest.approx(1e3)
  assert 0 < 50 * lat["batched_ms_per_query"] < wall_ms
  assert 0 < 50 / lat["parallel_qps"] < wall_ms / 1e3


def test_rerank_composes_with_scann(data, index):
  q, x, _ = data
  _, found = ann.scann_search(index, q[:8], 100)
  s, i = rerank.rerank("superglobal", q[:8], x, found, m=50)
  assert i.shape == (8, 100)
  np.testing.assert_array_equal(np.sort(i, axis=1), np.sort(found, axis=1))
  s, i = rerank.rerank(
      "aqe", q[:8], x, found,
      search_fn=lambda v, k: ann.scann_search(index, np.asarray(v), k))
  assert i.shape == (8, 100) and (i >= 0).all()


# ---------------------------------------------------------------------------
# Recall-targeted tuning.


@pytest.fixture(scope="module")
def clustered():
  from qaff_jax.bench import search as bench
  db, verify, tune, _ = bench.make_data(20_000, 32, 300, 300, None, 1.0, 0)
  return db, tune, verify


@pytest.fixture(scope="module")
def tuned_pair(clustered):
  db, tune, verify = clustered
  return ann.tune_for_recall(db, 100, [0.85, 0.95], tune_queries=tune,
                             verify_queries=verify, leaves_options=[141], num_single=20)


def test_tuned_recall_holds_on_held_out_queries(clustered, tuned_pair):
  db, _, verify = clustered
  exact = np.argsort(-(verify.astype(np.float64) @ db.T.astype(np.float64)), axis=1)[:, :100]
  for target, t in zip([0.85, 0.95], tuned_pair):
    rep = t.report
    assert rep["target_recall"] == target and rep["verified"]
    assert rep["settings_tried"] <= rep["settings_bound"]
    assert 0 < rep["tuning_s"] <= rep["total_s"]
    if t.backend == "scann":   # chosen only when faster than exact search
      assert rep["qps_batched"] > rep["exact_qps"] > 0
      assert rep["single_ms_p50"] <= rep["single_ms_p99"]
      # float32 re-ordering copy + D/2 AH code bytes + int32 token per leaf a
      # row sits in (two with SOAR spilling), + < 8 for the tree.
      copies = 1 if rep["scann_settings"]["soar_lambda"] is None else 2
      per_row = 32 * 4 + copies * (16 + 4)
      assert per_row <= rep["bytes_per_image"] <= per_row + 8, (copies, rep["bytes_per_image"])
    else:
      assert rep["qps_batched"] == rep["exact_qps"]
      assert rep.get("bytes_per_image", 32 * 4) == 32 * 4   # no index
    _, found = t.search(verify, 100, exact_db=db)
    recall = ann.recall_at_k(found, exact, 100)   # an independent exact ranking
    assert recall >= target, (target, recall)
    if t.backend == "scann":
      assert recall == pytest.approx(rep["verified_recall"], abs=0.002)


def test_lower_target_searches_less(tuned_pair):
  low, high = (t.report["scann_settings"] for t in tuned_pair)
  assert low["num_leaves"] == high["num_leaves"] == 141
  assert (low["leaves_to_search"] < high["leaves_to_search"]
          or low["reorder"] < high["reorder"]), (low, high)


def test_leave_one_out_tuning_is_saved_and_reloaded(clustered, tmp_path):
  db, _, _ = clustered
  t = ann.tune_for_recall(db, 20, 0.9, n_tune=200, n_verify=200, leaves_options=[100],
                          index_dir=tmp_path / "idx", num_single=10)
  rep = t.report
  assert rep["queries"] == "database rows, leave-one-out" and rep["verified"]
  loaded = ann.load_tuned(tmp_path / "idx")
  assert loaded.backend == t.backend and loaded.settings == t.settings
  assert loaded.report["bytes_per_image"] == pytest.approx(rep["bytes_per_image"])
  q = db[:30] + 0.01
  np.testing.assert_array_equal(loaded.search(q, 20, exact_db=db)[1],
                                t.search(q, 20, exact_db=db)[1])
  with pytest.raises(FileNotFoundError):
    ann.load_tuned(tmp_path / "nothing")


def test_drop_self_by_hand():
  idx = np.array([[7, 3, 5], [1, 2, 4], [9, 9, 8]])
  out = ann.drop_self(idx, np.array([3, 0, 9]), 2)
  np.testing.assert_array_equal(out, [[7, 5], [1, 2], [9, 8]])
  np.testing.assert_array_equal(ann.drop_self(idx, None, 2), idx[:, :2])


def test_exact_is_chosen_when_faster_or_when_scann_misses(tmp_path):
  assert ann.choose_backend(900.0, 1000.0, True)[0] == "exact"
  assert ann.choose_backend(1100.0, 1000.0, True)[0] == "scann"
  assert ann.choose_backend(5000.0, 1000.0, False)[0] == "exact"
  x = _unit_vectors(5, 500, 16)   # tiny: exact search, no index
  t = ann.tune_for_recall(x, 10, 0.95, n_tune=50, n_verify=50, index_dir=tmp_path)
  assert t.backend == "exact" and t.searcher is None and "too small" in t.report["reason"]
  assert t.report["verified_recall"] == 1.0 and t.report["settings_tried"] == 0
  assert t.report["qps_batched"] == t.report["exact_qps"] and t.report["bytes_per_image"] == 16 * 4
  loaded = ann.load_tuned(tmp_path)
  assert loaded.backend == "exact" and loaded.searcher is None
  q = _unit_vectors(6, 4, 16)
  np.testing.assert_array_equal(loaded.search(q, 10, exact_db=x)[1],
                                search.exact_search(q, x, 10)[1])
  with pytest.raises(ValueError, match="target"):
    ann.tune_for_recall(x, 10, 1.5)


def test_verification_misses_fall_to_the_next_candidate(clustered, monkeypatch):
  """A candidate that misses the target on the verification queries is not
  chosen: the next fastest is verified; when all miss, one 1.25x step up."""
  db, tune, verify = clustered
  real_call = ann._Trials.__call__
  state = {"misses": 0, "verified": []}

  def call(self, leaves, reorder):
    mean, se = real_call(self, leaves, reorder)
    if self.q is not tune:   # the verification set: the first `misses` settings miss,
      key = (int(leaves), int(reorder))          # the others pass
      if key not in state["verified"]:
        state["verified"].append(key)
      return (0.0, se) if state["verified"].index(key) < state["misses"] else (1.0, 0.0)
    return mean, se

  monkeypatch.setattr(ann._Trials, "__call__", call)
  kw = dict(tune_queries=tune, verify_queries=verify, leaves_options=[141], num_single=5)

  def run(misses):
    state.update(misses=misses, verified=[])
    t = ann.tune_for_recall(db, 100, 0.9, **kw)
    ranked = [(c["leaves_to_search"], c["reorder"]) for c in t.report["candidates"]]
    s = t.report["scann_settings"]
    return t, ranked, (s["leaves_to_search"], s["reorder"])

  t, ranked, chosen = run(0)
  assert len(ranked) >= 2 and t.report["verify_checks"] == 1 and chosen == ranked[0]
  t, ranked, chosen = run(1)
  assert state["verified"][:2] == ranked[:2]          # fastest first
  assert chosen == ranked[1] and t.report["verify_checks"] == 2
  assert not t.report["stepped_up"] and t.report["verified"]
  t, ranked, _ = run(len(ranked) + 1)
  rep = t.report    # nothing verified: exact search, the stepped-up ScaNN reported
  assert rep["stepped_up"] and rep["backend"] == "exact" and rep["scann_verified_recall"] == 0
  assert rep["verify_checks"] == min(len(ranked), ann.VERIFY_CANDIDATES) + 1
  s = rep["scann_settings"]
  assert (s["leaves_to_search"], s["reorder"]) == (min(141, math.ceil(1.25 * ranked[0][0])),
                                                    math.ceil(1.25 * ranked[0][1]))


def test_soar_spilling_reaches_scann(tmp_path):
  """soar_lambda builds ScaNN's SOAR index: at the same leaves searched it
  finds more of the exact top-k, stores a second AH code + token per row, and
  survives a save / load."""
  from qaff_jax.bench import search as bench
  db, q, _, _ = bench.make_data(30_000, 32, 200, 0, None, 1.0, 0, kind="flat")
  exact = np.argsort(-(q.astype(np.float64) @ db.T.astype(np.float64)), axis=1)[:, :50]
  kw = dict(num_leaves=300, training_sample_size=30_000, k=50, reorder=200)
  plain, soar = ann.build_scann(db, **kw), ann.build_scann(db, soar_lambda=1.5, **kw)
  recall = lambda s: ann.recall_at_k(ann.scann_search(s, q, 50, 6, 200)[1], exact, 50)
  assert recall(soar) > recall(plain) + 0.03, (recall(soar), recall(plain))
  sizes = [ann.bytes_per_image(ann.save_scann(s, tmp_path / name), len(db))
           for s, name in ((plain, "plain"), (soar, "soar"))]
  assert sizes[1] - sizes[0] == pytest.approx(32 // 2 + 4, abs=1.5), sizes
  loaded = ann.load_scann(tmp_path / "soar")
  np.testing.assert_array_equal(ann.scann_search(loaded, q, 50, 6, 200)[1],
                                ann.scann_search(soar, q, 50, 6, 200)[1])


def test_tuner_walks_every_build_option(clustered):
  """Each build option is built as given and walked; the chosen settings carry
  the build they came from."""
  assert ann.default_build_options(1_000_000) == [
      {"num_leaves": 2000, "dims_per_block": d, "soar_lambda": 1.5} for d in (2, 4)]
  db, tune, verify = clustered
  options = [{"num_leaves": 100, "dims_per_block": 2, "soar_lambda": None},
             {"num_leaves": 120, "dims_per_block": 4, "soar_lambda": 1.5}]
  t = ann.tune_for_recall(db, 100, 0.9, tune_queries=tune, verify_queries=verify,
                          build_options=options, num_single=5)
  rep = t.report
  built = {(c["num_leaves"], c["dims_per_block"], c["soar_lambda"]) for c in rep["candidates"]}
  assert built == {(100, 2, None), (120, 4, 1.5)}, built
  s = rep["scann_settings"]
  assert (s["num_leaves"], s["dims_per_block"], s["soar_lambda"]) in built
  assert s["anisotropic_quantization_threshold"] == 0.2
  if t.backend == "scann":
    copies = 1 if s["soar_lambda"] is None else 2
    per_row = 32 * 4 + copies * (32 // s["dims_per_block"] + 4)   # 1 byte a code
    assert per_row <= rep["bytes_per_image"] <= per_row + 8
