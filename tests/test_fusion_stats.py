"""Adaptivity diagnostics of QAFF fusion weights (evaluation.fusion_stats)."""

import json
import math
import os
import types

import numpy as np
import pytest

from qaff_jax.evaluation import fusion_stats as fs
from qaff_jax.evaluation import fusion_stats as fs_lib

NAN4 = [math.nan] * 4


def _weights(top_cells, grid=3, n_scales=1):
  """Rows with a clear largest regional weight at each of `top_cells`."""
  k = 1 + grid * grid + n_scales
  w = np.full((len(top_cells), k), 0.05)
  for row, cell in enumerate(top_cells):
    w[row, 1 + cell] = 0.4
  return w / w.sum(axis=1, keepdims=True)


# Four images on a 3x3 grid (cell i*3 + j = row i from the top, column j).
TOP = [4, 0, 2, 1]
BOXES = np.array([
    [0.4, 0.4, 0.6, 0.6],        # only the centre cell 4: hit, centre hit
    [0.5, 0.5, 1.0, 1.0],        # cells 4, 5, 7, 8; top 0: miss
    [0.6, 0.0, 1.0, 0.5],        # cells 1, 2, 4, 5; top 2 (top right): hit,
                                 # centre (0.8, 0.25) in cell 2
    [0.0, 0.0, 1 / 3, 1 / 3],    # exactly cell 0; top 1 only touches it: miss
])


def test_region_follow_hand_computed():
  r = fs.region_follow(_weights(TOP), BOXES, 3)
  assert r["num_images"] == 4
  assert r["region_follow"] == pytest.approx(0.5)
  assert r["chance"] == pytest.approx((1 + 4 + 4 + 1) / 9 / 4)
  assert r["region_follow_center"] == pytest.approx(0.5)
  assert r["center_chance"] == pytest.approx(1 / 9)
  # The centre cell overlaps 3 of the 4 boxes: the best one-cell-for-all rate.
  assert r["best_fixed"] == pytest.approx(0.75) and r["best_fixed_cell"] == 4
  cells = fs.box_cells(BOXES, 3)
  assert np.flatnonzero(cells[2]).tolist() == [1, 2, 4, 5]
  assert np.flatnonzero(cells[3]).tolist() == [0]
  assert fs.center_cells(BOXES, 3).tolist() == [4, 8, 2, 0]
  # Equal regional weights (non-adaptive fusion) score exactly chance.
  tied = fs.region_follow(np.full((4, 11), 1 / 11), BOXES, 3)
  assert tied["region_follow"] == pytest.approx(r["chance"])
  assert tied["region_follow_center"] == pytest.approx(1 / 9)
  # Two tied top cells, one on the box: half a hit.
  two = np.full((1, 11), 0.05)
  two[0, 1 + 0] = two[0, 1 + 8] = 0.3
  half = fs.region_follow(two, [[0.0, 0.0, 0.2, 0.2]], 3)
  assert half["region_follow"] == 0.5 and half["region_follow_center"] == 0.5
  # A box over the whole image is always hit: chance 1.
  full = fs.region_follow(_weights([7]), [[0, 0, 1, 1]], 3)
  assert full["region_follow"] == 1.0 and full["chance"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="no NaN"):
    fs.region_follow(_weights([0]), [NAN4], 3)
  with pytest.raises(ValueError, match="no area"):
    fs.region_follow(_weights([0]), [[0.5, 0.2, 0.5, 0.4]], 3)


def test_weight_by_kind():
  w = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
                [0.1, 0.3, 0.2, 0.1, 0.1, 0.2],
                [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
                [0.2, 0.2, 0.2, 0.1, 0.1, 0.2]])
  by = fs.weight_by_kind(w, ["scene", "object", "scene", "distractor"], 2)
  assert list(by) == ["distractor", "object", "scene"]
  assert by["scene"]["count"] == 2
  assert by["scene"]["global"] == pytest.approx(0.3)
  assert by["scene"]["regional"] == pytest.approx(0.4)
  assert by["scene"]["scale"] == pytest.approx(0.3)
  assert by["object"] == pytest.approx(
      {"count": 1, "global": 0.1, "regional": 0.7, "scale": 0.2})
  with pytest.raises(ValueError, match="3 kinds"):
    fs.weight_by_kind(w, ["scene"] * 3, 2)


