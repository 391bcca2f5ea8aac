"""Tests for the QAFF head (qaff_jax.models.qaff) and SC-GeM (models.spca).

NumPy references below are written independently of the JAX code (explicit
loops, float64, the formulas of the module docstrings). Parameters are
initialised with the cheap `unsafe_rbg` PRNG inside one jit: on CPU, compile
time is what these tests spend.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qaff_jax import models
from qaff_jax.models import qaff, spca

C, D = 32, 16
SMALL = dict(num_tokens=4, token_dim=8, hops=3, heads=8, mlp_hidden=8)


def _rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _init(ctor):
  """ctor() built with ONE compiled init (eager init compiles every op)."""
  graphdef = nnx.split(nnx.eval_shape(ctor))[0]
  state = jax.jit(lambda: nnx.split(ctor())[1])()
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, x, mask):
  return nnx.merge(graphdef, state)(x, mask)


def _run(module, x, mask=None):
  graphdef, state = nnx.split(module)
  return jax.tree.map(np.asarray, _apply(graphdef, state, x, mask))


def _set(variable, value):
  variable[...] = jnp.asarray(value, variable[...].dtype)


def _feature_map(shape, seed=0):
  return np.abs(np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def _np_l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_gem(cells, p, eps=1e-6):
  """GeM of an [n, C] list of cells; eps for an empty list."""
  if len(cells) == 0:
    return None
  return np.mean(np.maximum(cells, eps) ** p, axis=0) ** (1.0 / p)


def _np_layer_norm(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


# -------------------------------------------------------------------- config


def test_settings_defaults_and_config_reading():
  s = qaff.settings_from_config({})
  assert (s.grid, s.scales, s.fusion, s.temperature, s.global_pool,
          s.projection, s.num_tokens, s.token_dim, s.hops, s.heads,
          s.mlp_hidden) == (3, (0.5, 0.75, 1.5), "adaptive", 1.0, "scgem",
                            "per_type", 16, 128, 3, 8, 256)
  cfg = ml_collections.ConfigDict(
      {"dim": 8, "qaff": {"grid": 2, "scales": (0.5,), "fusion": "concat"}})
  s = qaff.settings_from_config(cfg)
  assert (s.grid, s.scales, s.fusion, s.num_features) == (2, (0.5,),
                                                           "concat", 6)
  with pytest.raises(ValueError, match=r"model\.qaff\.grids"):
    qaff.settings_from_config({"qaff": {"grids": 2}})


@pytest.mark.parametrize("field,value", [
    ("grid", 0), ("grid", 2.5), ("scales", (0.5, -1.0)), ("scales", "0.5"),
    ("fusion", "mean"), ("temperature", 0.0), ("global_pool", "max"),
    ("projection", "none"), ("num_tokens", 0), ("token_dim", -2),
    ("hops", 0), ("heads", 0), ("mlp_hidden", True),
])
def test_bad_settings_name_the_field(field, value):
  cfg = {"backbone": "resnet_tiny", "head": "qaff", "dim": D,
         "qaff": {field: value}}
  with pytest.raises(ValueError, match=rf"model\.qaff\.{field}"):
    nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))


def test_bad_combinations_name_the_field():
  with pytest.raises(ValueError, match=r"model\.qaff\.fusion"):
    qaff.QAFFSettings(fusion="scale", scales=())
  for build in (qaff.build_qaff_head, qaff.build_spca_head):
    with pytest.raises(ValueError, match=r"model\.qaff\.heads"):
      nnx.eval_shape(lambda: build({"dim": D}, 30, rngs=nnx.Rngs(0),
                                   dtype=jnp.float32,
                                   param_dtype=jnp.float32))


# ------------------------------------------------------------------- pooling


def _np_regional(x, p, grid, mask=None):
  """Loops: the grid over each image's valid bounding box, floor/ceil cells."""
  b, h, w, _ = x.shape
  mask = np.ones((b, h, w)) if mask is None else np.asarray(mask)
  out, valid = [], []
  for i in range(b):
    rows = [y for y in range(h) if mask[i, y].any()] or [0, h - 1]
    cols = [c for c in range(w) if mask[i, :, c].any()] or [0, w - 1]
    y0, ey = rows[0], rows[-1] + 1 - rows[0]
    x0, ex = cols[0], cols[-1] + 1 - cols[0]
    for r in range(grid):
      for c in range(grid):
        ys = range(y0 + math.floor(r * ey / grid),
                   y0 + math.ceil((r + 1) * ey / grid))
        xs = range(x0 + math.floor(c * ex / grid),
                   x0 + math.ceil((c + 1) * ex / grid))
        cells = [x[i, y, u] for y in ys for u in xs if mask[i, y, u] > 0]
        pooled = _np_gem(np.array(cells, np.float64), p)
        valid.append(pooled is not None)
        out.append(np.full(x.shape[-1], 1e-6) if pooled is None else pooled)
  return (np.array(out).reshape(b, grid * grid, -1),
          np.array(valid).reshape(b, grid * grid))


