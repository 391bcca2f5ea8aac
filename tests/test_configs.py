"""Config files, their variants and errors; no TensorFlow anywhere; the benchmark runs."""

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
  assert small.model.backbone == "resnet_tiny" and small.total_steps > 0


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


def test_configs_are_locked_against_typos():
  c = load("demo").get_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.optim.lrr = 0.1


def test_tensorflow_is_never_imported():
  import subprocess
  code = ("import sys; import qaff_jax.data.pipeline, qaff_jax.data.records, "
          "qaff_jax.data.convert, qaff_jax.train_lib; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_train_benchmark_runs():
  from qaff_jax.bench import train as bench
  c = load("gldv2").get_config("runlocal,head=gem")
  c.data.num_classes = 32
  c.batch_size = 8
  c.data.image_size = 32
  out = bench.run(c, steps=1, warmup=0)
  assert out["step_ms"] > 0 and out["img_per_s"] > 0 and out["compile_s"] > 0
  assert out["step_gflops"] > 0


def test_extraction_benchmark_runs():
  from qaff_jax.bench import extract as bench
  c = load("gldv2").get_config("runlocal,head=gem")
  c.data.num_classes = 8
  out = bench.run(c, n_images=3, max_side=64, scales=(1.0,))
  assert out["img_per_s"] > 0 and out["shape_buckets"] >= 1
