"""SC-GeM / SpCa head against the official SpCa forward, without PyTorch.

The NumPy reference below is written from the equations of the authors' code
(Zy-Zhang/SpCa networks/spca.py `Spca_layer`, `distance_encoding_m`, `Fuser`,
`SpCa.forward_test`; networks/RetrievalNet.py `Attention`, `Mlp`, `gem`) and
reads the official state-dict layout: torch LayerNorm (eps 1e-5, two-pass
variance), exact erf GELU, adjacency powers A^2 .. A^(m+1), softmax of
log(pi / sqrt(cov)) - ||x - mu||^2 / (2 cov), GeM p = 3, whitening with bias.
It runs in float64 with explicit loops over images and heads. Also here: the
official checkpoint converter (`convert.spca`) on synthetic state dicts.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qaff_jax import convert, models
from qaff_jax.convert import common
from qaff_jax.convert import spca as spca_convert
from qaff_jax.models import spca
from test_convert import torchvision_resnet, write

C, K, TD, HOPS, HEADS, D = 16, 3, 4, 2, 4, 8
_erf = np.vectorize(math.erf)


# ------------------------------------------------------------ NumPy reference


def np_layer_norm(x, weight, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)          # two-pass, biased
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_linear(sd, name, x):
  w = sd[f"{name}.weight"].astype(np.float64)
  if w.ndim == 4:                                          # 1x1 conv
    w = w[:, :, 0, 0]
  out = x @ w.T
  if f"{name}.bias" in sd:
    out = out + sd[f"{name}.bias"]
  return out


def np_adjacency(h, w):
  """Column-normalised A_ij = exp(-d_ij) / sum_i exp(-d_ij) (official)."""
  coords = np.array([(y, u) for y in range(h) for u in range(w)], np.float64)
  sq = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
  e = np.exp(-np.abs(np.sqrt(sq)))
  return e / e.sum(axis=0, keepdims=True)


def np_spca_head(sd, fmap, multi, heads):
  """SpCa.forward_test from the backbone map: [B, h, w, C] -> [B, D]."""
  b, h, w, c = fmap.shape
  n = h * w
  adj = np_adjacency(h, w)
  powers, a_t = [], adj
  for _ in range(multi):                          # A^2 .. A^(multi+1)
    a_t = a_t @ adj
    powers.append(a_t)
  out = []
  for i in range(b):
    f = fmap[i].reshape(n, c).astype(np.float64)   # cell n = y * w + x
    x = np_linear(sd, "pos_branch.proj_kv", f)                     # [N, d]
    mu = np_layer_norm(sd["pos_branch.clusters"][0],
                       sd["pos_branch.norm_templates.weight"],
                       sd["pos_branch.norm_templates.bias"])       # [K, d]
    pi, cov = sd["pos_branch.pi"][0], sd["pos_branch.cov"][0]
    sq = ((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1)           # [N, K]
    attn = np_softmax(np.log(pi / np.sqrt(cov)) - sq / cov / 2)
    attn_ = attn + 1e-8
    attn_ = attn_ / attn_.sum(axis=0, keepdims=True)
    enc = np.concatenate([attn_.T @ p for p in powers], axis=0)    # [K*m, N]
    enc = np_layer_norm(enc.T, sd["pos_branch.p_norm.weight"],
                        sd["pos_branch.p_norm.bias"])              # [N, K*m]
    # Fuser: q + Attention(LN(q), proj(x), proj(x)); then q + Mlp(q).
    ctx = np_linear(sd, "fuser.proj", enc)
    q_ln = np_layer_norm(f, sd["fuser.ln.weight"], sd["fuser.ln.bias"])
    qq = np_linear(sd, "fuser.cross_attn.q", q_ln)
    kk = np_linear(sd, "fuser.cross_attn.k", ctx)
    vv = np_linear(sd, "fuser.cross_attn.v", ctx)
    hd = c // heads
    attended = np.zeros((n, c))
    for j in range(heads):
      s = slice(j * hd, (j + 1) * hd)
      att = np_softmax(qq[:, s] @ kk[:, s].T * hd ** -0.5)
      attended[:, s] = att @ vv[:, s]
    q = f + np_linear(sd, "fuser.cross_attn.proj", attended)
    q = q + np_linear(sd, "fuser.mlp.fc2",
                      np_gelu(np_linear(sd, "fuser.mlp.fc1", q)))
    g = np.mean(np.maximum(q, 1e-6) ** 3, axis=0) ** (1.0 / 3.0)   # gem p=3
    v = np_linear(sd, "whiten", g)
    out.append(v / np.linalg.norm(v))
  return np.stack(out)


# --------------------------------------------------------------- Flax helpers


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def _head(deviations=spca.OFFICIAL, seed=0):
  return spca.SpCaHead(C, D, num_tokens=K, token_dim=TD, hops=HOPS,
                       heads=HEADS, learn_p=False, deviations=deviations,
                       rngs=_rngs(seed))


@jax.jit
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)["descriptor"]


@jax.jit
def _context(graphdef, state, x):
  return nnx.merge(graphdef, state).pool.context(x)


def _run(head, x):
  return np.asarray(_apply(*nnx.split(head), x))


def _randomize(head, seed=1):
  """Every parameter random (the official init zeroes the attention output)."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(head)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] in ("mix_logits",):
      value = rng.normal(0.0, 0.5, leaf.shape)
    elif names[-1] == "log_var":
      value = 1.0 + rng.normal(0.0, 0.3, leaf.shape)
    elif names[-1] == "scale":                            # LayerNorm weights
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      fan_in = leaf.shape[0] if leaf.ndim == 2 else 4
      value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
    flat[tuple(names)] = value.astype(np.float32)
  pure = nnx.to_pure_dict(state)

  def walk(node, prefix):
    for k in node:
      if isinstance(node[k], dict):
        walk(node[k], prefix + (str(k),))
      else:
        node[k] = jnp.asarray(flat[prefix + (str(k),)])

  walk(pure, ())
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(head, state)
  return head


