"""Tests for the procedural demo dataset (qaff_jax.data.demo)."""

from __future__ import annotations

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
  assert marker["spec"] == {**vars(SMALL)}
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
