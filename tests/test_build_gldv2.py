"""build_gldv2 (DELF layout without TensorFlow) on a small GLDv2-layout folder, read back
by the training pipeline; the RGLDv2 allowlist; check.py finding planted problems."""

import collections
import io
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import build_gldv2
from qaff_jax.data import check
from qaff_jax.data import pipeline
from qaff_jax.data import records

# Original GLDv2 landmark ids (not contiguous) -> number of images.
LANDMARKS = {1042: 4, 7: 3, 203093: 5, 55: 1, 999: 3}


def _id(lm: int, k: int) -> str:
  return f"{(lm * 7919 + k * 104729) % 16**16:016x}"


def _jpeg(seed: int) -> tuple[bytes, tuple[int, int]]:
  rng = np.random.default_rng(seed)
  h, w = int(rng.integers(18, 30)), int(rng.integers(18, 30))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, "JPEG")
  return buf.getvalue(), (h, w)


@pytest.fixture(scope="module")
def gld(tmp_path_factory):
  root = tmp_path_factory.mktemp("gld")
  images = root / "train"
  rows, files = [], {}
  for n, (lm, count) in enumerate(LANDMARKS.items()):
    ids = [_id(lm, k) for k in range(count)]
    rows.append(f"{lm},{' '.join(ids)}")
    for k, image_id in enumerate(ids):
      data, size = _jpeg(100 * n + k)
      folder = images / image_id[0] / image_id[1] / image_id[2]
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"{image_id}.jpg").write_bytes(data)
      files[image_id] = (data, size, lm)
  csv = root / "train_clean.csv"
  csv.write_text("landmark_id,images\n" + "\n".join(rows) + "\n")
  return {"root": root, "images": str(images), "csv": str(csv), "files": files}


def _delf_split(image_paths, file_ids, labels, fraction, seed):
  """DELF's train/validation split written out as its code does it (np.stack of str)."""
  attrs = np.stack((image_paths, file_ids, [str(x) for x in labels]))
  by_label = {}
  for i, lab in enumerate(labels):
    by_label.setdefault(lab, []).append(i)
  rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
  val, train = None, None
  for idx in by_label.values():
    sub = attrs[:, idx]
    cols = np.arange(sub.shape[1])
    rs.shuffle(cols)
    sub = sub[:, cols]
    cut = max(1, int(fraction * sub.shape[1]))
    val = sub[:, :cut] if val is None else np.concatenate((val, sub[:, :cut]), axis=1)
    train = sub[:, cut:] if train is None else np.concatenate((train, sub[:, cut:]), axis=1)
  return val[1].tolist(), train[1].tolist()


def _read(path):
  return [records.parse_gldv2_example(r) for r in records.iter_tfrecord(path)]


def test_build_matches_delf_and_the_pipeline_reads_it(gld, tmp_path):
  out = str(tmp_path / "records")
  report = build_gldv2.build(gld["images"], gld["csv"], out, num_shards=2, workers=2,
                             validation_split=0.2, seed=0, progress=False)
  remap = {lm: i for i, lm in enumerate(sorted(LANDMARKS))}      # DELF: sorted -> 0..N-1
  ids = list(gld["files"])
  labels = [remap[gld["files"][i][2]] for i in ids]
  val_ids, train_ids = _delf_split(ids, ids, labels, 0.2, 0)
  assert report["records"] == {"validation": len(val_ids), "train": len(train_ids)}
  assert report["classes"] == len(LANDMARKS)

  for split, want in (("train", train_ids), ("validation", val_ids)):
    got = []
    edges = np.linspace(0, len(want), 3, dtype=int)
    for s in range(2):
      recs = _read(os.path.join(out, records.shard_name(split, s, 2)))
      assert [r.image_id for r in recs] == want[edges[s]:edges[s + 1]]   # DELF sharding
      got += recs
    for r in got:
      data, (h, w), lm = gld["files"][r.image_id]
      assert r.encoded == data and (r.height, r.width) == (h, w)
      assert r.label == remap[lm]

  with open(os.path.join(out, "relabeling.csv")) as f:
    assert f.read().splitlines() == ["new_label,old_label"] + [
        f"{i},{lm}" for lm, i in sorted(remap.items(), key=lambda kv: kv[1])]

  # The training pipeline reads the train split: one epoch = its labels exactly.
  cfg = ml_collections.ConfigDict(dict(
      train_files=out, format="auto", image_size=16, shuffle_buffer=0, cycle_length=1,
      min_scale=0.5, color_jitter=0.0, num_workers=0, class_allowlist="", relabel=False))
  it = iter(pipeline.make_train_dataset(cfg, local_batch_size=1, seed=0))
  seen = [int(next(it)["label"][0]) for _ in train_ids]
  want_labels = [remap[gld["files"][i][2]] for i in train_ids]
  assert collections.Counter(seen) == collections.Counter(want_labels)

  # Reconciliation of a clean build: nothing to report.
  result = check.reconcile(out, gld["csv"])
  assert result["problems"] == 0 and result["records"] == len(ids)