def official_state_dict(head):
  """The official `SpCa` head keys from our head's parameters (by hand)."""
  a, f = head.pool.assign, head.pool.fuser

  def arr(v):
    return np.asarray(v[...], np.float64)

  sd = {
      "pos_branch.proj_kv.weight": arr(a.proj.kernel).T[:, :, None, None],
      "pos_branch.clusters": arr(a.templates)[None],
      "pos_branch.pi": np.exp(arr(a.mix_logits))[None],
      "pos_branch.cov": np.exp(arr(a.log_var))[None],
      "pos_branch.norm_templates.weight": arr(a.template_norm.scale),
      "pos_branch.norm_templates.bias": arr(a.template_norm.bias),
      "pos_branch.p_norm.weight": arr(head.pool.context_norm.scale),
      "pos_branch.p_norm.bias": arr(head.pool.context_norm.bias),
      "fuser.ln.weight": arr(f.query_norm.scale),
      "fuser.ln.bias": arr(f.query_norm.bias),
      "whiten.weight": arr(head.whiten.kernel).T[:, :, None, None],
      "whiten.bias": arr(head.whiten.bias),
  }
  for ours, theirs in (("context_proj", "fuser.proj"),
                       ("query", "fuser.cross_attn.q"),
                       ("key", "fuser.cross_attn.k"),
                       ("value", "fuser.cross_attn.v"),
                       ("out", "fuser.cross_attn.proj"),
                       ("mlp_in", "fuser.mlp.fc1"),
                       ("mlp_out", "fuser.mlp.fc2")):
    layer = getattr(f, ours)
    sd[f"{theirs}.weight"] = arr(layer.kernel).T
    sd[f"{theirs}.bias"] = arr(layer.bias)
  return sd


