"""Every `python -m qaff_jax.*` entry point: `--help` exits 0, usage mistakes are
one `error:` line on stderr with exit code 2, every flag has a help text, and
jax's platform probing ("Unable to initialize backend 'tpu'") stays quiet.

Each subprocess imports absl (and some jax, ~2-4 s); only cheap paths run.
"""

import ast
import json
import logging
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from qaff_jax import cli_util, config_lib
from qaff_jax.evaluation import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENTRY_POINTS = [
    "qaff_jax.train", "qaff_jax.evaluate", "qaff_jax.convert", "qaff_jax.compare",
    "qaff_jax.viz.fusion", "qaff_jax.data.demo", "qaff_jax.data.convert",
    "qaff_jax.bench.model", "qaff_jax.bench.extract", "qaff_jax.bench.train",
    "qaff_jax.bench.search", "qaff_jax.compile", "qaff_jax.search", "qaff_jax.reproduce",
    "qaff_jax.data.download", "qaff_jax.data.build_gldv2", "qaff_jax.data.check",
]
# compare.py is not switched to cli_util.run yet: absl's --help exits 1 there.
NO_RUN = "/nonexistent/qaff_run"  # never created: each case fails before writing
DEMO = ["--config", "configs/demo.py:quick", "--workdir", NO_RUN]
DOLG = ["--config", "configs/baselines.py:method=dolg", "--workdir", NO_RUN]


def _run(module, *args, platforms="cpu"):
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)


def _assert_usage_error(proc, *fragments):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def _fake_run(root, **config_fields):
  """A workdir that passes the CLI's checks: config.json and a step folder."""
  config = config_lib.apply_overrides(config_lib.base_config(), config_fields)
  os.makedirs(os.path.join(root, "checkpoints", "3"))
  with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json())
  return str(root)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0(module):
  proc = _run(module, "--help")
  assert proc.returncode == 0, proc.stderr
  assert "usage" in proc.stdout.lower() or "flags" in proc.stdout.lower(), proc.stdout
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module,args,fragments", [
    ("qaff_jax.train", [], ["missing --config, --workdir", "e.g. python -m qaff_jax.train"]),
    ("qaff_jax.train", ["--config", "configs/demo.py:quik", "--workdir", NO_RUN],
     ["quik"]),
    ("qaff_jax.train", ["--config", "configs/nope.py", "--workdir", NO_RUN],
     ["configs/nope.py"]),
    ("qaff_jax.train", ["--config", "configs/demo.py:quick", "--workdir", NO_RUN,
                        "--config.optim.lrr=0.1"], ["lrr"]),
    ("qaff_jax.train", ["--no_such_flag"], ["no_such_flag", "--help"]),
    # The config the trainer loads is locked and typed: an unknown field at any
    # depth, or a value of the wrong type, is named before anything runs.
    ("qaff_jax.train", [*DEMO, "--config.nonexistent=1"],
     ["no such config field 'nonexistent'", "--help"]),
    ("qaff_jax.train", [*DEMO, "--config.model.qaff.fusoin=uniform"],
     ["no such config field 'fusoin'", '"fusion"']),
    ("qaff_jax.train", [*DEMO, "--config.optim.lr=fast"],
     ["--config.optim.lr=fast", "float"]),
    ("qaff_jax.train", [*DEMO, "--config.batch_size=1.5"],
     ["--config.batch_size=1.5", "int"]),
    ("qaff_jax.train", [*DEMO, "--config.eval.at_end=maybe"],
     ["--config.eval.at_end=maybe", "boolean"]),
    ("qaff_jax.train", [*DOLG, "--config.loss.margn=0.2"],
     ["no such config field 'margn'", '"margin"']),
    # A None default that is typed (model.baseline.local_in_features: int).
    ("qaff_jax.train", [*DOLG, "--config.model.baseline.local_in_features=half"],
     ["--config.model.baseline.local_in_features=half", "int"]),
    # Good overrides reach the trainer's checks, typed (0 is the int 0); a bad
    # value found there is one line too.
    ("qaff_jax.train", ["--config", "configs/gldv2.py", "--workdir", NO_RUN,
                        "--config.data.train_files=/data/gldv2/train-*",
                        "--config.data.num_classes=0"],
     ["config.data.num_classes=0 must be > 0"]),
    # Extraction settings are checked before training, not at its end.
    ("qaff_jax.train", [*DEMO, "--config.eval.scales=a,b"],
     ["config.eval.scales=('a,b',)", "positive numbers"]),
    ("qaff_jax.train", [*DEMO, "--config.eval.scale_reduce=median"],
     ["config.eval.scale_reduce='median'"]),
    ("qaff_jax.convert", [], ["missing --from, --arch, --out"]),
    ("qaff_jax.bench.extract", [], ["missing --config"]),
    ("qaff_jax.viz.fusion", [], ["--workdir", "--help"]),
    ("qaff_jax.data.demo", [], ["--out"]),
    ("qaff_jax.data.convert", [], ["--input", "--output"]),
    ("qaff_jax.evaluate", [], ["nothing to evaluate", "--workdir"]),
    ("qaff_jax.evaluate", ["--workdir", "/does/not/exist"], ["/does/not/exist", "no such folder"]),
])
def test_usage_mistakes_are_one_line_exit_2(module, args, fragments):
  _assert_usage_error(_run(module, *args), *fragments)
  assert not os.path.exists(NO_RUN)


