"""The evaluation CLI end to end on a small demo set, and extraction properties."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx

from qaff_jax import parallel, train_lib
from qaff_jax.data import demo, revisited
from qaff_jax.evaluation import cli, extract, metrics, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_train import SMALL, tiny_config  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A demo set and a 2-step run on it (eval at the end, full-precision scales)."""
  root = str(tmp_path_factory.mktemp("evaldemo"))
  demo.generate(root, SMALL)
  workdir = os.path.join(root, "run")
  config = tiny_config(root, total_steps=2, **{"eval.at_end": True})
  out = train_lib.train_and_evaluate(config, workdir)
  return root, workdir, out["eval"]["demo"]


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "qaff_jax.evaluate", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_checkpoint_mode_reproduces_training_hook_and_caches(trained):
  root, workdir, hook_metrics = trained
  req = cli.Request(workdir=workdir, data_dir=os.path.join(root, "test"), datasets="demo")
  results, info, out = cli.run(req, None)
  for key in ("mAP_E", "mAP_M", "mAP_H", "mP@5_M"):
    assert results["demo"][key] == pytest.approx(hook_metrics[key], abs=1e-6)
  cached = os.listdir(os.path.join(workdir, "eval", "descriptors"))
  assert any(f.startswith("demo_db_step2") for f in cached)
  # A second run reuses the files (same ids and settings) and gives the same numbers.
  stamp = {f: os.path.getmtime(os.path.join(workdir, "eval", "descriptors", f)) for f in cached}
  again, _, _ = cli.run(req, None)
  assert again["demo"]["mAP_M"] == results["demo"]["mAP_M"]
  for f, t in stamp.items():
    assert os.path.getmtime(os.path.join(workdir, "eval", "descriptors", f)) == t
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert len(rep["results"]["demo"]["per_query"]["M"]) == SMALL.num_test_landmarks


def test_features_and_ranks_modes_json_stdout(trained, tmp_path):
  root, workdir, _ = trained
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  rng = np.random.default_rng(0)
  q = rng.normal(size=(ds.n_queries, 8)).astype(np.float32)
  x = rng.normal(size=(ds.n_db, 8)).astype(np.float32)
  np.save(tmp_path / "q.npy", q)
  np.save(tmp_path / "x.npy", x)
  gnd = os.path.join(root, "test", "demo", "gnd_demo.pkl")
  proc = _run_cli("--query_features", str(tmp_path / "q.npy"), "--db_features",
                  str(tmp_path / "x.npy"), "--gnd", gnd, "--json",
                  "--ranks_out", str(tmp_path / "r.npy"), "--out", str(tmp_path / "rep"))
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)  # stdout is exactly one JSON object
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  want = metrics.evaluate_revisited(np.argsort(-xn @ qn.T, axis=0, kind="stable"), ds.gnd)
  for key in ("mAP_E", "mAP_M", "mAP_H", "mP@1_E", "mP@10_H"):
    assert got[key] == pytest.approx(want[key], abs=1e-9)
  ranks = np.load(tmp_path / "r.npy")
  assert ranks.shape == (ds.n_db, ds.n_queries)
  proc = _run_cli("--ranks", str(tmp_path / "r.npy"), "--gnd", gnd, "--json",
                  "--out", str(tmp_path / "rep2"))
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == got