def _fmap(shape=(2, 3, 4, C), seed=0):
  return np.abs(np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


# ----------------------------------------------------- hand-computable pieces


def test_hops_are_adjacency_powers_two_to_m_plus_one_by_hand():
  """1 x 2 grid: A = [[p, q], [q, p]], p = 1/(1+e^-1), q = e^-1/(1+e^-1)."""
  e = math.exp(-1.0)
  p, q = 1.0 / (1.0 + e), e / (1.0 + e)
  a2 = np.array([[p * p + q * q, 2 * p * q], [2 * p * q, p * p + q * q]])
  a3 = a2 @ np.array([[p, q], [q, p]])
  spatial = np.array([[[1.0], [0.0]]], np.float32)       # token on cell 0
  got = np.asarray(spca.distance_encoding(spatial, None, 1, 2, 2))
  np.testing.assert_allclose(got[0], np.stack([a2[0], a3[0]], axis=1),
                             rtol=1e-6)
  np.testing.assert_allclose(got[0, :, 0], [0.6068, 0.3932], atol=1e-4)  # p=.7311
  earlier = np.asarray(spca.distance_encoding(spatial, None, 1, 2, 2, 1))
  np.testing.assert_allclose(earlier[0, :, 0], [p, q], rtol=1e-6)


def test_layernorm_is_torch_two_pass_with_eps_1e5():
  """Tiny variance on a large mean: one-pass E[x^2] - E[x]^2 loses it."""
  x = np.float32(10.0) + np.array([[1e-3, -1e-3, 2e-3, -2e-3]], np.float32)
  var = np.mean((x.astype(np.float64) - 10.0) ** 2)      # 2.5e-6
  want = (x - 10.0) / np.sqrt(var + 1e-5)
  norm = spca._layer_norm(4, spca.OFFICIAL, fast_variance=True, rngs=_rngs(),
                          dtype=jnp.float32, param_dtype=jnp.float32)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=2e-3)
  legacy = spca._layer_norm(4, spca.Deviations(legacy_layernorm=True),
                            fast_variance=True, rngs=_rngs(),
                            dtype=jnp.float32, param_dtype=jnp.float32)
  assert np.abs(np.asarray(legacy(jnp.asarray(x))) - want).max() > 0.05


# -------------------------------------------------------------- full forward


def test_official_forward_matches_numpy_reference():
  head = _randomize(_head())
  assert head.pool.fuser.mlp_norm is None and head.pool.first_hop == 2
  x = _fmap()
  ctx = jax.tree.map(np.asarray, _context(*nnx.split(head), x))
  assert 0.05 < ctx["responsibility"].max(-1).mean() < 0.99   # soft
  enc_std = ctx["encoding"].std()
  assert enc_std > 0.5                                        # not collapsed
  want = np_spca_head(official_state_dict(head), x, HOPS, HEADS)
  got = _run(head, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field", [f for f in spca.DEVIATION_FIELDS
                                   if f != "legacy_init"])
def test_each_forward_deviation_changes_the_output(field):
  official = _randomize(_head())
  x = _fmap()
  want = np_spca_head(official_state_dict(official), x, HOPS, HEADS)
  variant = _head(spca.Deviations(**{field: True}))
  # Same parameter values wherever the two heads share a parameter.
  _, base = nnx.split(official)
  _, state = nnx.split(variant)
  shared = nnx.to_pure_dict(base)
  pure = nnx.to_pure_dict(state)

  def copy(dst, src):
    for k in dst:
      if k in src:
        if isinstance(dst[k], dict):
          copy(dst[k], src[k])
        else:
          dst[k] = src[k]

  copy(pure, shared)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(variant, state)
  got = _run(variant, x)
  np.testing.assert_allclose(_run(official, x), want, rtol=1e-5, atol=1e-5)
  # The parity test's tolerance would catch it (tanh GELU moves the
  # descriptor least: ~4e-5 here).
  assert np.abs(got - want).max() > 2e-5, field
  assert not np.allclose(got, want, rtol=1e-5, atol=1e-5), field


