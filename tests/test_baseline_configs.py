"""configs/baselines.py: every method's recipe loads, builds, and says what its docstring says.

No training: models are built abstractly (nnx.eval_shape) on the tiny ResNet.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qaff_jax import config_lib, losses, models
from qaff_jax.models import baselines as model_baselines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


baselines = load("baselines")
METHODS = baselines.METHODS
S3 = (1 / math.sqrt(2), 1.0, math.sqrt(2))
S5 = (1 / (2 * math.sqrt(2)), 0.5, 1 / math.sqrt(2), 1.0, math.sqrt(2))

# The documented recipe of each method (configs/baselines.py docstring), by dotted key.
RECIPES = {
    "gem": {"model.head": "gem", "model.dim": 2048, "model.gem_p": 3.0,
            "model.learn_p": False, "loss.name": "arcface", "loss.scale": 32.0,
            "loss.margin": 0.15, "eval.scales": S3},
    "delg": {"model.head": "delg", "model.dim": 2048, "model.gem_p": 3.0,
             "model.learn_p": False, "model.bn_torch_stats": False, "loss.name": "arcface", "loss.margin": 0.1,
             "loss.scale": 45.25, "loss.learn_scale": True, "data.image_size": 321,
             "batch_size": 256, "total_steps": 500_000, "optim.lr": 0.01,
             "optim.momentum": 0.9, "optim.weight_decay": 0.0,
             "optim.warmup_epochs": 0.0, "optim.grad_clip": 10.0, "eval.scales": S3,
             "eval.max_side": 1024},
    "dolg": {"model.head": "dolg", "model.dim": 512, "model.gem_p": 3.0,
             "model.learn_p": True, "model.baseline.local_dim": 1024,
             "model.baseline.with_ma": False, "model.bn_torch_stats": True,
             "loss.name": "curricularface", "loss.scale": 30.0, "loss.margin": 0.15,
             "data.image_size": 512, "batch_size": 64, "num_epochs": 100.0,
             "optim.name": "sgd", "optim.lr": 0.01, "optim.momentum": 0.9,
             "optim.weight_decay": 1e-4, "optim.warmup_epochs": 5.0, "eval.scales": S5},
    "cvnet": {"model.head": "cvnet", "model.dim": 2048, "model.gem_p": 3.0,
              "model.learn_p": True, "model.bn_torch_stats": True,
              "loss.name": "curricularface", "eval.scales": S3},
    "superglobal": {"model.head": "superglobal", "model.dim": 2048,
                    "model.learn_p": False, "model.baseline.gemp_p": 4.6,
                    "model.baseline.rgem_p": 2.5, "model.baseline.rgem_size": 5,
                    "model.baseline.rgem_blend": 0.5, "model.baseline.relu_floor": 0.0,
                    "loss.name": "curricularface", "eval.scales": S3,
                    "eval.rerank": "superglobal", "eval.superglobal.m": 400,
                    "eval.superglobal.knn": 9, "eval.superglobal.beta": 0.15},
    "spca": {"model.head": "spca", "model.dim": 2048, "model.gem_p": 3.0,
             "model.learn_p": False, "model.qaff.num_tokens": 16,
             "model.qaff.token_dim": 128, "model.qaff.hops": 3, "model.qaff.heads": 8,
             "model.qaff.hops_from_one": False, "model.qaff.legacy_layernorm": False,
             "model.qaff.fuser_mlp_norm": False, "model.qaff.gelu_tanh": False,
             "model.qaff.legacy_init": False, "model.bn_torch_stats": True,
             "loss.name": "arcface", "loss.scale": 32.0, "loss.margin": 0.15,
             "optim.name": "sgd", "optim.momentum": 0.9, "eval.scales": S3},
    "madacos": {"model.head": "gem", "model.dim": 512, "model.gem_p": 3.0,
                "model.learn_p": False, "loss.name": "madacos",
                "loss.madacos_alpha": 0.02, "data.image_size": 512, "batch_size": 128,
                "num_epochs": 50.0, "optim.name": "sgd", "optim.lr": 0.005,
                "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
                "optim.warmup_epochs": 5.0, "eval.scales": S5},
    "qaff": {"model.head": "qaff"},
}


def get(c, dotted):
  for key in dotted.split("."):
    c = c[key]
  return c


def test_every_method_has_a_documented_recipe():
  assert set(RECIPES) == set(METHODS)
  doc = baselines.__doc__
  for method in METHODS:
    assert f"\n{method} " in doc, method


@pytest.mark.parametrize("method", METHODS)
def test_recipe_values_are_as_documented(method):
  c = baselines.get_config(f"method={method}")
  assert c.model.backbone == "resnet101"
  for key, want in RECIPES[method].items():
    got = get(c, key)
    if isinstance(want, tuple):
      assert got == pytest.approx(want, rel=1e-12), key
    else:
      assert got == want and type(got) is type(want), (key, got, want)
  assert c.model.head in models.HEADS
  assert c.loss.name in losses.LOSSES
  assert c.eval.at_end


@pytest.mark.parametrize("method", METHODS)
def test_model_builds_abstractly(method):
  c = baselines.get_config(f"method={method}")
  c.model.backbone = "resnet_tiny"

  def build_and_run():
    net = models.build_model(c.model, rngs=nnx.Rngs(0))
    return net(jnp.zeros((2, 64, 64, 3), jnp.float32))["descriptor"]

  out = nnx.eval_shape(build_and_run)
  assert out.shape == (2, c.model.dim) and out.dtype == jnp.float32
  abstract = nnx.eval_shape(lambda: models.build_model(c.model, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))


def test_superglobal_trains_with_the_cvnet_recipe():
  sg = baselines.get_config("method=superglobal")
  cv = baselines.get_config("method=cvnet")
  for section in ("data", "loss", "optim"):
    assert sg[section].to_dict() == cv[section].to_dict(), section
  assert (sg.batch_size, sg.num_epochs, sg.total_steps) == (
      cv.batch_size, cv.num_epochs, cv.total_steps)
  assert (sg.model.dim, sg.eval.scales) == (cv.model.dim, cv.eval.scales)
  assert cv.eval.rerank == "none"


def test_qaff_is_the_gldv2_recipe():
  gldv2 = load("gldv2")
  for arg in ("", "backbone=resnet50", "runlocal"):
    ours = baselines.get_config(",".join(filter(None, ("method=qaff", arg))))
    assert ours.to_dict() == gldv2.get_config(",".join(filter(None, (arg, "head=qaff")))).to_dict()


@pytest.mark.parametrize("method", METHODS)
def test_backbone_and_runlocal_variants(method):
  assert baselines.get_config(f"method={method},backbone=resnet50").model.backbone == "resnet50"
  small = baselines.get_config(f"method={method},runlocal")
  assert small.model.backbone == "resnet_tiny" and small.model.dtype == "float32"
  assert 0 < small.total_steps <= 10 and small.batch_size <= 16
  assert small.data.image_size <= 64 and small.eval.max_side <= 128
  assert small.model.head == baselines.get_config(f"method={method}").model.head


def test_bad_arguments_name_the_choices():
  with pytest.raises(ValueError, match="method='foo'.*gem.*superglobal.*qaff"):
    baselines.get_config("method=foo")
  with pytest.raises(ValueError, match="choose one of"):
    baselines.get_config()
  with pytest.raises(ValueError, match="resnet50"):
    baselines.get_config("method=delg,backbone=resnet18")
  with pytest.raises(ValueError, match="metod"):
    baselines.get_config("metod=delg")


def test_base_config_baseline_subdict_is_baseline_settings():
  fields = dataclasses.fields(model_baselines.BaselineSettings)
  sub = config_lib.base_config().model.baseline
  assert sub.to_dict() == {f.name: f.default for f in fields}
  assert model_baselines.settings_from_config(config_lib.base_config().model) == (
      model_baselines.BaselineSettings())
  # The None default is typed: nothing but an int may replace it (the CLI:
  # test_cli_usage.py).
  with pytest.raises(TypeError, match="local_in_features"):
    sub.local_in_features = "half"
  sub.local_in_features = 512
  assert model_baselines.settings_from_config({"baseline": sub}).local_in_features == 512


def test_docstring_starts_with_its_command():
  doc = baselines.__doc__.strip()
  assert "python -m qaff_jax.train --config configs/baselines.py:method=" in doc.split("\n\n")[1]