@pytest.mark.parametrize("method", ["superglobal", "aqe", "dba"])
def test_rerank_composes_with_both_backends(trained, method):
  root, _, _ = trained
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  rng = np.random.default_rng(1)
  q = rng.normal(size=(ds.n_queries, 16)).astype(np.float32)
  x = rng.normal(size=(ds.n_db, 16)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  params = {"superglobal": dict(m=10, knn=3, beta=0.15)}.get(method, dict(n=2, alpha=3.0))
  for backend in ("exact", "scann"):
    res = runner.search_and_rerank(q, x, backend=backend, rerank=method, rerank_params=params)
    assert res.indices.shape[0] == ds.n_queries
    for row in res.indices:
      assert len(set(row.tolist())) == len(row)  # a permutation of database ids
    m = runner.score(res.indices, ds.gnd)
    assert 0.0 <= m["mAP_M"] <= 1.0


def test_missing_images_error_or_skip(trained, tmp_path):
  root, workdir, _ = trained
  data = tmp_path / "data"
  shutil.copytree(os.path.join(root, "test"), data)
  ds = revisited.RevisitedDataset(str(data), "demo")
  os.remove(ds.db_path(0))
  req = cli.Request(workdir=workdir, data_dir=str(data), datasets="demo",
                    out=str(tmp_path / "rep"))
  with pytest.raises(FileNotFoundError, match=ds.imlist[0]):
    cli.run(req, None)
  req.skip_missing = True
  results, info, _ = cli.run(req, None)
  assert info["demo"]["missing_images"] == 1
  assert 0.0 <= results["demo"]["mAP_M"] <= 1.0


def test_r1m_distractors_extend_the_database(trained, tmp_path):
  root, workdir, _ = trained
  folder = tmp_path / "r1m" / "a"
  folder.mkdir(parents=True)
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  for i in range(5):  # any images will do as distractors
    shutil.copy(ds.db_path(i), folder / f"d{i}.jpg")
  req = cli.Request(workdir=workdir, data_dir=os.path.join(root, "test"), datasets="demo",
                    r1m=str(tmp_path / "r1m"), out=str(tmp_path / "rep"),
                    ranks_out=str(tmp_path / "ranks.npy"))
  results, info, _ = cli.run(req, None)
  assert info["demo"]["r1m"] == 5 and info["demo"]["n_db"] == ds.n_db + 5
  assert np.load(tmp_path / "ranks.npy").shape == (ds.n_db + 5, ds.n_queries)


def test_sharded_extraction_equals_single_device(trained):
  root, workdir, _ = trained
  config, net, _, _ = runner.load_network(workdir)
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  loaders = [lambda i=i: ds.load_db(i) for i in range(7)]
  sizes = [ds.load_db(i).shape[:2] for i in range(7)]
  outs = []
  for mesh in (parallel.make_mesh(2), parallel.make_mesh(1, jax.devices()[:1])):
    fwd = extract.make_forward(net, mesh)
    outs.append(extract.extract(fwd, loaders, sizes, mesh=mesh, max_side=64,
                                scales=(0.8, 1.0), batch_size=4)["descriptor"])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(outs[0], axis=1), 1.0, rtol=1e-5)


def _net_weights(net):
  """(GeM p, eps, whitening kernel [C, D], bias [D]) of the fixture's GeM head, float64."""
  head = net.head
  p = float(head.pool.p[...]) if head.pool.learn_p else float(head.pool.p)
  return (p, head.pool.eps, np.asarray(head.whiten.kernel[...], np.float64),
          np.asarray(head.whiten.bias[...], np.float64))


def _model_outputs(net, image):
  """The network's outputs (with "feature_map" [h, w, C]) for one unpadded uint8
  image, without a mask: a plain jitted call of the model, not the extractor."""
  from qaff_jax.data import transforms
  graphdef, state = nnx.split(net)
  out = _jitted_model(graphdef)(state, transforms.normalize_jnp(image[None]))
  return {k: np.asarray(v[0], np.float64) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _jitted_model(graphdef):
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, return_features=True))


def _gem_descriptor(net, fmap, rows, cols):
  """NumPy GeM head over the top-left rows x cols cells of `fmap`: GeM -> whiten -> L2."""
  p, eps, kernel, bias = _net_weights(net)
  cells = np.maximum(fmap[:rows, :cols], eps) ** p
  pooled = cells.mean(axis=(0, 1)) ** (1.0 / p)
  d = pooled @ kernel + bias
  return d / np.linalg.norm(d)