def _scale_case(sizes):
  """grid 1, scales (0.5, 2): w_x0.5 = 0.1 + 0.5 size, w_x2 = 0.3 - 0.5 size
  (their sum constant, so the log-scale centroid is linear in size)."""
  s = np.asarray(sizes, np.float64)
  w = np.zeros((len(s), 4))
  w[:, 2] = 0.1 + 0.5 * np.nan_to_num(s)
  w[:, 3] = 0.3 - 0.5 * np.nan_to_num(s)
  w[:, 0] = w[:, 1] = 0.3
  return w


def test_scale_size_correlation():
  sizes = [0.1, 0.2, 0.3, 0.4, math.nan]   # the NaN row is left out
  w = _scale_case(sizes)
  w[4, 2:] = [0.4, 0.0]                    # would spoil r if it were kept
  r = fs.scale_size_correlation(w, sizes, 1, (0.5, 2.0))
  assert r["num_images"] == 4
  assert r["per_scale"]["x0.5"] == pytest.approx(1.0)
  assert r["per_scale"]["x2"] == pytest.approx(-1.0)
  # c = (w1 log 0.5 + w2 log 2) / 0.4 falls as size grows.
  assert r["log_scale_centroid"] == pytest.approx(-1.0)
  json.dumps(r)

  const = np.tile([0.3, 0.3, 0.1, 0.3], (4, 1))
  r = fs.scale_size_correlation(const, sizes[:4], 1, (0.5, 2.0))
  assert r["per_scale"] == {"x0.5": None, "x2": None}
  assert r["log_scale_centroid"] is None
  # Constant sizes, and fewer than 3 images, give None as well.
  r = fs.scale_size_correlation(_scale_case([0.2] * 4), [0.2] * 4, 1,
                                (0.5, 2.0))
  assert r["per_scale"]["x0.5"] is None
  r = fs.scale_size_correlation(w[:2], sizes[:2], 1, (0.5, 2.0))
  assert r["per_scale"]["x0.5"] is None and r["log_scale_centroid"] is None
  assert r["num_images"] == 2
  # No scales: nothing to correlate.
  r = fs.scale_size_correlation(w[:, :2] / w[:, :2].sum(1, keepdims=True),
                                sizes, 1, ())
  assert r == {"per_scale": {}, "log_scale_centroid": None, "num_images": 4}


def test_fusion_summary_numbers_by_hand():
  # Grid 2, scales (0.5, 2): K = 7 = [global, r0..r3, x0.5, x2].
  w = np.array([
      [0.30, 0.10, 0.10, 0.10, 0.10, 0.20, 0.10],  # totals .3 .4 .3: regional; top: global
      [0.10, 0.25, 0.05, 0.05, 0.05, 0.25, 0.25],  # .1 .4 .5: scale; top tie r0/x.. -> r0
      [0.60, 0.05, 0.05, 0.05, 0.05, 0.10, 0.10],  # .6 .2 .2: global; top: global
      [0.40, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],  # .4 .4 .2: tie -> global; top: global
  ])
  s = fs.fusion_summary(w, 2, (0.5, 2.0))
  assert s["num_images"] == 4 and s["num_features"] == 7 and s["grid"] == 2
  assert s["labels"][0] == "global" and s["labels"][-2:] == ["x0.5", "x2"]
  # Type totals over the 4 images: global .3 .1 .6 .4, regional .4 .4 .2 .4,
  # scale .3 .5 .2 .2 -> means .35 .35 .3; population variances
  # (.05² + .25² + .25² + .05²)/4 = .0325, (3 .05² + .15²)/4 = .0075,
  # (0 + .2² + .1² + .1²)/4 = .015.
  assert s["type_mean"] == pytest.approx(
      {"global": 0.35, "regional": 0.35, "scale": 0.3})
  assert s["type_std"] == pytest.approx(
      {"global": math.sqrt(0.0325), "regional": math.sqrt(0.0075),
       "scale": math.sqrt(0.015)})
  assert s["component_mean"] == pytest.approx(
      [0.35, 0.125, 0.075, 0.075, 0.075, 0.1625, 0.1375])
  # r0 .1 .25 .05 .1: variance (.025² + .125² + .075² + .025²)/4 = .075²;
  # r1..r3 .1 .05 .05 .1: .025; x0.5 and x2 both variance .016875/4.
  assert s["component_std"] == pytest.approx(
      [math.sqrt(0.0325), 0.075, 0.025, 0.025, 0.025,
       math.sqrt(0.00421875), math.sqrt(0.00421875)])
  assert s["max_component_std"] == pytest.approx(math.sqrt(0.0325))
  np.testing.assert_allclose(s["regional_map"], [[0.125, 0.075], [0.075, 0.075]])
  assert s["argmax_type_fraction"] == pytest.approx(
      {"global": 0.5, "regional": 0.25, "scale": 0.25})
  assert s["argmax_component_fraction"] == pytest.approx(
      {"global": 0.75, "regional": 0.25, "scale": 0.0})
  # Entropies -Σ w ln w of each row.
  h = [-(0.3 * math.log(0.3) + 0.5 * math.log(0.1) + 0.2 * math.log(0.2)),
       -(0.1 * math.log(0.1) + 0.75 * math.log(0.25) + 0.15 * math.log(0.05)),
       -(0.6 * math.log(0.6) + 0.2 * math.log(0.05) + 0.2 * math.log(0.1)),
       -(0.4 * math.log(0.4) + 0.6 * math.log(0.1))]
  mean_h = sum(h) / 4
  assert s["entropy_mean"] == pytest.approx(mean_h)
  assert s["entropy_std"] == pytest.approx(
      math.sqrt(sum((v - mean_h) ** 2 for v in h) / 4))
  assert s["entropy_max"] == pytest.approx(math.log(7))
  assert s["entropy_ratio"] == pytest.approx(mean_h / math.log(7))
  # Identical rows: nothing adapts, every std is 0.
  same = fs.fusion_summary(np.tile(w[0], (3, 1)), 2, (0.5, 2.0))
  assert same["max_component_std"] == pytest.approx(0.0, abs=1e-15)
  assert same["entropy_std"] == pytest.approx(0.0, abs=1e-15)