def test_evaluate_workdir_checks_and_config_overrides_on_the_cli(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  run = _fake_run(tmp_path / "run")
  # A folder that is not a run, and a bad override of the run's saved config:
  # both found before anything loads a model.
  _assert_usage_error(_run("qaff_jax.evaluate", "--workdir", empty), "no config.json")
  _assert_usage_error(_run("qaff_jax.evaluate", "--workdir", run, "--data_dir", tmp_path,
                           "--config.eval.max_side=big"), "--config.eval.max_side=big", "int")


def test_backend_probe_line_absent_on_a_quick_command(tmp_path):
  gnd = {"imlist": [f"d{i}" for i in range(5)], "qimlist": ["q0", "q1"],
         "gnd": [{"easy": [0], "hard": [1], "junk": []}, {"easy": [2], "hard": [], "junk": [3]}]}
  with open(tmp_path / "gnd_t.pkl", "wb") as f:
    pickle.dump(gnd, f)
  rng = np.random.default_rng(0)
  np.save(tmp_path / "q.npy", rng.normal(size=(2, 4)).astype(np.float32))
  np.save(tmp_path / "x.npy", rng.normal(size=(5, 4)).astype(np.float32))
  # No JAX_PLATFORMS: jax probes every platform it knows (tpu, cuda, ...).
  proc = _run("qaff_jax.evaluate", "--query_features", tmp_path / "q.npy",
              "--db_features", tmp_path / "x.npy", "--gnd", tmp_path / "gnd_t.pkl",
              "--out", tmp_path / "rep", "--json", "--config.eval.search=exact", platforms=None)
  assert proc.returncode == 0, proc.stderr
  assert set(json.loads(proc.stdout)) >= {"mAP_E", "mAP_M", "mAP_H"}
  assert "Unable to initialize backend" not in proc.stderr, proc.stderr
  # With libtpu installed (the tpu extra) on a machine without TPUs: no libtpu chatter.
  assert "TPU_ACCELERATOR_TYPE" not in proc.stderr and "TPU_WORKER" not in proc.stderr, \
      proc.stderr


def test_quiet_backend_probe_filters_only_probe_records():
  logger = logging.getLogger(cli_util.XLA_BRIDGE_LOGGER)
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler, level = Keep(), logger.level
  logger.addHandler(handler)
  try:
    cli_util.quiet_backend_probe()
    cli_util.quiet_backend_probe()  # idempotent
    assert sum(isinstance(f, cli_util._BackendProbeFilter) for f in logger.filters) == 1
    logger.setLevel(logging.INFO)
    logger.info("Unable to initialize backend 'tpu': INTERNAL: no libtpu.so")
    logger.warning("Platform 'x' is experimental")
    assert seen == ["Platform 'x' is experimental"]
    logger.setLevel(logging.DEBUG)  # asked for debug output: the probe shows
    logger.info("Unable to initialize backend 'rocm': none")
    assert seen[-1].startswith("Unable to initialize backend 'rocm'")
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


# ---------------------------------------------------------------------------
# In-process: the pieces behind the CLI behaviour.


def test_split_config_overrides():
  argv = ["prog", "--workdir", "w", "--config.eval.max_side=512", "--config.eval.scales",
          "1.0", "--json", "--", "--config.x=1"]
  rest, overrides = cli_util.split_config_overrides(argv)
  assert rest == ["prog", "--workdir", "w", "--json", "--", "--config.x=1"]
  assert overrides == {"eval.max_side": "512", "eval.scales": "1.0"}
  with_file = ["prog", "--config", "configs/demo.py", "--config.eval.max_side=512"]
  assert cli_util.split_config_overrides(with_file) == (with_file, {})
  assert cli_util.split_config_overrides(["prog", "--config.eval.x"])[1] == {"eval.x": "true"}


def test_apply_config_overrides_parses_by_field_type():
  config = ml_collections.ConfigDict(dict(
      eval=dict(max_side=1024, scales=(0.7, 1.0), rerank="none", at_end=False, k=None,
                temp=0.5)))
  cli_util.apply_config_overrides(config, {
      "eval.max_side": "512", "eval.scales": "1,1.4", "eval.rerank": "aqe",
      "eval.at_end": "true", "eval.k": "100", "eval.temp": "2"})
  assert config.eval.max_side == 512 and config.eval.scales == (1.0, 1.4)
  assert config.eval.rerank == "aqe" and config.eval.at_end is True
  assert config.eval.k == 100 and config.eval.temp == 2.0
  with pytest.raises(cli_util.UsageError, match="did you mean --config.eval.max_side"):
    cli_util.apply_config_overrides(config, {"eval.max_sid": "5"})
  with pytest.raises(cli_util.UsageError, match="want an int"):
    cli_util.apply_config_overrides(config, {"eval.max_side": "big"})
  with pytest.raises(cli_util.UsageError, match="group of fields"):
    cli_util.apply_config_overrides(config, {"eval": "1"})


def test_overrides_apply_on_top_of_the_saved_config(tmp_path):
  run = _fake_run(tmp_path / "run", **{"eval.batch_size": 3, "model.backbone": "resnet_tiny",
                                       "eval.max_side": 800})
  req = cli.Request(workdir=run, config_overrides={"eval.max_side": "512", "eval.scales": "1.0"})
  config = cli._resolve_config(req, None)
  assert config.eval.max_side == 512 and tuple(config.eval.scales) == (1.0,)
  # The rest is the run's saved config, not the defaults.
  assert config.eval.batch_size == 3 and config.model.backbone == "resnet_tiny"
  assert cli._resolve_config(cli.Request(workdir=run), None).eval.max_side == 800


def test_evaluate_usage_errors_are_usage_errors(tmp_path):
  np.save(tmp_path / "r.npy", np.zeros((3, 2), np.int64))
  r, q = str(tmp_path / "r.npy"), str(tmp_path / "q.npy")
  cases = [
      (cli.Request(), "nothing to evaluate"),
      (cli.Request(ranks=r), "--gnd"),
      (cli.Request(ranks=r, query_features=q), "pick different modes"),
      (cli.Request(workdir=str(tmp_path), query_features=q), "pick different modes"),
      (cli.Request(query_features=q, gnd="g.pkl"), "give both"),
      (cli.Request(gldv2_solution="s.csv"), "--query_features and --db_features"),
      (cli.Request(workdir=str(tmp_path / "nope")), "no such folder"),
      (cli.Request(workdir=str(tmp_path)), "no config.json"),
  ]
  for req, match in cases:
    with pytest.raises(cli_util.UsageError, match=match):
      cli.run(req, None)
  run = _fake_run(tmp_path / "run")
  with pytest.raises(cli_util.UsageError, match="--step 7: no such checkpoint"):
    cli.run(cli.Request(workdir=run, step=7, data_dir="d"), None)
  with pytest.raises(cli_util.UsageError, match="--data_dir"):
    cli.run(cli.Request(workdir=run), None)
  os.rmdir(os.path.join(run, "checkpoints", "3"))
  with pytest.raises(cli_util.UsageError, match="no finished checkpoint"):
    cli.run(cli.Request(workdir=run, data_dir="d"), None)
  # A usage error is still a ValueError for library callers.
  assert issubclass(cli_util.UsageError, ValueError)


def test_one_line_shortens_tracebacks():
  text = ("flag --config=c.py:quik: Error whilst parsing config file:\n\nTraceback (most "
          "recent call last):\n  File \"c.py\", line 3\nValueError: unknown 'quik'")
  assert cli_util.one_line(text) == "flag --config=c.py:quik: ValueError: unknown 'quik'"
  assert cli_util.one_line("a\n  b\n") == "a; b"


def _entry_point_files():
  names = ["train.py", "evaluate.py", "compare.py", "convert/__main__.py", "viz/fusion.py",
           "data/demo.py", "data/convert.py"]
  bench = os.path.join(REPO, "qaff_jax", "bench")
  names += [f"bench/{f}" for f in sorted(os.listdir(bench)) if f.endswith(".py")
            and f != "__init__.py"]
  return [os.path.join(REPO, "qaff_jax", n) for n in names]


def _text(node):
  return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def test_every_flag_has_a_help_text():
  missing, seen = [], 0
  for path in _entry_point_files():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        continue
      name = node.func.attr
      kwargs = {k.arg: k.value for k in node.keywords}
      if name.startswith("DEFINE_"):  # (name, default, [enum_values,] help)
        at = 3 if name.endswith("enum") else 2
        help_node = node.args[at] if len(node.args) > at else kwargs.get("help")
      elif name == "add_argument":
        help_node = kwargs.get("help")
      else:
        continue
      seen += 1
      text = _text(help_node) if help_node is not None else None
      if not (text and text.strip()) and not isinstance(help_node, ast.JoinedStr):
        missing.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {name}")
  assert seen > 40
  assert not missing, missing
