"""qaff_jax.data.download against a local HTTP server (127.0.0.1) serving tiny archives
in the real GLDv2 and revisitop layouts: resume after a cut connection, checksum and
404 failures, the manifest, safe extraction, a full disk."""

import errno
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from qaff_jax.data import download
from qaff_jax.data import revisited


def _jpeg(seed: int, size=(24, 20)) -> bytes:
  arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG")
  return buf.getvalue()


def _tar(path, members: dict[str, bytes], mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, mode) as tf:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


# ---------------------------------------------------------------------------
# A local server: static files with Range support; optionally cuts a body once.


class _Handler(http.server.BaseHTTPRequestHandler):
  root = ""
  log: list = []
  cut_once: set = set()

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):
    path = os.path.join(self.root, self.path.lstrip("/"))
    self.log.append((self.path, self.headers.get("Range")))
    if not os.path.isfile(path):
      self.send_error(404)
      return
    with open(path, "rb") as f:
      data = f.read()
    start = 0
    rng = self.headers.get("Range")
    if rng and rng.startswith("bytes="):
      start = int(rng[len("bytes="):].split("-")[0])
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.path in self.cut_once:
      self.cut_once.discard(self.path)
      self.wfile.write(body[:len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
  root = tmp_path / "www"
  root.mkdir()
  handler = type("H", (_Handler,), {"root": str(root), "log": [], "cut_once": set()})
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield {"root": str(root), "url": f"http://127.0.0.1:{httpd.server_port}",
           "handler": handler}
  finally:
    httpd.shutdown()
    httpd.server_close()


GLD_IDS = {0: ["0a1b2c3d4e5f6071", "0a1f00000000aaaa"], 1: ["f0e1d2c3b4a59687"]}


def _gldv2_mirror(root: str, bad_md5: bool = False) -> dict[str, bytes]:
  """Two train tars (a/b/c/<id>.jpg members), their md5 files, train_clean.csv."""
  images = {}
  for i, ids in GLD_IDS.items():
    members = {}
    for k, image_id in enumerate(ids):
      data = _jpeg(10 * i + k)
      members[f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"] = data
      images[image_id] = data
    tar = os.path.join(root, f"google-landmark/train/images_{i:03d}.tar")
    _tar(tar, members)
    with open(tar, "rb") as f:
      digest = hashlib.md5(f.read()).hexdigest()
    if bad_md5 and i == 1:
      digest = "0" * 32
    _write(os.path.join(root, f"google-landmark/md5sum/train/md5.images_{i:03d}.txt"),
           f"{digest}  images_{i:03d}.tar\n".encode())
  _write(os.path.join(root, "google-landmark/metadata/train_clean.csv"),
         b"landmark_id,images\n7,0a1b2c3d4e5f6071 f0e1d2c3b4a59687\n3,0a1f00000000aaaa\n")
  return images


def _roxford_mirror(root: str) -> dict:
  """gnd_roxford5k.pkl made like qaff_jax.data.demo makes its gnd, and the jpg tgz."""
  imlist = ["all_souls_000001", "all_souls_000002", "ashmolean_000003"]
  qimlist = ["all_souls_000013"]
  cfg = {"imlist": imlist, "qimlist": qimlist,
         "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [1.0, 2.0, 15.0, 14.0]}]}
  _write(os.path.join(root, "revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"),
         pickle.dumps(cfg, protocol=4))
  members = {f"oxbuild_images/{n}.jpg": _jpeg(100 + k)
             for k, n in enumerate(imlist + qimlist)}
  _tar(os.path.join(root, "~vgg/data/oxbuildings/oxbuild_images-v1.tgz"), members, "w:gz")
  return cfg


def _get(handler, suffix):
  return [(p, r) for p, r in handler.log if p.endswith(suffix)]


# ---------------------------------------------------------------------------


def test_gldv2_resume_after_cut_connection_then_rerun_fetches_nothing(server, tmp_path):
  images = _gldv2_mirror(server["root"])
  out = str(tmp_path / "data")
  tar0 = "/google-landmark/train/images_000.tar"
  server["handler"].cut_once.add(tar0)

  # A run whose connection is cut mid-body and that may not retry: killed mid-file.
  results, status = download.download(["gldv2-clean"], out, base_url=server["url"],
                                       archives={0, 1}, retries=0, progress=False)
  failed = [r for r in results if not r.ok]
  assert [r.remote.dest for r in failed] == ["gldv2/archives/train/images_000.tar"]
  assert "images_000.tar" in failed[0].error
  part = os.path.join(out, "gldv2/archives/train/images_000.tar.part")
  partial = os.path.getsize(part)
  assert 0 < partial
  assert not os.path.exists(part[:-len(".part")])       # nothing half-written as complete
  manifest = download.load_manifest(out)
  assert "gldv2/archives/train/images_000.tar" not in manifest["files"]
  assert manifest["files"]["gldv2/archives/train/images_001.tar"]["extracted"]

  # The rerun resumes with a Range request and verifies the md5.
  results, status = download.download(["gldv2-clean"], out, base_url=server["url"],
                                       archives={0, 1}, retries=0, progress=False)
  assert all(r.ok for r in results), [r.error for r in results]
  assert (tar0, f"bytes={partial}-") in _get(server["handler"], "images_000.tar")
  entry = download.load_manifest(out)["files"]["gldv2/archives/train/images_000.tar"]
  assert entry["verified"] == "md5" and entry["extracted"] and entry["archive_deleted"]
  with open(os.path.join(server["root"], tar0.lstrip("/")), "rb") as f:
    assert entry["md5"] == hashlib.md5(f.read()).hexdigest()
  for image_id, data in images.items():
    path = os.path.join(out, "gldv2/train", image_id[0], image_id[1], image_id[2],
                        image_id + ".jpg")
    with open(path, "rb") as f:
      assert f.read() == data
  assert not os.path.exists(part)
  # Only archives 0 and 1 of 500: verified, but the dataset is not complete.
  assert not status["gldv2-clean"]["complete"]
  assert status["gldv2-clean"]["verified"] == 5   # csv + 2 x (md5 file + tar)

  # A third run fetches nothing; a deleted image makes its archive come back.
  n = len(server["handler"].log)
  results, _ = download.download(["gldv2-clean"], out, base_url=server["url"],
                                 archives={0, 1}, progress=False)
  assert {r.action for r in results} == {"present"} and len(server["handler"].log) == n
  os.remove(os.path.join(out, "gldv2/train/f/0/e/f0e1d2c3b4a59687.jpg"))
  results, _ = download.download(["gldv2-clean"], out, base_url=server["url"],
                                 archives={0, 1}, progress=False)
  assert [r.remote.dest for r in results if r.action == "downloaded"] == [
      "gldv2/archives/train/images_001.tar"]
  assert os.path.isfile(os.path.join(out, "gldv2/train/f/0/e/f0e1d2c3b4a59687.jpg"))


def test_checksum_mismatch_names_the_file_and_leaves_nothing(server, tmp_path, capsys):
  _gldv2_mirror(server["root"], bad_md5=True)
  out = str(tmp_path / "data")
  code = download.main(["gldv2-clean", "--out", out, "--base_url", server["url"],
                        "--archives", "0-1", "--no_progress"])
  assert code == 1
  err = capsys.readouterr().err
  assert "gldv2/archives/train/images_001.tar: MD5" in err and "does not match" in err
  assert "md5.images_001.txt" in err
  assert not os.path.exists(os.path.join(out, "gldv2/archives/train/images_001.tar"))
  assert not os.path.exists(os.path.join(out, "gldv2/archives/train/images_001.tar.part"))
  assert not os.path.exists(os.path.join(out, "gldv2/train/f"))
  manifest = download.load_manifest(out)
  assert "gldv2/archives/train/images_001.tar" not in manifest["files"]
  assert manifest["files"]["gldv2/archives/train/images_000.tar"]["extracted"]


def test_404_names_the_file(server, tmp_path, capsys):
  _gldv2_mirror(server["root"])
  os.remove(os.path.join(server["root"], "google-landmark/train/images_001.tar"))
  out = str(tmp_path / "data")
  code = download.main(["gldv2-clean", "--out", out, "--base_url", server["url"],
                        "--archives", "1", "--no_progress", "--retries", "0"])
  assert code == 1
  err = capsys.readouterr().err
  assert "gldv2/archives/train/images_001.tar: HTTP 404 Not Found" in err
  assert "/google-landmark/train/images_001.tar" in err


def test_revisitop_verified_by_restricted_unpickler_and_image_check(server, tmp_path):
  cfg = _roxford_mirror(server["root"])
  out = str(tmp_path / "data")
  results, status = download.download(["roxford5k"], out, base_url=server["url"],
                                      workers=2, progress=False)
  assert all(r.ok for r in results), [r.error for r in results]
  st = status["roxford5k"]
  assert st["complete"] and st["images"] == 4 and st["images_missing"] == 0
  gnd_path = os.path.join(out, "revisitop/roxford5k/gnd_roxford5k.pkl")
  with open(gnd_path, "rb") as f:
    assert st["gnd_sha256"] == hashlib.sha256(f.read()).hexdigest()
  entry = download.load_manifest(out)["files"]["revisitop/roxford5k/gnd_roxford5k.pkl"]
  assert entry["verified"].startswith("gnd-load") and entry["n_db"] == 3
  tar_entry = download.load_manifest(out)["files"]["revisitop/archives/oxbuild_images-v1.tgz"]
  assert tar_entry["verified"] == "tar-read" and tar_entry["members"] == 4
  ds = revisited.RevisitedDataset(os.path.join(out, "revisitop"), "roxford5k")
  assert ds.imlist == cfg["imlist"] and ds.check_images() == []
  assert download.dataset_status(out, "roxford5k")["complete"]


def test_a_malicious_gnd_pickle_is_refused(server, tmp_path):
  _roxford_mirror(server["root"])

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))

  _write(os.path.join(server["root"], "revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"),
         pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": Evil()}))
  out = str(tmp_path / "data")
  results, status = download.download(["roxford5k"], out, base_url=server["url"],
                                      progress=False)
  bad = [r for r in results if not r.ok]
  assert len(bad) == 1 and "gnd_roxford5k.pkl" in bad[0].error
  assert "refusing to unpickle" in bad[0].error
  assert not os.path.exists(os.path.join(out, "revisitop/roxford5k/gnd_roxford5k.pkl"))
  assert not status["roxford5k"]["complete"]


@pytest.mark.parametrize("name,link", [
    ("../evil.jpg", None), ("/abs/evil.jpg", None), ("a/../../evil.jpg", None),
    ("a/link.jpg", "../../outside.jpg"), ("a/link.jpg", "/etc/passwd")])
def test_safe_extract_refuses_escaping_members(tmp_path, name, link):
  archive = str(tmp_path / "bad.tar")
  with tarfile.open(archive, "w") as tf:
    ok = tarfile.TarInfo("a/fine.jpg")
    ok.size = 3
    tf.addfile(ok, io.BytesIO(b"abc"))
    info = tarfile.TarInfo(name)
    if link is None:
      info.size = 4
      tf.addfile(info, io.BytesIO(b"evil"))
    else:
      info.type = tarfile.SYMTYPE
      info.linkname = link
      tf.addfile(info)
  dest = tmp_path / "dest"
  with pytest.raises(download.UnsafeArchiveError, match="refused"):
    download.safe_extract(archive, str(dest))
  assert not os.path.exists(dest / "a" / "fine.jpg")   # the earlier member is removed
  assert not os.path.exists(tmp_path / "evil.jpg")
  assert not os.path.lexists(dest / "a" / "link.jpg")


def test_full_disk_is_reported_with_the_file_and_the_part_kept(server, tmp_path,
                                                               monkeypatch):
  _gldv2_mirror(server["root"])
  out = str(tmp_path / "data")
  real_open = open

  class Full:
    def __init__(self, f):
      self.f = f

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.f.close()

  def fake_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if str(path).endswith("images_000.tar.part") and ("w" in mode or "a" in mode):
      return Full(f)
    return f

  monkeypatch.setattr(download, "open", fake_open, raising=False)
  results, _ = download.download(["gldv2-clean"], out, base_url=server["url"],
                                 archives={0}, progress=False, retries=0)
  bad = [r for r in results if not r.ok]
  assert len(bad) == 1
  assert "images_000.tar.part: no space left on device" in bad[0].error
  assert "rerun" in bad[0].error
  assert not os.path.exists(os.path.join(out, "gldv2/archives/train/images_000.tar"))
  monkeypatch.undo()
  results, _ = download.download(["gldv2-clean"], out, base_url=server["url"],
                                 archives={0}, progress=False)
  assert all(r.ok for r in results)


def test_official_file_lists():
  files = download.official_files("gldv2-clean")
  tars = [f for f in files if f.kind == "tar"]
  assert len(tars) == 500 and tars[-1].url == (
      "https://s3.amazonaws.com/google-landmark/train/images_499.tar")
  assert tars[0].md5_file == "gldv2/archives/train/md5.images_000.txt"
  md5 = [f for f in files if f.kind == "md5"]
  assert md5[7].url == "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_007.txt"
  assert files[0].url == "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv"
  assert len([f for f in download.official_files("gldv2-index") if f.kind == "tar"]) == 100
  assert len([f for f in download.official_files("gldv2-test") if f.kind == "tar"]) == 20
  r1m = [f for f in download.official_files("revisitop1m") if f.kind == "tar"]
  assert len(r1m) == 100 and r1m[0].url.endswith("/revisitop1m/jpg/revisitop1m.1.tar.gz")
  par = download.official_files("rparis6k")
  assert par[0].url == "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl"
  assert [f.url.rsplit("/", 1)[1] for f in par[1:]] == ["paris_1-v1.tgz", "paris_2-v1.tgz"]
  assert download.mirror_url(tars[0].url, "http://127.0.0.1:9/") == (
      "http://127.0.0.1:9/google-landmark/train/images_000.tar")
  assert download.parse_archives("0-2,7") == {0, 1, 2, 7}


def test_cli_usage(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    download.main(["--help"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    download.main(["nope", "--out", str(tmp_path)])
  assert e.value.code == 2
  assert capsys.readouterr().err.count("\n") == 1
  assert download.main(["roxford5k", "--out", str(tmp_path), "--list"]) == 0
  assert "gnd_roxford5k.pkl" in capsys.readouterr().out
