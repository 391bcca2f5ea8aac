"""Tests for the baseline heads (models.baselines) and losses_baselines.

NumPy references are written independently of the JAX code: explicit loops,
float64, the formulas of the module docstrings (which follow the official
DOLG / SuperGlobal / CurricularFace / CFCD code). Parameters use the cheap
`unsafe_rbg` PRNG; compile time is what these tests spend.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qaff_jax import losses, losses_baselines as lb, models, parallel
from qaff_jax.models import baselines

D = 16
SMALL_DOLG = dict(local_dim=16, with_ma=True, aspp_dim=8, dilations=(1, 2, 3))


def _rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _init(ctor):
  """ctor(), initialised eagerly: each init op compiles once and is shared by
  every model of this file, cheaper here than one jitted init per model."""
  return ctor()


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, x, mask, stages):
  kw = {} if stages is None else {"stages": stages}
  return nnx.merge(graphdef, state)(x, mask, **kw)


def _run(module, x, mask=None, stages=None):
  graphdef, state = nnx.split(module)
  return jax.tree.map(np.asarray, _apply(graphdef, state, x, mask, stages))


def _map(shape, seed=0):
  return np.abs(np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def _np_l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _linear(module, x):
  return x @ np.asarray(module.kernel[...], np.float64) + np.asarray(
      module.bias[...], np.float64)


# --------------------------------------------------------------------- config


def test_settings_defaults_reading_and_errors():
  s = baselines.settings_from_config({})
  assert (s.local_dim, s.aspp_dim, s.dilations) == (1024, 512, (6, 12, 18))
  assert (s.gemp_p, s.rgem_p, s.rgem_size, s.rgem_blend) == (4.6, 2.5, 5, 0.5)
  assert s.relu_floor == 0.0 and s.aspp_pointwise
  cfg = ml_collections.ConfigDict({"baseline": {"rgem_size": 3,
                                                "dilations": [2, 4]}})
  s = baselines.settings_from_config(cfg)
  assert s.rgem_size == 3 and s.dilations == (2, 4)
  with pytest.raises(ValueError, match="model.baseline.rgem_sise"):
    baselines.settings_from_config({"baseline": {"rgem_sise": 3}})
  with pytest.raises(ValueError, match="model.baseline.rgem_size"):
    baselines.settings_from_config({"baseline": {"rgem_size": 4}})
  with pytest.raises(ValueError, match="model.baseline.relu_floor"):
    baselines.settings_from_config({"baseline": {"relu_floor": -1.0}})
  assert s.with_ma is False  # DOLG's MODEL.WITH_MA default
  with pytest.raises(ValueError, match="model.baseline.with_ma"):
    baselines.settings_from_config({"baseline": {"with_ma": 1}})


# ---------------------------------------------------------------- SuperGlobal


def _np_regional(x, p=2.5, size=5, blend=0.5, eps=1e-6):
  """Reflect-pad, power mean over each size x size window, blend. [h, w, C]."""
  r = size // 2
  x = x.astype(np.float64)
  xp = np.pad(np.maximum(x, eps) ** p, ((r, r), (r, r), (0, 0)),
              mode="reflect")
  h, w, _ = x.shape
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      window = xp[i:i + size, j:j + size]
      out[i, j] = window.mean(axis=(0, 1)) ** (1.0 / p)
  return (1 - blend) * x + blend * out


@pytest.mark.parametrize("shape,size", [((2, 6, 7, 3), 5), ((1, 2, 3, 2), 5),
                                        ((1, 4, 4, 2), 3)])
def test_superglobal_regional_gem_matches_numpy(shape, size):
  x = _map(shape)
  fn = jax.jit(functools.partial(baselines.superglobal_regional_gem,
                                 size=size))
  got = np.asarray(fn(x))
  for b in range(shape[0]):
    np.testing.assert_allclose(got[b], _np_regional(x[b], size=size),
                               rtol=1e-5, atol=1e-6)


def test_superglobal_regional_gem_reflects_inside_the_valid_box():
  """Each image's windows reflect at its valid box: padding changes nothing."""
  boxes = [(0, 5, 0, 6), (1, 4, 2, 8)]  # (r0, r1, c0, c1) inside an 8 x 9 map
  padded = _map((2, 8, 9, 3), seed=1) * 7.0  # garbage outside the boxes
  mask = np.zeros((2, 8, 9), np.float32)
  for b, (r0, r1, c0, c1) in enumerate(boxes):
    mask[b, r0:r1, c0:c1] = 1
  got = np.asarray(jax.jit(baselines.superglobal_regional_gem)(
      padded, mask=mask))
  for b, (r0, r1, c0, c1) in enumerate(boxes):
    want = _np_regional(padded[b, r0:r1, c0:c1])
    np.testing.assert_allclose(got[b, r0:r1, c0:c1], want, rtol=1e-5,
                               atol=1e-6)