def test_regional_gem_matches_numpy():
  fn = jax.jit(qaff.regional_gem, static_argnums=(2,))
  x = _feature_map((3, 7, 5, 4))
  mask = np.ones((3, 7, 5), np.float32)
  mask[1, 5:] = 0.0                       # padded: 5 x 4 valid
  mask[1, :, 4:] = 0.0
  mask[2, 2:5, 1:4] = 0.0                 # a hole: the centre cell is empty
  for m in (None, mask):
    got, valid = fn(x, 2.5, 3, m)
    want, want_valid = _np_regional(x, 2.5, 3, m)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(valid, want_valid)
  assert not valid[2, 4] and valid[2].sum() == 8
  # Fewer rows than grid lines (2 < 3): overlapping, never empty cells.
  x = _feature_map((1, 2, 4, 3), seed=1)
  got, valid = fn(x, 3.0, 3, None)
  np.testing.assert_allclose(got, _np_regional(x, 3.0, 3)[0], rtol=2e-5)
  assert valid.all()


def _np_rescale(x, s, mask=None):
  """Loops: half-pixel bilinear at factor s over valid in-range neighbours.

  Output size = #{i : (i + 1/2)/s <= n}; an output cell is valid when the
  input cell k with k < (i + 1/2)/s <= k + 1 is valid.
  """
  b, h, w, ch = x.shape
  mask = np.ones((b, h, w)) if mask is None else np.asarray(mask)

  def size(n):
    return max(1, sum(1 for i in range(4 * n + 4) if (i + 0.5) / s <= n))

  def taps(i, n):
    u = (i + 0.5) / s - 0.5
    k = math.floor(u)
    return [(k, 1.0 - (u - k)), (k + 1, u - k)]

  def centre_cell(i):
    c = (i + 0.5) / s
    return next(k for k in range(-1, 4 * (h + w) + 4) if k < c <= k + 1)

  ho, wo = size(h), size(w)
  out = np.zeros((b, ho, wo, ch))
  out_mask = np.zeros((b, ho, wo))
  for n in range(b):
    for i in range(ho):
      for j in range(wo):
        ci, cj = min(centre_cell(i), h - 1), min(centre_cell(j), w - 1)
        out_mask[n, i, j] = mask[n, ci, cj] > 0
        acc, total = np.zeros(ch), 0.0
        for y, wy in taps(i, h):
          for u, wx in taps(j, w):
            if 0 <= y < h and 0 <= u < w and mask[n, y, u] > 0:
              acc += wy * wx * x[n, y, u]
              total += wy * wx
        if out_mask[n, i, j]:
          out[n, i, j] = acc / total
  return out, out_mask


def test_scale_resampling_and_gem_match_numpy():
  scales = (0.5, 0.75, 1.5)

  @jax.jit
  def fn(x, mask):
    outs = []
    for s in scales:
      xs, ms = qaff.rescale(x, s, mask)
      outs.append((xs, ms, models.gem(xs, 3.0, mask=ms)))
    return outs

  x = _feature_map((2, 7, 5, 3))
  mask = np.ones((2, 7, 5), np.float32)
  mask[1, 4:] = 0.0
  mask[1, :, 3:] = 0.0
  mask[1, 0, 0] = 0.0
  for m in (None, mask):
    for s, (xs, ms, pooled) in zip(scales, fn(x, m)):
      want, want_mask = _np_rescale(x, s, m)
      assert xs.shape == want.shape
      if m is None:
        assert ms is None
        ms = np.ones(want_mask.shape)
      np.testing.assert_array_equal(ms, want_mask)
      np.testing.assert_allclose(xs * ms[..., None], want, rtol=1e-5,
                                 atol=1e-6)
      for n in range(2):
        cells = want[n][want_mask[n] > 0]
        np.testing.assert_allclose(pooled[n], _np_gem(cells, 3.0), rtol=1e-5)

  # Same definition as jax.image.resize (no anti-aliasing) where s * n is an
  # integer, so the output size is exactly s * n.
  x = _feature_map((1, 8, 4, 3), seed=2)
  for s in scales:
    want = jax.image.resize(x, (1, int(8 * s), int(4 * s), 3), "bilinear",
                            antialias=False)
    np.testing.assert_allclose(qaff.rescale(x, s)[0], want, rtol=1e-5,
                               atol=1e-6)


