"""Tests for the revisited Oxford/Paris protocol and the GLDv2 retrieval metric."""

import math

import numpy as np
import pytest

from qaff_jax.evaluation import metrics


# ---------------------------------------------------------------------------
# Hand-worked revisitop cases
# ---------------------------------------------------------------------------


def _col(*ids):
  return np.asarray(ids, dtype=np.int64)[:, None]


def test_compute_ap_by_hand():
  # One positive at the top: trapezoid (1 + 1) / 2 = 1.
  assert metrics.compute_ap([0], 1) == 1.0
  # Positives at 0-based positions [1, 2, 4] of 3:
  #   j=0 r=1: p0 = 0/1, p1 = 1/2 -> (0 + 1/2)/2/3 = 1/12
  #   j=1 r=2: p0 = 1/2, p1 = 2/3 -> (7/6)/6      = 7/36
  #   j=2 r=4: p0 = 2/4, p1 = 3/5 -> (11/10)/6    = 11/60   => 83/180
  assert metrics.compute_ap([1, 2, 4], 3) == pytest.approx(83 / 180, abs=1e-15)
  # Only one of two positives ranked (at 0): 0.5; nothing ranked: 0.
  assert metrics.compute_ap([0], 2) == 0.5
  assert metrics.compute_ap([], 2) == 0.0


def test_junk_is_removed_from_ranking():
  # Ranking 3 0 5 1 7 2 4 6; ok = {0, 1, 2}; junk = {5} at position 2.
  # Positives at 0-based [1, 3, 5] -> after removing the junk [1, 2, 4]
  # -> AP = 83/180 (see above). 1-based positions [2, 3, 5], max 5:
  #   P@1: kk = min(5, 1) = 1 -> 0/1 = 0
  #   P@5: kk = 5 -> 3/5
  #   P@10: kk = min(5, 10) = 5 -> 3/5 (the official quirk, not 3/10)
  ranks = _col(3, 0, 5, 1, 7, 2, 4, 6)
  gnd = [{"ok": [0, 1, 2], "junk": [5]}]
  m, aps, mpr, prs = metrics.compute_map(ranks, gnd, (1, 5, 10))
  assert m == pytest.approx(83 / 180, abs=1e-15)
  np.testing.assert_allclose(aps, [83 / 180])
  np.testing.assert_allclose(prs, [[0.0, 0.6, 0.6]])
  np.testing.assert_allclose(mpr, [0.0, 0.6, 0.6])


def test_all_positives_before_k_edge_case():
  # Ranking 2 0 1 3 4 5, ok = {2, 0}: positions [0, 1] -> AP = 1.
  # 1-based [1, 2], max 2: P@1 = 1/1, P@5: kk = min(2, 5) = 2 -> 2/2 = 1,
  # P@10 likewise 1 (a plain precision@k would give 0.4 and 0.2).
  ranks = _col(2, 0, 1, 3, 4, 5)
  _, aps, _, prs = metrics.compute_map(ranks, [{"ok": [2, 0], "junk": []}])
  assert aps[0] == 1.0
  np.testing.assert_array_equal(prs, [[1.0, 1.0, 1.0]])


def test_positive_beyond_k_with_junk():
  # Ranking 0..11, ok = {0, 11}, junk = {5}: positions [0, 11] -> [0, 10].
  #   j=0 r=0: (1 + 1)/2/2 = 1/2
  #   j=1 r=10: p0 = 1/10, p1 = 2/11 -> (31/110)/2/2 = 31/440  => AP = 251/440
  # 1-based [1, 11]: P@1 = 1/1, P@5 = 1/5, P@10 = 1/10.
  ranks = np.arange(12)[:, None]
  _, aps, _, prs = metrics.compute_map(ranks, [{"ok": [0, 11], "junk": [5]}])
  assert aps[0] == pytest.approx(251 / 440, abs=1e-15)
  np.testing.assert_allclose(prs, [[1.0, 0.2, 0.1]])