def test_batching_and_padding(trained):
  """A padded image's descriptor is the GeM of exactly its valid cells, and
  batch-mates never influence a descriptor."""
  _, workdir, _ = trained
  _, net, mesh, _ = runner.load_network(workdir)
  fwd = extract.make_forward(net, mesh)
  stride = net.backbone.output_stride
  assert stride == 32
  rng = np.random.default_rng(0)
  h, w = 90, 120   # not multiples of the stride: the last cell row/column is partial
  imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
  rows, cols = 3, 4   # ceil(90 / 32), ceil(120 / 32): the cells holding any valid pixel
  kw = dict(mesh=mesh, max_side=128, scales=(1.0,), batch_size=8)
  together = extract.extract(fwd, [lambda im=im: im for im in imgs], [(h, w)] * 3,
                             bucket=32, **kw)["descriptor"]
  for im, d in zip(imgs, together):  # batch-mates never influence a descriptor
    alone = extract.extract(fwd, [lambda: im], [(h, w)], bucket=32, **kw)["descriptor"][0]
    np.testing.assert_allclose(alone, d, rtol=1e-5, atol=1e-6)
  # Reference: the image zero-padded as the extractor pads it, the network's
  # feature map of that input, GeM in NumPy over exactly the valid cells. With
  # bucket 32 the input is 96x128 (map 3x4, all valid); with bucket 160 it is
  # 160x160 (map 5x5, of which the top-left 3x4 are valid).
  padded = extract.extract(fwd, [lambda: imgs[0]], [(h, w)], bucket=160, **kw)["descriptor"][0]
  for got, side in ((together[0], (96, 128)), (padded, (160, 160))):
    canvas = np.zeros((*side, 3), np.uint8)
    canvas[:h, :w] = imgs[0]
    fmap = _model_outputs(net, canvas)["feature_map"]
    assert fmap.shape[:2] == (side[0] // stride, side[1] // stride)
    np.testing.assert_allclose(got, _gem_descriptor(net, fmap, rows, cols), atol=2e-5)
  # The map of the padded input is not the unpadded one's (the convolutions see
  # the zeros), so padded and unpadded descriptors differ, and pooling all the
  # 5x5 cells would be far from the extracted descriptor.
  whole = _gem_descriptor(net, fmap, 5, 5)
  assert np.abs(whole - padded).max() > 100 * 2e-5


def test_descriptor_cache_is_keyed_by_step_settings_and_ids(trained, tmp_path, monkeypatch):
  """A cached file is reused only for the same step, extraction settings and
  image ids; any change re-extracts (counted by a stand-in for the extraction)."""
  from qaff_jax import config_lib
  from qaff_jax import state as state_lib
  root, workdir, _ = trained
  calls = []

  def fake_extract(forward, loaders, sizes, **kw):
    calls.append(kw)
    return {"descriptor": np.random.default_rng(len(calls)).normal(
        size=(len(loaders), 8)).astype(np.float32)}

  monkeypatch.setattr(extract, "extract", fake_extract)
  monkeypatch.setattr(extract, "make_forward", lambda *a, **k: None)
  run_dir = str(tmp_path / "run")

  def evaluate(step, **overrides):
    """Extractions (query + database) this evaluation ran, and its mAP."""
    config = config_lib.apply_overrides(state_lib.load_config(workdir),
                                        {f"eval.{k}": v for k, v in overrides.items()})
    before = len(calls)
    results, _ = runner.evaluate_network(config, None, None, step=step, workdir=run_dir,
                                         data_root=os.path.join(root, "test"),
                                         datasets=["demo"], kwargs=dict(backend="exact"))
    return len(calls) - before, results["demo"]["mAP_M"]

  first = evaluate(2)
  assert first[0] == 2
  assert evaluate(2) == (0, first[1])      # same step + settings + ids: the saved file
  assert evaluate(3)[0] == 2               # another checkpoint
  changes = dict(max_side=48, scales=(1.0, 0.5), batch_size=4, bucket=32, scale_reduce="max")
  for key, value in changes.items():
    assert evaluate(2, **{key: value})[0] == 2, key
    assert calls[-1][key] == value
  assert evaluate(2) == (0, first[1])      # the first file is still there, still valid
  assert evaluate(3, **changes)[0] == 2   # all changed together
  assert evaluate(3, **changes)[0] == 0   # ... and that file reused in turn

  # Image ids: another list, or the same ids in another order, re-extracts.
  settings = runner.ExtractSettings()
  path = str(tmp_path / "ids.npz")
  loaders, sizes = [None] * 3, [(8, 8)] * 3
  kw = dict(forward=None, mesh=None, settings=settings)
  a = runner.cached_extract(path, ["a", "b", "c"], loaders, sizes, **kw)
  n = len(calls)
  np.testing.assert_array_equal(runner.cached_extract(path, ["a", "b", "c"], loaders, sizes,
                                                      **kw)["descriptor"], a["descriptor"])
  assert len(calls) == n
  runner.cached_extract(path, ["a", "b", "d"], loaders, sizes, **kw)
  assert len(calls) == n + 1
  runner.cached_extract(path, ["d", "b", "a"], loaders, sizes, **kw)
  assert len(calls) == n + 2
  # The same ids and settings with other image sizes (another copy of the
  # images, or --skip_missing's blank stand-in for one of them) re-extracts.
  runner.cached_extract(path, ["d", "b", "a"], loaders, [(8, 8), (64, 64), (8, 8)], **kw)
  assert len(calls) == n + 3
  runner.cached_extract(path, ["d", "b", "a"], loaders, sizes, **kw)
  assert len(calls) == n + 4
  n += 2
  # The same file name with other settings (the file records its settings key).
  for key, value in changes.items():
    other = dataclasses.replace(settings, **{key: value})
    runner.cached_extract(path, ["d", "b", "a"], loaders, sizes, **{**kw, "settings": other})
    assert len(calls) == n + 3, key
    assert calls[-1][key] == value
    runner.cached_extract(path, ["d", "b", "a"], loaders, sizes, **kw)   # back: recomputed
    n += 2


def test_cli_scann_search_reports_recall_latency_and_bytes(trained, tmp_path):
  """`python -m qaff_jax.evaluate --workdir ... --search scann`: the ranking and
  the report's search fields against NumPy on the run's cached descriptors.
  The demo database (21 images) is below `ann.BRUTE_FORCE_BELOW` (no flag or
  config field changes it), so ScaNN serves it with its exact brute-force
  searcher: the top-k must be exactly the float64 ranking."""
  from qaff_jax import state as state_lib
  root, workdir, _ = trained
  k = 5
  t0 = time.perf_counter()
  proc = _run_cli("--workdir", workdir, "--data_dir", os.path.join(root, "test"),
                  "--datasets", "demo", "--search", "scann", "--k", str(k),
                  "--scann_dir", str(tmp_path / "index"), "--ranks_out",
                  str(tmp_path / "ranks.npy"), "--out", str(tmp_path / "rep"))
  wall_ms = 1e3 * (time.perf_counter() - t0)
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / "rep" / "report.json") as f:
    rep = json.load(f)
  info = rep["info"]["demo"]
  # The descriptors it searched: the run's cache for step 2 and its settings.
  key = runner.ExtractSettings.from_config(state_lib.load_config(workdir).eval).key()
  cache = runner.descriptor_cache(workdir)
  with np.load(os.path.join(cache, f"demo_query_step2_{key}.npz")) as z:
    q = z["descriptor"].astype(np.float64)
  with np.load(os.path.join(cache, f"demo_db_step2_{key}.npz")) as z:
    db = z["descriptor"].astype(np.float64)
  ds = revisited.RevisitedDataset(os.path.join(root, "test"), "demo")
  assert q.shape == (ds.n_queries, 16) and db.shape == (ds.n_db, 16)
  sims = q @ db.T
  want = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  gaps = np.diff(np.sort(sims, axis=1)[:, ::-1][:, :k + 1], axis=1)
  assert np.abs(gaps).min() > 1e-6   # no near-ties: the top-k is well defined
  ranks = np.load(tmp_path / "ranks.npy")
  assert ranks.shape == (k, ds.n_queries)
  np.testing.assert_array_equal(ranks.T, want)
  assert info["backend"] == info["search_used"] == "scann" and info["step"] == 2
  assert (info["n_db"], info["n_queries"], info["dim"]) == (ds.n_db, ds.n_queries, 16)
  assert info[f"scann_recall@{k}"] == _recall(ranks.T, want) == 1.0
  assert info["exact_bytes_per_image"] == info["descriptor_bytes"] == 16 * 4
  # Brute force keeps the float32 database: D*4 bytes an image plus file headers.
  assert info["scann_bytes_per_image"] == pytest.approx(_dir_bytes(tmp_path / "index") / ds.n_db)
  assert 16 * 4 <= info["scann_bytes_per_image"] <= 16 * 4 + 1024 / ds.n_db
  assert 0 < info["scann_ms_per_query"] * ds.n_queries < wall_ms
  want_metrics = metrics.evaluate_revisited(want.T, ds.gnd)
  for m in ("mAP_E", "mAP_M", "mAP_H", "mP@5_M"):
    assert rep["results"]["demo"][m] == pytest.approx(want_metrics[m], abs=1e-9)