def test_official_init_and_legacy_init_differ():
  x = _fmap()
  official = _head()
  legacy = _head(spca.Deviations(legacy_init=True))
  f = official.pool.fuser
  # Attention output zero in both (official `Attention` init); the MLP is
  # torch-initialised in the official code, zero in the earlier variant.
  assert np.abs(np.asarray(f.out.kernel[...])).max() == 0
  assert np.abs(np.asarray(f.mlp_out.kernel[...])).max() > 0
  assert np.abs(np.asarray(legacy.pool.fuser.mlp_out.kernel[...])).max() == 0
  bound = 1 / math.sqrt(2 * C)
  assert np.abs(np.asarray(f.mlp_out.bias[...])).max() <= bound
  bound = math.sqrt(6.0 / ((K + 1) * TD))       # xavier of the [1, K, d] tensor
  assert np.abs(np.asarray(official.pool.assign.templates[...])).max() <= bound
  ctx = _context(*nnx.split(legacy), x)
  np.testing.assert_array_equal(ctx["map"], x)  # identity fuser at init
  assert np.abs(np.asarray(_context(*nnx.split(official), x)["map"]) - x).max() > 1e-3
  assert np.abs(_run(official, x) - _run(legacy, x)).max() > 1e-3


def test_torch_reimplementation_if_available():
  """Optional: a tiny torch re-implementation (skipped without torch)."""
  torch = pytest.importorskip("torch")
  head = _randomize(_head())
  x = _fmap()
  sd = {k: torch.tensor(v) for k, v in official_state_dict(head).items()}
  f = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)   # NCHW
  b, c, h, w = f.shape
  proj = torch.nn.functional.conv2d(f, sd["pos_branch.proj_kv.weight"])
  xs = proj.reshape(b, -1, h * w).permute(0, 2, 1)
  mu = torch.nn.functional.layer_norm(
      sd["pos_branch.clusters"], (TD,), sd["pos_branch.norm_templates.weight"],
      sd["pos_branch.norm_templates.bias"])
  sq = torch.square(xs.unsqueeze(2) - mu.unsqueeze(1)).sum(-1)
  attn = torch.softmax(torch.log(sd["pos_branch.pi"] / torch.sqrt(
      sd["pos_branch.cov"])) - sq / sd["pos_branch.cov"] / 2, dim=-1)
  attn_ = attn + 1e-8
  attn_ = attn_ / attn_.sum(dim=-2, keepdim=True)
  adj = torch.tensor(np_adjacency(h, w))
  m, outs = adj, []
  for _ in range(HOPS):
    m = m @ adj
    outs.append(torch.einsum("bnk,nm->bkm", attn_, m))
  enc = torch.nn.functional.layer_norm(
      torch.cat(outs, 1).permute(0, 2, 1), (K * HOPS,),
      sd["pos_branch.p_norm.weight"], sd["pos_branch.p_norm.bias"])
  lin = lambda name, v: torch.nn.functional.linear(v, sd[f"{name}.weight"],
                                                   sd[f"{name}.bias"])
  q = f.reshape(b, c, h * w).permute(0, 2, 1)
  ctx = lin("fuser.proj", enc)
  q_ln = torch.nn.functional.layer_norm(q, (c,), sd["fuser.ln.weight"],
                                        sd["fuser.ln.bias"])
  split = lambda v: v.reshape(b, h * w, HEADS, -1).permute(0, 2, 1, 3)
  qq, kk, vv = (split(lin(f"fuser.cross_attn.{n}", v))
                for n, v in (("q", q_ln), ("k", ctx), ("v", ctx)))
  att = torch.softmax(qq @ kk.transpose(-2, -1) * (c // HEADS) ** -0.5, -1)
  o = (att @ vv).transpose(1, 2).reshape(b, h * w, c)
  q = q + lin("fuser.cross_attn.proj", o)
  q = q + lin("fuser.mlp.fc2", torch.nn.functional.gelu(lin("fuser.mlp.fc1", q)))
  g = q.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
  v = torch.nn.functional.linear(g, sd["whiten.weight"][:, :, 0, 0],
                                 sd["whiten.bias"])
  want = torch.nn.functional.normalize(v, dim=-1).numpy()
  np.testing.assert_allclose(_run(head, x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ converter


TINY_BACKBONE = dict(bottleneck=False, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128))


def official_checkpoint(seed=0, c=128, k=K, d=TD, multi=HOPS, dim=D,
                        classes=5):
  """A state dict laid out as the official `SpCa(...).state_dict()`."""
  rng = np.random.default_rng(seed)
  sd = {}
  names = {"conv1": "backbone.block1.0", "bn1": "backbone.block1.1"}
  for key, value in torchvision_resnet(**TINY_BACKBONE, seed=seed).items():
    top, _, rest = key.partition(".")
    if top == "fc":
      continue
    if top.startswith("layer"):
      sd[f"backbone.block{int(top[5:]) + 1}.{rest}"] = value
    else:
      sd[f"{names[top]}.{rest}"] = value

  def lin(name, o, i, conv=False):
    w = rng.normal(0, 1 / math.sqrt(i), (o, i)).astype(np.float32)
    sd[f"{name}.weight"] = w[:, :, None, None] if conv else w
    sd[f"{name}.bias"] = rng.normal(0, 0.1, o).astype(np.float32)

  def ln(name, n):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, n).astype(np.float32)

  sd["pos_branch.clusters"] = rng.normal(0, 0.5, (1, k, d)).astype(np.float32)
  sd["pos_branch.pi"] = rng.uniform(0.1, 1.0, (1, k)).astype(np.float32)
  sd["pos_branch.cov"] = rng.uniform(2.0, 4.0, (1, k)).astype(np.float32)
  sd["pos_branch.proj_kv.weight"] = rng.normal(
      0, 1 / math.sqrt(c), (d, c, 1, 1)).astype(np.float32)
  ln("pos_branch.p_norm", k * multi)
  ln("pos_branch.norm_templates", d)
  ln("fuser.ln", c)
  lin("fuser.proj", c, k * multi)
  for n in "qkv":
    lin(f"fuser.cross_attn.{n}", c, c)
  lin("fuser.cross_attn.proj", c, c)
  lin("fuser.mlp.fc1", 2 * c, c)
  lin("fuser.mlp.fc2", c, 2 * c)
  lin("whiten", dim, c, conv=True)
  sd["classifier.weight"] = rng.normal(0, 0.1, (classes, dim)).astype(np.float32)
  return sd


def _converted_model(converted):
  cfg = spca_convert.model_config("resnet_tiny", dict(
      num_tokens=K, token_dim=TD, hops=HOPS, dim=D))
  net = common.materialize(lambda rngs: models.build_model(cfg, rngs=rngs),
                           converted.params, converted.model_state)
  net.eval()
  return net


def test_converter_maps_every_official_parameter_and_matches_numpy(tmp_path):
  sd = official_checkpoint()
  converted = spca_convert.convert_spca(sd, backbone="resnet_tiny")
  assert converted.unused == sorted(
      ["classifier.weight"] + [k for k in sd if k.endswith("num_batches_tracked")])
  assert set(converted.used) == set(sd) - set(converted.unused)
  net = _converted_model(converted)
  head, a, f = net.head, net.head.pool.assign, net.head.pool.fuser
  got = lambda v: np.asarray(v[...])
  # Each parameter where it belongs (the transforms written out by hand).
  np.testing.assert_array_equal(got(a.proj.kernel),
                                sd["pos_branch.proj_kv.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(got(a.templates), sd["pos_branch.clusters"][0])
  np.testing.assert_allclose(got(a.mix_logits), np.log(sd["pos_branch.pi"][0]),
                             rtol=1e-6)
  np.testing.assert_allclose(got(a.log_var), np.log(sd["pos_branch.cov"][0]),
                             rtol=1e-6)
  pairs = [(a.template_norm.scale, "pos_branch.norm_templates.weight"),
           (a.template_norm.bias, "pos_branch.norm_templates.bias"),
           (head.pool.context_norm.scale, "pos_branch.p_norm.weight"),
           (head.pool.context_norm.bias, "pos_branch.p_norm.bias"),
           (f.query_norm.scale, "fuser.ln.weight"), (f.query_norm.bias, "fuser.ln.bias"),
           (head.whiten.bias, "whiten.bias")]
  for ours, theirs in (("context_proj", "fuser.proj"), ("query", "fuser.cross_attn.q"),
                       ("key", "fuser.cross_attn.k"), ("value", "fuser.cross_attn.v"),
                       ("out", "fuser.cross_attn.proj"), ("mlp_in", "fuser.mlp.fc1"),
                       ("mlp_out", "fuser.mlp.fc2")):
    layer = getattr(f, ours)
    np.testing.assert_array_equal(got(layer.kernel), sd[f"{theirs}.weight"].T)
    pairs.append((layer.bias, f"{theirs}.bias"))
  for ours, key in pairs:
    np.testing.assert_array_equal(got(ours), sd[key], err_msg=key)
  np.testing.assert_array_equal(got(head.whiten.kernel),
                                sd["whiten.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(got(net.backbone.conv1.kernel),
                                sd["backbone.block1.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got(net.backbone.layer4[0].bn2.var),
                                sd["backbone.block5.0.bn2.running_var"])
  # The converted model's forward equals the official equations (NumPy) on
  # the official tensors, from the converted backbone's map.
  images = np.random.default_rng(3).normal(size=(2, 96, 128, 3)).astype(np.float32)
  out = jax.jit(lambda m, x: m(x, return_features=True))(net, images)
  want = np_spca_head(sd, np.asarray(out["feature_map"]), HOPS, spca_convert.HEADS)
  np.testing.assert_allclose(out["descriptor"], want, rtol=1e-5, atol=1e-5)
  # Through a file and the Orbax checkpoint, as the CLI does it.
  src = tmp_path / "spca.safetensors"
  write(src, sd)
  _, folder = convert.convert_file(str(src), "spca_resnet_tiny",
                                   str(tmp_path / "out"))
  loaded = spca_convert.load_model(folder, backbone="resnet_tiny")
  np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(loaded, images)["descriptor"],
                             out["descriptor"], rtol=1e-6, atol=1e-6)


def test_converter_errors_name_the_official_keys():
  sd = official_checkpoint()
  missing = dict(sd)
  del missing["fuser.mlp.fc1.bias"]
  with pytest.raises(common.ConversionError, match=r"missing keys.*fuser\.mlp\.fc1\.bias"):
    spca_convert.convert_spca(missing, backbone="resnet_tiny")
  extra = dict(sd, **{"fuser.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(common.ConversionError, match=r"unexpected keys.*fuser\.extra\.weight"):
    spca_convert.convert_spca(extra, backbone="resnet_tiny")
  renamed = {k.replace("backbone.block3.", "backbone.layer2."): v for k, v in sd.items()}
  with pytest.raises(common.ConversionError, match=r"backbone\.block3\.0\.conv1\.weight"):
    spca_convert.convert_spca(renamed, backbone="resnet_tiny")
  bad = dict(sd, **{"pos_branch.cov": -sd["pos_branch.cov"]})
  with pytest.raises(common.ConversionError, match=r"pos_branch\.cov"):
    spca_convert.convert_spca(bad, backbone="resnet_tiny")
  no_head = {k: v for k, v in sd.items() if not k.startswith("pos_branch.")}
  with pytest.raises(common.ConversionError, match=r"pos_branch\.clusters"):
    spca_convert.convert_spca(no_head, backbone="resnet_tiny")
  # The published architectures resolve; a tiny file does not fit them.
  assert convert.converter_for("spca_r101") is spca_convert.convert_spca
  assert spca_convert.backbone_for("spca_r50") == "resnet50"
  with pytest.raises(common.ConversionError, match=r"spca_r101.*shape mismatches"):
    convert.convert_tensors(sd, "spca_r101")