# -------------------------------------------------------------------- SC-GeM


def _np_soft_assignment(x, mask, kernel, templates, ln_scale, ln_bias,
                        mix_logits, log_var, delta=spca.ASSIGN_DELTA, eps=1e-5):
  b, h, w, _ = x.shape
  n_cells, k_tokens = h * w, templates.shape[0]
  mu = _np_layer_norm(templates, eps) * ln_scale + ln_bias
  pi = np.exp(mix_logits) / np.exp(mix_logits).sum()
  var = np.exp(log_var)
  resp = np.zeros((b, n_cells, k_tokens))
  for n in range(b):
    feats = x[n].reshape(n_cells, -1) @ kernel
    for i in range(n_cells):
      logit = [math.log(pi[k]) - 0.5 * math.log(var[k])
               - np.sum((feats[i] - mu[k]) ** 2) / (2 * var[k])
               for k in range(k_tokens)]
      e = np.exp(np.array(logit) - max(logit))
      resp[n, i] = e / e.sum()
  m = mask.reshape(b, n_cells, 1)
  spatial = (resp + delta) * m
  return resp, spatial / spatial.sum(axis=1, keepdims=True)


def _np_distance_encoding(spatial, mask, h, w, hops, first=2):
  """Explicit A (valid cells only), powers A^first .. A^(first+hops-1)."""
  b, n_cells, k_tokens = spatial.shape
  cells = [(y, u) for y in range(h) for u in range(w)]
  e = np.array([[math.exp(-math.hypot(yi - yj, ui - uj))
                 for (yj, uj) in cells] for (yi, ui) in cells])
  out = np.zeros((b, n_cells, k_tokens * hops))
  for n in range(b):
    m = mask[n].reshape(-1)
    a = np.zeros((n_cells, n_cells))
    for j in range(n_cells):
      if m[j]:
        col = np.array([e[i, j] * m[i] for i in range(n_cells)])
        a[:, j] = col / col.sum()
    for i, t in enumerate(range(first, first + hops)):
      p_t = spatial[n].T @ np.linalg.matrix_power(a, t)      # [K, N]
      out[n, :, i * k_tokens:(i + 1) * k_tokens] = p_t.T
  return out


