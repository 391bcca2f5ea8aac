"""SC-GeM: the spatial-context-aware global feature of SpCa (ICCV 2023).

Zhang, Wang, Zhou, Koniusz, "Learning Spatial-context-aware Global Visual
Feature Representation for Instance Image Retrieval". By default the forward
pass and the initialisation follow the authors' code (Zy-Zhang/SpCa,
networks/spca.py `Spca_layer`, `distance_encoding_m`, `Fuser`, `SpCa`;
networks/RetrievalNet.py `Attention`, `Mlp`, `gem`). A feature map
F [B, h, w, C] (N = h*w cells, cell n at grid coordinate (y_n, x_n)) becomes
a descriptor in four steps:

1. Online tokens (`SoftAssignment`). Cells are projected, x_n = W_p F_n
   (C -> d, no bias), and softly assigned to K learned semantic tokens by a
   Gaussian-mixture posterior with templates mu_k = LayerNorm(T_k), mixing
   weights pi = softmax(l) and variances s2_k = exp(v_k):

     logit_nk = log pi_k - 1/2 log s2_k - ||x_n - mu_k||^2 / (2 s2_k)
     r_nk     = softmax_k(logit_nk)                      (responsibility)
     a_nk     = m_n (r_nk + delta) / sum_n' m_n' (r_n'k + delta)

   a_{:,k} is token k's spatial distribution (a distribution over the valid
   cells, m_n = 1 for a valid cell); delta = 1e-8 keeps it defined for a token
   no cell picks. The official code stores pi and s2 themselves (`pi`, `cov`);
   log pi_k - 1/2 log s2_k differs from its log(pi_k / sqrt(s2_k)) by a
   constant over k, which the softmax removes, so the forward is the same
   with l = log pi, v = log s2 (`convert.spca` maps them so).
2. Distance encoding (`distance_encoding`). With d_ij = ||(y_i, x_i) -
   (y_j, x_j)||_2 the grid distance and E_ij = exp(-d_ij), the transition
   matrix over the valid cells is column-normalised,

     A_ij = m_i m_j E_ij / sum_i' m_i' E_i'j,

   and hop t = 2 .. m+1 propagates each token's distribution t steps:
   P_t = a^T A^t ([K, N]), as the official `distance_encoding_m`, whose
   loop multiplies by A before it records the first map. The K*m values at
   each cell (hop-major: channel (t-2)*K + k) are LayerNorm'd and describe
   which tokens lie how far from it.
3. Fusion (`CrossAttentionFuser`, the official `Fuser`): the map cells query
   the context vectors by multi-head cross-attention (queries = LN(F),
   keys/values = Linear(K*m -> C) of the context, invalid cells masked out of
   the keys), then an MLP C -> 2C -> C with exact (erf) GELU; both residual:
   F' = F + Attn(LN(F), c, c), F'' = F' + MLP(F').
4. GeM (p = 3 fixed in the official recipe, mask-aware) over the fused map;
   `SpCaHead` adds the whitening Linear (C -> D, with bias; the official 1x1
   conv) and the L2 norm.

LayerNorms are torch's: eps 1e-5, variance mean((x - mean)^2). The official
running EM-style template / pi / cov updates do not reach its output and are
left out. Masks (padded batches) are an addition: with no mask, or on the
valid cells of a padded map, the result is the official one.

`Deviations` switches individual pieces back to this project's earlier
SC-GeM (config fields `model.qaff.<name>`, all off by default).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qaff_jax.models import pooling
from qaff_jax.models.heads import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
# Added to every responsibility before the per-token spatial normalisation.
ASSIGN_DELTA = 1e-8
# Lower bound of normalising sums (a fully padded image divides 0 by it).
_TINY = 1e-30
# torch.nn.LayerNorm's default eps, and the earlier variant's (flax default).
LAYERNORM_EPS = 1e-5
_LEGACY_LAYERNORM_EPS = 1e-6
# The official attention q/k/v init: trunc_normal_(std=.02, a=-2, b=2); the
# bounds are absolute (100 std), so it is a plain normal in practice.
_QKV_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Deviations:
  """Switches from the official SpCa code back to this project's earlier SC-GeM.

  All False (the default) is the official forward and initialisation. Each
  field is also a `model.qaff` config field of the same name.

  Attributes:
    hops_from_one: encode hops A^1..A^m (earlier variant) instead of the
      official A^2..A^(m+1).
    legacy_layernorm: LayerNorm eps 1e-6 everywhere and the one-pass variance
      E[x^2] - E[x]^2 in the template and encoding norms (earlier variant;
      the encoding's per-cell variance is ~1e-5..3e-4, where both matter)
      instead of torch's eps 1e-5 and two-pass variance.
    fuser_mlp_norm: a LayerNorm before the fuser MLP (earlier pre-norm
      variant); the official `Fuser` has none.
    gelu_tanh: tanh-approximate GELU in the fuser MLP (earlier variant; jax's
      default) instead of torch's exact erf GELU.
    legacy_init: Flax default initialisers and a zero-initialised MLP output,
      so the fuser is the identity at initialisation (earlier variant),
      instead of the official torch initialisers.
  """

  hops_from_one: bool = False
  legacy_layernorm: bool = False
  fuser_mlp_norm: bool = False
  gelu_tanh: bool = False
  legacy_init: bool = False

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if not isinstance(getattr(self, f.name), bool):
        raise ValueError(f"model.qaff.{f.name}={getattr(self, f.name)!r}: "
                         f"must be a bool.")


DEVIATION_FIELDS = tuple(f.name for f in dataclasses.fields(Deviations))
OFFICIAL = Deviations()


def torch_uniform(fan_in: int):
  """torch's default Linear/Conv init (weights and biases): U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _template_init(num_tokens: int, token_dim: int):
  """torch xavier_uniform_ of the official [1, K, d] `clusters` tensor.

  torch reads fan_in = K * d and fan_out = 1 * d from that 3-D shape, so the
  bound is sqrt(6 / ((K + 1) d)).
  """
  bound = math.sqrt(6.0 / ((num_tokens + 1) * token_dim))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _layer_norm(features: int, dev: Deviations, *, fast_variance: bool,
                rngs: nnx.Rngs, dtype, param_dtype) -> nnx.LayerNorm:
  """torch LayerNorm (eps 1e-5, two-pass) unless `dev.legacy_layernorm`."""
  if dev.legacy_layernorm:
    return nnx.LayerNorm(features, epsilon=_LEGACY_LAYERNORM_EPS,
                         use_fast_variance=fast_variance, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
  return nnx.LayerNorm(features, epsilon=LAYERNORM_EPS,
                       use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def _flat_mask(mask: jax.Array | None, batch: int, n: int) -> jax.Array:
  """[B, h, w] mask (or None = all valid) -> [B, N] float32 in {0, 1}."""
  if mask is None:
    return jnp.ones((batch, n), jnp.float32)
  return (mask.reshape(batch, n) > 0).astype(jnp.float32)


def grid_distances(h: int, w: int) -> jax.Array:
  """Euclidean distances between the cells of an h x w grid.

  Cells are numbered row-major (n = y*w + x); d_ij = sqrt((y_i - y_j)^2 +
  (x_i - x_j)^2) in cell units.

  Returns:
    [h*w, h*w] float32.
  """
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  sq = jnp.square(ys[:, None] - ys[None, :]) + jnp.square(xs[:, None] -
                                                        xs[None, :])
  return jnp.sqrt(sq)


def distance_encoding(spatial: jax.Array, mask: jax.Array | None, h: int,
                      w: int, hops: int, first_hop: int = 2) -> jax.Array:
  """Multi-hop distance encoding of the tokens' spatial distributions.

  P_t = a^T A^t for t = first_hop .. first_hop + hops - 1 with A_ij = m_i m_j
  exp(-d_ij) / sum_i' m_i' exp(-d_i'j) (see the module docstring; the
  official code has first_hop = 2). A is never formed per image: each
  multiplication is Z <- ((Z * m) @ E) * m / s with the shared E = exp(-d)
  and s_j = sum_i m_i E_ij, i.e. O(K N^2) instead of O(N^3). Invalid cells
  get zero rows and columns, so the result on the valid cells equals that of
  the map without its padding.

  Args:
    spatial: [B, N, K] token distributions a (zero on invalid cells).
    mask: [B, h, w] (> 0 = valid) or None (all valid).
    h, w: grid size, N = h*w.
    hops: number of recorded hops m.
    first_hop: the power of A of the first recorded hop (>= 1).

  Returns:
    [B, N, K*hops] float32, channel i*K + k = (P_{first_hop + i})_{k, n}.
  """
  if first_hop < 1:
    raise ValueError(f"first_hop must be >= 1, got {first_hop}")
  b, n, _ = spatial.shape
  m = _flat_mask(mask, b, n)
  kernel = jnp.exp(-grid_distances(h, w))                       # E [N, N]
  col_sum = jnp.matmul(m, kernel, precision=_HIGHEST)           # s [B, N]
  col_scale = m / jnp.maximum(col_sum, _TINY)
  z = jnp.swapaxes(spatial.astype(jnp.float32), 1, 2)           # [B, K, N]
  hop_maps = []
  for t in range(1, first_hop + hops):
    z = jnp.matmul(z * m[:, None, :], kernel, precision=_HIGHEST)
    z = z * col_scale[:, None, :]
    if t >= first_hop:
      hop_maps.append(z)
  return jnp.swapaxes(jnp.concatenate(hop_maps, axis=1), 1, 2)


class SoftAssignment(nnx.Module):
  """Gaussian-mixture soft assignment of map cells to K learned tokens.

  Parameters (official names in brackets): `proj` C -> d, no bias
  [`proj_kv`], `templates` T [K, d] [`clusters`], `template_norm` LayerNorm
  over d [`norm_templates`], `mix_logits` l [K] (zeros: pi = 1/K) [log `pi`]
  and `log_var` v [K] (zeros: s2 = 1) [log `cov`]. Formulas: step 1 of the
  module docstring. Everything after the projection runs in float32.
  """

  def __init__(self, in_features: int, num_tokens: int, token_dim: int, *,
               deviations: Deviations = OFFICIAL, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the assignment.

    Args:
      in_features: channels C of the map.
      num_tokens: K.
      token_dim: d, the projected cell / template size.
      deviations: switches away from the official code (`Deviations`).
      rngs: parameter RNGs.
      dtype: compute dtype of the projection.
      param_dtype: storage dtype of the parameters.
    """
    dev = deviations
    extra = {} if dev.legacy_init else {"kernel_init": torch_uniform(in_features)}
    self.proj = nnx.Linear(in_features, token_dim, use_bias=False,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           **extra)
    init = (nnx.initializers.xavier_uniform() if dev.legacy_init
            else _template_init(num_tokens, token_dim))
    self.templates = nnx.Param(init(rngs.params(), (num_tokens, token_dim),
                                    param_dtype))
    self.template_norm = _layer_norm(token_dim, dev, fast_variance=True,
                                     rngs=rngs, dtype=jnp.float32,
                                     param_dtype=param_dtype)
    self.mix_logits = nnx.Param(jnp.zeros((num_tokens,), param_dtype))
    self.log_var = nnx.Param(jnp.zeros((num_tokens,), param_dtype))

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Responsibilities and per-token spatial distributions.

    Args:
      feature_map: [B, h, w, C].
      mask: [B, h, w] (> 0 = valid) or None.

    Returns:
      (r, a): both [B, N, K] float32. r sums to 1 over K at every cell;
      a sums to 1 over the valid cells for every token (0 on invalid cells).
    """
    b, h, w, _ = feature_map.shape
    x = self.proj(feature_map).astype(jnp.float32).reshape(b, h * w, -1)
    mu = self.template_norm(self.templates[...].astype(jnp.float32))
    sq_dist = (jnp.sum(jnp.square(x), axis=-1, keepdims=True)
               - 2.0 * jnp.einsum("bnd,kd->bnk", x, mu, precision=_HIGHEST)
               + jnp.sum(jnp.square(mu), axis=-1))
    sq_dist = jnp.maximum(sq_dist, 0.0)
    log_var = self.log_var[...].astype(jnp.float32)
    log_pi = jax.nn.log_softmax(self.mix_logits[...].astype(jnp.float32))
    logits = log_pi - 0.5 * log_var - sq_dist * (0.5 * jnp.exp(-log_var))
    resp = jax.nn.softmax(logits, axis=-1)
    m = _flat_mask(mask, b, h * w)[..., None]
    weighted = (resp + ASSIGN_DELTA) * m
    spatial = weighted / jnp.maximum(jnp.sum(weighted, axis=1, keepdims=True),
                                     _TINY)
    return resp, spatial


class CrossAttentionFuser(nnx.Module):
  """Injects per-cell context vectors into the map (the official `Fuser`).

    c   = Linear(K*m -> C)(context)                       [`proj`]
    q   = LN_q(F) W_q,  k = c W_k,  v = c W_v              [`ln`, `cross_attn.q/k/v`]
    F'  = F  + W_o MHA(q, k, v)   (keys of invalid cells masked)   [`cross_attn.proj`]
    F'' = F' + W_2 gelu(W_1 F')   (C -> 2C -> C, erf GELU)        [`mlp.fc1/fc2`]

  Initialisation as the official code: q/k/v normal(0.02) with zero bias,
  W_o and its bias zero, the rest torch's default Linear init. Matmuls run in
  the compute dtype; attention logits, softmax and the LayerNorm statistics
  in float32. `Deviations` adds a LayerNorm before the MLP (`mlp_norm`), the
  tanh GELU, or the earlier init (W_2 also zero: identity at init).
  """

  def __init__(self, dim: int, context_dim: int, *, heads: int = 8,
               deviations: Deviations = OFFICIAL, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the fuser.

    Args:
      dim: channels C of the map (divisible by `heads`).
      context_dim: channels of the context vectors (K*m).
      heads: attention heads.
      deviations: switches away from the official code (`Deviations`).
      rngs: parameter RNGs.
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
    """
    if dim % heads:
      raise ValueError(f"heads={heads} must divide the map channels {dim}.")
    dev = deviations
    self.heads = heads
    self.dtype = dtype
    self.gelu_tanh = dev.gelu_tanh
    zeros = nnx.initializers.zeros_init()
    linear = functools.partial(nnx.Linear, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def torch_linear(fan_in, fan_out, **kw):
      if dev.legacy_init:
        return linear(fan_in, fan_out, **kw)
      init = torch_uniform(fan_in)
      return linear(fan_in, fan_out, **{"kernel_init": init,
                                        "bias_init": init, **kw})

    qkv = ({} if dev.legacy_init else
           {"kernel_init": nnx.initializers.normal(_QKV_STD)})
    norm = functools.partial(_layer_norm, dim, dev, fast_variance=False,
                             rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.context_proj = torch_linear(context_dim, dim)
    self.query_norm = norm()
    self.query = linear(dim, dim, **qkv)
    self.key = linear(dim, dim, **qkv)
    self.value = linear(dim, dim, **qkv)
    self.out = linear(dim, dim, kernel_init=zeros)
    self.mlp_norm = norm() if dev.fuser_mlp_norm else None
    self.mlp_in = torch_linear(dim, 2 * dim)
    self.mlp_out = (linear(2 * dim, dim, kernel_init=zeros) if dev.legacy_init
                    else torch_linear(2 * dim, dim))

  def __call__(self, feature_map: jax.Array, context: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """[B, h, w, C] map + [B, N, K*m] context -> fused [B, h, w, C].

    The output has the compute dtype; with `mask`, invalid cells are not
    attended to (their own outputs are computed but meaningless).
    """
    b, h, w, c = feature_map.shape
    n, heads = h * w, self.heads
    x = feature_map.astype(self.dtype).reshape(b, n, c)
    ctx = self.context_proj(context.astype(self.dtype))
    per_head = (b, n, heads, c // heads)
    q = self.query(self.query_norm(x)).reshape(per_head)
    k = self.key(ctx).reshape(per_head)
    v = self.value(ctx).reshape(per_head)
    key_mask = None
    if mask is not None:
      key_mask = (mask.reshape(b, 1, 1, n) > 0)
    attended = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
    x = x + self.out(attended.reshape(b, n, c)).astype(x.dtype)
    hidden = x if self.mlp_norm is None else self.mlp_norm(x)
    hidden = jax.nn.gelu(self.mlp_in(hidden), approximate=self.gelu_tanh)
    x = x + self.mlp_out(hidden).astype(x.dtype)
    return x.reshape(b, h, w, c)


class SCGeM(nnx.Module):
  """Spatial-context-aware GeM: tokens -> distance encoding -> fuser -> GeM.

  `__call__` gives the pooled [B, C] vector (no whitening: the QAFF head
  projects it); `context` exposes the intermediate maps for inspection.
  Submodules (official names in brackets): `assign` [`pos_branch`],
  `context_norm` [`pos_branch.p_norm`], `fuser` [`fuser`], `pool` [`pooling`].
  """

  def __init__(self, in_features: int, *, num_tokens: int = 16,
               token_dim: int = 128, hops: int = 3, heads: int = 8,
               p: float = 3.0, learn_p: bool = True, eps: float = 1e-6,
               deviations: Deviations = OFFICIAL, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds SC-GeM.

    Args:
      in_features: channels C of the map.
      num_tokens: K semantic tokens.
      token_dim: size d of the projected cells and templates.
      hops: m, hops of the distance encoding.
      heads: cross-attention heads (must divide C).
      p: initial GeM exponent.
      learn_p: whether p is trained (the official `gem` keeps p = 3 fixed).
      eps: GeM clamp.
      deviations: switches away from the official code (`Deviations`).
      rngs: parameter RNGs.
      dtype: compute dtype of the projections and the fuser.
      param_dtype: storage dtype of the parameters.
    """
    self.hops = hops
    self.first_hop = 1 if deviations.hops_from_one else 2
    self.assign = SoftAssignment(in_features, num_tokens, token_dim,
                                 deviations=deviations, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)
    self.context_norm = _layer_norm(num_tokens * hops, deviations,
                                    fast_variance=True, rngs=rngs,
                                    dtype=jnp.float32,
                                    param_dtype=param_dtype)
    self.fuser = CrossAttentionFuser(in_features, num_tokens * hops,
                                     heads=heads, deviations=deviations,
                                     rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype)
    self.pool = pooling.GeM(p, learn_p=learn_p, eps=eps,
                            param_dtype=param_dtype)

  def context(self, feature_map: jax.Array, mask: jax.Array | None = None
              ) -> dict[str, jax.Array]:
    """The intermediate maps of SC-GeM.

    Returns:
      "responsibility" [B, N, K] (r), "spatial" [B, N, K] (a),
      "encoding" [B, N, K*m] (LayerNorm'd distance encoding) and "map"
      [B, h, w, C] (the fused map, compute dtype).
    """
    _, h, w, _ = feature_map.shape
    resp, spatial = self.assign(feature_map, mask)
    encoding = self.context_norm(distance_encoding(
        spatial, mask, h, w, self.hops, first_hop=self.first_hop))
    fused = self.fuser(feature_map, encoding, mask)
    return {"responsibility": resp, "spatial": spatial, "encoding": encoding,
            "map": fused}

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """[B, h, w, C] (+ mask) -> GeM of the fused map, [B, C] float32."""
    return self.pool(self.context(feature_map, mask)["map"], mask)


class SpCaHead(nnx.Module):
  """SC-GeM alone: SC-GeM -> whitening Linear (C -> D) -> L2 norm (SpCa).

  `whiten` is the official 1x1 conv `whiten` (with bias, torch default init
  unless `deviations.legacy_init`).
  """

  stages: tuple[str, ...] = ()

  def __init__(self, in_features: int, dim: int, *, num_tokens: int = 16,
               token_dim: int = 128, hops: int = 3, heads: int = 8,
               p: float = 3.0, learn_p: bool = True, eps: float = 1e-6,
               deviations: Deviations = OFFICIAL, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the head; arguments as `SCGeM`, plus `dim` = D."""
    self.pool = SCGeM(in_features, num_tokens=num_tokens, token_dim=token_dim,
                      hops=hops, heads=heads, p=p, learn_p=learn_p, eps=eps,
                      deviations=deviations, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)
    init = torch_uniform(in_features)
    extra = {} if deviations.legacy_init else {"kernel_init": init,
                                               "bias_init": init}
    self.whiten = nnx.Linear(in_features, dim, dtype=jnp.float32,
                             param_dtype=param_dtype, rngs=rngs, **extra)

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """[B, h, w, C] -> {"descriptor": [B, D] float32, unit norm}."""
    return {"descriptor": l2_normalize(self.whiten(self.pool(feature_map,
                                                             mask)))}