def test_scale_gem_max_matches_numpy():
  rng = np.random.default_rng(0)
  descs = [rng.normal(size=(3, 8)).astype(np.float32) * s for s in (1, 5, .1)]
  got = np.asarray(baselines.scale_gem_max(descs))
  want = np.empty((3, 8))
  for i in range(3):
    per_scale = [d[i] / np.linalg.norm(d[i]) for d in descs]
    want[i] = np.max(np.stack(per_scale), axis=0)
  want = _np_l2(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(baselines.scale_gem_max(np.stack(descs))), want, rtol=1e-5,
      atol=1e-6)


@pytest.mark.parametrize("relu_floor", [0.0, 0.5])
def test_superglobal_head_matches_numpy_pipeline(relu_floor):
  c = 8
  head = _init(lambda: baselines.SuperGlobalHead(
      c, D, p=4.6, learn_p=False, relu_floor=relu_floor, rngs=_rngs()))
  x = _map((2, 5, 6, c), seed=2)
  mask = np.ones((2, 5, 6), np.float32)
  mask[1, 3:, :] = 0
  mask[1, :, 4:] = 0
  out = _run(head, x, mask)
  for b, (hv, wv) in enumerate([(5, 6), (3, 4)]):
    cells = x[b, :hv, :wv]
    if relu_floor:
      cells = np.maximum(cells, relu_floor)
    reg = _np_regional(cells, eps=1e-8).reshape(-1, c)
    pooled = _np_l2(np.mean(np.maximum(reg, 1e-8) ** 4.6, axis=0) ** (1 / 4.6))
    np.testing.assert_allclose(out["pooled"][b], pooled, rtol=1e-4, atol=1e-6)
    want = _np_l2(_linear(head.whiten, pooled))
    np.testing.assert_allclose(out["descriptor"][b], want, rtol=1e-4,
                               atol=1e-5)
  assert out["descriptor"].dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             rtol=1e-5)


def test_relu_plus_is_a_floor():
  x = jnp.array([-1.0, 0.0, 0.01, 0.5])
  np.testing.assert_allclose(baselines.relu_plus(x), [0.014, 0.014, 0.014, .5])


# ----------------------------------------------------------------------- DOLG