@pytest.mark.parametrize("legacy", [False, True])
def test_scgem_soft_assignment_distance_encoding_and_fuser(legacy):
  """Official hops A^2.. and torch LayerNorm; or the earlier variant (hops
  from A^1, eps 1e-6, identity fuser at init). tests/test_spca_parity.py
  checks the whole official forward."""
  h, w = 5, 6
  dev = spca.Deviations(hops_from_one=legacy, legacy_layernorm=legacy,
                        legacy_init=legacy)
  module = _init(lambda: spca.SCGeM(C, num_tokens=4, token_dim=8, hops=3,
                                    heads=8, deviations=dev, rngs=_rngs()))
  rng = np.random.default_rng(3)
  _set(module.assign.mix_logits, rng.normal(size=4))
  _set(module.assign.log_var, rng.normal(size=4) + 2.0)
  x = 0.3 * _feature_map((2, h, w, C))
  mask = np.ones((2, h, w), np.float32)
  mask[1, 3:] = 0.0
  mask[1, :, 4:] = 0.0

  graphdef, state = nnx.split(module)
  ctx = jax.jit(lambda st, x, m: nnx.merge(graphdef, st).context(x, m))(
      state, x, mask)
  a = module.assign
  resp, spatial = _np_soft_assignment(
      x, mask, np.asarray(a.proj.kernel[...]), np.asarray(a.templates[...]),
      np.asarray(a.template_norm.scale[...]),
      np.asarray(a.template_norm.bias[...]), np.asarray(a.mix_logits[...]),
      np.asarray(a.log_var[...]), eps=1e-6 if legacy else 1e-5)
  assert 0.05 < resp.max(-1).mean() < 0.99   # a soft, not one-hot, case
  np.testing.assert_allclose(ctx["responsibility"], resp, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(ctx["spatial"], spatial, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(np.asarray(ctx["spatial"]).sum(1), 1.0,
                             rtol=1e-5)
  first = 1 if legacy else 2
  enc = _np_distance_encoding(spatial, mask, h, w, 3, first)
  encode = jax.jit(spca.distance_encoding, static_argnums=(2, 3, 4, 5))
  np.testing.assert_allclose(
      encode(jnp.asarray(spatial, jnp.float32), mask, h, w, 3, first), enc,
      rtol=1e-4, atol=1e-9)
  # The encoding is LayerNorm'd per cell (scale 1, bias 0 at init).
  np.testing.assert_allclose(ctx["encoding"],
                             _np_layer_norm(enc, 1e-6 if legacy else 1e-5),
                             rtol=1e-3, atol=1e-4)
  if legacy:
    # Both zero-initialised output layers: the fuser is exactly the identity.
    np.testing.assert_array_equal(ctx["map"], x)
  else:
    # Official init: only the attention output starts at zero; the MLP does not.
    assert np.abs(np.asarray(ctx["map"]) - x).max() > 1e-3


# ---------------------------------------------------------------- QAFF head


def _expected_uniform_weights(fusion, grid=3, n_scales=3):
  kinds = ["global"] + ["regional"] * grid ** 2 + ["scale"] * n_scales
  keep = np.array([fusion not in ("global", "regional", "scale") or k == fusion
                   for k in kinds], np.float64)
  return keep / keep.sum()


@pytest.mark.parametrize("fusion,projection", [
    ("adaptive", "per_type"), ("uniform", "shared"), ("static", "per_type"),
    ("concat", "per_type"), ("global", "per_type"), ("regional", "per_type"),
    ("scale", "shared")])
def test_fusion_modes_weights_descriptor_and_gradients(fusion, projection):
  temperature = 2.0
  head = _init(lambda: qaff.QAFFHead(
      C, D, global_pool="gem", fusion=fusion, projection=projection,
      temperature=temperature, rngs=_rngs(), **SMALL))
  assert hasattr(head, "proj_local") == (projection == "shared")
  assert hasattr(head, "proj_regional") == (projection == "per_type")
  rng = np.random.default_rng(4)
  if fusion == "adaptive":  # non-uniform, per-image weights
    _set(head.fusion_mlp_out.kernel, rng.normal(size=(8, 13)))
  x = _feature_map((2, 6, 6, C))
  target = rng.normal(size=(2, D)).astype(np.float32)

  graphdef, params, rest = nnx.split(head, nnx.Param, ...)

  def loss_fn(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(out["descriptor"] * target), out

  if fusion in ("adaptive", "static", "concat"):  # learnable fusion
    (_, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, x)
  else:
    out, grads = _run(head, x), None
  out = jax.tree.map(np.asarray, out)
  weights, aux = out["fusion_weights"], out["aux_descriptors"]
  assert out["descriptor"].shape == (2, D)
  assert weights.shape == (2, 13)
  assert {k: v.shape for k, v in aux.items()} == {
      "global": (2, D), "regional": (2, 9, D), "scale": (2, 3, D)}
  assert out.pop("fusion_valid").dtype == np.bool_
  for v in jax.tree.leaves(out):
    assert v.dtype == np.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert (weights >= 0).all()
  np.testing.assert_allclose(np.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             rtol=1e-5)
  feats = np.concatenate([aux["global"][:, None], aux["regional"],
                          aux["scale"]], axis=1)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)

  if fusion == "adaptive":
    mlp_in, mlp_out = head.fusion_mlp_in, head.fusion_mlp_out
    hidden = jax.nn.gelu(aux["global"] @ np.asarray(mlp_in.kernel[...])
                         + np.asarray(mlp_in.bias[...]))
    logits = (np.asarray(hidden) @ np.asarray(mlp_out.kernel[...])
              + np.asarray(mlp_out.bias[...])) / temperature
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(weights, want / want.sum(-1, keepdims=True),
                               rtol=1e-4, atol=1e-7)
    assert not np.allclose(weights[0], weights[1])
  else:
    np.testing.assert_allclose(
        weights, np.broadcast_to(_expected_uniform_weights(fusion),
                                 weights.shape), rtol=1e-6, atol=1e-12)
  if fusion != "concat":
    np.testing.assert_allclose(
        out["descriptor"], _np_l2(np.einsum("bn,bnd->bd", weights, feats)),
        rtol=1e-5, atol=1e-6)

  if grads is not None:
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    fusion_param = grads[{"adaptive": "fusion_mlp_out",
                          "static": "fusion_logits",
                          "concat": "concat_proj"}[fusion]]
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(fusion_param))
    assert np.abs(grads["proj_global"]["kernel"][...]).max() > 0


def test_bfloat16_compute_gives_finite_float32_outputs():
  head = _init(lambda: qaff.QAFFHead(C, D, dtype=jnp.bfloat16, rngs=_rngs(),
                                     **SMALL))
  assert head.global_pool.fuser.query.dtype == jnp.bfloat16
  x = jnp.asarray(_feature_map((2, 6, 6, C)), jnp.bfloat16)
  out = _run(head, x, np.ones((2, 6, 6), np.float32))
  assert out.pop("fusion_valid").dtype == np.bool_
  for v in jax.tree.leaves(out):
    assert v.dtype == np.float32 and np.isfinite(v).all()
  np.testing.assert_allclose(np.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(out["fusion_weights"].sum(-1), 1.0, rtol=1e-6)


def test_padding_does_not_change_any_feature():
  """Padded map + mask == unpadded map, for every feature and the fusion.

  A non-trivial fuser (random output layers) and fusion MLP, so the masked
  soft assignment, distance encoding and attention keys all matter; padded
  cells hold large garbage that would show if it leaked.
  """
  head = _init(lambda: qaff.QAFFHead(C, D, rngs=_rngs(), **SMALL))
  rng = np.random.default_rng(5)
  fuser = head.global_pool.fuser
  for layer in (fuser.out, fuser.mlp_out, head.fusion_mlp_out):
    _set(layer.kernel, 0.3 * rng.normal(size=layer.kernel[...].shape))
  _set(head.global_pool.assign.log_var, np.full(4, 3.0))

  x = _feature_map((3, 6, 6, C), seed=6)
  mask = np.ones((3, 6, 6), np.float32)
  mask[1, 4:] = 0.0                                   # image 1: 4 x 5 valid
  mask[1, :, 5:] = 0.0
  mask[2] = 0.0                                       # image 2: all padding
  x[mask == 0] = 100.0
  padded = _run(head, x, mask)
  alone = _run(head, x[1:2, :4, :5])
  for key in ("descriptor", "fusion_weights"):
    np.testing.assert_allclose(padded[key][1], alone[key][0], rtol=1e-4,
                               atol=1e-5, err_msg=key)
  for key in ("global", "regional", "scale"):
    np.testing.assert_allclose(padded["aux_descriptors"][key][1],
                               alone["aux_descriptors"][key][0], rtol=1e-4,
                               atol=1e-5, err_msg=key)
  # An all-padding row is finite (extraction pads batches with such rows).
  for v in jax.tree.leaves(padded):
    assert np.isfinite(v).all()
  np.testing.assert_allclose(padded["fusion_weights"][2].sum(), 1.0,
                             rtol=1e-6)


# ----------------------------------------------------------------- build_model


def _model_cfg(head, **qaff_fields):
  return ml_collections.ConfigDict(dict(
      backbone="resnet_tiny", output_stride=32, head=head, dim=D,
      gem_p=3.0, learn_p=True, dtype="float32", param_dtype="float32",
      qaff={**SMALL, **qaff_fields}))


@pytest.mark.parametrize("head,fields", [
    ("spca", {})] + [("qaff", {"fusion": f}) for f in qaff.FUSIONS] + [
        ("qaff", {"global_pool": "gem", "projection": "shared"})])
def test_build_model_every_mode_bfloat16_abstract_forward_backward(head,
                                                                   fields):
  """Every mode builds; bf16 compute keeps f32 params, outputs, gradients."""
  cfg = _model_cfg(head, **fields)
  cfg.dtype = "bfloat16"
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  assert isinstance(model.head, qaff.QAFFHead if head == "qaff"
                    else spca.SpCaHead)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(
      nnx.state(model)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, images):
    out = nnx.merge(graphdef, params, rest, copy=True)(
        images, return_features=True)
    return jnp.sum(out["descriptor"][:, 0]), out

  (loss, out), grads = jax.eval_shape(
      jax.value_and_grad(loss_fn, has_aux=True), params, rest,
      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.pop("feature_map").dtype == jnp.bfloat16
  assert out["descriptor"].shape == (2, D)
  if head == "qaff":
    assert out["fusion_weights"].shape == (2, 13)
    assert out["aux_descriptors"]["regional"].shape == (2, 9, D)
    assert out.pop("fusion_valid").dtype == jnp.bool_
  for v in jax.tree.leaves((loss, out, grads)):
    assert v.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_build_model_qaff_jitted_forward_backward():
  cfg = _model_cfg("qaff")
  model = _init(lambda: models.build_model(cfg, rngs=_rngs()))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

  def loss_fn(params, images):
    out = nnx.merge(graphdef, params, rest, copy=True)(images)
    return jnp.sum(out["descriptor"][:, 0]), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, images)
  assert np.isfinite(loss)
  out.pop("fusion_valid")
  for v in jax.tree.leaves(out):
    assert v.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["descriptor"], axis=-1), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(out["fusion_weights"].sum(-1), 1.0, rtol=1e-6)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads["backbone"]["conv1"]["kernel"][...])).max() > 0