def test_query_without_positives_is_excluded():
  # Queries: the junk case (83/180; P = 0, .6, .6), the edge case (1; 1, 1, 1),
  # an empty query (NaN, excluded), the beyond-k case (251/440; 1, .2, .1).
  cols = [
      [3, 0, 5, 1, 7, 2, 4, 6, 8, 9, 10, 11],
      [2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11],
      list(range(12)),
      list(range(12)),
  ]
  ranks = np.asarray(cols).T
  gnd = [
      {"ok": [0, 1, 2], "junk": [5]},
      {"ok": [2, 0]},  # 'junk' key absent: treated as empty
      {"ok": [], "junk": [3]},
      {"ok": [0, 11], "junk": [5]},
  ]
  m, aps, mpr, prs = metrics.compute_map(ranks, gnd, [1, 5, 10])
  assert m == pytest.approx((83 / 180 + 1 + 251 / 440) / 3, abs=1e-15)
  assert np.isnan(aps[2]) and np.isnan(prs[2]).all()
  np.testing.assert_allclose(
      mpr, [(0 + 1 + 1) / 3, (0.6 + 1 + 0.2) / 3, (0.6 + 1 + 0.1) / 3])


def test_all_queries_empty_gives_nan():
  m, aps, mpr, _ = metrics.compute_map(np.arange(4)[:, None], [{"ok": []}])
  assert math.isnan(m) and np.isnan(aps).all() and np.isnan(mpr).all()


def test_truncated_ranking():
  # Top-3 only: 4 0 1 | (rest unranked). ok = {0, 7}: only 0 is ranked, at 1.
  # AP = (0 + 1/2)/2/2 = 1/8; P@1 = 0, P@5: kk = min(2, 5) = 2 -> 1/2.
  _, aps, _, prs = metrics.compute_map(_col(4, 0, 1), [{"ok": [0, 7]}], (1, 5))
  assert aps[0] == 0.125
  np.testing.assert_allclose(prs, [[0.0, 0.5]])
  # No positive ranked at all: AP 0 and P@k 0 (the reference would crash).
  _, aps, _, prs = metrics.compute_map(_col(4, 1), [{"ok": [0, 7]}], (1, 5))
  assert aps[0] == 0.0 and (prs == 0).all()


def test_shape_errors():
  with pytest.raises(ValueError, match="n_queries"):
    metrics.compute_map(np.arange(6).reshape(3, 2), [{"ok": [0]}])
  with pytest.raises(ValueError, match="protocol"):
    metrics.protocol_gnd([{"easy": [0]}], "extreme")


# ---------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------