def test_rerun_skips_finished_shards_and_arrayrecord(gld, tmp_path):
  out = str(tmp_path / "records")
  build_gldv2.build(gld["images"], gld["csv"], out, num_shards=3, validation_split=0,
                    progress=False)
  shard = os.path.join(out, records.shard_name("train", 1, 3))
  before = os.stat(shard).st_mtime_ns
  os.remove(os.path.join(out, records.shard_name("train", 2, 3)))   # as if killed
  report = build_gldv2.build(gld["images"], gld["csv"], out, num_shards=3,
                             validation_split=0, progress=False)
  assert report["shards_written"] == 1 and report["shards_skipped"] == 2
  assert os.stat(shard).st_mtime_ns == before
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  with pytest.raises(FileExistsError, match="another build plan"):
    build_gldv2.build(gld["images"], gld["csv"], out, num_shards=4, validation_split=0,
                      progress=False)

  ar = str(tmp_path / "ar")
  build_gldv2.build(gld["images"], gld["csv"], ar, num_shards=2, fmt="arrayrecord",
                    validation_split=0, progress=False)
  assert sorted(os.listdir(ar))[-2:] == ["train-00000-of-00002.array_record",
                                         "train-00001-of-00002.array_record"]
  assert check.reconcile(ar, gld["csv"])["problems"] == 0


def test_missing_image_stops_the_build_unless_allowed(gld, tmp_path):
  images = tmp_path / "imgs"
  shutil.copytree(gld["images"], images)
  gone = _id(7, 1)
  os.remove(images / gone[0] / gone[1] / gone[2] / f"{gone}.jpg")
  with pytest.raises(FileNotFoundError, match=gone):
    build_gldv2.build(str(images), gld["csv"], str(tmp_path / "a"), num_shards=1,
                      validation_split=0, progress=False)
  report = build_gldv2.build(str(images), gld["csv"], str(tmp_path / "b"), num_shards=1,
                             validation_split=0, allow_missing=True, progress=False)
  assert report["missing_images"] == [gone]
  result = check.reconcile(str(tmp_path / "b"), gld["csv"])
  assert result["missing"] == [gone] and result["missing_known_at_build"] == 1