# ----------------------------------------------------------- attention fusion


def test_attention_fusion_weights_match_numpy_sum_to_one_and_respect_masks():
  temperature = 0.5
  head = _init(lambda: qaff.QAFFHead(
      C, D, global_pool="gem", fusion="attention", attn_dim=8,
      temperature=temperature, rngs=_rngs(), **SMALL))
  rng = np.random.default_rng(7)
  _set(head.fusion_embed, rng.normal(size=(13, 8)))
  _set(head.fusion_log_temp, 0.7)
  x = _feature_map((3, 6, 6, C))
  # Image 1 is valid only on its top row and left column (an L): the four
  # regional cells off the L hold no valid cell and must get zero weight.
  mask = np.ones((3, 6, 6), np.float32)
  mask[1] = 0.0
  mask[1, 0, :] = 1.0
  mask[1, :, 0] = 1.0
  out = _run(head, x, mask)
  w = out["fusion_weights"]
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.exp(out["fusion_log_weights"]), w, rtol=1e-6)
  aux = out["aux_descriptors"]
  feats = np.concatenate([aux["global"][:, None], aux["regional"], aux["scale"]], 1)
  q = (aux["global"] @ np.asarray(head.fusion_query.kernel[...])
       + np.asarray(head.fusion_query.bias[...]))
  k = feats @ np.asarray(head.fusion_key.kernel[...]) + np.asarray(head.fusion_embed[...])
  logits = np.exp(0.7) / math.sqrt(8) * np.einsum("bd,bnd->bn", q, k) / temperature
  logits = np.where(out["fusion_valid"], logits, -np.inf)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-7)
  assert out["fusion_valid"][0].all()
  assert not out["fusion_valid"][1, [5, 6, 8, 9]].any()
  assert (w[1][~out["fusion_valid"][1]] == 0).all()
  assert not np.allclose(w[0], w[2])  # per-image weights


