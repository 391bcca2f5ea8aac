"""Tests for the revisitop-layout dataset reader."""

import pickle

import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import revisited

NAME = "rtiny"


def _write_jpeg(path, h, w, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  shape = (h, w, 3) if mode == "RGB" else (h, w)
  Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(
      path, quality=95)


def _make_dataset(root, n_db=3, write_images=True):
  folder = root / NAME
  (folder / "jpg").mkdir(parents=True)
  imlist = [f"db_{i}" for i in range(n_db)]
  qimlist = ["query_0", "query_1"]
  gnd = [
      {"easy": [0], "hard": [1], "junk": [2], "bbx": [1.5, 2.5, 10.4, 12.6]},
      {"easy": np.array([2]), "hard": [], "junk": [0], "bbx": (0.0, 0.0, 8.0, 6.0)},
  ]
  with open(folder / f"gnd_{NAME}.pkl", "wb") as f:
    pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
  if write_images:
    for i, name in enumerate(imlist):
      _write_jpeg(folder / "jpg" / f"{name}.jpg", 20, 30, seed=i)
    _write_jpeg(folder / "jpg" / "query_0.jpg", 24, 16, seed=10)
    _write_jpeg(folder / "jpg" / "query_1.jpg", 10, 12, seed=11, mode="L")
  return folder


def test_dataset_fields_and_paths(tmp_path):
  folder = _make_dataset(tmp_path)
  ds = revisited.RevisitedDataset(tmp_path, NAME)
  assert ds.imlist == ["db_0", "db_1", "db_2"]
  assert ds.qimlist == ["query_0", "query_1"]
  assert ds.n_db == 3 and ds.n_queries == 2
  assert ds.db_path(1) == str(folder / "jpg" / "db_1.jpg")
  assert ds.query_path(0) == str(folder / "jpg" / "query_0.jpg")
  g = ds.gnd[1]
  assert g["easy"].dtype == np.int64 and list(g["easy"]) == [2]
  assert g["hard"].size == 0 and g["bbx"] == (0.0, 0.0, 8.0, 6.0)
  assert ds.check_images() == []


def test_load_images_and_crop(tmp_path):
  _make_dataset(tmp_path)
  ds = revisited.RevisitedDataset(tmp_path, NAME)
  db = ds.load_db(0)
  assert db.dtype == np.uint8 and db.shape == (20, 30, 3)
  full = ds.load_query(0, crop=False)
  assert full.shape == (24, 16, 3)
  # bbx (1.5, 2.5, 10.4, 12.6) -> PIL rounds half to even: (2, 2, 10, 13).
  assert revisited.crop_box((1.5, 2.5, 10.4, 12.6)) == (2, 2, 10, 13)
  crop = ds.load_query(0)
  assert crop.shape == (11, 8, 3)
  np.testing.assert_array_equal(crop, full[2:13, 2:10])
  # Identical to what revisitop / cirtorch do: PIL crop with the float box.
  with Image.open(ds.query_path(0)) as img:
    ref = np.asarray(img.convert("RGB").crop((1.5, 2.5, 10.4, 12.6)))
  np.testing.assert_array_equal(crop, ref)
  # Grayscale files come back as 3-channel RGB.
  assert ds.load_query(1).shape == (6, 8, 3)


def test_missing_and_unreadable_files_are_all_listed(tmp_path):
  folder = _make_dataset(tmp_path)
  (folder / "jpg" / "db_1.jpg").unlink()
  (folder / "jpg" / "query_1.jpg").unlink()
  (folder / "jpg" / "db_2.jpg").write_bytes(b"not a jpeg")
  ds = revisited.RevisitedDataset(tmp_path, NAME)
  with pytest.raises(revisited.MissingImagesError) as info:
    ds.check_images()
  msg = str(info.value)
  assert msg.startswith("3 ")
  for name in ("db_1.jpg", "db_2.jpg", "query_1.jpg"):
    assert name in msg
  assert "db_0.jpg" not in msg
  bad = ds.check_images(skip_missing=True)
  assert [p.rsplit("/", 1)[-1] for p in bad] == ["db_1.jpg", "db_2.jpg",
                                                 "query_1.jpg"]
  assert ds.missing == bad


def test_many_missing_files_are_counted(tmp_path):
  _make_dataset(tmp_path, n_db=25, write_images=False)
  ds = revisited.RevisitedDataset(tmp_path, NAME)
  with pytest.raises(FileNotFoundError) as info:
    ds.check_images()
  msg = str(info.value)
  assert msg.startswith("27 ") and "... and 7 more" in msg
  assert "db_0.jpg" in msg and "query_1.jpg" not in msg
  assert len(info.value.paths) == 27
  assert len(ds.check_images(skip_missing=True)) == 27


def test_load_gnd_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="gnd_rtiny.pkl"):
    revisited.RevisitedDataset(tmp_path, NAME)
  path = tmp_path / "gnd_bad.pkl"
  with open(path, "wb") as f:
    pickle.dump({"imlist": ["a"], "qimlist": []}, f)
  with pytest.raises(ValueError, match=r"gnd_bad\.pkl.*'gnd'"):
    revisited.load_gnd(path)
  path.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="gnd_bad.pkl"):
    revisited.load_gnd(path)
  with open(path, "wb") as f:
    pickle.dump({"imlist": ["a"], "qimlist": ["q"],
                 "gnd": [{"easy": [3], "bbx": [0, 0, 1, 1]}]}, f)
  with pytest.raises(ValueError, match="outside"):
    revisited.load_gnd(path)


def test_distractor_paths(tmp_path):
  lst = tmp_path / "revisitop1m.txt"
  lst.write_text("00/img_a.jpg\nimg_b\n\n  01/img_c.png  \n")
  paths = revisited.distractor_paths(lst, tmp_path / "jpg")
  assert paths == [str(tmp_path / "jpg" / "00/img_a.jpg"),
                   str(tmp_path / "jpg" / "img_b.jpg"),
                   str(tmp_path / "jpg" / "01/img_c.png")]
  (tmp_path / "jpg" / "00").mkdir(parents=True)
  _write_jpeg(tmp_path / "jpg" / "00" / "img_a.jpg", 8, 8)
  bad = revisited.check_paths(paths, skip_missing=True)
  assert len(bad) == 2
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    revisited.distractor_paths(tmp_path / "nope.txt", tmp_path)
