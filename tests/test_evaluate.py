"""The evaluation CLI end to end on a small demo set, and extraction properties."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

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


def test_batching_and_padding(trained):
  _, workdir, _ = trained
  _, net, mesh, _ = runner.load_network(workdir)
  fwd = extract.make_forward(net, mesh)
  rng = np.random.default_rng(0)
  imgs = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
  kw = dict(mesh=mesh, max_side=128, scales=(1.0,))
  together = extract.extract(fwd, [lambda im=im: im for im in imgs], [(96, 128)] * 3,
                             batch_size=8, bucket=32, **kw)["descriptor"]
  for im, d in zip(imgs, together):  # batch-mates never influence a descriptor
    alone = extract.extract(fwd, [lambda: im], [(96, 128)], batch_size=8, bucket=32,
                            **kw)["descriptor"][0]
    np.testing.assert_allclose(alone, d, rtol=1e-5, atol=1e-6)
  # Padding into a larger bucket: pooled cells are exactly the valid ones, but
  # cells next to the padding see it through the convolutions, so the
  # descriptor moves a little (more for tiny maps like this 3x4 one).
  padded = extract.extract(fwd, [lambda: imgs[0]], [(96, 128)], batch_size=8, bucket=160,
                           **kw)["descriptor"][0]
  assert float(together[0] @ padded) > 0.9


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(ValueError, match="nothing to evaluate"):
    cli.run(cli.Request(), None)
  np.save(tmp_path / "r.npy", np.zeros((3, 2), np.int64))
  with pytest.raises(ValueError, match="--gnd"):
    cli.run(cli.Request(ranks=str(tmp_path / "r.npy")), None)
  with pytest.raises(FileNotFoundError, match="gnd_x.pkl"):
    cli.run(cli.Request(ranks=str(tmp_path / "r.npy"), gnd=str(tmp_path / "gnd_x.pkl")), None)


def test_scann_backend_reports_recall_latency_and_index_size(tmp_path):
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(30, 32))
  x = (centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = x[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  res = runner.search_and_rerank(q, x, backend="scann", k=100,
                                 scann_dir=str(tmp_path / "index"))
  info = res.info
  assert info["scann_recall@100"] >= 0.9
  assert info["scann_ms_per_query"] > 0 and info["exact_ms_per_query"] > 0
  assert info["scann_bytes_per_image"] > 0 and info["exact_bytes_per_image"] == 32 * 4
  assert res.indices.shape == (50, 100)


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
