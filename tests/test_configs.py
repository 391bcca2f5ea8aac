"""Config files, their variants and errors; no TensorFlow anywhere.

What the trainer does with a bad `--config.<field>` override (the config it
loads is locked and typed) is checked on the command line in test_cli_usage.py;
the benchmarks are in test_bench.py.
"""

import os
import sys

import pytest

from qaff_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


def test_gldv2_recipe():
  c = load("gldv2").get_config()
  assert (c.model.backbone, c.data.image_size, c.batch_size) == ("resnet101", 512, 256)
  assert c.model.head == "qaff" and c.loss.aux_weight > 0
  assert load("gldv2").get_config("head=gem").loss.aux_weight == 0.0
  assert (c.loss.name, c.loss.scale, c.loss.margin) == ("arcface", 30.0, 0.15)
  assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
      "sgd", 0.01, 0.9, 1e-4)
  assert c.optim.warmup_epochs == 5.0
  assert load("gldv2").get_config("backbone=resnet50").model.backbone == "resnet50"
  small = load("gldv2").get_config("runlocal")
  # runlocal: "tiny model, few steps", everything else the recipe.
  assert small.model.backbone == "resnet_tiny" and 0 < small.total_steps <= 10
  assert small.batch_size <= 16 and small.data.image_size <= 64
  assert (small.loss.to_dict(), small.model.head) == (c.loss.to_dict(), c.model.head)


def test_rgldv2_filters_and_relabels():
  c = load("rgldv2").get_config("backbone=resnet50")
  assert c.data.class_allowlist and c.data.relabel
  assert c.model.backbone == "resnet50"


def test_every_config_docstring_starts_with_its_command():
  for name in ("gldv2", "rgldv2", "demo"):
    doc = load(name).__doc__.strip()
    assert f"python -m qaff_jax.train --config configs/{name}.py" in doc.split("\n\n")[1]


def test_bad_arguments_name_the_key():
  with pytest.raises(ValueError, match="backbon"):
    load("gldv2").get_config("backbon=resnet50")
  with pytest.raises(ValueError, match="quick"):
    config_lib.parse_arg("quick=maybe", quick=False)
  assert config_lib.parse_arg("quick,epochs=3", quick=False, epochs=1.0).epochs == 3.0


def test_train_entry_point_loads_the_config_locked():
  """`python -m qaff_jax.train` reads --config locked: overrides apply, and code
  that sets a field the config lacks (a typo, a stale name) is an error naming it.
  (A bad `--config.<field>` on the command line: test_cli_usage.py.)"""
  import subprocess
  code = """if True:
      import sys
      sys.argv = ["train", "--config", "configs/demo.py:quick", "--workdir", "w",
                  "--config.optim.lr=0.5"]
      from qaff_jax import cli_util, train
      cli_util.parse_flags(sys.argv)
      c = train._CONFIG.value
      assert c.optim.lr == 0.5 and c.total_steps == 4, (c.optim.lr, c.total_steps)
      c.optim.lr = 0.25  # an existing field may change
      for node, key in ((c.optim, "lrr"), (c, "demo_roots"), (c.model.qaff, "fusoin")):
        try:
          setattr(node, key, 1)
        except AttributeError as err:
          assert key in str(err), err
        else:
          raise SystemExit(f"set {key} on a locked config")
      print("locked")
      """
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.split() == ["locked"], proc.stderr


def test_apply_overrides_sets_fields_and_names_unknown_ones():
  """config_lib.apply_overrides (compare / evaluate overrides): dotted keys at any
  depth; an unknown field is a KeyError naming it and changes nothing."""
  c = load("demo").get_config()
  config_lib.apply_overrides(c, {"model.qaff.fusion": "uniform", "optim.lr": 0.5})
  assert (c.model.qaff.fusion, c.optim.lr) == ("uniform", 0.5)
  before = c.to_dict()
  with pytest.raises(KeyError, match=r"'optim\.lrr': no such config field"):
    config_lib.apply_overrides(c, {"optim.lrr": 0.1})
  with pytest.raises(KeyError, match="model.qaff.fusoin"):
    config_lib.apply_overrides(c, {"model.qaff.fusoin": "uniform"})
  with pytest.raises(KeyError, match="optimm"):
    config_lib.apply_overrides(c, {"optimm.lr": 0.1})
  with pytest.raises(TypeError, match="'lr'"):   # fields keep their types
    config_lib.apply_overrides(c, {"optim.lr": "fast"})
  assert c.to_dict() == before


def test_check_config_names_the_key():
  """The trainer's early checks (train.py turns them into one `error:` line)."""
  from qaff_jax import train_lib
  ok = load("gldv2").get_config("runlocal")
  ok.data.train_files = "/data/gldv2/train-*"
  train_lib.check_config(ok)
  train_lib.check_config(load("gldv2").get_config(), need_data=False)  # AOT compile
  for field, value, match in [
      ("data.train_files", "", "config.data.train_files is empty"),
      ("data.num_classes", 0, r"config.data.num_classes=0 must be > 0"),
      ("batch_size", 0, "config.batch_size=0"),
      ("grad_accum", 3, r"config.batch_size=16 must be a positive multiple of "
                        r"config.grad_accum=3"),
      ("loss.name", "arcfaec", "config.loss.name='arcfaec'")]:
    bad = config_lib.apply_overrides(ok.copy_and_resolve_references(), {field: value})
    with pytest.raises(ValueError, match=match):
      train_lib.check_config(bad)


def test_tensorflow_is_never_imported():
  import subprocess
  code = ("import sys; import qaff_jax.data.pipeline, qaff_jax.data.records, "
          "qaff_jax.data.convert, qaff_jax.train_lib; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