def test_rgldv2_allowlist_filters_and_relabels_in_the_pipeline(gld, tmp_path):
  out = str(tmp_path / "records")
  build_gldv2.build(gld["images"], gld["csv"], out, num_shards=1, validation_split=0,
                    progress=False)
  removed = tmp_path / "removed.txt"
  removed.write_text("# overlapping with ROxf/RPar\n7\n203093\n")
  assert build_gldv2.main(["--csv", gld["csv"], "--out", out, "--exclude", str(removed),
                           "--allowlist_only"]) == 0
  path = os.path.join(out, build_gldv2.ALLOWLIST)
  remap = {lm: i for i, lm in enumerate(sorted(LANDMARKS))}
  kept = sorted(remap[lm] for lm in LANDMARKS if lm not in (7, 203093))
  assert pipeline.read_class_allowlist(path) == kept          # configs/rgldv2.py's format
  keep_csv = tmp_path / "rgldv2.csv"                           # train_clean-format list
  keep_csv.write_text("landmark_id,images\n55,x\n999,y\n1042,z\n")
  info = build_gldv2.write_allowlist(gld["csv"], str(tmp_path / "k.txt"), keep=str(keep_csv))
  assert pipeline.read_class_allowlist(str(tmp_path / "k.txt")) == kept
  assert info["removed_images"] == LANDMARKS[7] + LANDMARKS[203093]

  cfg = ml_collections.ConfigDict(dict(
      train_files=out, format="auto", image_size=16, shuffle_buffer=0, cycle_length=1,
      min_scale=0.5, color_jitter=0.0, num_workers=0, class_allowlist=path, relabel=True))
  n = sum(LANDMARKS[lm] for lm in LANDMARKS if lm not in (7, 203093))
  it = iter(pipeline.make_train_dataset(cfg, local_batch_size=1, seed=0))
  seen = collections.Counter(int(next(it)["label"][0]) for _ in range(n))
  assert seen == collections.Counter({kept.index(remap[lm]): LANDMARKS[lm]
                                      for lm in LANDMARKS if lm not in (7, 203093)})


def test_check_finds_planted_problems(gld, tmp_path, capsys):
  out = str(tmp_path / "records")
  build_gldv2.build(gld["images"], gld["csv"], out, num_shards=2, validation_split=0,
                    progress=False)
  shard0 = os.path.join(out, records.shard_name("train", 0, 2))
  shard1 = os.path.join(out, records.shard_name("train", 1, 2))
  raws = list(records.iter_tfrecord(shard0))
  recs = [records.parse_gldv2_example(r) for r in raws]
  missing_id = recs[0].image_id                         # planted: an image left out
  dup = raws[1]                                         # planted: a duplicate
  corrupt_id = recs[2].image_id                         # planted: a corrupt record
  framed = [records.encode_record(r) for r in raws[1:]] + [records.encode_record(dup)]
  bad = bytearray(framed[1])
  bad[-6] ^= 0xFF                                       # flip a data byte: CRC fails
  framed[1] = bytes(bad)
  with open(shard0, "wb") as f:
    f.write(b"".join(framed))
  wrong = records.make_gldv2_example(  # a wrong label
      b"x", (recs[3].label + 1) % len(LANDMARKS), recs[3].image_id, 1, 1)
  with open(shard1, "ab") as f:
    f.write(records.encode_record(wrong))

  code = check.main([out, "--csv", gld["csv"], "--json"])
  assert code == 1
  result = json.loads(capsys.readouterr().out)
  assert set(result["missing"]) == {missing_id, corrupt_id}
  assert {d["id"] for d in result["duplicates"]} == {recs[1].image_id, recs[3].image_id}
  assert result["counts"]["unreadable"] == 1
  assert "bad data checksum" in result["unreadable"][0]["error"]
  assert [m["id"] for m in result["label_mismatch"]] == [recs[3].image_id]
  assert result["counts"]["label_counts"] >= 1
  code = check.main([out, "--csv", gld["csv"]])
  text = capsys.readouterr().out
  assert code == 1 and "PROBLEMS" in text and "unreadable" in text and missing_id in text


def test_cli_usage(gld, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    build_gldv2.main(["--help"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    build_gldv2.main(["--csv", gld["csv"], "--out", str(tmp_path)])
  assert e.value.code == 2 and "missing --images" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    check.main([str(tmp_path / "nope"), "--csv", gld["csv"]])
  assert e.value.code == 2
  assert build_gldv2.main(["--images", gld["images"], "--csv", gld["csv"], "--out",
                           str(tmp_path / "r"), "--num_shards", "1", "--workers", "1",
                           "--no_progress"]) == 0
  assert "records in" in capsys.readouterr().out