class _FakeHosts:
  """`process_count` simulated processes (threads) with `local` devices each:
  the `jax` calls `extract.extract` makes, and an all-gather over a barrier."""

  def __init__(self, count, local):
    self.count, self.local = count, local
    self.me = threading.local()
    self.barrier = threading.Barrier(count, timeout=30)
    self.slots = [None] * count
    self.batches = [[] for _ in range(count)]   # per process: (images, mask) of each step
    self.jax = types.SimpleNamespace(process_index=lambda: self.me.p,
                                     process_count=lambda: count,
                                     device_count=lambda: count * local,
                                     device_get=np.asarray)
    self.parallel = types.SimpleNamespace(global_batch=self.global_batch)
    self.multihost = types.SimpleNamespace(process_allgather=self.allgather)

  def global_batch(self, local_batch, mesh):
    del mesh
    self.batches[self.me.p].append((local_batch["image"].copy(), local_batch["mask"].copy()))
    return local_batch   # each process keeps its own rows: the forward runs locally

  def allgather(self, x, tiled):
    assert tiled
    self.slots[self.me.p] = np.asarray(x)
    self.barrier.wait()
    out = np.concatenate(self.slots)
    self.barrier.wait()
    return out


def _probe_forward(images, mask):
  """Per row: [pixel value (the image id + 1), valid rows, valid columns, leak]:
  a padded row (no valid pixel) returns 1e6 in the last slot."""
  out = np.zeros((len(images), 4))
  for r, (im, m) in enumerate(zip(images, mask)):
    valid = m > 0
    if valid.any():
      out[r, :3] = im[valid].mean(), valid.any(axis=1).sum(), valid.any(axis=0).sum()
    else:
      out[r, 3] = 1e6
  return {"probe": out}


