"""The comparison script: every variant is a valid config that builds a model;
`python -m qaff_jax.compare` end to end; the table's arithmetic."""

import glob
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

import test_metrics  # its independent revisitop reference
from qaff_jax import compare, models
from qaff_jax.data import revisited

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_env():
  """The environment of a user's run: one CPU device (not the suite's 8 fake
  ones), sharing the suite's persistent compilation cache (conftest.py)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                    "qaff_jax_test_xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def test_cli_end_to_end_table_is_the_recomputed_map(tmp_path):
  # The README's command, one variant, a few steps. The config reads the demo
  # data from ./demo_data: a link to one copy kept beside the compilation cache,
  # which the CLI itself writes on first use (and rewrites if it is stale).
  shared = os.path.join(tempfile.gettempdir(), "qaff_jax_test_demo_data")
  os.makedirs(shared, exist_ok=True)
  os.symlink(shared, tmp_path / "demo_data")
  proc = subprocess.run(
      [sys.executable, "-m", "qaff_jax.compare", "--set", "ablations", "--only", "gem",
       "--quick", "--workdir", "wd"],
      cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout.strip()
  assert (tmp_path / "wd" / "ablations.md").read_text().strip() == table
  header, rule, *rows = table.splitlines()
  assert header.startswith("| variant | seeds | mAP E | mAP M | mAP H |")
  assert len(rows) == 1
  cells = [c.strip() for c in rows[0].strip("|").split("|")]

  # Recompute the mAP from the run's saved descriptors: float64 dot products,
  # a stable descending sort, and test_metrics' loop-based revisitop AP.
  gnd = revisited.load_gnd(tmp_path / "demo_data" / "test" / "demo" / "gnd_demo.pkl")
  desc = {}
  for kind, names in (("query", gnd["qimlist"]), ("db", gnd["imlist"])):
    (path,) = glob.glob(str(tmp_path / "wd" / "gem_seed0" / "eval" / "descriptors" /
                            f"demo_{kind}_step4_*.npz"))
    z = np.load(path)
    assert z["ids"].tolist() == list(names)
    desc[kind] = z["descriptor"].astype(np.float64)
  dim = desc["db"].shape[1]
  assert dim == compare.variant_config({"model.head": "gem"}).model.dim
  s = desc["query"] @ desc["db"].T
  ranks = np.argsort(-s, axis=1, kind="stable").T
  ref = {p: test_metrics._reference_protocol(ranks, gnd["gnd"], p, (1,))[0]
         for p in ("easy", "medium", "hard")}

  run = json.loads((tmp_path / "wd" / "ablations.json").read_text())
  (row,) = run["runs"]
  assert row["variant"] == "gem" and row["seed"] == 0
  for p, key in (("easy", "mAP_E"), ("medium", "mAP_M"), ("hard", "mAP_H")):
    assert row[key] == pytest.approx(ref[p], abs=1e-9), key
  assert cells == ["gem", "1", f"{100 * ref['easy']:.2f}", f"{100 * ref['medium']:.2f}",
                   f"{100 * ref['hard']:.2f}", "-", "-", str(4 * dim),
                   f"{row['extract_ms_per_image']:.1f}"]


@pytest.mark.parametrize("args,fragment", [
    (["--set", "nope"], "--set='nope'"),
    (["--only", "gem,nope"], "unknown variants ['nope']"),
    (["--seeds", "0"], "--seeds=0"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, args, fragment):
  proc = subprocess.run([sys.executable, "-m", "qaff_jax.compare", *args,
                         "--workdir", str(tmp_path / "wd")],
                        cwd=REPO, env=_cli_env(), capture_output=True, text=True,
                        timeout=120)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert fragment in lines[0]
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("set_name", sorted(compare.SETS))
def test_every_variant_builds(set_name):
  for name, overrides in compare.SETS[set_name].items():
    config = compare.apply_overrides(compare.demo_config(), overrides)
    model = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m: m(jax.numpy.zeros((2, 64, 64, 3))), model)
    assert out["descriptor"].shape == (2, config.model.dim), name


def test_unknown_override_is_an_error():
  with pytest.raises(KeyError, match="model.qaff.fusoin"):
    compare.apply_overrides(compare.demo_config(), {"model.qaff.fusoin": "uniform"})


def test_markdown_table():
  rows = [{"variant": "a", "mAP_E": 0.5, "mAP_M": 0.25, "mAP_H": 0.125,
           "descriptor_bytes": 512, "extract_ms_per_image": 3.0}]
  assert "| a | 1 | 50.00 | 25.00 | 12.50 | - | - | 512 | 3.0 |" in compare.markdown(rows)


def test_seeds_give_mean_and_population_std():
  rows = [{"variant": "q", "seed": s, "mAP_E": e, "mAP_M": m, "mAP_H": 0.1,
           "descriptor_bytes": 512, "extract_ms_per_image": 2.0, "region_follow": f,
           "region_follow_chance": 0.2, "weight_std": 0.05}
          for s, e, m, f in ((0, 0.5, 0.2, 0.6), (1, 0.7, 0.4, 0.8))]
  rows.append({"variant": "gem", "seed": 0, "mAP_E": 0.3, "mAP_M": 0.3, "mAP_H": 0.3,
               "descriptor_bytes": 512, "extract_ms_per_image": 1.0})
  summary = compare.summarise(rows)
  assert [e["variant"] for e in summary] == ["q", "gem"]
  assert summary[0]["mAP_E"] == pytest.approx(0.6) and summary[0]["mAP_E_std"] == pytest.approx(0.1)
  table = compare.markdown(rows)
  assert "| q | 2 | 60.00 ± 10.00 | 30.00 ± 10.00 | 10.00 ± 0.00 | 0.70 ± 0.10 (0.20) |" in table
  assert "| gem | 1 | 30.00 | 30.00 | 30.00 | - | - |" in table


def test_fixed_fusions_switch_routing_off_and_seed_is_set():
  config = compare.variant_config({"model.qaff.fusion": "uniform"}, seed=2)
  assert config.model.qaff.route_weight == 0.0 and config.model.qaff.entropy_weight == 0.0
  assert config.seed == 2