def test_attention_fusion_gradients_reach_every_fusion_parameter():
  head = _init(lambda: qaff.QAFFHead(C, D, global_pool="gem", fusion="attention",
                                     rngs=_rngs(), **SMALL))
  graphdef, params, rest = nnx.split(head, nnx.Param, ...)
  x = _feature_map((2, 6, 6, C))
  target = np.random.default_rng(1).normal(size=(2, D)).astype(np.float32)

  def loss_fn(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x)["descriptor"] * target)

  grads = jax.jit(jax.grad(loss_fn))(params)
  for name in ("fusion_query", "fusion_key", "fusion_embed", "fusion_log_temp"):
    leaves = jax.tree.leaves(grads[name])
    assert leaves and all(np.abs(np.asarray(g)).max() > 0 for g in leaves), name


def test_routing_and_entropy_need_a_learned_fusion():
  with pytest.raises(ValueError, match="model.qaff.fusion"):
    qaff.QAFFSettings(fusion="uniform", route_weight=1.0)
  with pytest.raises(ValueError, match="model.qaff.route_over"):
    qaff.QAFFSettings(route_over="cells")
  with pytest.raises(ValueError, match="model.qaff.route_tau"):
    qaff.QAFFSettings(route_tau=0.0)
  assert qaff.QAFFSettings(fusion="attention", route_weight=1.0).route_weight == 1.0
  np.testing.assert_array_equal(qaff.QAFFSettings(grid=2, scales=(0.5,)).feature_types(),
                                [0, 1, 1, 1, 1, 2])