# Rows each process loads per step (one shape bucket, batch_size 8, 2 devices a
# process), by hand: the global batch is 8 rounded up to the device count
# (P=3: 12), a partial batch is the smallest device count times a power of two
# holding its jobs, and each process takes 1/P of the rows.
_LOCAL_ROWS = {  # (processes, images) -> per-step local rows
    (1, 1): [2], (1, 5): [8], (1, 13): [8, 8],
    (2, 1): [2], (2, 5): [4], (2, 13): [4, 4],
    (3, 1): [2], (3, 5): [2], (3, 13): [4, 2],
    (4, 1): [2], (4, 5): [2], (4, 13): [2, 2]}
# n = 5: the images each process extracts (rows p*r .. p*r + r - 1 of the batch).
_OWNERS_5 = {1: [{0, 1, 2, 3, 4}], 2: [{0, 1, 2, 3}, {4}], 3: [{0, 1}, {2, 3}, {4}],
             4: [{0, 1}, {2, 3}, {4}, set()]}


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_rows_are_split_over_processes_exactly_once(processes, monkeypatch):
  for n in (1, 5, 13):
    hosts = _FakeHosts(processes, local=2)
    monkeypatch.setattr(extract, "jax", hosts.jax)
    monkeypatch.setattr(extract, "parallel", hosts.parallel)
    monkeypatch.setattr(extract, "multihost_utils", hosts.multihost)
    loads = [[] for _ in range(processes)]

    def loader(i):
      def load():
        loads[hosts.me.p].append(i)
        return np.full((40, 60, 3), i + 1, np.uint8)
      return load

    results, errors = [None] * processes, []

    def run(p):
      hosts.me.p = p
      try:
        results[p] = extract.extract(_probe_forward, [loader(i) for i in range(n)],
                                     [(40, 60)] * n, mesh=None, max_side=64,
                                     scales=(1.0, 0.5), batch_size=8, bucket=16)
      except Exception as e:  # noqa: BLE001 (re-raised below)
        errors.append(e)
        hosts.barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(processes)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    if errors:
      raise errors[0]
    # Two buckets (scale 0.5: 20x30 -> 32x32, scale 1: 40x60 -> 48x64), in order.
    rows = _LOCAL_ROWS[(processes, n)]
    want = [(r, 32, 32, 3) for r in rows] + [(r, 48, 64, 3) for r in rows]
    for p in range(processes):   # equal shapes on every process, step by step
      assert [images.shape for images, _ in hosts.batches[p]] == want, (p, n)
    # Every (image, scale) job is extracted by exactly one process.
    jobs = []
    for p in range(processes):
      for images, mask in hosts.batches[p]:
        for im, m in zip(images, mask):
          if m.any():
            valid = m > 0
            jobs.append((int(im[valid].mean()) - 1, int(valid.any(1).sum()),
                         int(valid.any(0).sum())))
          else:
            assert not im.any()   # a padded row is blank
    assert sorted(jobs) == sorted([(i, 20, 30) for i in range(n)]
                                  + [(i, 40, 60) for i in range(n)]), (processes, n)
    if n == 5:
      for p, owned in enumerate(_OWNERS_5[processes]):
        assert set(loads[p]) == owned, (processes, p)
    # All processes return the same full result; padded rows never enter it.
    want = np.stack([[i + 1, 30, 45, 0] for i in range(n)]).astype(np.float32)
    for p in range(processes):
      np.testing.assert_array_equal(results[p]["probe"], want)


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(ValueError, match="nothing to evaluate"):
    cli.run(cli.Request(), None)
  np.save(tmp_path / "r.npy", np.zeros((3, 2), np.int64))
  with pytest.raises(ValueError, match="--gnd"):
    cli.run(cli.Request(ranks=str(tmp_path / "r.npy")), None)
  with pytest.raises(FileNotFoundError, match="gnd_x.pkl"):
    cli.run(cli.Request(ranks=str(tmp_path / "r.npy"), gnd=str(tmp_path / "gnd_x.pkl")), None)


