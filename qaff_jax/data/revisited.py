"""Revisited Oxford / Paris (and R1M distractors) in the revisitop layout.

Layout (as the official revisitop `configdataset` expects):
  <root>/<name>/gnd_<name>.pkl    dict with 'imlist', 'qimlist', 'gnd'
  <root>/<name>/jpg/<id>.jpg      database and query images
Each `gnd[i]` holds 'easy', 'hard', 'junk' (0-based database indices) and 'bbx'
(x1, y1, x2, y2) in pixels. Queries are NOT in the database list.

Query cropping follows revisitop's example reader and cirtorch: the RGB image is
cropped with PIL `img.crop(bbx)` with the float box exactly as stored; PIL rounds
each coordinate with Python's `round` (half to even) and truncates to int. We apply
that rounding explicitly (`crop_box`) so the result does not depend on PIL
internals. The box is not clipped: parts outside the image come back black, as
in the reference.

The ground-truth pickles come from the web, so `load_gnd` never runs the
generic unpickler: `_GndUnpickler` resolves only the builtin containers and
scalars and the numpy array / dtype / scalar constructors that genuine
revisitop files use, and refuses every other global before calling it.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import importlib
import os
import pickle
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

REQUIRED_KEYS = ("imlist", "qimlist", "gnd")
_MAX_NAMED = 20


class MissingImagesError(FileNotFoundError):
  """Some dataset images are missing or unreadable; `.paths` lists all of them."""

  def __init__(self, paths: Sequence[str], what: str = "images"):
    self.paths = list(paths)
    named = "\n  ".join(self.paths[:_MAX_NAMED])
    more = len(self.paths) - _MAX_NAMED
    tail = f"\n  ... and {more} more" if more > 0 else ""
    super().__init__(f"{len(self.paths)} {what} missing or unreadable:\n  "
                     f"{named}{tail}")


class _RefusedGlobal(pickle.UnpicklingError):
  """A pickle referenced a global outside the allowlist; nothing was called."""

  def __init__(self, module: str, name: str):
    self.qualname = f"{module}.{name}"
    # Protocols < 3 written by Python 3 use Python 2 names (subprocess.Popen
    # becomes commands.Popen); say what the name means today as well.
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
      py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
    if py3 is not None and py3 != (module, name):
      self.qualname += f" (Python 3: {py3[0]}.{py3[1]})"
    super().__init__(f"refused global {self.qualname}")


_BUILTIN_TYPES = (dict, list, tuple, set, str, bytes, int, float, bool, complex)


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` as Python 3 pickles bytes at protocol < 3, latin-1 only."""
  if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
    raise pickle.UnpicklingError(
        f"_codecs.encode allowed only for str with latin-1, got "
        f"{type(text).__name__} with {encoding!r}")
  return text.encode("latin1")


def _import_first(*names: str):
  """The first of the modules `names` that imports (numpy 2.x, then 1.x)."""
  for name in names:
    try:
      return importlib.import_module(name)
    except ImportError:
      continue
  raise ImportError(f"none of {names} is importable")


def _allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) as written in a pickle -> the object it may resolve to."""
  table: dict[tuple[str, str], Any] = {}
  for module in ("builtins", "__builtin__"):  # protocol < 3 writes __builtin__
    for cls in _BUILTIN_TYPES:
      table[(module, cls.__name__)] = cls
  table[("__builtin__", "unicode")] = str  # Python 2 names
  table[("__builtin__", "long")] = int
  table[("_codecs", "encode")] = _latin1_encode
  # numpy 1.x pickles name numpy.core, 2.x numpy._core: map both to what the
  # installed numpy provides (preferring _core avoids the 2.x shim's warning).
  multiarray = _import_first("numpy._core.multiarray", "numpy.core.multiarray")
  numeric = _import_first("numpy._core.numeric", "numpy.core.numeric")
  for core in ("numpy.core", "numpy._core"):
    table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
    table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
    # Protocol 5 arrays (Python 3.14's default protocol).
    table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
  table[("numpy", "ndarray")] = np.ndarray
  table[("numpy", "dtype")] = np.dtype
  return table


class _GndUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_allowed_globals()`; anything else raises.

  Data opcodes (dicts, lists, strings, numbers) need no global; a global is
  what a pickle must name to call code, and `find_class` is where it is looked
  up, so refusing there stops the call before it happens.
  """

  _allowed: dict[tuple[str, str], Any] | None = None

  def find_class(self, module: str, name: str) -> Any:
    if _GndUnpickler._allowed is None:
      _GndUnpickler._allowed = _allowed_globals()
    try:
      return _GndUnpickler._allowed[(module, name)]
    except KeyError:
      raise _RefusedGlobal(module, name) from None