def _small_gnd():
  return [
      {"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]},
      {"easy": [4], "hard": [], "junk": []},
  ]


def test_protocol_gnd_sets():
  easy, medium, hard = (metrics.protocol_gnd(_small_gnd(), p)
                        for p in ("easy", "medium", "hard"))
  assert sorted(easy[0]["ok"]) == [0] and sorted(easy[0]["junk"]) == [1, 2]
  assert sorted(medium[0]["ok"]) == [0, 1] and sorted(medium[0]["junk"]) == [2]
  assert sorted(hard[0]["ok"]) == [1] and sorted(hard[0]["junk"]) == [0, 2]
  assert hard[1]["ok"].size == 0 and sorted(hard[1]["junk"]) == [4]
  assert [list(g["ok"]) for g in metrics.protocol_gnd(_small_gnd(), "M")] == [
      [0, 1], [4]]


def test_evaluate_revisited_three_protocols():
  # Query 0 ranking 3 0 2 1 4 5 (easy 0, hard 1, junk 2):
  #   E: ok {0} at 1; junk {2, 1} after it -> pos [1]: AP = (0 + 1/2)/2 = 1/4;
  #      1-based [2]: P@1 = 0, P@5 = P@10 = 1/2 (kk = 2).
  #   M: ok {0, 1} at [1, 3]; junk 2 at 2 -> [1, 2]:
  #      AP = 1/8 + (1/2 + 2/3)/4 = 5/12; 1-based [2, 3]: P@1 0, P@5 = P@10 = 2/3.
  #   H: ok {1} at 3; junk {0, 2} at 1, 2 -> [1]: AP = 1/4; P = 0, 1/2, 1/2.
  # Query 1 ranking 4 0 1 2 3 5 (easy 4, no hard): E and M AP = 1, P = 1;
  #   H has no positives: excluded.
  ranks = np.asarray([[3, 0, 2, 1, 4, 5], [4, 0, 1, 2, 3, 5]]).T
  res = metrics.evaluate_revisited(ranks, _small_gnd())
  expected = {
      "mAP_E": (0.25 + 1) / 2, "mAP_M": (5 / 12 + 1) / 2, "mAP_H": 0.25,
      "mP@1_E": 0.5, "mP@5_E": 0.75, "mP@10_E": 0.75,
      "mP@1_M": 0.5, "mP@5_M": (2 / 3 + 1) / 2, "mP@10_M": (2 / 3 + 1) / 2,
      "mP@1_H": 0.0, "mP@5_H": 0.5, "mP@10_H": 0.5,
  }
  for key, value in expected.items():
    assert res[key] == pytest.approx(value, abs=1e-15), key
  assert set(res) == set(expected) | {"per_query"}
  assert res["per_query"]["E"] == [0.25, 1.0]
  assert res["per_query"]["M"] == pytest.approx([5 / 12, 1.0])
  assert res["per_query"]["H"][0] == 0.25 and math.isnan(res["per_query"]["H"][1])
  # mAP M = (5/12 + 1)/2 = 17/24; mP@5 M = (2/3 + 1)/2 = 5/6.
  assert metrics.format_revisited(res) == (
      "mAP E: 62.50 M: 70.83 H: 25.00\n"
      "mP@[1, 5, 10] E: 50.00/75.00/75.00 M: 50.00/83.33/83.33 H: 0.00/50.00/50.00")


# ---------------------------------------------------------------------------
# Independent reference on random data
# ---------------------------------------------------------------------------


def _reference_query(column, ok, junk, kappas):
  """Straightforward per-query computation: filter junk, then walk the list."""
  ok, junk = set(int(x) for x in ok), set(int(x) for x in junk)
  kept = [int(x) for x in column if int(x) not in junk]
  hit_positions = []  # 1-based positions in the junk-free list
  ap = 0.0
  for r, item in enumerate(kept):
    if item in ok:
      j = len(hit_positions)
      prec_before = 1.0 if r == 0 else j / r
      prec_after = (j + 1) / (r + 1)
      ap += 0.5 * (prec_before + prec_after) / len(ok)
      hit_positions.append(r + 1)
  prs = []
  for kappa in kappas:
    if not hit_positions:
      prs.append(0.0)
      continue
    cut = min(hit_positions[-1], kappa)
    prs.append(sum(1 for p in hit_positions if p <= cut) / cut)
  return ap, prs


def _reference_protocol(ranks, gnd, protocol, kappas):
  aps, prs = [], []
  for i, g in enumerate(gnd):
    easy, hard, junk = (list(g.get(k, [])) for k in ("easy", "hard", "junk"))
    ok, bad = {"easy": (easy, junk + hard), "medium": (easy + hard, junk),
               "hard": (hard, junk + easy)}[protocol]
    if not ok:
      continue
    ap, pr = _reference_query(ranks[:, i], ok, bad, kappas)
    aps.append(ap)
    prs.append(pr)
  return float(np.mean(aps)), np.mean(np.asarray(prs), axis=0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_reference(seed):
  rng = np.random.default_rng(seed)
  n_db, nq, kappas = 60, 12, (1, 3, 5, 10, 30)
  ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
  if seed == 4:  # truncated rankings are handled the same way
    ranks = ranks[:25]
  gnd = []
  for i in range(nq):
    ids = rng.permutation(n_db)
    sizes = rng.integers(0, 8, size=3)
    if i == 0:
      sizes[:2] = 0  # a query with no positives under any protocol
    if i == 1:
      sizes[1] = 0  # no hard positives: empty under 'hard'
    a, b, c = np.cumsum(sizes)
    gnd.append({"easy": list(ids[:a]), "hard": list(ids[a:b]),
                "junk": list(ids[b:c])})
  res = metrics.evaluate_revisited(ranks, gnd, kappas)
  for protocol, s in (("easy", "E"), ("medium", "M"), ("hard", "H")):
    ref_map, ref_pr = _reference_protocol(ranks, gnd, protocol, kappas)
    assert res[f"mAP_{s}"] == pytest.approx(ref_map, abs=1e-12)
    for kappa, value in zip(kappas, ref_pr):
      assert res[f"mP@{kappa}_{s}"] == pytest.approx(value, abs=1e-12)


def test_evaluate_revisited_equals_compute_map_per_protocol():
  # Overlapping / repeated ids and truncated, Fortran-ordered rankings included.
  rng = np.random.default_rng(11)
  n_db, nq = 80, 20
  ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)[:50]
  gnd = [{key: rng.choice(n_db, int(rng.integers(0, 12)))
          for key in ("easy", "hard", "junk")} for _ in range(nq)]
  for r in (ranks, np.asfortranarray(ranks)):
    res = metrics.evaluate_revisited(r, gnd)
    for protocol, s in (("easy", "E"), ("medium", "M"), ("hard", "H")):
      m, aps, mpr, _ = metrics.compute_map(r, metrics.protocol_gnd(gnd, protocol))
      assert res[f"mAP_{s}"] == m
      np.testing.assert_array_equal(res["per_query"][s], aps)
      assert [res[f"mP@{k}_{s}"] for k in (1, 5, 10)] == list(mpr)


# ---------------------------------------------------------------------------
# GLDv2 mAP@100
# ---------------------------------------------------------------------------


def test_gldv2_map_by_hand():
  solution = {
      "q1": {"a", "b"},
      "q2": ["c"],
      "q3": {"d", "e", "f"},
      "q4": None,       # non-landmark query: not scored
      "q5": set(),      # likewise
      "q6": {"g"},      # scored but never predicted: AP 0
  }
  predictions = {
      "q1": ["a", "x", "b"],  # (1/1 + 2/3) / 2 = 5/6
      "q2": ["x", "x", "c"],  # repeat x keeps its slot: (1/3) / 1
      "q3": ["d", "d", "e"],  # (1/1 + 2/3) / 3 = 5/9
      "q4": ["a"],
      "zz": ["a"],            # unknown query: ignored
  }
  aps = metrics.gldv2_average_precisions(predictions, solution)
  assert set(aps) == {"q1", "q2", "q3", "q6"}
  assert aps["q1"] == pytest.approx(5 / 6)
  assert aps["q2"] == pytest.approx(1 / 3)
  assert aps["q3"] == pytest.approx(5 / 9)
  assert aps["q6"] == 0.0
  assert metrics.gldv2_map_at_k(predictions, solution) == pytest.approx(
      (5 / 6 + 1 / 3 + 5 / 9 + 0) / 4)


def test_gldv2_cutoff():
  # k = 2: only "x a" count; a at rank 2 -> 1/2; divided by min(3, 2) = 2.
  assert metrics.gldv2_map_at_k({"q": ["x", "a", "b"]},
                                {"q": {"a", "b", "c"}}, k=2) == 0.25
  # More relevant images than k: 100 hits in the top 100 -> AP 1.
  relevant = {f"i{j}" for j in range(150)}
  preds = {"q": [f"i{j}" for j in range(120)]}
  assert metrics.gldv2_map_at_k(preds, {"q": relevant}) == 1.0
  assert math.isnan(metrics.gldv2_map_at_k({}, {"q": None}))


def test_gldv2_solution_loader(tmp_path):
  path = tmp_path / "retrieval_solution_v2.1.csv"
  path.write_text("id,images,Usage\n"
                  "q1,a b c,Public\n"
                  "q2,d,Private\n"
                  "q3,None,Ignored\n"
                  "q4,None,Private\n")
  sol = metrics.load_gldv2_retrieval_solution(path)
  assert sol.public == {"q1": {"a", "b", "c"}}
  assert sol.private == {"q2": {"d"}, "q4": set()}
  assert sol.ignored == ["q3"]
  assert set(sol.subset("all")) == {"q1", "q2", "q4"}
  preds = {"q1": ["a", "z", "b"], "q2": ["d"], "q3": ["a"]}
  # q1: (1 + 2/3) / 3 = 5/9; q2: 1; q4 has no solution -> not scored.
  assert metrics.gldv2_map_at_k(preds, sol.scored) == pytest.approx((5 / 9 + 1) / 2)

  bad = tmp_path / "bad.csv"
  bad.write_text("id,images,Usage\nq1,a,Secret\n")
  with pytest.raises(ValueError, match="Secret"):
    metrics.load_gldv2_retrieval_solution(bad)
  bad.write_text("id,images\nq1,a\n")
  with pytest.raises(ValueError, match="Usage"):
    metrics.load_gldv2_retrieval_solution(bad)
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    metrics.load_gldv2_retrieval_solution(tmp_path / "nope.csv")