def test_upsample_mask_matches_numpy():
  mask = np.array([[[1, 1, 0], [1, 0, 0]]], np.float32)
  got = np.asarray(baselines.upsample_mask(jnp.asarray(mask), (4, 5)))
  want = np.empty((1, 4, 5))
  for i in range(4):
    for j in range(5):
      want[0, i, j] = mask[0, min(i // 2, 1), min(j // 2, 2)]
  np.testing.assert_array_equal(got, want)
  same = np.asarray(baselines.upsample_mask(jnp.asarray(mask), (2, 3)))
  np.testing.assert_array_equal(same, mask)


def _dolg_head(c4=12, c3=6, **kw):
  return _init(lambda: baselines.DOLGHead(
      c4, D, local_in_features=c3, **{**SMALL_DOLG, **kw}, rngs=_rngs()))


def test_dolg_orthogonal_fusion_and_outputs():
  head = _dolg_head()
  assert baselines.DOLGHead.stages == ("layer3",)
  x4, x3 = _map((2, 3, 3, 12), 3), _map((2, 6, 6, 6), 4)
  out = _run(head, x4, None, {"layer3": x3})
  orth, fg = out["local_orthogonal"], out["global_feature"]
  assert orth.shape == (2, 6, 6, 16) and fg.shape == (2, 16)
  assert out["attention"].shape == (2, 6, 6) and (out["attention"] > 0).all()
  # Every fused local vector is orthogonal to its image's global vector.
  cosines = np.einsum("bhwc,bc->bhw", orth, fg) / (
      np.linalg.norm(orth, axis=-1) * np.linalg.norm(fg, axis=-1)[:, None,
                                                                  None])
  assert np.abs(cosines).max() < 1e-5
  assert np.abs(orth).max() > 1e-2  # not trivially zero
  # Descriptor = normalize(fuse_fc([f_g, mean f_orth])).
  fused = np.concatenate([fg, orth.mean(axis=(1, 2))], axis=-1)
  want = _np_l2(_linear(head.fuse_fc, fused))
  np.testing.assert_allclose(out["descriptor"], want, rtol=1e-4, atol=1e-5)
  assert out["descriptor"].dtype == np.float32
  # orthogonal_component is f_l - (f_l.f_g / |f_g|^2) f_g.
  fl = np.random.default_rng(5).normal(size=(1, 2, 2, 4))
  g = np.random.default_rng(6).normal(size=(1, 4))
  want = fl - np.einsum("bhwc,bc->bhw", fl, g)[..., None] / (g ** 2).sum() * g
  np.testing.assert_allclose(baselines.orthogonal_component(fl, g), want,
                             rtol=1e-5, atol=1e-6)


def test_dolg_without_multi_atrous_matches_numpy():
  """MODEL.WITH_MA off (the released DOLG): layer3 -> SpatialAttention2d
  (conv1 C3 -> Cl, BN, softplus score) directly; GeM with learnable p."""
  head = _dolg_head(with_ma=False)
  assert head.multi_atrous is None
  assert head.attention.conv1.kernel[...].shape == (1, 1, 6, 16)
  assert isinstance(head.pool.p, nnx.Param)
  head.eval()  # BN on its initial running statistics (mean 0, var 1)
  x4, x3 = _map((2, 3, 3, 12), 3), _map((2, 6, 6, 6), 4)
  out = _run(head, x4, None, {"layer3": x3})
  att = head.attention
  w1 = np.asarray(att.conv1.kernel[...], np.float64)[0, 0]
  y = x3.astype(np.float64) @ w1 + np.asarray(att.conv1.bias[...])
  y = y / np.sqrt(1.0 + 1e-5)
  normed = y / np.linalg.norm(y, axis=-1, keepdims=True)
  w2 = np.asarray(att.conv2.kernel[...], np.float64)[0, 0]
  score = np.log1p(np.exp(np.maximum(y, 0) @ w2 + np.asarray(att.conv2.bias[...])))
  fl = score * normed
  fg = _linear(head.global_fc, np.mean(np.maximum(x4, 1e-6) ** 3.0,
                                       axis=(1, 2)) ** (1 / 3))
  orth = fl - (np.einsum("bhwc,bc->bhw", fl, fg) / (fg ** 2).sum(-1)[:, None, None]
               )[..., None] * fg[:, None, None, :]
  want = _np_l2(_linear(head.fuse_fc, np.concatenate(
      [fg, orth.mean(axis=(1, 2))], axis=-1)))
  np.testing.assert_allclose(out["descriptor"], want, rtol=1e-4, atol=1e-5)
  with_ma = _dolg_head(with_ma=True)
  assert with_ma.multi_atrous is not None
  assert with_ma.attention.conv1.kernel[...].shape == (1, 1, 16, 16)


def test_dolg_padded_maps_with_mask_equal_unpadded_in_eval():
  head = _dolg_head()
  head.eval()  # BatchNorm on running statistics: a per-cell function.
  x4, x3 = _map((1, 2, 2, 12), 7), _map((1, 4, 4, 6), 8)
  want = _run(head, x4, None, {"layer3": x3})["descriptor"]
  p4 = _map((1, 3, 4, 12), 9) * 5.0
  p3 = _map((1, 6, 8, 6), 10) * 5.0
  p4[:, :2, :2], p3[:, :4, :4] = x4, x3
  mask = np.zeros((1, 3, 4), np.float32)
  mask[:, :2, :2] = 1
  got = _run(head, p4, mask, {"layer3": p3})["descriptor"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------- build_model heads


def _model_cfg(head):
  return ml_collections.ConfigDict(dict(
      backbone="resnet_tiny", output_stride=32, head=head, dim=D, gem_p=3.0,
      learn_p=True, dtype="float32", param_dtype="float32",
      baseline=dict(SMALL_DOLG)))


@pytest.mark.parametrize("head", ["delg", "dolg", "cvnet", "superglobal"])
def test_build_model_jitted_forward_backward(head):
  cfg = _model_cfg(head)
  model = _init(lambda: models.build_model(cfg, rngs=_rngs()))
  kind = {"delg": models.GeMHead, "cvnet": models.GeMHead,
          "dolg": baselines.DOLGHead,
          "superglobal": baselines.SuperGlobalHead}[head]
  assert isinstance(model.head, kind)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  mask = jnp.ones((2, 64, 64)).at[1, 40:].set(0)

  def loss_fn(params, images, mask):
    out = nnx.merge(graphdef, params, rest, copy=True)(images, mask)
    return jnp.sum(out["descriptor"][:, 0]), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, images, mask)
  assert np.isfinite(loss)
  assert out["descriptor"].shape == (2, D)
  assert out["descriptor"].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             rtol=1e-5)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads["backbone"]["conv1"]["kernel"][...])).max() > 0
  if head == "dolg":
    assert np.abs(np.asarray(
        grads["head"]["multi_atrous"]["project"]["kernel"][...])).max() > 0


