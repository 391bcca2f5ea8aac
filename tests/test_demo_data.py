"""Tests for the procedural demo dataset (qaff_jax.data.demo)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import demo, records

SMALL = demo.DemoSpec(num_train_classes=4, views_per_class=3, num_test_landmarks=3,
                      db_views_per_landmark=4, queries_per_landmark=2,
                      num_distractors=3, train_size=64, num_shards=2, seed=7)


def _tree_bytes(root: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("demo"))
  demo.generate(root, SMALL)
  return root


def _load_gnd(root: str) -> dict:
  with open(os.path.join(root, "test", "demo", "gnd_demo.pkl"), "rb") as f:
    return pickle.load(f)


def test_train_records_parse_back(data_root):
  paths = demo._paths(data_root, SMALL)
  assert sorted(os.listdir(paths["train_files"])) == [
      "train-00000-of-00002", "train-00001-of-00002"]
  recs = [records.parse_gldv2_example(raw)
          for p in paths["train_shards"] for raw in records.iter_tfrecord(p)]
  assert len(recs) == SMALL.num_train_classes * SMALL.views_per_class
  assert sorted({r.label for r in recs}) == list(range(SMALL.num_train_classes))
  counts = np.bincount([r.label for r in recs])
  assert (counts == SMALL.views_per_class).all()
  ids = [r.image_id for r in recs]
  assert len(set(ids)) == len(ids)
  for r in recs:
    int(r.image_id, 16)  # hex
    img = Image.open(io.BytesIO(r.encoded))
    assert img.format == "JPEG" and img.mode == "RGB"
    assert img.size == (r.width, r.height)
    lo = round(0.75 * SMALL.train_size)
    assert lo <= r.width <= SMALL.train_size and lo <= r.height <= SMALL.train_size


def test_gnd_revisitop_structure(data_root):
  cfg = _load_gnd(data_root)
  assert set(cfg) == {"imlist", "qimlist", "gnd"}
  n_db = SMALL.num_test_landmarks * SMALL.db_views_per_landmark + SMALL.num_distractors
  n_q = SMALL.num_test_landmarks * SMALL.queries_per_landmark
  assert len(cfg["imlist"]) == n_db and len(set(cfg["imlist"])) == n_db
  assert len(cfg["qimlist"]) == n_q == len(cfg["gnd"])
  assert not set(cfg["imlist"]) & set(cfg["qimlist"])
  jpg = os.path.join(data_root, "test", "demo", "jpg")
  assert len(os.listdir(jpg)) == n_db + n_q
  sizes = [Image.open(os.path.join(jpg, i + ".jpg")).size for i in cfg["imlist"]]
  assert max(max(s) for s in sizes) > SMALL.train_size  # larger than training
  for qid, g in zip(cfg["qimlist"], cfg["gnd"]):
    easy, hard, junk = (set(map(int, g[k])) for k in ("easy", "hard", "junk"))
    assert all(0 <= k < n_db for k in easy | hard | junk)
    assert not easy & hard and not easy & junk and not hard & junk
    assert easy and len(easy | hard | junk) == SMALL.db_views_per_landmark
    w, h = Image.open(os.path.join(jpg, qid + ".jpg")).size
    x1, y1, x2, y2 = g["bbx"]
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert (x2 - x1) * (y2 - y1) < w * h  # the landmark is a region
  # Queries of one landmark share their ground truth; other landmarks don't.
  per_lm = SMALL.queries_per_landmark
  positives = [frozenset(g["easy"]) | frozenset(g["hard"]) for g in cfg["gnd"]]
  for i in range(0, n_q, per_lm):
    assert len(set(positives[i:i + per_lm])) == 1
  assert len(set(positives)) == SMALL.num_test_landmarks


def test_test_landmarks_disjoint_from_train(data_root):
  with open(os.path.join(data_root, "DONE.json")) as f:
    marker = json.load(f)
  assert marker["version"] == demo.VERSION
  # The landmarks marker leaves out the mixed-only fields (DONE.json as before them).
  assert marker["spec"] == demo.marker_spec(SMALL) == {
      k: v for k, v in vars(SMALL).items() if k not in demo._MIXED_FIELDS}
  assert set(vars(SMALL)) - set(marker["spec"]) == set(demo._MIXED_FIELDS)
  scenes = {k: {tuple(s) for s in v} for k, v in marker["scenes"].items()}
  assert len(scenes["train"]) == SMALL.num_train_classes
  assert len(scenes["test"]) == SMALL.num_test_landmarks
  assert not scenes["train"] & scenes["test"]
  assert not (scenes["train"] | scenes["test"]) & scenes["distractor"]
  # The scenes themselves differ, not just their keys.
  train = [np.asarray(demo.scene_image(*k), np.float32) for k in sorted(scenes["train"])]
  for key in sorted(scenes["test"]):
    test = np.asarray(demo.scene_image(*key), np.float32)
    assert min(np.abs(test - t).mean() for t in train) > 10.0


def test_deterministic(tmp_path, data_root):
  demo.generate(tmp_path / "again", SMALL)
  assert _tree_bytes(str(tmp_path / "again")) == _tree_bytes(data_root)
  other = demo.DemoSpec(**{**vars(SMALL), "seed": 8})
  demo.generate(tmp_path / "other", other)
  shard = os.path.join("train", "train-00000-of-00002")
  assert _tree_bytes(str(tmp_path / "other"))[shard] != _tree_bytes(data_root)[shard]


def test_deterministic_across_processes(tmp_path, data_root):
  """Byte-identical in a fresh interpreter with another string-hash seed."""
  args = [a for k, v in vars(SMALL).items() for a in ("--" + k, str(v))]
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-m", "qaff_jax.data.demo", "--out", str(tmp_path)] + args,
                 check=True, env=env, cwd=repo, capture_output=True)
  got = _tree_bytes(str(tmp_path))
  got.pop(".demo.lock", None)
  want = _tree_bytes(data_root)
  assert got == want


def test_ensure_demo_data_reuses_and_regenerates(tmp_path, monkeypatch):
  root = str(tmp_path / "d")
  paths = demo.ensure_demo_data(root, SMALL)
  assert paths["train_files"] == os.path.join(root, "train")
  assert paths["test_root"] == os.path.join(root, "test")
  assert paths["test_name"] == "demo"
  assert os.path.isfile(os.path.join(root, "test", "demo", "gnd_demo.pkl"))
  assert not [n for n in os.listdir(root) if n.startswith(".demo-gen-")]
  before = _tree_bytes(root)

  calls = []
  real_generate = demo.generate
  monkeypatch.setattr(demo, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
  assert demo.ensure_demo_data(root, SMALL) == paths
  assert not calls and _tree_bytes(root) == before

  # Other parameters, or a missing marker, regenerate.
  bigger = demo.DemoSpec(**{**vars(SMALL), "num_shards": 3})
  demo.ensure_demo_data(root, bigger)
  assert len(calls) == 1
  assert sorted(os.listdir(os.path.join(root, "train"))) == [
      records.shard_name("train", i, 3) for i in range(3)]
  os.remove(os.path.join(root, "DONE.json"))
  demo.ensure_demo_data(root, bigger)
  assert len(calls) == 2


def test_cli(tmp_path, capsys):
  args = ["--out", str(tmp_path)] + [
      a for k, v in vars(SMALL).items() for a in ("--" + k, str(v))]
  demo.main(args)
  out = json.loads(capsys.readouterr().out.splitlines()[0])
  assert out == {"train_files": str(tmp_path / "train"),
                 "test_root": str(tmp_path / "test"), "test_name": "demo"}
  assert os.path.isfile(tmp_path / "DONE.json")


# --------------------------------------------------------------------------
# Layouts and the mixed (scenes + small objects) layout.


MIXED_SMALL = demo.DemoSpec(num_train_classes=3, views_per_class=3, num_test_landmarks=2,
                            db_views_per_landmark=4, queries_per_landmark=2,
                            num_distractors=4, train_size=64, num_shards=2, seed=5,
                            layout="mixed", num_object_classes=3, num_test_objects=2,
                            num_backgrounds=3)


def test_spec_for_and_layouts():
  assert demo.spec_for("landmarks") == demo.DemoSpec()
  assert demo.spec_for("mixed") == demo.MIXED_SPEC
  assert demo.MIXED_SPEC.layout == "mixed" and demo.DemoSpec().layout == "landmarks"
  copy = demo.spec_for("mixed")
  copy.seed = 99
  assert demo.MIXED_SPEC.seed == 0  # a fresh copy each call
  with pytest.raises(ValueError, match=r"'roads'.*landmarks.*mixed"):
    demo.spec_for("roads")
  with pytest.raises(ValueError, match="'roads'"):
    demo.DemoSpec(layout="roads")
  assert demo.layout_test_name(demo.DemoSpec()) == "demo"
  assert demo.layout_test_name(demo.MIXED_SPEC) == "mixed"
  # The landmarks marker spec ignores the mixed-only fields; the mixed one keeps all.
  other = demo.DemoSpec(num_object_classes=3, num_backgrounds=2)
  assert demo.marker_spec(other) == demo.marker_spec(demo.DemoSpec())
  assert demo.marker_spec(MIXED_SMALL) == vars(MIXED_SMALL)


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("mixed"))
  demo.generate(root, MIXED_SMALL)
  return root


def _mixed_records(root: str) -> list[tuple[records.ImageRecord, np.ndarray, bytes]]:
  paths = demo._paths(root, MIXED_SMALL)
  out = []
  for p in paths["train_shards"]:
    for raw in records.iter_tfrecord(p):
      out.append((records.parse_gldv2_example(raw), records.parse_object_boxes(raw), raw))
  return out


def _side_fraction(box, width: int, height: int) -> float:
  x0, y0, x1, y1 = box
  return max(x1 - x0, y1 - y0) / min(width, height)


def _check_object_pixels(view: demo.ObjectView) -> None:
  """The object changes pixels inside its box only, and touches every box edge."""
  img = np.asarray(view.image, np.int16)
  bg = np.asarray(view.background, np.int16)
  assert img.shape == bg.shape
  changed = np.abs(img - bg).max(axis=-1) > 0
  x0, y0, x1, y1 = view.box
  assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]
  inside = changed[y0:y1, x0:x1]
  outside = changed.copy()
  outside[y0:y1, x0:x1] = False
  assert not outside.any()
  assert inside.mean() > 0.5
  assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
  assert np.abs(img - bg)[y0:y1, x0:x1].mean() > 10.0


def test_mixed_train_records_and_boxes(mixed_root):
  recs = _mixed_records(mixed_root)
  n_scene, n_obj = MIXED_SMALL.num_train_classes, MIXED_SMALL.num_object_classes
  assert len(recs) == (n_scene + n_obj) * MIXED_SMALL.views_per_class
  labels = [r.label for r, _, _ in recs]
  assert (np.bincount(labels) == MIXED_SMALL.views_per_class).all()
  assert sorted(set(labels)) == list(range(n_scene + n_obj))
  # Shuffled across shards: object records are not all at the end.
  first_shard = [records.parse_gldv2_example(raw).label for raw in records.iter_tfrecord(
      demo._paths(mixed_root, MIXED_SMALL)["train_shards"][0])]
  assert {lab >= n_scene for lab in first_shard} == {True, False}
  ids = [r.image_id for r, _, _ in recs]
  assert len(set(ids)) == len(ids)
  lo, hi = demo.OBJECT_FRACTION
  by_id = {}
  for r, boxes, _ in recs:
    img = Image.open(io.BytesIO(r.encoded))
    assert img.format == "JPEG" and img.size == (r.width, r.height)
    if r.label < n_scene:
      assert boxes.shape == (0, 4) and boxes.dtype == np.float32
      continue
    assert boxes.shape == (1, 4) and boxes.dtype == np.float32
    xmin, ymin, xmax, ymax = boxes[0]
    assert 0.0 <= xmin < xmax <= 1.0 and 0.0 <= ymin < ymax <= 1.0
    frac = _side_fraction(boxes[0] * [r.width, r.height, r.width, r.height], r.width, r.height)
    assert lo - 1e-5 <= frac <= hi + 1e-5
    by_id[r.image_id] = (r, boxes[0])
  # Every object record is what `object_view` renders: same JPEG, same box,
  # and the object's pixels lie in the box.
  for j in range(n_obj):
    for v in range(MIXED_SMALL.views_per_class):
      view = demo.object_view(MIXED_SMALL, "train", j, v)
      r, box = by_id[view.image_id]
      assert r.label == n_scene + j and r.encoded == view.encoded
      w, h = view.image.size
      x0, y0, x1, y1 = view.box
      np.testing.assert_allclose(box, np.float32([x0 / w, y0 / h, x1 / w, y1 / h]))
      _check_object_pixels(view)


def test_mixed_records_read_by_grain_pipeline(mixed_root):
  ml_collections = pytest.importorskip("ml_collections")
  from qaff_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(
      train_files=demo._paths(mixed_root, MIXED_SMALL)["train_files"], format="auto",
      image_size=16, shuffle_buffer=4, min_scale=0.2, color_jitter=0.0, num_workers=0,
      class_allowlist="", relabel=False))
  n = (MIXED_SMALL.num_train_classes + MIXED_SMALL.num_object_classes) * MIXED_SMALL.views_per_class
  it = iter(pipeline.make_train_dataset(cfg, local_batch_size=n, seed=0))
  batch = next(it)
  it.close()
  assert batch["image"].shape == (n, 16, 16, 3)
  assert int(batch["skipped"].sum()) == 0
  assert sorted(set(batch["label"].tolist())) == list(range(
      MIXED_SMALL.num_train_classes + MIXED_SMALL.num_object_classes))


def test_mixed_test_set(mixed_root):
  from qaff_jax.data import revisited  # pylint: disable=import-outside-toplevel
  paths = demo._paths(mixed_root, MIXED_SMALL)
  assert paths["test_name"] == "mixed"
  assert paths["gnd_path"] == os.path.join(mixed_root, "test", "mixed", "gnd_mixed.pkl")
  assert paths["objects_path"] == os.path.join(mixed_root, "test", "mixed", "objects.json")
  ds = revisited.RevisitedDataset(paths["test_root"], "mixed")
  sp = MIXED_SMALL
  n_classes = sp.num_test_landmarks + sp.num_test_objects
  assert ds.n_db == n_classes * sp.db_views_per_landmark + sp.num_distractors
  assert ds.n_queries == n_classes * sp.queries_per_landmark
  assert len(os.listdir(paths["image_dir"])) == ds.n_db + ds.n_queries
  ds.check_images()

  images = demo.load_objects(paths["objects_path"])["images"]
  assert set(images) == set(ds.imlist) | set(ds.qimlist)
  kinds = [images[i]["kind"] for i in ds.imlist]
  assert kinds.count("scene") == sp.num_test_landmarks * sp.db_views_per_landmark
  assert kinds.count("object") == sp.num_test_objects * sp.db_views_per_landmark
  assert kinds.count("distractor") == sp.num_distractors
  for image_id, entry in images.items():
    img = Image.open(os.path.join(paths["image_dir"], image_id + ".jpg"))
    assert (entry["width"], entry["height"]) == img.size
    assert (entry["box"] is None) == (entry["kind"] != "object")
  for k, image_id in enumerate(ds.imlist):
    entry = images[image_id]
    if entry["kind"] == "object":
      frac = _side_fraction(entry["box"], entry["width"], entry["height"])
      assert demo.OBJECT_FRACTION[0] <= frac <= demo.OBJECT_FRACTION[1]

  q_kinds = [images[q]["kind"] for q in ds.qimlist]
  assert q_kinds.count("object") == sp.num_test_objects * sp.queries_per_landmark
  positives = []
  for i, (qid, g) in enumerate(zip(ds.qimlist, ds.gnd)):
    entry = images[qid]
    pos = set(g["easy"].tolist()) | set(g["hard"].tolist())
    assert len(g["easy"]) and len(pos | set(g["junk"].tolist())) == sp.db_views_per_landmark
    # Positives are of the query's kind; distractors are never positives.
    assert {images[ds.imlist[k]]["kind"] for k in pos} == {entry["kind"]}
    positives.append(frozenset(pos))
    x0, y0, x1, y1 = g["bbx"]
    assert 0 <= x0 < x1 <= entry["width"] and 0 <= y0 < y1 <= entry["height"]
    if entry["kind"] == "object":
      assert list(g["bbx"]) == [float(v) for v in entry["box"]]
      frac = _side_fraction(entry["box"], entry["width"], entry["height"])
      assert demo.QUERY_OBJECT_FRACTION[0] <= frac <= demo.QUERY_OBJECT_FRACTION[1]
    crop = ds.load_query(i)
    assert crop.shape[:2] == (round(y1) - round(y0), round(x1) - round(x0))
  assert len(set(positives)) == n_classes

  # Stored object images are what `object_view` renders, object inside its box.
  for o in range(sp.num_test_objects):
    for v in range(sp.db_views_per_landmark):
      view = demo.object_view(sp, "db", o, v)
      assert images[view.image_id]["box"] == list(view.box)
      with open(os.path.join(paths["image_dir"], view.image_id + ".jpg"), "rb") as f:
        assert f.read() == view.encoded
      _check_object_pixels(view)
    for q in range(sp.queries_per_landmark):
      view = demo.object_view(sp, "query", o, q)
      assert view.image_id in ds.qimlist
      _check_object_pixels(view)


def test_mixed_classes_disjoint(mixed_root):
  with open(os.path.join(mixed_root, "DONE.json")) as f:
    marker = json.load(f)
  assert marker["version"] == demo.VERSION and marker["spec"] == vars(MIXED_SMALL)
  assert marker["test_name"] == "mixed"
  assert marker["labels"] == {"scene": [0, 3], "object": [3, 6]}
  scenes = {k: {tuple(s) for s in v} for k, v in marker["scenes"].items()}
  objects = {k: {tuple(s) for s in v} for k, v in marker["objects"].items()}
  all_keys = list(scenes.values()) + list(objects.values())
  assert sum(len(k) for k in all_keys) == len(set().union(*all_keys))
  assert len(objects["train"]) == MIXED_SMALL.num_object_classes
  assert len(objects["test"]) == MIXED_SMALL.num_test_objects
  # Test object appearances differ from every training object's.
  train = [np.asarray(demo.object_image(*k), np.float32) for k in sorted(objects["train"])]
  for key in sorted(objects["test"]):
    test = np.asarray(demo.object_image(*key), np.float32)
    assert min(np.abs(test - t).mean() for t in train) > 5.0


def test_mixed_deterministic(tmp_path, mixed_root):
  demo.generate(tmp_path / "again", MIXED_SMALL)
  assert _tree_bytes(str(tmp_path / "again")) == _tree_bytes(mixed_root)


def test_mixed_ensure_and_cli(tmp_path, monkeypatch, capsys, mixed_root):
  root = str(tmp_path / "d")
  paths = demo.ensure_demo_data(root, MIXED_SMALL)
  assert paths["test_name"] == "mixed" and os.path.isfile(paths["objects_path"])
  calls = []
  real_generate = demo.generate
  monkeypatch.setattr(demo, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
  assert demo.ensure_demo_data(root, MIXED_SMALL) == paths and not calls
  os.remove(paths["objects_path"])  # an incomplete test set regenerates
  demo.ensure_demo_data(root, MIXED_SMALL)
  assert len(calls) == 1 and os.path.isfile(paths["objects_path"])

  # The CLI: str flags, and unset fields take the layout's defaults.
  args = ["--out", str(tmp_path / "cli")] + [
      a for k, v in vars(MIXED_SMALL).items() for a in ("--" + k, str(v))]
  demo.main(args)
  out = json.loads(capsys.readouterr().out.splitlines()[0])
  assert out["test_name"] == "mixed"
  got = _tree_bytes(str(tmp_path / "cli"))
  got.pop(".demo.lock", None)
  assert got == _tree_bytes(mixed_root)
  specs = []
  monkeypatch.setattr(demo, "ensure_demo_data", lambda root, spec: specs.append(spec) or {
      "train_files": "t", "test_root": "r", "test_name": demo.layout_test_name(spec)})
  demo.main(["--out", str(tmp_path / "x"), "--layout", "mixed", "--seed", "3"])
  demo.main(["--out", str(tmp_path / "x")])
  assert specs == [dataclasses.replace(demo.MIXED_SPEC, seed=3), demo.DemoSpec()]
  with pytest.raises(SystemExit):
    demo.main(["--out", str(tmp_path / "x"), "--layout", "roads"])


def _write_sidecar(path, images, version=1) -> str:
  with open(path, "w") as f:
    json.dump({"version": version, "images": images}, f)
  return str(path)


def test_load_objects_validates(tmp_path, mixed_root):
  good = os.path.join(mixed_root, "test", "mixed", "objects.json")
  data = demo.load_objects(good)
  assert data["version"] == 1 and data["images"]
  ok = {"a": {"kind": "object", "box": [1, 2, 5, 6], "width": 10, "height": 8},
        "b": {"kind": "scene", "box": None, "width": 10, "height": 8}}
  assert demo.load_objects(_write_sidecar(tmp_path / "ok.json", ok))["images"] == ok
  bad = {
      "version": ({}, 2, r"version 2"),
      "kind": ({"x": {"kind": "thing", "box": None, "width": 4, "height": 4}}, 1, r"'x'.*kind"),
      "outside": ({"x": {"kind": "object", "box": [0, 0, 11, 4], "width": 10, "height": 8}},
                  1, r"'x'.*not inside"),
      "empty": ({"x": {"kind": "object", "box": [3, 0, 3, 4], "width": 10, "height": 8}},
                1, r"'x'.*empty"),
      "scene_box": ({"x": {"kind": "scene", "box": [0, 0, 2, 2], "width": 4, "height": 4}},
                    1, r"'x'.*expected null"),
      "object_no_box": ({"x": {"kind": "object", "box": None, "width": 4, "height": 4}},
                        1, r"'x'.*box None"),
      "missing": ({"x": {"kind": "scene", "width": 4, "height": 4}}, 1, r"'x'.*missing.*box"),
      "size": ({"x": {"kind": "scene", "box": None, "width": 0, "height": 4}}, 1, r"'x'.*width"),
  }
  for name, (images, version, pattern) in bad.items():
    path = _write_sidecar(tmp_path / f"{name}.json", images, version)
    with pytest.raises(ValueError, match=pattern) as err:
      demo.load_objects(path)
    assert path in str(err.value), name
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  with pytest.raises(ValueError, match="garbage.json"):
    demo.load_objects(garbage)
  with pytest.raises(FileNotFoundError):
    demo.load_objects(tmp_path / "absent.json")