def test_fusion_summary_with_and_without_metadata():
  w = _weights(TOP, n_scales=3)
  w[:, -3:] += np.array([[0.0, 0.1, 0.2]]) * np.arange(4)[:, None] / 4
  w /= w.sum(axis=1, keepdims=True)
  scales = (0.5, 0.75, 1.5)
  plain = fs.fusion_summary(w, 3, scales)
  assert "adaptivity" not in plain
  assert plain["max_component_std"] == pytest.approx(w.std(axis=0).max())
  old_keys = {"num_images", "num_features", "grid", "scales", "labels",
              "type_mean", "type_std", "component_mean", "component_std",
              "entropy_mean", "entropy_std", "entropy_max", "entropy_ratio",
              "argmax_type_fraction", "argmax_component_fraction",
              "regional_map"}
  assert old_keys <= set(plain)
  assert "chance" not in fs.format_fusion_summary(plain)

  # Two extra images without a box: a scene and an unknown one.
  w6 = np.concatenate([w, _weights([8, 8], n_scales=3)])
  boxes = np.concatenate([BOXES, [NAN4, NAN4]])
  kinds = ["object"] * 4 + ["scene", "unknown"]
  s = fs.fusion_summary(w6, 3, scales, kinds=kinds, boxes=boxes)
  base = fs.fusion_summary(w6, 3, scales)
  assert {k: s[k] for k in base} == base   # old keys unchanged
  a = s["adaptivity"]
  assert a["num_box_images"] == 4
  assert a["region_follow"] == pytest.approx(0.5)
  assert a["region_follow_chance"] == pytest.approx(10 / 36)
  assert a["region_follow_center"] == pytest.approx(0.5)
  assert a["region_follow_center_chance"] == pytest.approx(1 / 9)
  assert set(a["by_kind"]) == {"object", "scene", "unknown"}
  assert a["global_weight_scene"] == pytest.approx(w6[4, 0])
  assert a["global_weight_object"] == pytest.approx(w6[:4, 0].mean())
  assert a["scale_size_corr"]["num_images"] == 4
  assert set(a["scale_size_corr"]["per_scale"]) == {"x0.5", "x0.75", "x1.5"}
  assert a["max_component_std"] == s["max_component_std"]
  json.dumps(s)
  md = fs.format_fusion_summary(s)
  assert "### Adaptivity" in md
  assert "overlaps the box in 50.0% (chance 27.8%; the best single cell" in md
  assert "(chance 11.1%)" in md
  assert "| scene | 1 |" in md and "log-scale centroid" in md

  # Kinds only: no box statistics; boxes only: no kind statistics.
  only_kinds = fs.fusion_summary(w6, 3, scales, kinds=kinds)["adaptivity"]
  assert only_kinds["region_follow"] is None
  assert only_kinds["num_box_images"] == 0
  assert only_kinds["scale_size_corr"] is None
  assert "no images with an object box" in fs.format_adaptivity(only_kinds)[2]
  only_boxes = fs.fusion_summary(w6, 3, scales, boxes=boxes)["adaptivity"]
  assert only_boxes["by_kind"] is None
  assert only_boxes["global_weight_scene"] is None
  assert only_boxes["region_follow"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match=r"expected \[6, 4\]"):
    fs.fusion_summary(w6, 3, scales, boxes=BOXES)
  with pytest.raises(ValueError, match="4 finite numbers or all NaN"):
    fs.fusion_summary(w6, 3, scales,
                      boxes=np.concatenate([BOXES, [[0, 0, 1, math.nan]],
                                            [NAN4]]))


