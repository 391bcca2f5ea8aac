r"""Downloads GLDv2 and the revisitop test sets, verified, resumable, in parallel.

python -m qaff_jax.data.download gldv2-clean roxford5k rparis6k --out /data \
    [--workers 8] [--archives 0-9] [--keep_archives] [--base_url http://mirror]

Datasets and their official files (URLs as published by the dataset authors):

  gldv2-clean  https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv and
               train/images_{000..499}.tar, each checked against
               md5sum/train/md5.images_{000..499}.txt (cvdfoundation/google-landmark
               README, "Checking the download"; the md5 files are fetched first).
  gldv2-index  metadata/index.csv, index_image_to_landmark.csv,
               index_label_to_category.csv; index/images_{000..099}.tar (+ md5 files).
  gldv2-test   metadata/test.csv, ground_truth/{recognition,retrieval}_solution_v2.1.csv;
               test/images_{000..019}.tar (+ md5 files).
  roxford5k    http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl
               and https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz
               (the sources filipradenovic/revisitop python/download.py uses).
  rparis6k     .../datasets/rparis6k/gnd_rparis6k.pkl and
               https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{1,2}-v1.tgz.
  revisitop1m  http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{1..100}.tar.gz
               and the image list revisitop1m.txt beside jpg/.

Verification: GLDv2 archives by their published MD5. revisitop publishes no checksums,
so its archives are verified by reading every member to the end (tar framing and the
gzip CRC), a gnd pickle by loading it with the project's restricted unpickler
(`revisited.load_gnd`), and a test set as a whole by finding every image its gnd lists
in jpg/; their SHA-256 goes into the manifest (the protocol fingerprint of
`qaff_jax.reproduce` reads it). CSVs are checked for their documented header.

Layout under --out:
  manifest.json                         what is present and verified (written atomically)
  gldv2/metadata/*.csv                  GLDv2 CSVs (ground_truth/ files too)
  gldv2/{train,index,test}/a/b/c/id.jpg extracted images (the tar layout)
  gldv2/archives/<split>/               md5 files; tars while not yet extracted
  revisitop/<name>/gnd_<name>.pkl, revisitop/<name>/jpg/<id>.jpg   (ROxf/RPar, flat as
                                        revisitop's download.py leaves them)
  revisitop/revisitop1m/jpg/...         R1M images in the archives' folders
  revisitop/revisitop1m/revisitop1m.txt

Every file downloads into `<file>.part` with HTTP Range requests (a killed run goes on
from where it stopped); only a verified file is renamed into place. Archives are
extracted member by member (`<member>.part`, then rename), refusing absolute paths,
'..', links that leave the folder and device files; an archive counts as done only once
fully extracted, and is then deleted unless --keep_archives (its member list stays, so
a re-run checks the images are still there). A re-run fetches only what is missing or
bad. `--base_url URL` fetches every file from URL + the official URL's path (a mirror
or a test server). The standard library's urllib is used: Range requests and streaming
need nothing more, and no new dependency.

Exit status: 0 when everything asked for is present and verified, 1 when a file failed
(each named, with the reason: HTTP 404, checksum mismatch, full disk, ...), 2 for a
usage error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Any, Callable, Sequence

from qaff_jax import cli_util

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
USER_AGENT = "qaff_jax-download/1"
CHUNK = 1 << 20

GLDV2 = "https://s3.amazonaws.com/google-landmark"
REVISITOP_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"

# Documented first lines of the GLDv2 CSVs (cvdfoundation/google-landmark README).
CSV_HEADERS = {
    "train_clean.csv": "landmark_id,images",
    "train.csv": "id,url,landmark_id",
    "index.csv": "id",
    "index_image_to_landmark.csv": "id,landmark_id",
    "index_label_to_category.csv": "landmark_id,category",
    "test.csv": "id",
    "recognition_solution_v2.1.csv": "id,landmarks,Usage",
    "retrieval_solution_v2.1.csv": "id,images,Usage",
}


# ---------------------------------------------------------------------------
# Errors: each names the file.


class DownloadError(RuntimeError):
  """A file could not be fetched or verified; the message names it."""


class NotFoundError(DownloadError):
  """HTTP 404."""


class ChecksumError(DownloadError):
  """The downloaded bytes do not match the published checksum."""


class DiskFullError(DownloadError):
  """ENOSPC while writing; the partial file is kept for resuming."""


class UnsafeArchiveError(DownloadError):
  """An archive member would land outside its folder (or is a device file)."""


# ---------------------------------------------------------------------------
# The official file lists.


@dataclasses.dataclass(frozen=True)
class Remote:
  """One file to fetch.

  Attributes:
    dest: path under --out.
    url: the official URL.
    kind: 'tar' (an archive), 'md5' (a GLDv2 md5 file), 'csv', 'gnd', 'list'.
    dataset: which dataset lists it.
    md5_file: for a GLDv2 tar, the `dest` of its md5 file.
    extract_to: for an archive, the folder (under --out) it unpacks into.
    flatten: unpack members by file name only (revisitop's ROxf/RPar jpg/ folders).
    index: the archive number in its file name (for --archives).
  """
  dest: str
  url: str
  kind: str
  dataset: str
  md5_file: str | None = None
  extract_to: str | None = None
  flatten: bool = False
  index: int | None = None


_GLDV2_SPLITS = {  # dataset: (split, number of tars, metadata files)
    "gldv2-clean": ("train", 500, ("metadata/train_clean.csv",)),
    "gldv2-index": ("index", 100, ("metadata/index.csv",
                                   "metadata/index_image_to_landmark.csv",
                                   "metadata/index_label_to_category.csv")),
    "gldv2-test": ("test", 20, ("metadata/test.csv",
                                "ground_truth/recognition_solution_v2.1.csv",
                                "ground_truth/retrieval_solution_v2.1.csv")),
}
DATASETS = ("gldv2-clean", "gldv2-index", "gldv2-test", "roxford5k", "rparis6k",
            "revisitop1m")
R1M_ARCHIVES = 100


def _gldv2_files(dataset: str) -> list[Remote]:
  split, n, metadata = _GLDV2_SPLITS[dataset]
  out = [Remote(f"gldv2/metadata/{posixpath.basename(m)}", f"{GLDV2}/{m}", "csv", dataset)
         for m in metadata]
  for i in range(n):
    md5 = f"gldv2/archives/{split}/md5.images_{i:03d}.txt"
    out.append(Remote(md5, f"{GLDV2}/md5sum/{split}/md5.images_{i:03d}.txt", "md5",
                      dataset, index=i))
    out.append(Remote(f"gldv2/archives/{split}/images_{i:03d}.tar",
                      f"{GLDV2}/{split}/images_{i:03d}.tar", "tar", dataset, md5_file=md5,
                      extract_to=f"gldv2/{split}", index=i))
  return out


def _revisited_files(name: str) -> list[Remote]:
  if name == "roxford5k":
    archives = [f"{OXFORD}/oxbuild_images-v1.tgz"]
  else:
    archives = [f"{PARIS}/paris_1-v1.tgz", f"{PARIS}/paris_2-v1.tgz"]
  out = [Remote(f"revisitop/{name}/gnd_{name}.pkl",
                f"{REVISITOP_GND}/{name}/gnd_{name}.pkl", "gnd", name)]
  for i, url in enumerate(archives):
    out.append(Remote(f"revisitop/archives/{posixpath.basename(url)}", url, "tar", name,
                      extract_to=f"revisitop/{name}/jpg", flatten=True, index=i))
  return out


def _r1m_files() -> list[Remote]:
  out = [Remote("revisitop/revisitop1m/revisitop1m.txt", f"{R1M}/revisitop1m.txt", "list",
                "revisitop1m")]
  for i in range(1, R1M_ARCHIVES + 1):
    out.append(Remote(f"revisitop/archives/revisitop1m.{i}.tar.gz",
                      f"{R1M}/jpg/revisitop1m.{i}.tar.gz", "tar", "revisitop1m",
                      extract_to="revisitop/revisitop1m/jpg", index=i))
  return out


def official_files(dataset: str) -> list[Remote]:
  """Every file of `dataset` (one of `DATASETS`), small files first."""
  if dataset in _GLDV2_SPLITS:
    return _gldv2_files(dataset)
  if dataset in ("roxford5k", "rparis6k"):
    return _revisited_files(dataset)
  if dataset == "revisitop1m":
    return _r1m_files()
  raise ValueError(f"unknown dataset {dataset!r}; choose from {list(DATASETS)}")


def parse_archives(spec: str | None) -> set[int] | None:
  """'0-9,42' -> {0..9, 42}; None or '' -> None (all)."""
  if not spec:
    return None
  picked = set()
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    lo, dash, hi = part.partition("-")
    try:
      a, b = int(lo), int(hi) if dash else int(lo)
    except ValueError:
      raise ValueError(f"--archives {spec!r}: want numbers and ranges like 0-9,42") from None
    if b < a:
      raise ValueError(f"--archives {spec!r}: range {part} runs backwards")
    picked.update(range(a, b + 1))
  return picked


def mirror_url(url: str, base_url: str | None) -> str:
  """`url` on the mirror `base_url` (same path), or `url` itself."""
  if not base_url:
    return url
  return base_url.rstrip("/") + urllib.parse.urlsplit(url).path


# ---------------------------------------------------------------------------
# The manifest.


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class Manifest:
  """`<out>/manifest.json`: {files: {dest: entry}, datasets: {name: status}}.

  Thread-safe; every change is written at once (atomically), so a killed run
  leaves a manifest that lists exactly what was verified before it died.
  """

  def __init__(self, root: str):
    self.root = root
    os.makedirs(root, exist_ok=True)
    self.path = os.path.join(root, MANIFEST)
    self._lock = threading.Lock()
    self.data = load_manifest(root) or {"version": MANIFEST_VERSION, "files": {},
                                        "datasets": {}}

  def entry(self, dest: str) -> dict | None:
    with self._lock:
      e = self.data["files"].get(dest)
      return dict(e) if e else None

  def set(self, dest: str, entry: dict | None) -> None:
    with self._lock:
      if entry is None:
        self.data["files"].pop(dest, None)
      else:
        self.data["files"][dest] = entry
      _write_json_atomic(self.path, self.data)

  def set_dataset(self, name: str, status: dict) -> None:
    with self._lock:
      self.data["datasets"][name] = status
      _write_json_atomic(self.path, self.data)


def load_manifest(root: str) -> dict | None:
  """The manifest under `root`, or None when there is none.

  Raises ValueError for a manifest that is not valid JSON (names it).
  """
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable manifest ({e})") from None
  if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
    raise ValueError(f"{path}: not a version-{MANIFEST_VERSION} download manifest")
  data.setdefault("files", {})
  data.setdefault("datasets", {})
  return data


def dataset_status(root: str, dataset: str) -> dict:
  """What the manifest says of `dataset`: {'complete': bool, ...}; not complete if absent."""
  data = load_manifest(root) or {"datasets": {}}
  return data["datasets"].get(dataset) or {"complete": False,
                                           "reason": "not in the manifest"}


# ---------------------------------------------------------------------------
# Fetching one file.


def file_digest(path: str, name: str = "sha256") -> str:
  """The hex digest of a file, read in chunks."""
  return _hash_file(path, name)[name].hexdigest()


def _hash_file(path: str, *names: str) -> dict[str, Any]:
  hashers = {n: hashlib.new(n) for n in names}
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      for h in hashers.values():
        h.update(chunk)
  return hashers


def _disk_full(path: str, err: OSError) -> DiskFullError:
  folder = os.path.dirname(os.path.abspath(path))
  try:
    free = shutil.disk_usage(folder).free
  except OSError:
    free = -1
  return DiskFullError(f"{path}: no space left on device ({err.strerror}; {free} bytes "
                       f"free in {folder}); free some space and rerun: the download "
                       f"resumes where it stopped")


_RETRYABLE = (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
              http.client.HTTPException)


def fetch(url: str, dest: str, *, on_bytes: Callable[[int], None] | None = None,
          timeout: float = 60.0, retries: int = 5, backoff: float = 1.0,
          hashes: Sequence[str] = ("md5", "sha256"),
          stop: threading.Event | None = None) -> tuple[str, int, dict[str, str]]:
  """Downloads `url` into `dest + '.part'`, resuming what is there.

  Returns:
    (the .part path, its size, {hash name: hex digest}); the caller verifies
    and renames it.

  Raises:
    NotFoundError (HTTP 404), DiskFullError (ENOSPC; the .part stays),
    DownloadError (other HTTP errors, or `retries` failed attempts).
  """
  part = dest + ".part"
  os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
  last_error: Exception | None = None
  for attempt in range(retries + 1):
    if stop is not None and stop.is_set():
      raise DownloadError(f"{dest}: stopped (another file failed with a full disk)")
    if attempt:
      time.sleep(backoff * 2 ** (attempt - 1))
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
      headers["Range"] = f"bytes={offset}-"
    try:
      resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout)
    except urllib.error.HTTPError as e:
      if e.code == 416 and offset:  # nothing after `offset`: complete, or a bad .part
        total = _content_range_total(e.headers.get("Content-Range", ""))
        if total == offset:
          return part, offset, {n: h.hexdigest() for n, h in _hash_file(part, *hashes).items()}
        os.remove(part)
        last_error = DownloadError(f"{dest}: partial file larger than {url}; restarted")
        continue
      if e.code == 404:
        raise NotFoundError(f"{dest}: HTTP 404 Not Found: {url}") from None
      if 500 <= e.code < 600:
        last_error = DownloadError(f"{dest}: HTTP {e.code} {e.reason}: {url}")
        continue
      raise DownloadError(f"{dest}: HTTP {e.code} {e.reason}: {url}") from None
    except _RETRYABLE as e:
      last_error = DownloadError(f"{dest}: {type(e).__name__}: {e} ({url})")
      continue
    with resp:
      if offset and resp.status == 206:
        start = _content_range_start(resp.headers.get("Content-Range", ""))
        if start != offset:
          os.remove(part)
          last_error = DownloadError(f"{dest}: server resumed at {start}, not {offset}")
          continue
        mode = "ab"
      else:  # 200: the whole file (the server ignored the Range header)
        offset, mode = 0, "wb"
      length = resp.headers.get("Content-Length")
      expected = offset + int(length) if length is not None else None
      hashers = (_hash_file(part, *hashes) if mode == "ab"
                 else {n: hashlib.new(n) for n in hashes})
      size = offset
      try:
        with open(part, mode) as f:
          while True:
            if stop is not None and stop.is_set():
              raise DownloadError(f"{dest}: stopped (another file failed with a full disk)")
            chunk = resp.read(CHUNK)
            if not chunk:
              break
            f.write(chunk)
            for h in hashers.values():
              h.update(chunk)
            size += len(chunk)
            if on_bytes is not None:
              on_bytes(len(chunk))
      except OSError as e:
        if e.errno == errno.ENOSPC:
          raise _disk_full(part, e) from None
        if isinstance(e, _RETRYABLE):
          last_error = DownloadError(f"{dest}: connection lost at byte {size}: {e} ({url})")
          continue
        raise DownloadError(f"{dest}: {e}") from None
      except _RETRYABLE as e:  # http.client.IncompleteRead and friends
        last_error = DownloadError(f"{dest}: connection lost at byte {size}: "
                                   f"{type(e).__name__} ({url})")
        continue
    if expected is not None and size != expected:
      last_error = DownloadError(f"{dest}: got {size} of {expected} bytes ({url})")
      continue
    return part, size, {n: h.hexdigest() for n, h in hashers.items()}
  raise DownloadError(f"{dest}: gave up after {retries + 1} attempts; last: {last_error}")


def _content_range_start(value: str) -> int | None:
  m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
  return int(m.group(1)) if m else None


def _content_range_total(value: str) -> int | None:
  m = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", value.strip())
  return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------
# Verification.


def parse_md5_file(path: str) -> str:
  """The checksum in a GLDv2 md5 file (`md5sum` output: '<32 hex>  images_000.tar')."""
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read().strip()
  token = text.split()[0].lower() if text else ""
  if not re.fullmatch(r"[0-9a-f]{32}", token):
    raise DownloadError(f"{path}: not an md5 file (want '<32 hex digits>  <file>', "
                        f"got {text[:60]!r})")
  return token


def verify_tar(path: str) -> int:
  """Reads every member of the archive to the end; returns the member count.

  Catches a truncated or corrupted archive (tar framing, gzip CRC) without
  extracting anything. Raises DownloadError naming the file.
  """
  count = 0
  try:
    with tarfile.open(path, "r:*") as tf:
      for member in tf:
        count += 1
        if member.isfile():
          src = tf.extractfile(member)
          while src.read(CHUNK):
            pass
  except (tarfile.TarError, OSError, EOFError, ValueError) as e:
    raise DownloadError(f"{path}: corrupt or truncated archive ({type(e).__name__}: "
                        f"{e})") from None
  if count == 0:
    raise DownloadError(f"{path}: archive holds no members")
  return count


def verify_gnd(path: str) -> dict:
  """Loads a revisitop ground truth with the restricted unpickler; its counts."""
  from qaff_jax.data import revisited  # noqa: PLC0415 (numpy + PIL; only when needed)
  try:
    gnd = revisited.load_gnd(path)
  except (ValueError, FileNotFoundError) as e:
    raise DownloadError(f"{path}: not a usable revisitop ground truth: {e}") from None
  return {"n_db": len(gnd["imlist"]), "n_queries": len(gnd["qimlist"])}


def verify_csv(path: str) -> str:
  """Checks a GLDv2 CSV's first line against its documented header."""
  with open(path, "rb") as f:
    first = f.readline().decode("utf-8", "replace").strip().lstrip("\ufeff")
  want = CSV_HEADERS.get(os.path.basename(path))
  if want is not None and first != want:
    raise DownloadError(f"{path}: header {first!r}, expected {want!r}")
  if not first:
    raise DownloadError(f"{path}: empty file")
  return first


# ---------------------------------------------------------------------------
# Safe extraction.


def _member_name(archive: str, member: tarfile.TarInfo) -> str:
  name = member.name
  parts = name.replace("\\", "/").split("/")
  if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
    raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refused")
  if ".." in parts:
    raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refused")
  return posixpath.normpath("/".join(p for p in parts if p not in ("", ".")))


def safe_extract(archive: str, dest_dir: str, *, flatten: bool = False,
                 on_bytes: Callable[[int], None] | None = None) -> list[list]:
  """Extracts `archive` into `dest_dir`; returns [[relative path, size], ...].

  Each file is written as `<path>.part` and renamed when complete. Refused
  (UnsafeArchiveError, and what this archive extracted so far is removed):
  absolute paths, '..', links leaving `dest_dir` (or any link when
  `flatten`), device files and FIFOs. `flatten` keeps only each file's name
  (revisitop's ROxf/RPar jpg/ folders). Python's `tarfile.data_filter` checks
  every member as well.
  """
  dest_dir = os.path.abspath(dest_dir)
  os.makedirs(dest_dir, exist_ok=True)
  written: list[list] = []

  def target_of(rel: str) -> str:
    return os.path.join(dest_dir, posixpath.basename(rel) if flatten else rel)

  try:
    with tarfile.open(archive, "r:*") as tf:
      for member in tf:
        rel = _member_name(archive, member)
        try:
          tarfile.data_filter(member, dest_dir)
        except tarfile.FilterError as e:
          raise UnsafeArchiveError(f"{archive}: member {member.name!r} refused "
                                   f"({type(e).__name__}: {e})") from None
        if member.isdir():
          if not flatten:
            os.makedirs(os.path.join(dest_dir, rel), exist_ok=True)
          continue
        if member.issym() or member.islnk():
          if flatten:
            raise UnsafeArchiveError(f"{archive}: link member {member.name!r} in an "
                                     "archive unpacked flat; refused")
          link = member.linkname
          base = posixpath.dirname(rel) if member.issym() else ""
          resolved = posixpath.normpath(posixpath.join(base, link))
          if posixpath.isabs(link) or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchiveError(f"{archive}: link {member.name!r} -> {link!r} "
                                     "points outside the folder; refused")
          target = target_of(rel)
          os.makedirs(os.path.dirname(target), exist_ok=True)
          with contextlib.suppress(FileNotFoundError):
            os.remove(target)
          if member.issym():
            os.symlink(link, target)
          else:
            os.link(os.path.join(dest_dir, resolved), target)
          written.append([rel, 0])
          continue
        if not member.isfile():
          raise UnsafeArchiveError(f"{archive}: member {member.name!r} is not a regular "
                                   "file, directory or link; refused")
        target = target_of(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".part"
        src = tf.extractfile(member)
        try:
          with open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
              out.write(chunk)
              if on_bytes is not None:
                on_bytes(len(chunk))
        except OSError as e:
          with contextlib.suppress(OSError):
            os.remove(tmp)
          if e.errno == errno.ENOSPC:
            raise _disk_full(target, e) from None
          raise
        os.replace(tmp, target)
        written.append([posixpath.basename(rel) if flatten else rel, member.size])
  except UnsafeArchiveError:
    for rel, _ in written:
      with contextlib.suppress(OSError):
        os.remove(os.path.join(dest_dir, rel))
    raise
  except (tarfile.TarError, EOFError, zlib.error) as e:
    raise DownloadError(f"{archive}: corrupt archive while extracting "
                        f"({type(e).__name__}: {e})") from None
  return written


def _members_file(root: str, remote: Remote) -> str:
  return os.path.join(root, remote.dest + ".members.json")


def _members_present(root: str, remote: Remote) -> tuple[bool, str]:
  """Whether every file an extracted archive listed is still there, same size."""
  path = _members_file(root, remote)
  try:
    with open(path, encoding="utf-8") as f:
      members = json.load(f)
  except (OSError, ValueError):
    return False, f"member list {path} missing or unreadable"
  folder = os.path.join(root, remote.extract_to)
  for rel, size in members:
    p = os.path.join(folder, rel)
    if os.path.islink(p):
      continue
    try:
      if size and os.path.getsize(p) != size:
        return False, f"{p}: size changed"
    except OSError:
      return False, f"{p}: missing"
  return True, ""


# ---------------------------------------------------------------------------
# The job: fetch, verify, extract, record.


@dataclasses.dataclass
class Result:
  remote: Remote
  ok: bool
  action: str           # 'present', 'downloaded', 'failed'
  error: str = ""


class Downloader:
  """Fetches `Remote`s into `root` with a thread pool, recording the manifest."""

  def __init__(self, root: str, *, workers: int = 4, base_url: str | None = None,
               keep_archives: bool = False, verify_present: bool = False,
               timeout: float = 60.0, retries: int = 5, backoff: float = 1.0,
               progress: bool | None = None):
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.manifest = Manifest(self.root)
    self.workers = max(1, int(workers))
    self.base_url = base_url
    self.keep_archives = keep_archives
    self.verify_present = verify_present
    self.timeout, self.retries, self.backoff = timeout, retries, backoff
    self.stop = threading.Event()
    from tqdm import tqdm  # noqa: PLC0415
    self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                     desc="download", dynamic_ncols=True,
                     disable=None if progress is None else not progress, mininterval=1.0)
    self._bar_lock = threading.Lock()

  def close(self) -> None:
    self._bar.close()

  def _bytes(self, n: int) -> None:
    with self._bar_lock:
      self._bar.update(n)

  def path(self, remote: Remote) -> str:
    return os.path.join(self.root, remote.dest)

  # --- what is already there

  def is_present(self, remote: Remote) -> tuple[bool, str]:
    """Whether `remote` is verified per the manifest and still on disk."""
    entry = self.manifest.entry(remote.dest)
    if not entry or not entry.get("verified"):
      return False, "not verified yet"
    if entry.get("url") != remote.url:
      return False, "recorded from another URL"
    if remote.kind == "tar":
      if entry.get("extracted"):
        return _members_present(self.root, remote)
      return False, "not extracted yet"
    path = self.path(remote)
    if not os.path.isfile(path) or os.path.getsize(path) != entry.get("size"):
      return False, "file missing or its size changed"
    if self.verify_present and entry.get("sha256"):
      digest = file_digest(path)
      if digest != entry["sha256"]:
        return False, "sha256 changed"
    return True, ""

  # --- one file

  def _verify(self, remote: Remote, path: str, digests: dict[str, str]) -> dict:
    """How `path` (a .part or the file) was verified; raises on failure."""
    if remote.kind == "md5":
      return {"verified": "md5-file", "md5_value": parse_md5_file(path)}
    if remote.kind == "csv":
      return {"verified": "csv-header", "header": verify_csv(path)}
    if remote.kind == "gnd":
      return {"verified": "gnd-load (restricted unpickler)", **verify_gnd(path)}
    if remote.kind == "list":
      with open(path, encoding="utf-8", errors="replace") as f:
        n = sum(1 for line in f if line.strip())
      if not n:
        raise DownloadError(f"{path}: empty image list")
      return {"verified": "list", "lines": n}
    if remote.md5_file:
      want = parse_md5_file(self.path_md5(remote))
      if digests["md5"] != want:
        raise ChecksumError(f"{remote.dest}: MD5 {digests['md5']} does not match "
                            f"{want} published in {posixpath.basename(remote.md5_file)}; "
                            "the download was deleted, rerun to fetch it again")
      return {"verified": "md5"}
    return {"verified": "tar-read", "archive_members": verify_tar(path)}

  def path_md5(self, remote: Remote) -> str:
    return os.path.join(self.root, remote.md5_file)

  def run_one(self, remote: Remote) -> Result:
    present, _ = self.is_present(remote)
    if present:
      return Result(remote, True, "present")
    if self.stop.is_set():
      return Result(remote, False, "failed", f"{remote.dest}: skipped after a full disk")
    try:
      self._fetch_verify_extract(remote)
    except DiskFullError as e:
      self.stop.set()
      return Result(remote, False, "failed", str(e))
    except DownloadError as e:
      return Result(remote, False, "failed", str(e))
    except OSError as e:
      if e.errno == errno.ENOSPC:
        self.stop.set()
        return Result(remote, False, "failed", str(_disk_full(self.path(remote), e)))
      return Result(remote, False, "failed", f"{remote.dest}: {e}")
    return Result(remote, True, "downloaded")

  def _fetch_verify_extract(self, remote: Remote) -> None:
    dest = self.path(remote)
    if remote.md5_file and not os.path.isfile(self.path_md5(remote)):
      raise DownloadError(f"{remote.dest}: its checksum file {remote.md5_file} is not "
                          "there (it failed above); nothing to verify against")
    entry = self.manifest.entry(remote.dest)
    have_verified_archive = (remote.kind == "tar" and entry and entry.get("verified")
                             and entry.get("url") == remote.url and os.path.isfile(dest)
                             and os.path.getsize(dest) == entry.get("size"))
    if not have_verified_archive:
      url = mirror_url(remote.url, self.base_url)
      part, size, digests = fetch(url, dest, on_bytes=self._bytes, timeout=self.timeout,
                                  retries=self.retries, backoff=self.backoff,
                                  stop=self.stop)
      try:
        how = self._verify(remote, part, digests)
      except DownloadError:
        with contextlib.suppress(OSError):
          os.remove(part)
        raise
      os.replace(part, dest)
      entry = {"url": remote.url, "fetched_from": url, "dataset": remote.dataset,
               "kind": remote.kind, "size": size, "md5": digests["md5"],
               "sha256": digests["sha256"], "verified_at": _now(), **how}
      if remote.kind == "tar":
        entry["extracted"] = False
      self.manifest.set(remote.dest, entry)
    if remote.kind != "tar":
      return
    members = safe_extract(dest, os.path.join(self.root, remote.extract_to),
                           flatten=remote.flatten)
    _write_json_atomic(_members_file(self.root, remote), members)
    entry = dict(entry, extracted=True, extracted_to=remote.extract_to,
                 members=len(members), extracted_at=_now())
    if not self.keep_archives:
      os.remove(dest)
      entry["archive_deleted"] = True
    self.manifest.set(remote.dest, entry)

  # --- many files

  def run(self, remotes: Sequence[Remote]) -> list[Result]:
    """Small files first (checksums before the archives they verify), then archives."""
    small = [r for r in remotes if r.kind != "tar"]
    archives = [r for r in remotes if r.kind == "tar"]
    results = []
    for group in (small, archives):
      if not group:
        continue
      with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
        results.extend(pool.map(self.run_one, group))
    return results


# ---------------------------------------------------------------------------
# Dataset-level checks and the manifest's dataset status.


def _revisited_images(root: str, name: str) -> tuple[int, list[str]]:
  from qaff_jax.data import revisited  # noqa: PLC0415
  gnd = revisited.load_gnd(os.path.join(root, "revisitop", name, f"gnd_{name}.pkl"))
  folder = os.path.join(root, "revisitop", name, "jpg")
  ids = list(dict.fromkeys(gnd["imlist"] + gnd["qimlist"]))
  missing = [i for i in ids if not os.path.isfile(os.path.join(folder, i + ".jpg"))]
  return len(ids), missing


def _r1m_images(root: str) -> tuple[int, list[str]]:
  from qaff_jax.data import revisited  # noqa: PLC0415
  base = os.path.join(root, "revisitop", "revisitop1m")
  paths = revisited.distractor_paths(os.path.join(base, "revisitop1m.txt"),
                                     os.path.join(base, "jpg"))
  missing = [p for p in paths if not os.path.isfile(p)]
  return len(paths), missing


def update_dataset_status(dl: Downloader, dataset: str, results: Sequence[Result],
                          selected: set[int] | None) -> dict:
  """Records in the manifest whether `dataset` is complete (every official file
  verified, and for the test sets every listed image present)."""
  all_files = official_files(dataset)
  present = {r.dest for r in all_files if dl.is_present(r)[0]}
  failed = [res.error for res in results if not res.ok and res.remote.dataset == dataset]
  status: dict[str, Any] = {"files": len(all_files), "verified": len(present),
                            "checked_at": _now(), "errors": failed[:20]}
  missing_files = [r.dest for r in all_files if r.dest not in present]
  status["missing_files"] = missing_files[:20]
  if selected is not None:
    status["archives_requested"] = sorted(selected)
  complete = not missing_files
  if dataset in ("roxford5k", "rparis6k", "revisitop1m") and not missing_files:
    try:
      n, missing = (_r1m_images(dl.root) if dataset == "revisitop1m"
                    else _revisited_images(dl.root, dataset))
    except (ValueError, FileNotFoundError) as e:
      n, missing = 0, [str(e)]
    status["images"] = n
    status["images_missing"] = len(missing)
    status["images_missing_first"] = missing[:20]
    complete = not missing
  if dataset in ("roxford5k", "rparis6k"):
    entry = dl.manifest.entry(f"revisitop/{dataset}/gnd_{dataset}.pkl") or {}
    status["gnd_sha256"] = entry.get("sha256")
  status["complete"] = complete
  status["verification"] = ("md5 (published md5 files)" if dataset.startswith("gldv2")
                            else "no published checksums: archives read through "
                            "(tar + gzip CRC), gnd loaded by the restricted unpickler, "
                            "every listed image present; sha256 recorded")
  dl.manifest.set_dataset(dataset, status)
  return status


def download(datasets: Sequence[str], out: str, *, workers: int = 4,
             base_url: str | None = None, archives: set[int] | None = None,
             keep_archives: bool = False, verify_present: bool = False,
             timeout: float = 60.0, retries: int = 5, backoff: float = 1.0,
             progress: bool | None = None) -> tuple[list[Result], dict[str, dict]]:
  """Fetches `datasets` into `out`; returns (per-file results, per-dataset status)."""
  dl = Downloader(out, workers=workers, base_url=base_url, keep_archives=keep_archives,
                  verify_present=verify_present, timeout=timeout, retries=retries,
                  backoff=backoff, progress=progress)
  try:
    remotes = []
    for name in datasets:
      for r in official_files(name):
        if archives is not None and r.index is not None and r.index not in archives:
          continue
        remotes.append(r)
    results = dl.run(remotes)
    statuses = {name: update_dataset_status(dl, name, results, archives)
                for name in datasets}
  finally:
    dl.close()
  return results, statuses


# ---------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.data.download",
      description="Download GLDv2 / revisitop datasets: verified, resumable, parallel.")
  parser.add_argument("datasets", nargs="+", metavar="DATASET",
                      help=f"one or more of: {', '.join(DATASETS)}")
  parser.add_argument("--out", required=True, help="data root (manifest.json goes here)")
  parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
  parser.add_argument("--base_url", default=None,
                      help="fetch from this mirror (URL + the official URL's path)")
  parser.add_argument("--archives", default=None,
                      help="only these archive numbers, e.g. 0-9,42 (as in the file "
                      "names; default all)")
  parser.add_argument("--keep_archives", action="store_true",
                      help="keep archives after extracting them")
  parser.add_argument("--verify", action="store_true",
                      help="re-hash files already present instead of trusting size")
  parser.add_argument("--timeout", type=float, default=60.0,
                      help="seconds without data before a retry")
  parser.add_argument("--retries", type=int, default=5,
                      help="attempts per file after the first (each resumes)")
  parser.add_argument("--list", action="store_true",
                      help="print the files and URLs, download nothing")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  unknown = [d for d in args.datasets if d not in DATASETS]
  if unknown:
    parser.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
  if args.workers < 1:
    parser.error(f"--workers {args.workers}: want at least 1")
  try:
    archives = parse_archives(args.archives)
  except ValueError as e:
    parser.error(str(e))
  if args.list:
    for name in args.datasets:
      for r in official_files(name):
        if archives is None or r.index is None or r.index in archives:
          print(f"{name}\t{r.kind}\t{mirror_url(r.url, args.base_url)}\t{r.dest}")
    return 0
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    results, statuses = download(
        args.datasets, args.out, workers=args.workers, base_url=args.base_url,
        archives=archives, keep_archives=args.keep_archives, verify_present=args.verify,
        timeout=args.timeout, retries=args.retries,
        progress=False if args.no_progress else None)
  except ValueError as e:  # an unreadable manifest
    print(f"error: {e}", file=sys.stderr)
    return 1
  failed = [r for r in results if not r.ok]
  for r in failed:
    print(f"error: {r.error}", file=sys.stderr)
  fetched = sum(r.action == "downloaded" for r in results)
  for name, st in statuses.items():
    state = "complete" if st["complete"] else "INCOMPLETE"
    extra = (f", {st['images_missing']} of {st['images']} images missing"
             if "images" in st and st["images_missing"] else "")
    print(f"{name}: {state} ({st['verified']}/{st['files']} files verified{extra})")
  print(f"{fetched} file(s) fetched, {len(results) - fetched - len(failed)} already "
        f"present, {len(failed)} failed; manifest: {os.path.join(args.out, MANIFEST)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