@pytest.mark.parametrize("head", ["dolg", "superglobal"])
def test_build_model_bfloat16_abstract_forward_backward(head):
  """bf16 compute keeps float32 parameters, descriptors and gradients."""
  cfg = _model_cfg(head)
  cfg.dtype = "bfloat16"
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, images):
    out = nnx.merge(graphdef, params, rest, copy=True)(images)
    return jnp.sum(out["descriptor"][:, 0]), out

  (loss, out), grads = jax.eval_shape(
      jax.value_and_grad(loss_fn, has_aux=True), params, rest,
      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out["descriptor"].shape == (2, D)
  for v in jax.tree.leaves((loss, out, grads)):
    assert v.dtype == jnp.float32


# -------------------------------------------------------------------- losses


def _np_cos(emb, w):
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  return np.clip(emb.astype(np.float64) @ w.T.astype(np.float64), -1, 1)


def _np_lse(z):
  return np.log(np.sum(np.exp(z - z.max()))) + z.max()


def _np_curricular(emb, w, labels, t, num_classes, s, m, momentum):
  cos = _np_cos(emb, w)[:, :num_classes]
  cos_y = cos[np.arange(len(labels)), labels]
  new_t = (1 - momentum) * t + momentum * cos_y.mean()
  logits, loss = np.empty_like(cos), np.empty(len(labels))
  for i, y in enumerate(labels):
    theta = math.acos(cos_y[i])
    threshold = math.cos(theta + m)
    target = threshold if theta + m <= math.pi else (
        cos_y[i] - math.sin(math.pi - m) * m)
    for j in range(num_classes):
      c = cos[i, j]
      logits[i, j] = s * (c * (new_t + c) if c > threshold else c)
    logits[i, y] = s * target
    loss[i] = _np_lse(logits[i]) - s * target
  return logits, loss, new_t, cos.argmax(1) == labels


def test_curricular_face_matches_numpy():
  rng = np.random.default_rng(0)
  n, d, classes = 6, 8, 10
  emb = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(classes + 2, d)).astype(np.float32)  # + 2 padding rows
  labels = rng.integers(0, classes, n)
  emb[0] = -w[labels[0]]  # theta ~ pi: the linear continuation branch
  emb[1] = w[labels[1]] + 0.1 * emb[1]  # an easy example
  t = 0.3
  kw = dict(num_classes=classes, scale=30.0, margin=0.15, momentum=0.01)

  @jax.jit
  def run(emb, t):
    logits, _, _, new_t = lb.curricular_face_logits(emb, w, labels, t, **kw)
    loss, correct, new_t2 = lb.curricular_face_loss(emb, w, labels, t, **kw)
    # t carries no gradient; the loss does reach the embeddings.
    grads = jax.grad(lambda e, t: jnp.sum(lb.curricular_face_loss(
        e, w, labels, t, **kw)[0]), argnums=(0, 1))(emb, t)
    return logits, new_t, loss, correct, new_t2, grads

  logits, new_t, loss, correct, new_t2, (g_emb, g_t) = run(emb, t)
  want_logits, want_loss, want_t, want_correct = _np_curricular(
      emb, w, labels, t, classes, 30.0, 0.15, 0.01)
  np.testing.assert_allclose(np.asarray(logits)[:, :classes], want_logits,
                             rtol=1e-4, atol=1e-4)
  assert np.isneginf(np.asarray(logits)[:, classes:]).all()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose([new_t, new_t2], [want_t, want_t], rtol=1e-5)
  np.testing.assert_array_equal(correct, want_correct)
  assert np.isfinite(g_emb).all() and float(g_t) == 0.0