SIDECAR = {"version": 1, "images": {
    "db_obj": {"kind": "object", "box": [10, 20, 60, 70], "width": 200,
               "height": 100},
    "db_big": {"kind": "object", "box": [-5, 0, 250, 100], "width": 200,
               "height": 100},
    "db_scene": {"kind": "scene", "box": None, "width": 64, "height": 64},
    "q_obj": {"kind": "object", "box": [0, 0, 32, 32], "width": 64,
              "height": 64},
}}


def _write(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    f.write(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def test_load_objects_sidecar(tmp_path):
  assert fs.load_objects_sidecar(tmp_path / "objects.json") is None
  side = fs.load_objects_sidecar(_write(tmp_path / "objects.json", SIDECAR))
  assert side["version"] == 1
  assert side["images"]["db_obj"] == {"kind": "object",
                                      "box": (10.0, 20.0, 60.0, 70.0),
                                      "width": 200, "height": 100}
  assert side["images"]["db_scene"]["box"] is None
  # A missing "box" key means null; unknown keys are ignored.
  ok = {"version": 1, "images": {"a": {"kind": "distractor", "width": 5,
                                       "height": 5, "note": "x"}}}
  assert fs.load_objects_sidecar(_write(tmp_path / "ok.json", ok))[
      "images"]["a"]["box"] is None

  cases = [
      ("not json {", "cannot read"),
      ({"images": {}}, "version None"),
      ({"version": 2, "images": {}}, "version 2"),
      ({"version": 1, "images": []}, "'images' must be an object"),
      ({"version": 1, "images": {"x": 3}}, r"images\['x'\]: expected an object"),
      ({"version": 1, "images": {"x": {"kind": "thing", "width": 1,
                                       "height": 1}}}, r"images\['x'\]: kind"),
      ({"version": 1, "images": {"x": {"kind": "object", "width": 0,
                                       "height": 1}}}, r"images\['x'\]: width"),
      ({"version": 1, "images": {"x": {"kind": "scene", "box": [0, 0, 1, 1],
                                       "width": 4, "height": 4}}}, "has a box"),
      ({"version": 1, "images": {"x": {"kind": "object", "box": [0, 0, 1],
                                       "width": 4, "height": 4}}}, "4 finite"),
      ({"version": 1, "images": {"x": {"kind": "object", "box": [3, 0, 1, 1],
                                       "width": 4, "height": 4}}}, "x1 <= x0"),
      ({"version": 1, "images": {"x": {"kind": "object", "box": [5, 0, 9, 1],
                                       "width": 4, "height": 4}}}, "outside"),
  ]
  for i, (content, message) in enumerate(cases):
    path = _write(tmp_path / f"bad{i}.json", content)
    with pytest.raises(ValueError, match=message) as err:
      fs.load_objects_sidecar(path)
    assert path in str(err.value)


def _fake_dataset(tmp_path, sidecar=SIDECAR, missing=()):
  data_dir = tmp_path / "fake"
  data_dir.mkdir()
  if sidecar is not None:
    _write(data_dir / "objects.json", sidecar)
  ds = types.SimpleNamespace(
      data_dir=str(data_dir), qimlist=["q_obj", "q_gone"],
      imlist=["db_obj", "db_scene", "db_big", "db_gone"],
      missing=list(missing))
  ds.query_path = lambda i: os.path.join(ds.data_dir, ds.qimlist[i] + ".jpg")
  ds.db_path = lambda i: os.path.join(ds.data_dir, ds.imlist[i] + ".jpg")
  return ds


def test_metadata_for_queries_have_no_boxes(tmp_path):
  ds = _fake_dataset(tmp_path)
  kinds, boxes = fs.dataset_metadata(ds)
  assert kinds == ["object", "unknown", "object", "scene", "object",
                   "unknown"]
  assert np.isnan(boxes[:2]).all()           # queries: kinds, never boxes
  np.testing.assert_allclose(boxes[2], [0.05, 0.2, 0.3, 0.7])
  assert np.isnan(boxes[3]).all() and np.isnan(boxes[5]).all()
  np.testing.assert_allclose(boxes[4], [0.0, 0.0, 1.0, 1.0])   # clipped
  side = fs.load_objects_sidecar(os.path.join(ds.data_dir, "objects.json"))
  k, b = fs.metadata_for(["q_obj"], side, use_boxes=True)
  np.testing.assert_allclose(b, [[0, 0, 0.5, 0.5]])
  k, b = fs.metadata_for(["db_obj"], None, use_boxes=True)
  assert k == ["unknown"] and np.isnan(b).all()


def test_hook_fusion_summary_with_sidecar(tmp_path):
  config = types.SimpleNamespace(model={"qaff": {"grid": 3,
                                                 "scales": (0.5, 0.75, 1.5)}})
  w = _weights([0, 4, 0, 8, 4, 2], n_scales=3)
  q, db = {"fusion_weights": w[:2]}, {"fusion_weights": w[2:]}
  # No dataset, or one without a sidecar: no adaptivity section.
  assert "adaptivity" not in fs_lib.dataset_fusion_summary(config, q, db)
  (tmp_path / "bare").mkdir()
  bare = _fake_dataset(tmp_path / "bare", sidecar=None)
  assert "adaptivity" not in fs_lib.dataset_fusion_summary(config, q, db, bare)

  (tmp_path / "b").mkdir()
  gone = os.path.join(str(tmp_path / "b" / "fake"), "db_big.jpg")
  ds = _fake_dataset(tmp_path / "b", missing=[gone])
  s = fs_lib.dataset_fusion_summary(config, q, db, ds)
  a = s["adaptivity"]
  assert s["num_images"] == 6
  # Only db_obj keeps a box (queries never, db_big is missing on disk): its
  # top cell 0 overlaps the box (x 0.05..0.3, y 0.2..0.7: cells 0, 3, 6).
  assert a["num_box_images"] == 1
  assert a["region_follow"] == 1.0
  assert a["region_follow_chance"] == pytest.approx(3 / 9)
  assert a["by_kind"]["object"]["count"] == 2     # q_obj and db_obj
  assert a["by_kind"]["unknown"]["count"] == 3    # q_gone, db_big, db_gone
  assert a["by_kind"]["scene"]["count"] == 1
  assert a["global_weight_scene"] == pytest.approx(w[3, 0])


def test_routing_check_hits_hand_computed():
  from qaff_jax.evaluation import routing_check
  # 2 images, grid 2 (cells 0 TL, 1 TR, 2 BL, 3 BR), one scale: K = 6.
  boxes = np.array([[0.0, 0.0, 0.4, 0.4],    # cell 0 only
                    [0.6, 0.6, 1.0, 1.0]])   # cell 3 only
  losses = np.array([[5.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # argmin cell 0: hit
                     [5.0, 1.0, 2.0, 3.0, 4.0, 5.0]])   # argmin cell 0: miss
  weights = np.array([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1],   # top cell 1: miss
                      [0.1, 0.1, 0.1, 0.1, 0.5, 0.1]])  # top cell 3: hit
  r = routing_check.hits(losses, weights, boxes, 2)
  assert r["target_hit"] == 0.5 and r["router_hit"] == 0.5
  assert r["chance"] == pytest.approx(0.25) and r["best_fixed"] == pytest.approx(0.5)
  assert r["loss_spread"] == pytest.approx(np.std([1.0, 2.0, 3.0, 4.0]))
  assert r["mean_loss"] == pytest.approx([5.0, 1.0, 2.0, 3.0, 4.0, 5.0])
