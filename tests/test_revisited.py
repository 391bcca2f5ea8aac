"""Tests for the revisitop-layout dataset reader."""

import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import revisited

NAME = "rtiny"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_read_gnd_scores_by_hand_under_the_three_protocols(tmp_path):
  # The reader's gnd (lists and arrays in the pickle) straight into the metric.
  # Query 0 (easy 0, hard 1, junk 2) ranks 2 3 0 1 4:
  #   E: junk {2, 1} dropped -> 3 0 4: 0 at position 1, AP (0 + 1/2)/2 = 1/4.
  #   M: junk {2} -> 3 0 1 4: positives at 1, 2: 1/8 + (1/2 + 2/3)/4 = 5/12.
  #   H: junk {2, 0} -> 3 1 4: 1 at position 1: AP 1/4.
  # Query 1 (easy 2, no hard, junk 0) ranks 0 2 4 3 1: junk 0 dropped, so
  # E = M = 1; H: no positives, left out of the mean.
  from qaff_jax.evaluation import metrics
  _make_dataset(tmp_path, n_db=5, write_images=False)
  ds = revisited.RevisitedDataset(tmp_path, NAME)
  ranks = np.array([[2, 3, 0, 1, 4], [0, 2, 4, 3, 1]]).T
  res = metrics.evaluate_revisited(ranks, ds.gnd, kappas=(1,))
  assert res["mAP_E"] == pytest.approx((1 / 4 + 1) / 2, abs=1e-12)
  assert res["mAP_M"] == pytest.approx((5 / 12 + 1) / 2, abs=1e-12)
  assert res["mAP_H"] == pytest.approx(1 / 4, abs=1e-12)
  assert res["mP@1_E"] == 0.5 and res["mP@1_H"] == 0.0
  assert res["per_query"]["H"][0] == pytest.approx(1 / 4)
  assert np.isnan(res["per_query"]["H"][1])


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


# --------------------------------------------------------------------------
# Ground-truth pickles come from the web: only data may come out of them.


