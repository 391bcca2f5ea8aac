"""Tests for qaff_jax.models: ResNet, GeM, GeMHead, RetrievalModel, build_model."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qaff_jax import models
from qaff_jax.models import heads, pooling, resnet, retrieval


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(backbone="resnet_tiny", output_stride=32, head="gem", dim=16,
             gem_p=3.0, learn_p=True, dtype="float32", param_dtype="float32")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _images(shape=(2, 32, 32, 3), seed=0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _flat(tree) -> dict:
  return {path: v for path, v in nnx.to_flat_state(tree)}


def _numpy_gem(x, p, eps=1e-6, mask=None):
  """Independent reference: loops over images, boolean indexing for the mask."""
  x = np.maximum(np.asarray(x, np.float64), eps)
  out = []
  for b in range(x.shape[0]):
    cells = x[b].reshape(-1, x.shape[-1])
    if mask is not None:
      cells = cells[np.asarray(mask[b]).reshape(-1) > 0]
    out.append(np.mean(cells ** p, axis=0) ** (1.0 / p))
  return np.stack(out)


def _abstract_model(cfg) -> models.RetrievalModel:
  """The model with ShapeDtypeStruct leaves (no parameter is materialised)."""
  return nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))


def _abstract_call(model: nnx.Module, shape, **kwargs):
  """Output shapes of `model(x, return_features=True)` in eval mode."""
  model.eval()  # no BatchNorm statistics update: much cheaper to trace
  graphdef, state = nnx.split(model)
  return jax.eval_shape(
      lambda state, x: nnx.merge(graphdef, state)(
          x, return_features=True, **kwargs),
      state, jax.ShapeDtypeStruct(shape, jnp.float32))


# ---------------------------------------------------------------- backbones

# (name, last-map channels, torchvision parameter count without `fc`).
_DEPTHS = [
    ("resnet18", 512, 11_689_512 - 513_000),
    ("resnet34", 512, 21_797_672 - 513_000),
    ("resnet50", 2048, 25_557_032 - 2_049_000),
    ("resnet101", 2048, 44_549_160 - 2_049_000),
    ("resnet152", 2048, 60_192_808 - 2_049_000),
]


@pytest.mark.parametrize("name,channels,n_params", _DEPTHS)
def test_backbone_shapes_and_param_count_abstract(name, channels, n_params):
  model = _abstract_model(_cfg(backbone=name, dim=64))
  out = _abstract_call(model, (2, 64, 64, 3))
  assert out["feature_map"].shape == (2, 2, 2, channels)
  assert out["descriptor"].shape == (2, 64)
  assert out["descriptor"].dtype == jnp.float32

  # Same parameter count as torchvision (minus the classifier): the layout
  # (widths, blocks, downsample placement, BN affine) matches 1:1.
  params = jax.tree.leaves(nnx.state(model.backbone, nnx.Param))
  assert sum(math.prod(p.shape) for p in params) == n_params


def test_readme_model_card_resnet_params_are_torchvisions():
  """README's model card rows: torchvision's count without `fc`, and + GeM head
  D=512 (whiten C x 512 + bias, GeM p)."""
  readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "README.md")
  with open(readme, encoding="utf-8") as f:
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in f if line.startswith("| resnet")}
  checked = 0
  for name, channels, n in _DEPTHS:
    if name in rows:
      assert rows[name] == [f"{n / 1e6:.2f}", f"{(n + channels * 512 + 512 + 1) / 1e6:.2f}"]
      checked += 1
  assert checked >= 3


def test_resnet50_torchvision_key_layout():
  backbone = nnx.eval_shape(lambda: resnet.resnet50(rngs=nnx.Rngs(0)))
  flat = _flat(nnx.state(backbone))
  expected = {
      ("conv1", "kernel"): (7, 7, 3, 64),
      ("bn1", "mean"): (64,),
      ("layer1", 0, "conv1", "kernel"): (1, 1, 64, 64),
      ("layer1", 0, "conv3", "kernel"): (1, 1, 64, 256),
      ("layer1", 0, "downsample", 0, "kernel"): (1, 1, 64, 256),
      ("layer1", 0, "downsample", 1, "var"): (256,),
      ("layer2", 0, "conv2", "kernel"): (3, 3, 128, 128),
      ("layer4", 2, "bn3", "scale"): (2048,),
  }
  for path, shape in expected.items():
    assert flat[path].shape == shape, path
  assert ("layer1", 1, "downsample", 0, "kernel") not in flat
  assert len(backbone.layer3) == 6
  # Kinds: weights are Params, running statistics BatchStats.
  assert isinstance(backbone.layer1[0].bn1.scale, nnx.Param)
  assert isinstance(backbone.layer1[0].bn1.mean, nnx.BatchStat)
  assert backbone.layer1[0].bn1.momentum == 0.9
  assert backbone.layer1[0].bn1.epsilon == 1e-5


def test_output_stride_16_doubles_spatial_size():
  x = _images((2, 64, 64, 3))
  m32 = models.build_model(_cfg(), rngs=nnx.Rngs(0))
  m16 = models.build_model(_cfg(output_stride=16), rngs=nnx.Rngs(0))
  assert m32(x, return_features=True)["feature_map"].shape == (2, 2, 2, 128)
  assert m16(x, return_features=True)["feature_map"].shape == (2, 4, 4, 128)
  assert m16.backbone.output_stride == 16
  # ResNet-50: the last stage's blocks after the first are dilated.
  b = nnx.eval_shape(lambda: resnet.resnet50(output_stride=16,
                                             rngs=nnx.Rngs(0)))
  assert b.layer4[0].conv2.strides == (1, 1)
  assert b.layer4[0].conv2.kernel_dilation == (1, 1)
  assert b.layer4[1].conv2.kernel_dilation == (2, 2)
  b.eval()
  graphdef, state = nnx.split(b)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
  assert out.shape == (1, 4, 6, 2048)


def test_return_stages():
  b = resnet.resnet_tiny(rngs=nnx.Rngs(0))
  stages = b(_images((1, 64, 64, 3)), return_stages=True)
  assert {k: v.shape for k, v in stages.items()} == {
      "stem": (1, 16, 16, 16), "layer1": (1, 16, 16, 16),
      "layer2": (1, 8, 8, 32), "layer3": (1, 4, 4, 64),
      "layer4": (1, 2, 2, 128)}
  # Odd sizes round up at every stride-2 step, as torch's padding does.
  assert b(_images((1, 33, 47, 3))).shape == (1, 2, 2, 128)


def test_train_vs_eval_batchnorm():
  model = models.build_model(_cfg(), rngs=nnx.Rngs(0))
  x = _images()
  stats0 = nnx.state(model, nnx.BatchStat)

  model.eval()
  assert model.backbone.bn1.use_running_average
  out_eval = model(x)["descriptor"]
  assert jax.tree.all(jax.tree.map(
      lambda a, b: bool(jnp.array_equal(a, b)), stats0,
      nnx.state(model, nnx.BatchStat)))
  # Eval mode is per-image: a sample's descriptor does not depend on the batch.
  np.testing.assert_allclose(model(x[:1])["descriptor"], out_eval[:1],
                             atol=1e-5)

  model.train()
  assert not model.backbone.bn1.use_running_average
  model(x)
  mean = model.backbone.bn1.mean[...]
  assert not np.allclose(mean, 0.0)
  # torch momentum 0.1: new = 0.9 * old + 0.1 * batch_mean, with old = 0.
  conv_out = model.backbone.conv1(x)
  np.testing.assert_allclose(mean, 0.1 * conv_out.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_params_and_descriptor_f32():
  model = models.build_model(_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = model(_images(), return_features=True)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert out["descriptor"].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             atol=1e-5)
  for leaf in jax.tree.leaves(nnx.state(model)):
    assert leaf.dtype == jnp.float32
  assert model.backbone.bn1.dtype == jnp.float32
  assert model.backbone.conv1.dtype == jnp.bfloat16


# ------------------------------------------------------------------ pooling


def test_gem_matches_numpy_with_and_without_mask():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)  # negatives clamp
  mask = (rng.random((3, 4, 5)) > 0.5).astype(np.float32)
  mask[2] = 0.0
  mask[2, 1, 3] = 1.0  # a single valid cell
  for p in (1.0, 2.5, 3.0):
    np.testing.assert_allclose(pooling.gem(x, p), _numpy_gem(x, p),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooling.gem(x, p, mask=mask),
                               _numpy_gem(x, p, mask=mask), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(pooling.gem(x, 3.0, mask=np.ones((3, 4, 5))),
                             pooling.gem(x, 3.0), rtol=1e-6)
  assert pooling.gem(x.astype(jnp.bfloat16), 3.0).dtype == jnp.float32


def test_gem_empty_mask_is_finite_with_finite_gradient():
  x = jnp.abs(_images((2, 3, 3, 4)))
  mask = jnp.ones((2, 3, 3)).at[1].set(0.0)
  out = pooling.gem(x, 3.0, mask=mask)
  np.testing.assert_allclose(out[1], 1e-6, rtol=1e-6)
  g = jax.grad(lambda p: pooling.gem(x, p, mask=mask).sum())(3.0)
  assert np.isfinite(g)


def test_gem_module_learn_p():
  learned = pooling.GeM(3.0, rngs=nnx.Rngs(0))
  fixed = pooling.GeM(3.0, learn_p=False, rngs=nnx.Rngs(0))
  assert isinstance(learned.p, nnx.Param) and learned.p[...] == 3.0
  assert not jax.tree.leaves(nnx.state(fixed, nnx.Param))
  x = jnp.abs(_images((2, 3, 3, 4)))
  np.testing.assert_allclose(learned(x), fixed(x), rtol=1e-6)


# -------------------------------------------------------- heads and model


def test_descriptor_unit_norm_train_and_eval():
  model = models.build_model(_cfg(dim=24), rngs=nnx.Rngs(0))
  for mode in ("train", "eval"):
    getattr(model, mode)()
    d = model(_images((2, 64, 64, 3)))["descriptor"]
    assert d.shape == (2, 24) and d.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(d, axis=-1), 1.0, atol=1e-5)


def test_gem_head_is_gem_whiten_normalize():
  head = heads.GeMHead(8, 5, p=2.0, rngs=nnx.Rngs(0))
  fmap = _images((2, 3, 3, 8))
  pooled = _numpy_gem(fmap, 2.0)
  w = np.asarray(head.whiten.kernel[...], np.float64)
  b = np.asarray(head.whiten.bias[...], np.float64)
  ref = pooled @ w + b
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(head(fmap)["descriptor"], ref, rtol=1e-5,
                             atol=1e-6)


def test_downsample_mask_any_pixel_rule():
  mask = np.zeros((1, 64, 64), np.float32)
  mask[0, :40, :17] = 1.0  # valid 40 x 17 image, padded bottom/right
  cells = retrieval.downsample_mask(mask, (2, 2), 32)
  np.testing.assert_array_equal(cells, [[[1, 0], [1, 0]]])
  # ceil(40/16) x ceil(17/16) cells at stride 16.
  cells = retrieval.downsample_mask(mask, (4, 4), 16)
  assert cells.sum() == 3 * 2 and cells[0, :3, :2].all()
  # A map that needs padding of the mask (H not a multiple of the stride).
  assert retrieval.downsample_mask(mask[:, :40], (2, 2), 32).shape == (1, 2, 2)


def test_model_mask_pools_only_valid_cells():
  model = models.build_model(_cfg(output_stride=16), rngs=nnx.Rngs(0))
  model.eval()
  x = _images((2, 64, 64, 3))
  mask = np.ones((2, 64, 64), np.float32)
  mask[1, 33:, :] = 0.0  # second image: 33 valid rows -> 3 of 4 cell rows
  out = model(x, mask=mask, return_features=True)
  fmap = out["feature_map"]
  ref = model.head(fmap[1:, :3])["descriptor"]
  np.testing.assert_allclose(out["descriptor"][1:], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["descriptor"][:1], model(x[:1])["descriptor"],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="mask shape"):
    model(x, mask=mask[:, :32])


def test_gradient_flows_to_p_and_backbone():
  model = models.build_model(_cfg(output_stride=16), rngs=nnx.Rngs(0))
  x = _images((2, 32, 32, 3))  # a 2x2 map: p matters
  target = jax.random.normal(jax.random.key(1), (2, 16))

  @nnx.jit
  def grads(model, x):
    def loss_fn(model):
      return jnp.sum(model(x)["descriptor"] * target)
    return nnx.grad(loss_fn)(model)

  g = grads(model, x)
  gp = g["head"]["pool"]["p"][...]
  assert np.isfinite(gp) and abs(gp) > 1e-6
  gk = g["backbone"]["conv1"]["kernel"][...]
  assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0
  # Only Params are differentiated; running statistics are not.
  assert not jax.tree.leaves(nnx.state(g, nnx.BatchStat))


def test_head_can_request_earlier_stages():

  class TwoStageHead(nnx.Module):
    stages = ("layer3",)

    def __call__(self, feature_map, mask=None, *, stages):
      d = heads.l2_normalize(jnp.concatenate(
          [feature_map.mean((1, 2)), stages["layer3"].mean((1, 2))], -1))
      return {"descriptor": d, "layer3_shape": jnp.array(
          stages["layer3"].shape)}

  model = models.RetrievalModel(resnet.resnet_tiny(rngs=nnx.Rngs(0)),
                                TwoStageHead())
  out = model(_images((1, 64, 64, 3)))
  assert out["descriptor"].shape == (1, 128 + 64)
  np.testing.assert_array_equal(out["layer3_shape"], [1, 4, 4, 64])


# ------------------------------------------------------------- build_model


@pytest.mark.parametrize("key,value,choice", [
    ("backbone", "resnet99", "resnet50"),
    ("head", "dolg_v9", "gem"),
    ("dtype", "float16", "bfloat16"),
    ("output_stride", 8, "16"),
])
def test_build_model_errors_name_key_and_choices(key, value, choice):
  with pytest.raises(ValueError) as e:
    models.build_model(_cfg(**{key: value}), rngs=nnx.Rngs(0))
  assert f"model.{key}" in str(e.value)
  assert choice in str(e.value)


def test_build_model_reads_plain_dict_and_defaults():
  model = models.build_model(
      {"backbone": "resnet_tiny", "head": "gem", "dim": 8, "learn_p": False,
       "gem_p": 4.0}, rngs=nnx.Rngs(0))
  assert isinstance(model, models.RetrievalModel)
  assert model.head.pool.p == 4.0
  assert model.backbone.output_stride == 32
  assert model(_images())["descriptor"].shape == (2, 8)


def test_relu_plus_floors_stages_one_to_three_only():
  """SuperGlobal's ReLU+: stage 1-3 outputs >= floor, stage 4 plain ReLU, same params."""
  cfg = dict(backbone="resnet_tiny", head="gem", dim=8, relu_floor=0.5)
  net = models.build_model(cfg, rngs=nnx.Rngs(0))
  plain = models.build_model({**cfg, "relu_floor": 0.0}, rngs=nnx.Rngs(0))
  net.eval()
  plain.eval()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  stages = net.backbone(x, return_stages=True)
  for name in ("layer1", "layer2", "layer3"):
    assert float(jnp.min(stages[name])) >= 0.5 - 1e-6, name
  assert float(jnp.min(stages["layer4"])) == 0.0
  assert jax.tree.structure(nnx.state(net)) == jax.tree.structure(nnx.state(plain))
  with pytest.raises(ValueError, match="model.relu_floor"):
    models.build_model({**cfg, "backbone": "vit_tiny"}, rngs=nnx.Rngs(0))