def _np_madacos(emb, w, labels, num_classes, alpha, min_scale):
  cos = _np_cos(emb, w)[:, :num_classes]
  cos_y = cos[np.arange(len(labels)), labels]
  k = np.argsort(cos_y, kind="stable")[(len(labels) - 1) // 2]
  med = cos_y[k]
  s = max(min_scale, math.log(9999999 * (1 - alpha) / alpha) / (1 - med))
  b = sum(math.exp(s * cos[k, j]) for j in range(num_classes)
          if j != labels[k])
  m = max(0.0, med - math.log(b * alpha / (1 - alpha)) / s)
  loss = np.empty(len(labels))
  for i, y in enumerate(labels):
    z = s * cos[i].copy()
    z[y] = s * (cos[i, y] - m)
    loss[i] = _np_lse(z) - z[y]
  return loss, s, m, cos.argmax(1) == labels


@pytest.mark.parametrize("closeness", [0.0, 3.0])
def test_madacos_matches_numpy(closeness):
  rng = np.random.default_rng(1)
  n, d, classes = 7, 8, 10
  w = rng.normal(size=(classes + 2, d)).astype(np.float32)
  labels = rng.integers(0, classes, n)
  # closeness 0: random cosines, s hits the floor 32; 3: targets near their
  # centres, so the median is high and s = ln(K (1-a)/a) / (1 - median) > 32.
  emb = (rng.normal(size=(n, d)) + closeness * w[labels]).astype(np.float32)
  run = jax.jit(lambda e: (
      lb.madacos_loss(e, w, labels, num_classes=classes, alpha=0.02,
                      with_stats=True),
      jax.grad(lambda e: jnp.sum(lb.madacos_loss(
          e, w, labels, num_classes=classes)[0]))(e)))
  (loss, correct, stats), grads = run(emb)
  want_loss, s, m, want_correct = _np_madacos(emb, w, labels, classes, 0.02,
                                              32.0)
  assert (s == 32.0) == (closeness == 0.0)
  np.testing.assert_allclose(stats["scale"], s, rtol=1e-4)
  np.testing.assert_allclose(stats["margin"], m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(correct, want_correct)
  assert np.isfinite(grads).all()


def test_madacos_margin_brings_median_probability_to_alpha():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(50, 16)).astype(np.float32)
  labels = np.arange(9)
  emb = (rng.normal(size=(9, 16)) + 2.0 * w[labels]).astype(np.float32)
  cos = losses.cosine_logits(jnp.asarray(emb), jnp.asarray(w))
  s, m = lb.madacos_scale_margin(cos, jnp.asarray(labels), num_classes=50)
  assert float(m) > 0
  cos = np.asarray(cos, np.float64)
  cos_y = cos[labels, labels]
  k = np.argsort(cos_y)[4]
  z = float(s) * cos[k]
  z[k] = float(s) * (cos_y[k] - float(m))
  prob = np.exp(z[k] - _np_lse(z))
  np.testing.assert_allclose(prob, 0.02, rtol=1e-3)


def test_learnable_scale_loss_equals_fixed_scale_and_trains_scale():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(5, 8)).astype(np.float32)
  w = rng.normal(size=(9, 8)).astype(np.float32)
  labels = rng.integers(0, 9, 5)
  init = lb.delg_initial_scale(2048)
  assert abs(init - 45.2548) < 1e-3
  scale = lb.LearnableScale(init)

  @jax.jit
  def run(s):
    return (lb.learnable_scale_loss(emb, w, labels, s, num_classes=9),
            losses.margin_softmax_loss(emb, w, labels, num_classes=9,
                                       name="arcface", scale=init, margin=0.1),
            jax.grad(lambda s: jnp.mean(lb.learnable_scale_loss(
                emb, w, labels, s, num_classes=9)[0]))(s))

  (loss, correct), (want, want_correct), g = run(scale())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_array_equal(correct, want_correct)
  assert np.isfinite(g) and float(g) != 0.0


