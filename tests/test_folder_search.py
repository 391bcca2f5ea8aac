"""`python -m qaff_jax.search`: folder index, query, the web page, the HTML report."""

import copy
import importlib.util
import dataclasses
import io
import json
import os
import shutil
import socket
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from qaff_jax import train_lib
from qaff_jax.data import demo, revisited
from qaff_jax.search import index as lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_train import SMALL, tiny_config  # noqa: E402

sys.path.pop(0)

CHUNK = 8
BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The demo set, a 2-step GeM run on it and its network (loaded once)."""
  root = str(tmp_path_factory.mktemp("searchdemo"))
  demo.generate(root, SMALL)
  workdir = os.path.join(root, "run")
  train_lib.train_and_evaluate(tiny_config(root, total_steps=2), workdir)
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  return ds, workdir, lib.Extractor(lib.model_info(workdir))


def _photos(ds, dest):
  """The demo images as a photo folder: a subfolder, upper-case extensions, a
  truncated JPEG, an empty PNG and a file that is not an image."""
  os.makedirs(os.path.join(dest, "trip", "day2"))
  for i, name in enumerate(sorted(os.listdir(ds.image_dir))):
    sub = ("trip/day2/" if i % 3 == 0 else "trip/" if i % 3 == 1 else "")
    ext = ".JPG" if i % 4 == 0 else ".jpg"
    shutil.copy(os.path.join(ds.image_dir, name), os.path.join(dest, sub + name[:-4] + ext))
  with open(ds.db_path(0), "rb") as f:
    data = f.read()
  with open(os.path.join(dest, "broken.jpg"), "wb") as f:
    f.write(data[:len(data) // 3])
  open(os.path.join(dest, "trip", "empty.png"), "wb").close()
  with open(os.path.join(dest, "notes.txt"), "w") as f:
    f.write("not an image")
  return dest


def _rel(folder, image_id):
  for here, _, files in os.walk(folder):
    for name in files:
      if os.path.splitext(name)[0] == image_id:
        return os.path.relpath(os.path.join(here, name), folder).replace(os.sep, "/")
  raise KeyError(image_id)


@pytest.fixture(scope="module")
def built(run, tmp_path_factory):
  ds, _, extractor = run
  base = tmp_path_factory.mktemp("photos")
  photos = _photos(ds, str(base / "photos"))
  summary = lib.update_index(str(base / "index"), photos, extractor=extractor,
                             chunk_images=CHUNK, progress=False)
  return photos, str(base / "index"), summary


def test_index_lists_unreadable_files_and_stores_everything(run, built):
  ds, workdir, _ = run
  photos, index_dir, summary = built
  n_images = len(set(ds.imlist) | set(ds.qimlist))
  assert summary.total == n_images and len(summary.extracted) == n_images + 2
  assert sorted(f["path"] for f in summary.failed) == ["broken.jpg", "trip/empty.png"]
  index = lib.FolderIndex(index_dir)
  assert len(index) == n_images and index.root == os.path.abspath(photos)
  assert sorted(f["path"] for f in index.failed) == ["broken.jpg", "trip/empty.png"]
  assert all("undecodable" in f["error"] for f in index.failed)
  assert index.meta["model"]["workdir"] == os.path.abspath(workdir)
  assert index.meta["model"]["step"] == 2 and index.meta["scann"] is None
  assert np.allclose(np.linalg.norm(index.descriptor, axis=1), 1.0, atol=1e-5)
  with open(os.path.join(index_dir, "config.json")) as f:
    assert json.load(f)["model"]["head"] == "gem"
  assert not os.path.exists(os.path.join(index_dir, lib.CHUNKS_DIR))
  assert index.paths == sorted(index.paths) and "trip/day2/" in " ".join(index.paths)


def test_query_with_own_file_and_revisited_crop(run, built):
  ds, _, extractor = run
  photos, index_dir, _ = built
  index = lib.FolderIndex(index_dir)
  for i in (0, 5):
    rel = _rel(photos, ds.imlist[i])
    q = extractor.describe(os.path.join(photos, rel))
    top = index.results(q["descriptor"], 5)
    assert top[0]["path"] == rel and top[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert top[1]["score"] < top[0]["score"]
  # Query crops as the revisited protocol makes them: positives rank high.
  aps = []
  for i in range(ds.n_queries):
    q = extractor.describe(ds.query_path(i), box=ds.query_bbx(i))
    ranked = [os.path.splitext(os.path.basename(r["path"]))[0]
              for r in index.results(q["descriptor"], len(index))]
    junk = {ds.imlist[j] for j in ds.gnd[i]["junk"]}
    db = [x for x in ranked if x in set(ds.imlist) and x not in junk]
    pos = {ds.imlist[j] for j in list(ds.gnd[i]["easy"]) + list(ds.gnd[i]["hard"])}
    hits = np.cumsum([x in pos for x in db])
    aps.append(np.mean([hits[r] / (r + 1) for r, x in enumerate(db) if x in pos]))
  chance = np.mean([len(list(g["easy"]) + list(g["hard"])) for g in ds.gnd]) / ds.n_db
  assert np.mean(aps) > max(0.5, 2 * chance)


def test_incremental_update_extracts_only_new_and_changed(run, tmp_path):
  ds, _, extractor = run
  photos = _photos(ds, str(tmp_path / "photos"))
  index_dir = str(tmp_path / "index")
  first = lib.update_index(index_dir, photos, extractor=extractor, chunk_images=CHUNK,
                           progress=False)
  count = extractor.images_extracted
  again = lib.update_index(index_dir, photos, extractor=extractor, progress=False)
  assert again.extracted == [] and extractor.images_extracted == count
  assert again.reused == first.total + 2   # unreadable files are not retried either

  changed, gone = _rel(photos, ds.imlist[1]), _rel(photos, ds.imlist[2])
  Image.open(os.path.join(photos, changed)).transpose(Image.FLIP_LEFT_RIGHT).save(
      os.path.join(photos, changed), quality=90)
  os.remove(os.path.join(photos, gone))
  Image.open(ds.db_path(3)).save(os.path.join(photos, "trip", "new copy.webp"), "WEBP")
  third = lib.update_index(index_dir, photos, extractor=extractor, progress=False)
  assert sorted(third.extracted) == sorted([changed, "trip/new copy.webp"])
  assert extractor.images_extracted == count + 2
  assert third.removed == [gone] and third.total == first.total
  index = lib.FolderIndex(index_dir)
  assert gone not in index.paths and "trip/new copy.webp" in index.paths
  q = extractor.describe(os.path.join(photos, changed))
  assert index.results(q["descriptor"], 1)[0]["path"] == changed
  assert [n for n in os.listdir(index_dir) if n.startswith("descriptors-")] == [
      index.meta["descriptors"]]


def test_killed_run_resumes_without_redoing_chunks(run, tmp_path):
  ds, _, extractor = run
  photos = _photos(ds, str(tmp_path / "photos"))
  index_dir = str(tmp_path / "index")

  def killed(n, paths):
    raise KeyboardInterrupt(f"killed after chunk {n}")

  start = extractor.images_extracted
  with pytest.raises(KeyboardInterrupt):
    lib.update_index(index_dir, photos, extractor=extractor, chunk_images=CHUNK,
                     progress=False, on_chunk=killed)
  assert extractor.images_extracted - start <= CHUNK
  assert len(os.listdir(os.path.join(index_dir, lib.CHUNKS_DIR))) == 1
  assert lib.read_meta(index_dir) is None
  done_first = sorted(p for p in (lib.scan_images(photos)[i].path for i in range(CHUNK)))

  mid = extractor.images_extracted
  chunks = []
  resumed = lib.update_index(index_dir, photos, extractor=extractor, chunk_images=CHUNK,
                             progress=False, on_chunk=lambda n, p: chunks.append(p))
  assert resumed.resumed == CHUNK
  assert not set(resumed.extracted) & set(done_first)
  unreadable = {"broken.jpg", "trip/empty.png"} - set(done_first)
  assert extractor.images_extracted - mid == sum(len(c) for c in chunks) - len(unreadable)
  assert resumed.total + len(resumed.failed) == len(lib.scan_images(photos))
  assert not os.path.exists(os.path.join(index_dir, lib.CHUNKS_DIR))


def test_other_model_is_refused_or_rebuilt_and_scann_above_threshold(run, built, tmp_path):
  ds, _, extractor = run
  photos, index_dir, _ = built
  other = dataclasses.replace(extractor.info, fingerprint="0" * 20, step=4)
  with pytest.raises(lib.IndexMismatchError, match="--rebuild"):
    lib.update_index(index_dir, photos, info=other, progress=False)
  with pytest.raises(lib.IndexMismatchError, match="images folder"):
    lib.update_index(index_dir, str(tmp_path), extractor=extractor, progress=False)
  # A rebuild (here into a copy, with a ScaNN index forced) re-extracts all.
  copy_dir = str(tmp_path / "index")
  shutil.copytree(index_dir, copy_dir)
  fake = copy.copy(extractor)
  fake.info = other
  rebuilt = lib.update_index(copy_dir, photos, extractor=fake, rebuild=True,
                             scann_min_images=5, progress=False)
  assert len(rebuilt.extracted) == rebuilt.total + 2 and rebuilt.searcher == "scann"
  index = lib.FolderIndex(copy_dir)
  assert index.meta["model"]["fingerprint"] == "0" * 20 and index.searcher is not None
  rel = _rel(photos, ds.imlist[4])
  q = extractor.describe(os.path.join(photos, rel))
  assert index.results(q["descriptor"], 3)[0]["path"] == rel


def test_cli_index_query_and_usage_errors(run, built, capsys):
  from qaff_jax.search import __main__ as cli
  ds, workdir, _ = run
  photos, index_dir, _ = built
  cli.main(["index", "--workdir", workdir, "--images", photos, "--index", index_dir,
            "--quiet"])
  out = capsys.readouterr().out
  assert "0 extracted" in out and "2 unreadable" in out
  assert "unreadable: broken.jpg: undecodable image" in out and "trip/empty.png" in out
  bbx = ds.query_bbx(0)
  cli.main(["query", "--index", index_dir, "--image", ds.query_path(0), "-k", "3", "--json",
            "--box", ",".join(str(v) for v in bbx)])
  got = json.loads(capsys.readouterr().out)
  assert len(got["results"]) == 3 and got["box"] == list(bbx)
  assert got["results"][0]["score"] >= got["results"][1]["score"]
  for argv, message in [(["query", "--index", index_dir, "--image", "nope.jpg"], "no such file"),
                        (["query", "--index", index_dir, "--image", ds.query_path(0),
                          "--box", "1,2,3"], "x0,y0,x1,y1"),
                        (["index", "--workdir", workdir, "--images", "/nonexistent",
                          "--index", index_dir], "not a folder"),
                        (["frobnicate"], "invalid choice")]:
    with pytest.raises(SystemExit) as exit_:
      cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--help"])
  assert exit_.value.code == 0


# ---------------------------------------------------------------------------
# The web page.


@pytest.fixture(scope="module")
def client(run, built):
  pytest.importorskip("fastapi")
  from fastapi.testclient import TestClient

  from qaff_jax.search import server
  _, _, extractor = run
  index = lib.FolderIndex(built[1])
  return TestClient(server.create_app(index, extractor, max_upload_bytes=3 * 2**20)), index


def test_http_upload_query_limits_and_no_traversal(run, built, client):
  ds, _, _ = run
  photos, index_dir, _ = built
  http, index = client
  page = http.get("/")
  assert page.status_code == 200 and 'id="results"' in page.text
  assert http.get("/api/info").json()["images"] == len(index)
  rel = _rel(photos, ds.imlist[0])
  with open(os.path.join(photos, rel), "rb") as f:
    data = f.read()
  res = http.post("/api/query?k=5", content=data)
  assert res.status_code == 200, res.text
  top = res.json()["results"]
  assert top[0]["path"] == rel and top[0]["score"] == pytest.approx(1.0, abs=1e-4)
  boxed = http.post("/api/query?k=5&box=0.1,0.1,0.6,0.7", content=data).json()
  assert boxed["query"]["box"] == [0.1, 0.1, 0.6, 0.7] and len(boxed["results"]) == 5
  by_id = http.post(f"/api/query/{top[0]['id']}?k=5").json()
  assert [r["id"] for r in by_id["results"]][:1] == [top[0]["id"]]

  assert http.post("/api/query", content=b"x" * (3 * 2**20 + 1)).status_code == 413
  assert http.post("/api/query", content=b"GIF89a not really").status_code == 400
  assert http.post("/api/query", content=b"").status_code == 400
  assert http.post("/api/query?box=0,0,2,1", content=data).status_code == 400
  assert http.post("/api/query?k=0", content=data).status_code == 400

  thumb = http.get(f"/api/thumb/{top[0]['id']}")
  assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
  assert len(os.listdir(os.path.join(index_dir, lib.THUMBS_DIR))) == 1
  assert http.get(f"/api/image/{top[0]['id']}").status_code == 200
  secret = os.path.join(os.path.dirname(photos), "secret.jpg")
  shutil.copy(os.path.join(photos, rel), secret)
  for url in ("/api/image/../secret.jpg", "/api/image/..%2Fsecret.jpg",
              "/api/thumb/%2e%2e%2fsecret.jpg", f"/api/image/{secret}", "/api/image/-1",
              f"/api/thumb/{len(index)}", "/api/image/0x1", "/../secret.jpg",
              "/api/image/1%2F..%2F..%2Fsecret.jpg"):
    assert http.get(url).status_code in (400, 404), url
  # A stored path whose file became a link out of the folder is refused too.
  victim = index.paths[1]
  os.replace(os.path.join(photos, victim), os.path.join(photos, victim + ".bak"))
  os.symlink(secret, os.path.join(photos, victim))
  try:
    assert http.get("/api/image/1").status_code == 404
  finally:
    os.remove(os.path.join(photos, victim))
    os.replace(os.path.join(photos, victim + ".bak"), os.path.join(photos, victim))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _browser():
  if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright is not installed (pip install playwright)")
  for path in BROWSERS:
    if os.path.exists(path):
      return path
  pytest.skip("no Chromium (apt-get install -y chromium)")


def test_page_in_headless_chromium(run, built, tmp_path):
  executable = _browser()
  pytest.importorskip("fastapi")
  uvicorn = pytest.importorskip("uvicorn")
  from playwright.sync_api import sync_playwright

  from qaff_jax.search import server
  ds, _, extractor = run
  photos, index_dir, _ = built
  index = lib.FolderIndex(index_dir)
  # Fusion weights as a QAFF run stores them (this GeM run has none): the page
  # draws those of an indexed query.
  layout = {"grid": 3, "scales": [0.5, 1.0], "labels": []}
  index.meta["model"]["fusion"] = layout
  index.fusion = np.random.default_rng(0).dirichlet(np.ones(12), len(index)).astype(np.float32)
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(server.create_app(index, extractor), host="127.0.0.1",
                                      port=port, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 20
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  rel = _rel(photos, ds.imlist[0])
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=executable, headless=True,
                                  args=["--no-sandbox"])
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.goto(f"http://127.0.0.1:{port}/")
      page.wait_for_selector("#gallery .cell")
      page.set_input_files("#file", os.path.join(photos, rel))
      page.wait_for_selector("#results .result")
      first = page.locator("#results .result").first
      assert first.get_attribute("data-path") == rel
      assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
      assert page.locator("#fusion").is_hidden()   # a GeM network: no weights
      # Drag a box on the query: searched again with the box.
      stage = page.locator("#qimg").bounding_box()
      page.mouse.move(stage["x"] + 0.2 * stage["width"], stage["y"] + 0.2 * stage["height"])
      page.mouse.down()
      page.mouse.move(stage["x"] + 0.8 * stage["width"], stage["y"] + 0.9 * stage["height"],
                      steps=4)
      page.mouse.up()
      page.wait_for_function("document.getElementById('status').textContent"
                             ".includes('for the box')")
      # Click a result: it becomes the query; the stored fusion weights show.
      page.locator("#results .result").nth(1).click()
      page.wait_for_selector("#overlay .fcell")
      assert page.locator("#overlay .fcell").count() == 9
      assert page.locator("#bars .row").count() == 2 + 2 + 1
      page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)
      browser.close()
  finally:
    srv.should_exit = True
    thread.join(10)
  assert os.path.getsize(tmp_path / "search_page.png") > 10_000


# ---------------------------------------------------------------------------
# The HTML evaluation report.


class _Tags(__import__("html.parser").parser.HTMLParser):
  """Start tags with attributes, and the text of <td data-key> cells."""

  def __init__(self):
    super().__init__()
    self.tags, self.cells, self._cell, self._row = [], [], None, None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append((tag, attrs))
    if tag == "tr" and "data-dataset" in attrs:
      self._row = attrs["data-dataset"]
    if tag == "td" and "data-key" in attrs:
      self._cell = attrs["data-key"]

  def handle_data(self, data):
    if self._cell is not None:
      self.cells.append((self._row, self._cell, data))
      self._cell = None


def test_html_report_structure(run, tmp_path):
  from qaff_jax.evaluation import report, runner
  ds, _, _ = run
  rng = np.random.default_rng(0)
  ranks = np.stack([rng.permutation(ds.n_db) for _ in range(ds.n_queries)])
  results = {"demo": runner.score(ranks, ds.gnd)}
  weights = rng.dirichlet(np.ones(1 + 4 + 2), ds.n_queries)
  path = report.write_html_report(results, str(tmp_path), datasets=ds, ranks=ranks,
                                  fusion=weights, grid=2, scales=(0.5, 1.0))
  assert path == str(tmp_path / "report.html")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
  parser = _Tags()
  parser.feed(text)
  for name, key, value in parser.cells:
    assert name == "demo" and value == f"{100 * results['demo'][key]:.2f}"
  assert {k for _, k, _ in parser.cells} >= {"mAP_E", "mAP_M", "mAP_H", "mP@10_H"}
  imgs = [a for t, a in parser.tags if t == "img"]
  assert all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
  assert sum("query" in a["class"].split() for a in imgs) == ds.n_queries
  assert sum(a["class"] == "fusion" for a in imgs) == ds.n_queries
  hits = [a for a in imgs if "hit" in a["class"].split()]
  assert len(hits) == 10 * ds.n_queries
  for q in range(ds.n_queries):
    g = ds.gnd[q]
    for r, a in enumerate(hits[10 * q:10 * q + 10]):
      j = int(ranks[q, r])
      want = ("easy" if j in set(g["easy"].tolist()) else "hard" if j in set(g["hard"].tolist())
              else "junk" if j in set(g["junk"].tolist()) else "negative")
      assert int(a["data-db"]) == j and a["class"].split() == ["hit", want]
  bars = [a for t, a in parser.tags if t == "rect" and "ap" in a.get("class", "").split()]
  per_query = results["demo"]["per_query"]
  assert len(bars) == sum(np.isfinite(v).sum() for v in per_query.values())