def _load_pickle(path: str) -> Any:
  """Unpickles `path` restrictedly; retries with latin-1 for Python 2 files.

  Python 2 pickles store numpy array data as byte strings that the default
  ASCII decoding rejects; `encoding='latin1'` is numpy's documented way to
  read them.
  """
  with open(path, "rb") as f:
    try:
      return _GndUnpickler(f).load()
    except UnicodeDecodeError:
      f.seek(0)
      return _GndUnpickler(f, encoding="latin1").load()


def load_gnd(path: str | os.PathLike) -> dict[str, Any]:
  """Loads a revisitop `gnd_<name>.pkl`.

  Returns:
    The dict with 'imlist' and 'qimlist' as lists of str and 'gnd' as a list of
    dicts whose 'easy'/'hard'/'junk' are int64 arrays (missing -> empty) and
    'bbx' a tuple of 4 floats (or None); other keys are passed through.

  Raises:
    FileNotFoundError: the file does not exist (names it).
    ValueError: unreadable pickle, a pickle that names any global besides
      builtin containers/scalars and numpy arrays/dtypes/scalars (names the
      file and the refused `module.name`; nothing of it is run), or keys
      missing / inconsistent (names the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ground-truth file not found: {path}")
  try:
    data = _load_pickle(path)
  except _RefusedGlobal as e:
    raise ValueError(
        f"{path}: refusing to unpickle global {e.qualname}: a ground-truth "
        "file holds only builtin containers and numpy arrays, and this one "
        "names code to run") from None
  except Exception as e:  # pickle raises many types for bad input
    raise ValueError(f"cannot read ground-truth pickle {path}: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
  missing = [k for k in REQUIRED_KEYS if k not in data]
  if missing:
    raise ValueError(f"{path}: missing key(s) {missing}; expected "
                     f"{list(REQUIRED_KEYS)}, found {sorted(map(str, data))}")
  out = dict(data)
  out["imlist"] = [str(x) for x in data["imlist"]]
  out["qimlist"] = [str(x) for x in data["qimlist"]]
  if len(data["gnd"]) != len(out["qimlist"]):
    raise ValueError(f"{path}: {len(data['gnd'])} gnd entries for "
                     f"{len(out['qimlist'])} queries")
  n_db = len(out["imlist"])
  gnd = []
  for i, entry in enumerate(data["gnd"]):
    if not isinstance(entry, dict):
      raise ValueError(f"{path}: gnd[{i}] is {type(entry).__name__}, not a dict")
    g = dict(entry)
    for key in ("easy", "hard", "junk"):
      value = entry.get(key)
      ids = (np.zeros((0,), np.int64) if value is None
             else np.asarray(value, dtype=np.int64).reshape(-1))
      if ids.size and (ids.min() < 0 or ids.max() >= n_db):
        raise ValueError(f"{path}: gnd[{i}]['{key}'] has indices outside "
                         f"[0, {n_db})")
      g[key] = ids
    bbx = entry.get("bbx")
    g["bbx"] = None if bbx is None else tuple(
        float(v) for v in np.asarray(bbx).reshape(-1))
    if g["bbx"] is not None and len(g["bbx"]) != 4:
      raise ValueError(f"{path}: gnd[{i}]['bbx'] must have 4 values")
    gnd.append(g)
  out["gnd"] = gnd
  return out


def crop_box(bbx: Sequence[float]) -> tuple[int, int, int, int]:
  """The integer box PIL's `crop` uses for a float (x1, y1, x2, y2) box."""
  x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
  return x1, y1, x2, y2


def _load_rgb(path: str) -> Image.Image:
  with open(path, "rb") as f:
    img = Image.open(f)
    return img.convert("RGB")