def _pair_case():
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(7, 6)).astype(np.float32)
  emb[3] = emb[2]  # identical positives: distance 0, gradient must be finite
  emb[5] = emb[4]  # identical negatives
  labels = np.array([0, 0, 1, 1, 2, 3, 1])  # label 2 and 3 have no positive
  return emb, labels


def test_contrastive_loss_matches_numpy_loop():
  emb, labels = _pair_case()
  run = jax.jit(lambda e: (
      lb.contrastive_loss(e, labels, margin=0.7),
      jax.grad(lambda e: lb.masked_mean(*lb.contrastive_loss(e, labels)[::2]))(
          e)))
  (loss, correct, valid), g = run(emb)
  x = _np_l2(emb.astype(np.float64))
  want, want_valid = np.zeros(7), np.zeros(7, bool)
  for i in range(7):
    if not any(labels[j] == labels[i] for j in range(7) if j != i):
      continue
    want_valid[i] = True
    for j in range(7):
      if j == i:
        continue
      dist = np.linalg.norm(x[i] - x[j])
      if labels[j] == labels[i]:
        want[i] += 0.5 * dist ** 2
      else:
        want[i] += 0.5 * max(0.0, 0.7 - dist) ** 2
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
  nearest = [max((j for j in range(7) if j != i), key=lambda j: x[i] @ x[j])
             for i in range(7)]
  np.testing.assert_array_equal(
      correct, want_valid & (labels[nearest] == labels))
  np.testing.assert_allclose(lb.masked_mean(loss, valid),
                             want[want_valid].mean(), rtol=1e-5)
  assert np.isfinite(g).all()


@pytest.mark.parametrize("squared", [True, False])
def test_triplet_batch_hard_matches_numpy_loop(squared):
  emb, labels = _pair_case()
  run = jax.jit(lambda e, y: (
      lb.triplet_loss(e, y, margin=0.1, squared=squared),
      jax.grad(lambda e: lb.masked_mean(*lb.triplet_loss(
          e, y, squared=squared)[::2]))(e)))
  (loss, _, valid), g = run(emb, labels)
  x = _np_l2(emb.astype(np.float64))
  want, want_valid = np.zeros(7), np.zeros(7, bool)
  for i in range(7):
    dist = lambda j: np.sum((x[i] - x[j]) ** 2) ** (1.0 if squared else 0.5)
    pos = [dist(j) for j in range(7) if j != i and labels[j] == labels[i]]
    neg = [dist(j) for j in range(7) if labels[j] != labels[i]]
    if pos and neg:
      want_valid[i] = True
      want[i] = max(0.0, max(pos) - min(neg) + 0.1)
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
  assert np.isfinite(g).all()
  # One class only: no negatives, nothing valid, loss 0, finite gradient.
  (loss, _, valid), g = run(emb, np.zeros(7, labels.dtype))
  assert not np.asarray(valid).any() and not np.asarray(loss).any()
  assert np.isfinite(g).all()


@pytest.mark.parametrize("name", ["curricular", "madacos"])
def test_sharded_class_matrix_losses_equal_single_device(name):
  mesh = parallel.make_mesh(2)  # (4, 2)
  rng = np.random.default_rng(5)
  b, c, d = 16, 64, 8
  emb = rng.normal(size=(b, d)).astype(np.float32)
  w = rng.normal(size=(c, d)).astype(np.float32)
  labels = rng.integers(0, 60, b).astype(np.int32)
  emb[:, :] += 2.0 * w[labels]
  shard = dict(embedding_sharding=NamedSharding(mesh, P()),
               logits_sharding=NamedSharding(mesh, P(None,
                                                     parallel.CLASS_AXES)))

  def f(e, w, y, **kw):
    if name == "curricular":
      return jnp.mean(lb.curricular_face_loss(e, w, y, 0.2, num_classes=60,
                                              **kw)[0])
    return jnp.mean(lb.madacos_loss(e, w, y, num_classes=60, **kw)[0])

  sharded = jax.jit(jax.value_and_grad(functools.partial(f, **shard),
                                       argnums=1),
                    in_shardings=(parallel.batch_sharding(mesh, 2),
                                  parallel.class_rows_sharding(mesh),
                                  parallel.batch_sharding(mesh, 1)))
  value, grad = sharded(emb, w, labels)
  want_value, want_grad = jax.jit(jax.value_and_grad(f, argnums=1))(
      emb, w, labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