class _Payload:
  """Pickles as a call of `func(*args)`: what a malicious gnd file carries."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _genuine_gnd():
  """The revisitop layout: numpy int index arrays, numpy float bbx."""
  return {
      "imlist": ["db_0", "db_1", "db_2"],
      "qimlist": ["q_0", "q_1"],
      "gnd": [
          {"easy": np.array([0, 2], np.int64), "hard": np.array([1], np.int64),
           "junk": np.array([], np.int64),
           "bbx": np.array([1.5, 2.5, 10.25, 12.75], np.float64)},
          {"easy": np.array([1], np.int32), "hard": np.array([], np.int64),
           "junk": np.array([0, 2], np.int64), "bbx": np.array([0, 0, 8, 6], np.float32)},
      ],
      # Not in revisitop files, but plain data the loader must pass through.
      "extra": {"set": {1, 2}, "complex": 1 + 2j, "bytes": b"\x00\xff",
                "scalar": np.int64(7), "float": np.float32(0.5), "none": None},
  }


def _check_genuine(cfg):
  assert cfg["imlist"] == ["db_0", "db_1", "db_2"] and cfg["qimlist"] == ["q_0", "q_1"]
  g0, g1 = cfg["gnd"]
  assert g0["easy"].dtype == np.int64 and g0["easy"].tolist() == [0, 2]
  assert g0["hard"].tolist() == [1] and g0["junk"].size == 0
  assert g0["bbx"] == (1.5, 2.5, 10.25, 12.75)
  assert g1["easy"].dtype == np.int64 and g1["junk"].tolist() == [0, 2]
  assert g1["bbx"] == (0.0, 0.0, 8.0, 6.0)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_genuine_gnd_pickle_loads_under_each_protocol(tmp_path, protocol):
  path = tmp_path / f"gnd_p{protocol}.pkl"
  with open(path, "wb") as f:
    pickle.dump(_genuine_gnd(), f, protocol=protocol)
  cfg = revisited.load_gnd(path)
  _check_genuine(cfg)
  extra = cfg["extra"]
  assert extra["set"] == {1, 2} and extra["complex"] == 1 + 2j
  assert extra["bytes"] == b"\x00\xff" and extra["none"] is None
  assert extra["scalar"] == 7 and isinstance(extra["scalar"], np.int64)
  assert extra["float"] == 0.5 and isinstance(extra["float"], np.float32)


def _py2_int_array(values):
  """An int64 array pickled the way Python 2 numpy 1.x does (protocol 2).

  Names `numpy.core.multiarray`, and stores the array data as a Python 2 byte
  string (SHORT_BINSTRING), which Python 3 can only decode with latin-1.
  """
  data = np.asarray(values, "<i8").tobytes()

  def glob(module, name):
    return b"c" + module + b"\n" + name + b"\n"

  def bstr(b):
    return b"U" + bytes([len(b)]) + b
  dtype = (glob(b"numpy", b"dtype") + bstr(b"i8") + b"K\x00K\x01\x87R"
           + b"(K\x03" + bstr(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
  return (glob(b"numpy.core.multiarray", b"_reconstruct") + glob(b"numpy", b"ndarray")
          + b"K\x00\x85" + bstr(b"b") + b"\x87R"
          + b"(K\x01K" + bytes([len(values)]) + b"\x85" + dtype + b"\x89"
          + b"T" + struct.pack("<I", len(data)) + data + b"tb")


def test_python2_gnd_pickle_loads_with_latin1(tmp_path):
  def ustr(s):
    return b"X" + struct.pack("<I", len(s)) + s.encode()
  # {'imlist': [...], 'qimlist': ['q'], 'gnd': [{'easy': array, 'bbx': [...]}]}
  body = (b"}(" + ustr("imlist") + b"]" + b"(" + b"".join(ustr(f"db_{i}") for i in range(250))
          + b"e" + ustr("qimlist") + b"]" + ustr("q") + b"a"
          + ustr("gnd") + b"]}(" + ustr("easy") + _py2_int_array([3, 200, 249])
          + ustr("bbx") + b"](G" + struct.pack(">d", 1.0) + b"G" + struct.pack(">d", 2.0)
          + b"G" + struct.pack(">d", 3.0) + b"G" + struct.pack(">d", 4.0) + b"eua" + b"u.")
  path = tmp_path / "gnd_py2.pkl"
  path.write_bytes(b"\x80\x02" + body)
  with pytest.raises(UnicodeDecodeError):  # why the latin-1 retry is needed
    pickle.loads(path.read_bytes())
  cfg = revisited.load_gnd(path)
  assert len(cfg["imlist"]) == 250 and cfg["qimlist"] == ["q"]
  (g,) = cfg["gnd"]
  assert g["easy"].tolist() == [3, 200, 249] and g["bbx"] == (1.0, 2.0, 3.0, 4.0)
  assert g["hard"].size == 0 and g["junk"].size == 0


def _evil_gnd(payload):
  """A well-formed gnd dict with `payload` hidden in one entry."""
  gnd = _genuine_gnd()
  gnd["gnd"][1]["bbx"] = payload
  return gnd


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_carrying_gnd_pickle_is_refused_unrun(tmp_path, protocol):
  marker = tmp_path / "pwned"
  path = tmp_path / "gnd_evil.pkl"
  with open(path, "wb") as f:
    pickle.dump(_evil_gnd(_Payload(os.system, f"touch {marker}")), f, protocol=protocol)
  with pytest.raises(ValueError) as info:
    revisited.load_gnd(path)
  msg = str(info.value)
  # os.system pickles under its defining module (posix on Linux).
  assert str(path) in msg and f"{os.system.__module__}.system" in msg
  assert not marker.exists()


@pytest.mark.parametrize("func, args, name", [
    (subprocess.Popen, (["true"],), "subprocess.Popen"),
    (eval, ("1 + 1",), "eval"),
    (getattr, (dict, "fromkeys"), "getattr"),  # reaching through an allowed type
    (np.load, ("x.npy",), "load"),
])
@pytest.mark.parametrize("protocol", [2, 4])
def test_other_callables_are_refused(tmp_path, func, args, name, protocol):
  path = tmp_path / "gnd_evil.pkl"
  with open(path, "wb") as f:
    pickle.dump(_evil_gnd(_Payload(func, *args)), f, protocol=protocol)
  with pytest.raises(ValueError, match="refusing to unpickle global") as info:
    revisited.load_gnd(path)
  assert "gnd_evil.pkl" in str(info.value) and name in str(info.value)
  if func is eval:  # written as builtins.eval, or __builtin__.eval below protocol 3
    assert ("builtins.eval" if protocol >= 3 else "__builtin__.eval") in str(info.value)


def test_codecs_encode_is_latin1_only(tmp_path):
  # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, 'latin1');
  # any other codec (e.g. zlib, base64) is refused.
  raw = pickle.dumps(_genuine_gnd(), protocol=2)
  assert b"_codecs" in raw and b"latin1" in raw
  evil = raw.replace(b"latin1", b"base64", 1)  # same length: still well formed
  path = tmp_path / "gnd_codec.pkl"
  path.write_bytes(evil)
  with pytest.raises(ValueError, match=r"gnd_codec\.pkl.*latin-1.*'base64'"):
    revisited.load_gnd(path)


def test_evaluate_cli_refuses_evil_gnd_in_one_line(tmp_path):
  marker = tmp_path / "pwned"
  gnd = tmp_path / "evil.pkl"
  with open(gnd, "wb") as f:
    pickle.dump(_evil_gnd(_Payload(os.system, f"touch {marker}")), f, protocol=4)
  ranks = tmp_path / "R.npy"
  np.save(ranks, np.tile(np.arange(3)[:, None], (1, 2)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "qaff_jax.evaluate", "--ranks", str(ranks), "--gnd", str(gnd),
       "--out", str(tmp_path / "rep")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert not marker.exists()
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: ")
  assert "evil.pkl" in lines[-1] and "system" in lines[-1]
  assert proc.stdout == ""
