"""ULTRON-style hybrid: CDConv and SCALA against independent NumPy code, shapes,
build_model, and a finite jitted forward + backward."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qaff_jax import models
from qaff_jax.models import ultron


def random_module(make, seed=0):
  """`make()` built abstractly, every variable drawn from NumPy (no JAX init).

  BatchNorm variances/scales are made positive; other leaves ~ N(0, 0.2^2).
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key in ("var", "scale"):
      v = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      v = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(v, leaf.dtype)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _pure(module):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


# ---------------------------------------------------------------------------
# NumPy references (float64, explicit loops).


def np_depthwise3x3(x, kernel, bias, dilation):
  """x [B,H,W,C], kernel [3,3,1,C]: zero-padded dilated depthwise conv."""
  b, h, w, c = x.shape
  out = np.zeros_like(x) + bias
  for m in (-1, 0, 1):
    for n in (-1, 0, 1):
      wk = kernel[m + 1, n + 1, 0]
      for i in range(h):
        for j in range(w):
          y, z = i + m * dilation, j + n * dilation
          if 0 <= y < h and 0 <= z < w:
            out[:, i, j] += wk * x[:, y, z]
  return out


def np_cdconv(x, p, sizes, dilations):
  groups, start = [], 0
  for g, (size, d) in enumerate(zip(sizes, dilations)):
    dw = p["dw"][g]
    groups.append(np_depthwise3x3(x[..., start:start + size], dw["kernel"],
                                  dw["bias"], d))
    start += size
  y = np.concatenate(groups, axis=-1)
  return y @ p["pw"]["kernel"][0, 0] + p["pw"]["bias"]


def np_scala(x, p, heads, window, shift):
  """Per-query loops: keys = cells in the same (offset-grid) window."""
  b, h, w, c = x.shape
  d = c // heads
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
  k = k + np_depthwise3x3(k, p["key_context"]["kernel"],
                          p["key_context"]["bias"], 1)
  table = p["rel_bias"]

  def group(i, size):
    if size <= window:
      return 0
    return (i + (window - shift) % window) // window

  out = np.zeros((b, h, w, c))
  for i in range(h):
    for j in range(w):
      keys = [(y, z) for y in range(h) for z in range(w)
              if group(y, h) == group(i, h) and group(z, w) == group(j, w)]
      for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        logits = np.stack(
            [np.sum(q[:, i, j, sl] * k[:, y, z, sl], axis=-1) / np.sqrt(d)
             + table[i - y + window - 1, j - z + window - 1, hd]
             for y, z in keys], axis=-1)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        vals = np.stack([v[:, y, z, sl] for y, z in keys], axis=1)
        out[:, i, j, sl] = np.einsum("bk,bkd->bd", a, vals)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


# ---------------------------------------------------------------------------
# Tests.


def test_split_channels():
  assert ultron.split_channels(16, 4) == [4, 4, 4, 4]
  assert ultron.split_channels(10, 4) == [3, 3, 2, 2]
  with pytest.raises(ValueError):
    ultron.split_channels(3, 4)


@pytest.mark.parametrize("channels", [8, 10])
def test_cdconv_matches_numpy(channels):
  dilations = (1, 2, 3, 4)
  module = random_module(lambda: ultron.CDConv(
      channels, 6, dilations=dilations, rngs=nnx.Rngs(0)), seed=channels)
  x = np.random.default_rng(1).normal(size=(2, 9, 10, channels))
  got = np.asarray(nnx.jit(lambda m, t: m(t))(module,
                                               x.astype(np.float32)))
  want = np_cdconv(x, _pure(module), ultron.split_channels(channels, 4),
                   dilations)
  assert got.shape == (2, 9, 10, 6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,shift", [((2, 5, 7, 8), 1), ((1, 6, 2, 8), 0),
                                         ((1, 7, 5, 8), 2)])
def test_scala_matches_numpy(shape, shift):
  heads, window = 2, 3
  module = random_module(lambda: ultron.SCALA(
      shape[-1], heads, window, shift=shift, rngs=nnx.Rngs(0)), seed=shift)
  x = np.random.default_rng(2).normal(size=shape)
  got = np.asarray(nnx.jit(lambda m, t: m(t))(module, x.astype(np.float32)))
  want = np_scala(x, _pure(module), heads, window, shift)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_scala_keys_carry_context():
  """Zeroing the key-context conv changes the output: the term is live."""
  module = random_module(lambda: ultron.SCALA(8, 2, 3, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 8)),
                  jnp.float32)
  run = nnx.jit(lambda m, t: m(t))
  before = run(module, x)
  module.key_context.kernel[...] = jnp.zeros_like(module.key_context.kernel[...])
  module.key_context.bias[...] = jnp.zeros_like(module.key_context.bias[...])
  assert not np.allclose(before, run(module, x), atol=1e-5)


def _cfg(backbone, **kw):
  return ml_collections.ConfigDict(dict(backbone=backbone, head="gem", dim=16,
                                        **kw))


@pytest.mark.parametrize("name,output_stride,width,dtype", [
    ("ultron_small", 16, 512, "float32"), ("ultron_base", 32, 768, "bfloat16")])
def test_variant_shapes(name, output_stride, width, dtype):
  model = nnx.eval_shape(lambda: models.build_model(
      _cfg(name, output_stride=output_stride, dtype=dtype), rngs=nnx.Rngs(0)))
  model.eval()
  out = nnx.eval_shape(lambda m, x: m(x, return_features=True), model,
                       jax.ShapeDtypeStruct((2, 100, 72, 3), jnp.float32))
  s = output_stride
  assert out["feature_map"].shape == (2, -(-100 // s), -(-72 // s), width)
  assert out["feature_map"].dtype == jnp.dtype(dtype)
  assert out["descriptor"].shape == (2, 16)
  assert out["descriptor"].dtype == jnp.float32
  assert model.backbone.out_features == width
  assert model.backbone.output_stride == s


def test_ultron_tiny_builds_and_trains():
  model = random_module(lambda: models.build_model(_cfg("ultron_tiny"),
                                                   rngs=nnx.Rngs(0)))
  model.train()
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)),
                  jnp.float32)

  def loss(m, t):
    out = m(t, return_features=True)
    return jnp.sum(out["descriptor"][0] * out["descriptor"][1]), out

  (value, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(
      model, x)
  assert out["feature_map"].shape == (2, 1, 1, 128)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  stages = nnx.eval_shape(lambda m, t: m.backbone(t, return_stages=True),
                          model, x)
  assert [stages[k].shape[1] for k in ("stem", "layer1", "layer2", "layer3",
                                       "layer4")] == [8, 8, 4, 2, 1]