def check_paths(paths: Iterable[str], skip_missing: bool = False,
                decode: bool = False, what: str = "images") -> list[str]:
  """Finds missing or unreadable image files.

  Args:
    paths: files to check.
    skip_missing: if False, raise when any file is bad; if True, return them.
    decode: fully decode each image (slow) instead of PIL's header `verify()`.
    what: noun used in the error message.

  Returns:
    The bad paths, in input order (empty when all are fine).

  Raises:
    MissingImagesError: one error listing every bad file (the first 20 by name,
      then a count), unless `skip_missing`.
  """
  bad = []
  for path in paths:
    try:
      with Image.open(path) as img:
        if decode:
          img.load()
        else:
          img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
      bad.append(path)
  if bad and not skip_missing:
    raise MissingImagesError(bad, what)
  return bad


class RevisitedDataset:
  """ROxford5k / RParis6k ground truth and image paths.

  Attributes:
    root: the datasets folder; name: e.g. 'roxford5k'.
    imlist / qimlist: database / query image ids.
    gnd: per-query ground truth (see `load_gnd`).
    missing: bad files found by the last `check_images(skip_missing=True)`.
  """

  def __init__(self, root: str | os.PathLike, name: str, ext: str = ".jpg"):
    self.root = os.fspath(root)
    self.name = name
    self.ext = ext
    self.data_dir = os.path.join(self.root, name)
    self.image_dir = os.path.join(self.data_dir, "jpg")
    self.gnd_path = os.path.join(self.data_dir, f"gnd_{name}.pkl")
    cfg = load_gnd(self.gnd_path)
    self.imlist: list[str] = cfg["imlist"]
    self.qimlist: list[str] = cfg["qimlist"]
    self.gnd: list[dict[str, Any]] = cfg["gnd"]
    self.missing: list[str] = []

  @property
  def n_db(self) -> int:
    return len(self.imlist)

  @property
  def n_queries(self) -> int:
    return len(self.qimlist)

  def db_path(self, i: int) -> str:
    return os.path.join(self.image_dir, self.imlist[i] + self.ext)

  def query_path(self, i: int) -> str:
    return os.path.join(self.image_dir, self.qimlist[i] + self.ext)

  def query_bbx(self, i: int) -> tuple[float, float, float, float] | None:
    return self.gnd[i]["bbx"]

  def load_query(self, i: int, crop: bool = True) -> np.ndarray:
    """Query i as uint8 RGB [H, W, 3], cropped to its bbx (PIL rounding)."""
    img = _load_rgb(self.query_path(i))
    bbx = self.query_bbx(i)
    if crop:
      if bbx is None:
        raise ValueError(f"{self.gnd_path}: query {i} ({self.qimlist[i]}) "
                         "has no bbx to crop to")
      img = img.crop(crop_box(bbx))
    return np.asarray(img, dtype=np.uint8)

  def load_db(self, i: int) -> np.ndarray:
    """Database image i as uint8 RGB [H, W, 3]."""
    return np.asarray(_load_rgb(self.db_path(i)), dtype=np.uint8)

  def all_paths(self) -> list[str]:
    """Database then query image paths, without repeats."""
    paths = [self.db_path(i) for i in range(self.n_db)]
    paths += [self.query_path(i) for i in range(self.n_queries)]
    return list(dict.fromkeys(paths))

  def check_images(self, skip_missing: bool = False,
                   decode: bool = False) -> list[str]:
    """Checks every database and query image (see `check_paths`).

    With `skip_missing` the bad files are returned and stored in `.missing`
    (their count is `len(.missing)`); otherwise one error lists them all.
    """
    self.missing = check_paths(self.all_paths(), skip_missing=skip_missing,
                               decode=decode, what=f"{self.name} images")
    return self.missing

  def __repr__(self) -> str:
    return (f"RevisitedDataset({self.name!r}, n_db={self.n_db}, "
            f"n_queries={self.n_queries}, root={self.root!r})")


def distractor_paths(list_file: str | os.PathLike, folder: str | os.PathLike,
                     ext: str = ".jpg") -> list[str]:
  """R1M-style distractor list -> image paths.

  Each non-empty line of `list_file` is a path relative to `folder` (as in
  revisitop1m.txt, e.g. 'a/b/c.jpg') or a bare id, which gets `ext` appended.
  Absolute lines are kept as they are.
  """
  list_file = os.fspath(list_file)
  folder = os.fspath(folder)
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"distractor list not found: {list_file}")
  with open(list_file) as f:
    lines = [line.strip() for line in f]
  paths = []
  for line in lines:
    if not line:
      continue
    if not os.path.splitext(line)[1]:
      line += ext
    paths.append(os.path.join(folder, line))
  return paths
