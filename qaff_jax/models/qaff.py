"""QAFF: query-adaptive fusion of global, regional and multi-scale GeM features.

From one backbone map F [B, h, w, C] the head pools 1 + g^2 + S vectors,

  global    SC-GeM (`spca.SCGeM`) or plain GeM of F          (1)
  regional  GeM of each cell of a g x g grid over F          (g^2, row-major)
  scale     GeM of F resampled by each factor s_j            (S)

projects each to D (whitening Linear) and L2-normalises it (F_i), predicts
softmax weights w (sum 1) and returns

  descriptor = normalize(sum_i w_i F_i).

Fusion modes (`fusion`), selectable by config alone:
  adaptive  w = softmax(MLP(F_global) / T); MLP D -> hidden -> 1+g^2+S, its
            last layer zero-initialised (training starts from uniform weights)
  attention w = softmax(tau * <q, k_i> / sqrt(d_a) / T): the global descriptor
            queries the 1+g^2+S feature tokens, q = Wq F_global + bq,
            k_i = Wk F_i + e_i (e_i a learned embedding of feature i: its
            type, cell or scale), tau = exp(learned log-temperature, init 0).
            The bias bq lets a token score by its own content ("this cell
            holds an object") as well as by its agreement with the global view.
  uniform   w = 1 / (1+g^2+S)
  static    w = softmax(l / T), l learned logits (no MLP; zero-initialised)
  concat    descriptor = normalize(Linear(concat_i F_i)) ((1+g^2+S)*D -> D);
            the reported weights are the implied uniform ones
  global | regional | scale
            one feature type alone, uniform within it (zero weight elsewhere)

Masks (padded evaluation batches; padding at the bottom/right, or anywhere):
every feature is exactly invariant to padding, i.e. a padded map with its
mask gives the unpadded map's vectors.
  * global: SC-GeM and GeM are mask-aware (see `spca`).
  * regional: the grid is laid over the bounding box of the valid cells, not
    over the padded array; each cell pools its valid cells only.
  * scale: resampling is a normalised bilinear interpolation (only valid cells
    contribute) at the explicit factor s, so sample positions do not depend
    on the padded size; an output cell is valid when its centre falls in a
    valid input cell. Only a degenerate map so small that s*extent < 0.5
    differs (the unpadded map keeps one output cell).
  A feature with no valid cell (a regional cell over a hole of an irregular
  mask, a scale whose output has no valid cell, or a fully padded image) has
  a defined vector (GeM of nothing = eps) but is masked out of the softmax,
  so the remaining weights renormalise; if all are invalid the weights are
  uniform (finite output for the all-padding rows of an evaluation batch).

Config: `model.qaff` (see `QAFFSettings`), plus `model.dim`, `model.gem_p`,
`model.learn_p` shared with the GeM head; one learnable GeM p per feature
type (global, regional, scale).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qaff_jax import config_lib
from qaff_jax.models import pooling
from qaff_jax.models import spca
from qaff_jax.models.heads import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST

FUSIONS = ("adaptive", "attention", "uniform", "static", "concat", "global",
           "regional", "scale")
# Fusions whose weights are trained (routing distillation and the entropy
# term apply to these).
LEARNED_FUSIONS = ("adaptive", "attention", "static")
ROUTE_OVER = ("features", "types")
GLOBAL_POOLS = ("scgem", "gem")
PROJECTIONS = ("shared", "per_type")
# Added to the logits of masked-out features (and, twice, to features outside
# the selected type of a single-type mode): exp() of it underflows to 0.
_MASKED = -1e9


# --------------------------------------------------------------------- config


_is_int = config_lib.is_int
_is_real = config_lib.is_real


@dataclasses.dataclass(frozen=True)
class QAFFSettings:
  """The `model.qaff` fields, validated.

  Attributes:
    grid: g, regional grid size (g x g cells).
    scales: resampling factors of the scale features (S of them, may be empty
      unless fusion='scale').
    fusion: one of FUSIONS.
    temperature: T of the softmax ('adaptive', 'static').
    global_pool: 'scgem' (SC-GeM) or 'gem' (plain GeM) for the global feature.
    projection: 'per_type' (one whitening Linear per feature type) or
      'shared' (one for the global feature, one for regional + scale).
    num_tokens: K, SC-GeM semantic tokens.
    token_dim: d, SC-GeM token / projected-cell size.
    hops: m, SC-GeM distance-encoding hops.
    heads: SC-GeM cross-attention heads (must divide the map channels).
    mlp_hidden: hidden units of the adaptive fusion MLP.
    attn_dim: d_a, query/key size of the attention fusion.
    route_weight: weight of the routing-distillation term
      KL(softmax(-loss_i / route_tau) || w) (0 = off; `losses.routing_kl`).
    route_tau: temperature of the routing target.
    route_over: 'features' (each of the 1+g^2+S features is a candidate) or
      'types' (global / regional / scale; the target mass of a type is
      compared with the type's total weight).
    route_signal: what scores a candidate for the routing target: 'loss'
      (its margin loss) or 'distinct' (its largest cosine to an other-class
      batch-mate's features: clutter shared across classes scores high;
      route_over='features' only; `losses.background_similarity`).
    entropy_weight: weight of the mean fusion-weight entropy added to the
      loss (> 0 sharpens the weights, < 0 smooths them; 0 = off).
    fusion_lr_mult: learning-rate multiplier of the fusion parameters
      (`fusion_*` submodules).
    hops_from_one, legacy_layernorm, fuser_mlp_norm, gelu_tanh, legacy_init:
      SC-GeM switches away from the official SpCa code, all False by default
      (`spca.Deviations` says what each restores and why).
  """

  grid: int = 3
  scales: tuple[float, ...] = (0.5, 0.75, 1.5)
  fusion: str = "adaptive"
  temperature: float = 1.0
  global_pool: str = "scgem"
  projection: str = "per_type"
  num_tokens: int = 16
  token_dim: int = 128
  hops: int = 3
  heads: int = 8
  mlp_hidden: int = 256
  attn_dim: int = 64
  route_weight: float = 0.0
  route_tau: float = 1.0
  route_over: str = "features"
  route_signal: str = "loss"
  entropy_weight: float = 0.0
  fusion_lr_mult: float = 1.0
  hops_from_one: bool = False
  legacy_layernorm: bool = False
  fuser_mlp_norm: bool = False
  gelu_tanh: bool = False
  legacy_init: bool = False

  def __post_init__(self):
    """Raises ValueError naming `model.qaff.<field>` for a bad value."""
    def bad(field, why):
      return ValueError(f"model.qaff.{field}={getattr(self, field)!r}: {why}.")

    for field in ("grid", "num_tokens", "token_dim", "hops", "heads",
                  "mlp_hidden", "attn_dim"):
      v = getattr(self, field)
      if not _is_int(v) or v <= 0:
        raise bad(field, "must be a positive int")
      object.__setattr__(self, field, int(v))
    scales = self.scales
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
      raise bad("scales", "must be a sequence of positive numbers")
    if not all(_is_real(s) and float(s) > 0 for s in scales):
      raise bad("scales", "must be a sequence of positive numbers")
    object.__setattr__(self, "scales", tuple(float(s) for s in scales))
    if not _is_real(self.temperature) or float(self.temperature) <= 0:
      raise bad("temperature", "must be a positive number")
    object.__setattr__(self, "temperature", float(self.temperature))
    for field in ("route_tau", "fusion_lr_mult"):
      if not _is_real(getattr(self, field)) or float(getattr(self, field)) <= 0:
        raise bad(field, "must be a positive number")
      object.__setattr__(self, field, float(getattr(self, field)))
    for field in ("route_weight", "entropy_weight"):
      if not _is_real(getattr(self, field)):
        raise bad(field, "must be a finite number")
      object.__setattr__(self, field, float(getattr(self, field)))
    if self.route_weight < 0:
      raise bad("route_weight", "must be >= 0")
    for field, choices in (("fusion", FUSIONS), ("global_pool", GLOBAL_POOLS),
                           ("projection", PROJECTIONS),
                           ("route_over", ROUTE_OVER),
                           ("route_signal", ("loss", "distinct"))):
      if getattr(self, field) not in choices:
        raise bad(field, f"choose one of {list(choices)}")
    if self.route_signal == "distinct" and self.route_over != "features":
      raise bad("route_signal", "'distinct' scores single features: needs "
                "model.qaff.route_over='features'")
    if ((self.route_weight > 0 or self.entropy_weight != 0)
        and self.fusion not in LEARNED_FUSIONS):
      raise bad("fusion", "routing distillation / the entropy term train the "
                f"fusion weights: choose one of {list(LEARNED_FUSIONS)}")
    if self.fusion == "scale" and not self.scales:
      raise bad("fusion", "needs at least one of model.qaff.scales")
    self.deviations()  # raises for a non-bool switch

  def deviations(self) -> spca.Deviations:
    """The SC-GeM switches away from the official SpCa code."""
    return spca.Deviations(**{f: getattr(self, f) for f in spca.DEVIATION_FIELDS})

  @property
  def num_features(self) -> int:
    """1 + g^2 + S."""
    return 1 + self.grid ** 2 + len(self.scales)

  def feature_types(self) -> np.ndarray:
    """[1+g^2+S] int: 0 global, 1 regional, 2 scale, per feature."""
    return np.array([0] + [1] * self.grid ** 2 + [2] * len(self.scales))


def settings_from_config(model_cfg: Mapping[str, Any]) -> QAFFSettings:
  """`model_cfg["qaff"]` (a dict/ConfigDict, or absent) -> `QAFFSettings`.

  Missing fields take the defaults; an unknown field is a ValueError naming
  it (a typo must not silently fall back to a default).
  """
  sub = model_cfg.get("qaff", None)
  if sub is None:
    sub = {}
  sub = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
  known = {f.name for f in dataclasses.fields(QAFFSettings)}
  unknown = sorted(set(sub) - known)
  if unknown:
    raise ValueError(f"Unknown model.qaff.{unknown[0]}; known fields: "
                     f"{sorted(known)}.")
  return QAFFSettings(**sub)


def _check_heads(heads: int, in_features: int) -> None:
  if in_features % heads:
    raise ValueError(f"model.qaff.heads={heads} must divide the feature "
                     f"map's channels ({in_features}).")


# -------------------------------------------------------------------- pooling


def _extent(valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last True index along the last axis ([B, L] bool).

  A row without any True gives (0, L). (argmax of a bool row is the index
  of its first True.)
  """
  length = valid.shape[-1]
  first = jnp.argmax(valid, axis=-1)
  last = length - jnp.argmax(valid[:, ::-1], axis=-1)
  anything = jnp.any(valid, axis=-1)
  return jnp.where(anything, first, 0), jnp.where(anything, last, length)


def _grid_lines(valid: jax.Array, grid: int) -> jax.Array:
  """[B, L] bool (line has a valid cell) -> [B, grid, L] cell membership.

  Over the valid extent [a, b) of length e = b - a, cell i covers
  [a + floor(i e / g), a + ceil((i + 1) e / g)), the adaptive-pooling rule:
  cells never empty, neighbours overlap by one line when g does not divide e.
  """
  first, last = _extent(valid)
  ext = (last - first)[:, None]
  i = jnp.arange(grid)[None, :]
  start = first[:, None] + (i * ext) // grid
  end = first[:, None] + ((i + 1) * ext + grid - 1) // grid
  pos = jnp.arange(valid.shape[-1])
  return (pos >= start[..., None]) & (pos < end[..., None])


def region_masks(mask: jax.Array | None, size: tuple[int, int], grid: int,
                 batch: int) -> jax.Array:
  """Cell masks of the g x g grid over each image's valid bounding box.

  Args:
    mask: [B, h, w] (> 0 = valid) or None (all valid).
    size: (h, w).
    grid: g.
    batch: B.

  Returns:
    [B, g*g, h, w] float32: cell (i, j) (index i*g + j) restricted to the
    valid cells.
  """
  h, w = size
  if mask is None:
    m = jnp.ones((batch, h, w), bool)
  else:
    m = mask > 0
  rows = _grid_lines(jnp.any(m, axis=2), grid)               # [B, g, h]
  cols = _grid_lines(jnp.any(m, axis=1), grid)               # [B, g, w]
  cells = (rows[:, :, None, :, None] & cols[:, None, :, None, :]
           & m[:, None, None])
  return cells.reshape(batch, grid * grid, h, w).astype(jnp.float32)


def regional_gem(x: jax.Array, p: jax.Array | float, grid: int,
                 mask: jax.Array | None = None, eps: float = 1e-6
                 ) -> tuple[jax.Array, jax.Array]:
  """GeM of each cell of a g x g grid (see `region_masks`), in float32.

  Args:
    x: [B, h, w, C].
    p: GeM exponent.
    grid: g.
    mask: [B, h, w] or None.
    eps: GeM clamp; an empty cell pools to eps.

  Returns:
    ([B, g*g, C] pooled, [B, g*g] bool: the cell has a valid cell).
  """
  b, h, w, _ = x.shape
  cells = region_masks(mask, (h, w), grid, b)
  p = jnp.asarray(p, jnp.float32)
  xp = jnp.power(jnp.maximum(x.astype(jnp.float32), eps), p)
  sums = jnp.einsum("brhw,bhwc->brc", cells, xp, precision=_HIGHEST)
  count = jnp.sum(cells, axis=(2, 3))[..., None]
  valid = count > 0
  mean = jnp.where(valid, sums / jnp.maximum(count, 1.0), 1.0)
  out = jnp.where(valid, jnp.power(mean, 1.0 / p), jnp.float32(eps))
  return out, valid[..., 0]


def _source_index(n_out: int, scale: float) -> np.ndarray:
  """Input cell holding each output cell's centre: ceil((i + 1/2) / s) - 1."""
  return np.ceil((np.arange(n_out) + 0.5) / scale).astype(np.int64) - 1


def scaled_size(n_in: int, scale: float) -> int:
  """Output cells at factor s: those whose centre lies inside the input.

  #{i >= 0 : (i + 1/2) / s <= n_in} = round-half-up(s * n_in), at least 1.
  """
  count = int(np.sum(_source_index(int(math.ceil(scale * n_in)) + 2, scale)
                     < n_in))
  return max(1, count)


def bilinear_matrix(n_in: int, scale: float) -> np.ndarray:
  """[scaled_size(n_in, s), n_in] bilinear weights at factor s.

  Half-pixel centres: output i samples input position
  u = clip((i + 1/2) / s - 1/2, 0, n_in - 1) with weights 1 - f and f on
  cells floor(u) and floor(u) + 1 (f = u - floor(u)). Clipping is the edge
  rule of `jax.image.resize(..., 'bilinear', antialias=False)`, whose result
  this equals whenever n_out = s * n_in exactly.
  """
  n_out = scaled_size(n_in, scale)
  u = np.clip((np.arange(n_out) + 0.5) / scale - 0.5, 0.0, n_in - 1)
  lo = np.floor(u).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = u - lo
  mat = np.zeros((n_out, n_in), np.float64)
  np.add.at(mat, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(mat, (np.arange(n_out), hi), frac)
  return mat.astype(np.float32)


def rescale(x: jax.Array, scale: float, mask: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array | None]:
  """Bilinear resampling of a map by the factor `scale`, mask-aware.

  Without a mask: X_s = W_y X W_x^T with W = `bilinear_matrix`. With a mask
  m, normalised interpolation, X_s = W_y (X m) W_x^T / (W_y m W_x^T), so
  padded cells never leak into valid ones; the output mask is nearest
  sampling of m at `_source_index` (an output cell is valid when its centre
  lies in a valid input cell, where the denominator is >= 1/4).

  Args:
    x: [B, h, w, C].
    scale: s > 0.
    mask: [B, h, w] or None.

  Returns:
    ([B, h', w', C] float32, [B, h', w'] float32 mask or None), with
    h' = scaled_size(h, s), w' = scaled_size(w, s).
  """
  _, h, w, _ = x.shape
  wy, wx = bilinear_matrix(h, scale), bilinear_matrix(w, scale)
  x = x.astype(jnp.float32)

  def resample(t):
    return jnp.einsum("yh,bhw...,xw->byx...", wy, t, wx, precision=_HIGHEST)

  if mask is None:
    return resample(x), None
  m = (mask > 0).astype(jnp.float32)
  num = resample(x * m[..., None])
  den = resample(m)
  iy = np.minimum(_source_index(wy.shape[0], scale), h - 1)
  ix = np.minimum(_source_index(wx.shape[0], scale), w - 1)
  out_mask = m[:, iy][:, :, ix]
  ratio = num / jnp.where(den > 0, den, 1.0)[..., None]
  return jnp.where(out_mask[..., None] > 0, ratio, 0.0), out_mask


def _exponent(pool: pooling.GeM) -> jax.Array | float:
  return pool.p[...] if pool.learn_p else pool.p


def _any_valid(mask: jax.Array | None, batch: int) -> jax.Array:
  if mask is None:
    return jnp.ones((batch,), bool)
  return jnp.any(mask.reshape(batch, -1) > 0, axis=-1)


# ----------------------------------------------------------------------- head


class QAFFHead(nnx.Module):
  """Query-adaptive fusion of SC-GeM, regional-GeM and scale-GeM features.

  Submodules (stable names): `global_pool` (spca.SCGeM or pooling.GeM),
  `regional_pool` / `scale_pool` (their GeM p), `proj_global` and
  `proj_regional` + `proj_scale` ('per_type') or `proj_local` ('shared'),
  and per fusion mode `fusion_mlp_in` + `fusion_mlp_out` ('adaptive'),
  `fusion_query` + `fusion_key` + `fusion_embed` + `fusion_log_temp`
  ('attention'),
  `fusion_logits` ('static') or `concat_proj` ('concat').

  Output of `__call__` (all float32):
    descriptor       [B, D], unit norm
    fusion_weights   [B, 1+g^2+S], sum 1 (order: global, regional row-major,
                     scales in config order)
    fusion_log_weights  their logarithm (log-softmax, for the routing loss)
    fusion_valid     [B, 1+g^2+S] bool: the feature has a valid cell
    aux_descriptors  {"global": [B, D], "regional": [B, g^2, D],
                      "scale": [B, S, D]}, each unit norm; all three types are
                     computed in every mode, so consumers never special-case.
  """

  stages: tuple[str, ...] = ()

  def __init__(self, in_features: int, dim: int, *, p: float = 3.0,
               learn_p: bool = True, eps: float = 1e-6, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, **settings):
    """Builds the head.

    Args:
      in_features: channels C of the map.
      dim: descriptor size D.
      p: initial GeM exponent (all three feature types).
      learn_p: whether the p's are trained.
      eps: GeM clamp.
      rngs: parameter RNGs.
      dtype: compute dtype of SC-GeM's projections and fuser; pooling,
        projections and fusion run in float32.
      param_dtype: storage dtype of the parameters.
      **settings: `QAFFSettings` fields (grid=..., fusion=..., ...).
    """
    cfg = QAFFSettings(**settings)
    self.cfg = cfg
    self.eps = eps
    gem = functools.partial(pooling.GeM, p, learn_p=learn_p, eps=eps,
                            param_dtype=param_dtype)
    if cfg.global_pool == "scgem":
      _check_heads(cfg.heads, in_features)
      self.global_pool = spca.SCGeM(
          in_features, num_tokens=cfg.num_tokens, token_dim=cfg.token_dim,
          hops=cfg.hops, heads=cfg.heads, p=p, learn_p=learn_p, eps=eps,
          deviations=cfg.deviations(), rngs=rngs, dtype=dtype,
          param_dtype=param_dtype)
    else:
      self.global_pool = gem()
    self.regional_pool = gem()
    self.scale_pool = gem()

    linear = functools.partial(nnx.Linear, dtype=jnp.float32,
                               param_dtype=param_dtype, rngs=rngs)
    self.proj_global = linear(in_features, dim)
    if cfg.projection == "per_type":
      self.proj_regional = linear(in_features, dim)
      self.proj_scale = linear(in_features, dim)
    else:
      self.proj_local = linear(in_features, dim)

    n = cfg.num_features
    if cfg.fusion == "adaptive":
      self.fusion_mlp_in = linear(dim, cfg.mlp_hidden)
      self.fusion_mlp_out = linear(cfg.mlp_hidden, n,
                                   kernel_init=nnx.initializers.zeros_init())
    elif cfg.fusion == "attention":
      self.fusion_query = linear(dim, cfg.attn_dim)
      self.fusion_key = linear(dim, cfg.attn_dim, use_bias=False)
      self.fusion_embed = nnx.Param(nnx.initializers.normal(0.02)(
          rngs.params(), (n, cfg.attn_dim), param_dtype))
      self.fusion_log_temp = nnx.Param(jnp.zeros((), param_dtype))
    elif cfg.fusion == "static":
      self.fusion_logits = nnx.Param(jnp.zeros((n,), param_dtype))
    elif cfg.fusion == "concat":
      self.concat_proj = linear(n * dim, dim)

  def _pool(self, feature_map: jax.Array, mask: jax.Array | None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array,
                       jax.Array]:
    """Pooled vectors: global [B, C], regional [B, g^2, C], scale [B, S, C]
    and validity: regional [B, g^2], scale [B, S] (bool)."""
    b, _, _, c = feature_map.shape
    cfg = self.cfg
    pooled_global = self.global_pool(feature_map, mask)
    pooled_regional, valid_regional = regional_gem(
        feature_map, _exponent(self.regional_pool), cfg.grid, mask, self.eps)
    pooled_scale, valid_scale = [], []
    for s in cfg.scales:
      xs, ms = rescale(feature_map, s, mask)
      pooled_scale.append(self.scale_pool(xs, ms))
      valid_scale.append(_any_valid(ms, b))
    if cfg.scales:
      pooled_scale = jnp.stack(pooled_scale, axis=1)
      valid_scale = jnp.stack(valid_scale, axis=1)
    else:
      pooled_scale = jnp.zeros((b, 0, c), jnp.float32)
      valid_scale = jnp.zeros((b, 0), bool)
    return (pooled_global, pooled_regional, pooled_scale, valid_regional,
            valid_scale)

  def _type_mask(self) -> np.ndarray:
    """[1+g^2+S] bool: the features a single-type mode keeps (else all)."""
    cfg = self.cfg
    kinds = np.array(["global"] + ["regional"] * cfg.grid ** 2
                     + ["scale"] * len(cfg.scales))
    if cfg.fusion in ("global", "regional", "scale"):
      return kinds == cfg.fusion
    return np.ones(kinds.shape, bool)

  def _logits(self, desc_global: jax.Array, feats: jax.Array,
              batch: int) -> jax.Array:
    """Fusion logits / T, [B, 1+g^2+S] float32 (zeros for fixed modes)."""
    cfg = self.cfg
    n = cfg.num_features
    if cfg.fusion == "adaptive":
      hidden = jax.nn.gelu(self.fusion_mlp_in(desc_global))
      return self.fusion_mlp_out(hidden) / cfg.temperature
    if cfg.fusion == "attention":
      query = self.fusion_query(desc_global)                       # [B, d]
      keys = (self.fusion_key(feats)
              + self.fusion_embed[...].astype(jnp.float32))       # [B, n, d]
      scale = (jnp.exp(self.fusion_log_temp[...].astype(jnp.float32))
               / math.sqrt(cfg.attn_dim))
      scores = jnp.einsum("bd,bnd->bn", query, keys, precision=_HIGHEST)
      return scale * scores / cfg.temperature
    if cfg.fusion == "static":
      logits = self.fusion_logits[...].astype(jnp.float32) / cfg.temperature
      return jnp.broadcast_to(logits, (batch, n))
    return jnp.zeros((batch, n), jnp.float32)

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> dict[str, Any]:
    """[B, h, w, C] (+ [B, h, w] mask) -> the dict of the class docstring."""
    b = feature_map.shape[0]
    cfg = self.cfg
    (pooled_global, pooled_regional, pooled_scale, valid_regional,
     valid_scale) = self._pool(feature_map, mask)

    if cfg.projection == "per_type":
      proj_regional, proj_scale = self.proj_regional, self.proj_scale
    else:
      proj_regional = proj_scale = self.proj_local
    desc_global = l2_normalize(self.proj_global(pooled_global))
    desc_regional = l2_normalize(proj_regional(pooled_regional))
    desc_scale = l2_normalize(proj_scale(pooled_scale))
    feats = jnp.concatenate(
        [desc_global[:, None], desc_regional, desc_scale], axis=1)
    valid = jnp.concatenate(
        [_any_valid(mask, b)[:, None], valid_regional, valid_scale], axis=1)

    penalty = (jnp.where(valid, 0.0, _MASKED)
               + jnp.where(self._type_mask(), 0.0, 2 * _MASKED))
    log_weights = jax.nn.log_softmax(
        self._logits(desc_global, feats, b) + penalty, axis=-1)
    weights = jnp.exp(log_weights)
    if cfg.fusion == "concat":
      flat = (feats * valid[..., None]).reshape(b, -1)
      descriptor = l2_normalize(self.concat_proj(flat))
    else:
      descriptor = l2_normalize(
          jnp.einsum("bn,bnd->bd", weights, feats, precision=_HIGHEST))
    return {
        "descriptor": descriptor,
        "fusion_weights": weights,
        "fusion_log_weights": log_weights,
        "fusion_valid": valid,
        "aux_descriptors": {"global": desc_global, "regional": desc_regional,
                            "scale": desc_scale},
    }


# ------------------------------------------------------------------- builders


def build_qaff_head(model_cfg: Mapping[str, Any], in_features: int, *,
                    rngs: nnx.Rngs, dtype, param_dtype) -> QAFFHead:
  """HEADS['qaff']: reads model.dim, gem_p, learn_p and model.qaff."""
  cfg = settings_from_config(model_cfg)
  return QAFFHead(in_features, model_cfg["dim"],
                  p=model_cfg.get("gem_p", 3.0),
                  learn_p=model_cfg.get("learn_p", True), rngs=rngs,
                  dtype=dtype, param_dtype=param_dtype,
                  **dataclasses.asdict(cfg))


def build_spca_head(model_cfg: Mapping[str, Any], in_features: int, *,
                    rngs: nnx.Rngs, dtype, param_dtype) -> spca.SpCaHead:
  """HEADS['spca']: SC-GeM alone; reads model.dim, gem_p, learn_p and
  model.qaff.{num_tokens, token_dim, hops, heads} plus the `spca.Deviations`
  switches (the rest is validated and ignored)."""
  cfg = settings_from_config(model_cfg)
  _check_heads(cfg.heads, in_features)
  return spca.SpCaHead(
      in_features, model_cfg["dim"], num_tokens=cfg.num_tokens,
      token_dim=cfg.token_dim, hops=cfg.hops, heads=cfg.heads,
      p=model_cfg.get("gem_p", 3.0), learn_p=model_cfg.get("learn_p", True),
      deviations=cfg.deviations(), rngs=rngs, dtype=dtype,
      param_dtype=param_dtype)