def test_torch_stats_batchnorm_running_var_is_unbiased():
  """model.bn_torch_stats: torch's running-variance update (n / (n - 1))."""
  x = np.asarray(_images((4, 5, 6, 3), seed=2)) * 3.0 + 1.0
  n = 4 * 5 * 6
  xv = x.reshape(-1, 3).astype(np.float64)
  mean, biased = xv.mean(0), xv.var(0)
  torch_bn = resnet.batch_norm(3, torch_stats=True, rngs=nnx.Rngs(0))
  flax_bn = resnet.batch_norm(3, rngs=nnx.Rngs(0))
  assert isinstance(torch_bn, resnet.TorchStatsBatchNorm)
  assert type(flax_bn) is nnx.BatchNorm
  y_torch, y_flax = torch_bn(jnp.asarray(x)), flax_bn(jnp.asarray(x))
  # Training output: both normalise with the biased batch variance.
  want = (x - mean) / np.sqrt(biased + 1e-5)
  np.testing.assert_allclose(y_torch, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_flax, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(torch_bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(torch_bn.var[...], 0.9 + 0.1 * biased * n / (n - 1),
                             rtol=1e-5)
  np.testing.assert_allclose(flax_bn.var[...], 0.9 + 0.1 * biased, rtol=1e-5)
  # Eval mode uses the running statistics, as nnx.BatchNorm.
  torch_bn.eval()
  np.testing.assert_allclose(
      torch_bn(jnp.asarray(x)),
      (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * biased * n / (n - 1) + 1e-5),
      rtol=1e-5, atol=1e-5)


def test_bn_torch_stats_reaches_every_batchnorm_after_one_step():
  """One jitted train-mode forward (what a train step runs): the stem BN's
  running var equals the unbiased NumPy variance of its input."""
  model = models.build_model(_cfg(bn_torch_stats=True, head="dolg", dim=8,
                                  baseline=dict(local_dim=8)), rngs=nnx.Rngs(0))
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  assert bns and all(isinstance(m, resnet.TorchStatsBatchNorm) for m in bns)
  assert isinstance(model.head.attention.bn, resnet.TorchStatsBatchNorm)
  assert type(models.build_model(_cfg(), rngs=nnx.Rngs(0)).backbone.bn1) is nnx.BatchNorm
  x = _images((2, 32, 32, 3), seed=4)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    m = nnx.merge(graphdef, state)
    m(x)
    return nnx.state(m)

  new = nnx.merge(graphdef, step(state, x))
  conv = np.asarray(model.backbone.conv1(x), np.float64).reshape(-1, 16)
  n = conv.shape[0]
  np.testing.assert_allclose(new.backbone.bn1.var[...],
                             0.9 + 0.1 * conv.var(0) * n / (n - 1), rtol=1e-5)
  with pytest.raises(ValueError, match="model.bn_torch_stats"):
    models.build_model(_cfg(backbone="vit_tiny", bn_torch_stats=True),
                       rngs=nnx.Rngs(0))