def _dir_bytes(directory):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def _recall(found, exact):
  """Mean fraction of each row of `exact` found in the same row of `found` (sets)."""
  return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / len(e)
                        for a, e in zip(found, exact)]))


def test_scann_backend_reports_recall_latency_and_index_size(tmp_path):
  rng = np.random.default_rng(3)
  n, dim, nq = 3000, 32, 50
  centres = rng.normal(size=(30, dim))
  x = (centres[rng.integers(0, 30, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = x[:nq] + 0.05 * rng.normal(size=(nq, dim)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  # Independent exact top-100: float64 scores (the 100th/101st gap here is > 1e-5,
  # far above float32 rounding, so float32 and float64 rankings agree).
  exact = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1,
                     kind="stable")[:, :100]
  recalls = {}
  for name, params in (("default", None),
                       # Deliberately bad: one leaf of 55, AH scores, no re-ordering.
                       ("bad", dict(num_leaves_to_search=1, reorder=0))):
    index = tmp_path / name
    t0 = time.perf_counter()
    res = runner.search_and_rerank(q, x, backend="scann", k=100, scann_dir=str(index),
                                   scann_params=params)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    info = res.info
    assert res.indices.shape == (nq, 100) and info["search_used"] == "scann"
    recalls[name] = _recall(res.indices, exact)
    assert info["scann_recall@100"] == pytest.approx(recalls[name], abs=1e-12), name
    assert 0 < info["scann_ms_per_query"] * nq < wall_ms
    assert 0 < info["exact_ms_per_query"] * nq < wall_ms
    assert info["exact_bytes_per_image"] == dim * 4
    # Bytes on disk / n. Per image: int32 leaf token + D/2 one-byte AH codes
    # (dims_per_block=2) + the float32 re-ordering copy (D*4) when re-ordering;
    # the tree centres and codebooks add a few bytes per image at this n.
    assert info["scann_bytes_per_image"] == pytest.approx(_dir_bytes(index) / n)
    per_image = 4 + dim // 2 + (0 if name == "bad" else dim * 4)
    assert per_image <= info["scann_bytes_per_image"] <= per_image + 8, name
  assert recalls["default"] >= 0.95
  assert recalls["bad"] <= recalls["default"] - 0.2, recalls


def test_multiscale_mean_and_max_side_cap_match_a_reference(trained):
  """Default extraction = L2(mean over the default scales of the single-scale
  descriptors), each scale resized (PIL bilinear, as `extract.resize_to`) from
  the original image to round(side * min(1, max_side / long side) * scale)."""
  from PIL import Image
  _, workdir, _ = trained
  _, net, mesh, _ = runner.load_network(workdir)
  img = np.random.default_rng(6).integers(0, 256, (77, 150, 3), dtype=np.uint8)
  # By hand: cap 96 / 150 = 0.64 -> 49.28 x 96; times 1/sqrt2, 1, sqrt2:
  # 34.85 x 67.88, 49.28 x 96, 69.69 x 135.76, rounded to the nearest pixel.
  sizes = [(35, 68), (49, 96), (70, 136)]
  assert [extract.scaled_size(77, 150, 96, s) for s in extract.DEFAULT_SCALES] == sizes
  assert extract.scaled_size(40, 60, 96, 1.0) == (40, 60)   # never enlarged by the cap
  per_scale = []
  for h, w in sizes:
    resized = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    per_scale.append(_model_outputs(net, resized)["descriptor"])  # unpadded, no mask
  want = np.mean(per_scale, axis=0)
  want /= np.linalg.norm(want)
  # bucket=1: every input is exactly its resized size, so no padding is involved.
  got = extract.extract(extract.make_forward(net, mesh), [lambda: img], [(77, 150)],
                        mesh=mesh, max_side=96, bucket=1)["descriptor"][0]
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The scales matter: the mean is far from any one scale's descriptor.
  assert min(np.abs(want - d).max() for d in per_scale) > 1e-3


def test_scale_max_reduce_is_elementwise_max_of_scales(trained):
  _, workdir, _ = trained
  _, net, mesh, _ = runner.load_network(workdir)
  fwd = extract.make_forward(net, mesh)
  rng = np.random.default_rng(5)
  img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  kw = dict(mesh=mesh, max_side=96, batch_size=8)
  per_scale = [extract.extract(fwd, [lambda: img], [(64, 96)], scales=(s,), **kw)["descriptor"][0]
               for s in (0.75, 1.0)]
  got = extract.extract(fwd, [lambda: img], [(64, 96)], scales=(0.75, 1.0),
                        scale_reduce="max", **kw)["descriptor"][0]
  want = np.maximum(per_scale[0], per_scale[1])
  np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)


def test_gldv2_retrieval_mode(tmp_path):
  # 3 test images, 5 index images; t0 matches i1 exactly, t1 matches i3, t2 is a non-landmark.
  rng = np.random.default_rng(0)
  index = rng.normal(size=(5, 8)).astype(np.float32)
  test = np.stack([index[1], index[3], rng.normal(size=8)]).astype(np.float32)
  np.save(tmp_path / "index.npy", index)
  np.save(tmp_path / "test.npy", test)
  (tmp_path / "index_ids.txt").write_text("\n".join(f"i{j}" for j in range(5)) + "\n")
  (tmp_path / "test_ids.txt").write_text("t0\nt1\nt2\n")
  (tmp_path / "sol.csv").write_text("id,images,Usage\nt0,i1 i4,Public\nt1,i3,Private\n"
                                    "t2,None,Ignored\n")
  req = cli.Request(gldv2_solution=str(tmp_path / "sol.csv"),
                    query_features=str(tmp_path / "test.npy"), query_ids=str(tmp_path / "test_ids.txt"),
                    db_features=str(tmp_path / "index.npy"), db_ids=str(tmp_path / "index_ids.txt"),
                    out=str(tmp_path / "rep"))
  results, _, _ = cli.run(req, None)
  # Independent: rank index images by cosine and apply the Kaggle AP@100 by hand.
  def ap(qv, relevant):
    order = np.argsort(-(index / np.linalg.norm(index, axis=1, keepdims=True)) @ qv, kind="stable")
    hits, total = 0, 0.0
    for rank, j in enumerate(order, 1):
      if f"i{j}" in relevant:
        hits += 1
        total += hits / rank
    return total / min(len(relevant), 100)
  t0 = ap(test[0] / np.linalg.norm(test[0]), {"i1", "i4"})
  t1 = ap(test[1] / np.linalg.norm(test[1]), {"i3"})
  assert results["gldv2"]["mAP@100_public"] == pytest.approx(t0)
  assert results["gldv2"]["mAP@100_private"] == pytest.approx(t1)
  assert results["gldv2"]["mAP@100_all"] == pytest.approx((t0 + t1) / 2)
  assert os.path.exists(tmp_path / "rep" / "report.md")


def test_hook_and_cli_are_one_evaluation_path(trained):
  """The training hook honours eval.search / eval.rerank like the CLI, both use
  one descriptor cache (ids saved with the descriptors), and each evaluation
  keeps its own report folder named by step and settings."""
  from qaff_jax.evaluation import hook
  root, workdir, _ = trained
  config, graphdef, state, mesh, step = runner.load_state(workdir)
  config.eval.data_root = os.path.join(root, "test")
  cache = runner.descriptor_cache(workdir)
  (db_file,) = [f for f in os.listdir(cache) if f.startswith("demo_db_step2")]
  with np.load(os.path.join(cache, db_file), allow_pickle=False) as z:
    ds = revisited.RevisitedDataset(config.eval.data_root, "demo")
    assert list(z["ids"]) == list(ds.imlist) and z["descriptor"].shape[0] == ds.n_db
  stamp = os.path.getmtime(os.path.join(cache, db_file))

  config.eval.rerank = "aqe"
  from_hook = hook.evaluate_state(config, graphdef, state, mesh, workdir, step=step)["demo"]
  assert os.path.getmtime(os.path.join(cache, db_file)) == stamp   # reused, not re-extracted
  from_cli, info, out = cli.run(cli.Request(workdir=workdir, data_dir=config.eval.data_root,
                                            datasets="demo", rerank="aqe"), None)
  assert from_cli["demo"]["mAP_M"] == pytest.approx(from_hook["mAP_M"], abs=1e-9)
  assert info["demo"]["rerank"] == "aqe"
  plain, _, _ = cli.run(cli.Request(workdir=workdir, data_dir=config.eval.data_root,
                                    datasets="demo"), None)
  assert from_hook["mAP_M"] != pytest.approx(plain["demo"]["mAP_M"], abs=1e-9)
  reports = sorted(d for d in os.listdir(os.path.join(workdir, "eval")) if d.startswith("step"))
  key = runner.ExtractSettings.from_config(config.eval).key()
  assert f"step2_exact_aqe_{key}" in reports and f"step2_exact_none_{key}" in reports
  assert os.path.basename(out) == f"step2_exact_aqe_{key}"
  assert runner.latest_report(workdir).endswith(f"step2_exact_none_{key}")
  # Each report has its self-contained HTML page: one section per query with its top 10.
  with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
    page = f.read()
  assert page.count('<img class="hit ') == ds.n_queries * 10
  assert 'src="data:image/jpeg;base64,' in page   # images embedded, no external files


def test_scann_target_recall_tunes_saves_and_reuses(tmp_path):
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(30, 32))
  x = (centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = x[:40] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  kwargs = dict(backend="scann", k=50, scann_dir=str(tmp_path / "index"), target_recall=0.9)
  res = runner.search_and_rerank(q, x, **kwargs)
  rep = res.info["scann_tuning"]
  assert rep["target_recall"] == 0.9 and rep["verified"] and rep["backend"] in ("scann", "exact")
  assert res.info["search_used"] == rep["backend"] and res.indices.shape == (40, 50)
  if rep["backend"] == "scann":
    assert res.info["scann_recall@50"] >= 0.85
  again = runner.search_and_rerank(q, x, **kwargs)   # the saved index, not re-tuned
  assert again.info["scann_tuning"]["total_s"] == rep["total_s"]
  np.testing.assert_array_equal(again.indices, res.indices)
  # --target_recall is for ScaNN only, and a recall.
  from qaff_jax import config_lib
  with pytest.raises(ValueError, match="--search scann"):
    cli._search_kwargs(cli.Request(search="exact", target_recall=0.9), config_lib.base_config())
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    cli._search_kwargs(cli.Request(search="scann", target_recall=2.0), config_lib.base_config())
  kw = cli._search_kwargs(cli.Request(search="scann", target_recall=0.95),
                          config_lib.base_config())
  assert kw["target_recall"] == 0.95 and "target_recall" not in kw["scann_params"]
  assert "recall0.95" in runner.report_name(3, runner.ExtractSettings(), kw)
