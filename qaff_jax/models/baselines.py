"""Heads of the published baselines: DELG, DOLG, CVNet (global) and SuperGlobal.

Each is a head in the sense of `heads` (feature map [B, h, w, C] + optional
cell mask -> dict with "descriptor" [B, D] float32, unit norm) and an entry in
`models.HEADS`, so `model.head=<name>` selects it.

  delg         GeM (p = model.gem_p, learnable iff model.learn_p) -> whitening
               Linear C -> D (with bias) -> L2. Cao et al., "Unifying Deep
               Local and Global Features for Image Search", ECCV 2020; the
               DELF/DELG TF code uses p = 3 fixed, D = 2048, ArcFace margin 0.1
               and scale sqrt(D) (`losses_baselines.learnable_scale_loss`).
  cvnet        The same head shape (CVNet's `GlobalHead`: learnable GeM,
               init 3, then Linear with bias); Lee et al., "Correlation
               Verification for Image Retrieval", CVPR 2022, trained with
               CurricularFace (`losses_baselines.curricular_face_loss`).
               DELG and CVNet differ in their loss recipe, not in the head.
  dolg         Yang et al., "DOLG: Single-Stage Image Retrieval with Deep
               Orthogonal Fusion of Local and Global Features", ICCV 2021.
               See `DOLGHead`.
  superglobal  Shao et al., "Global Features are All You Need for Image
               Retrieval and Reranking", ICCV 2023. See `SuperGlobalHead`.

Config: `model.dim`, `model.gem_p`, `model.learn_p` as for the GeM head, and
the optional sub-dict `model.baseline` (see `BaselineSettings`; missing fields
take the defaults, an unknown field is an error).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qaff_jax import config_lib
from qaff_jax.models import pooling
from qaff_jax.models import resnet
from qaff_jax.models.heads import GeMHead, l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
# Convs of the DOLG local branch: He-normal on fan-out, as pycls' init.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


# --------------------------------------------------------------------- config


_is_int = config_lib.is_int
_is_real = config_lib.is_real


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
  """The `model.baseline` fields, validated.

  Attributes:
    local_dim: DOLG local-branch width; also the size of the projected global
      vector (`fc_t`, 1024 for ResNet-50/101).
    local_in_features: channels of the `layer3` map DOLG reads; None means
      half the last map's channels (true for every ResNet).
    with_ma: DOLG's multi-atrous module before the attention (the official
      `cfg.MODEL.WITH_MA`, False in its released config and trainer); the
      `aspp_*` / `dilations` fields apply only when it is on.
    aspp_dim: channels of each multi-atrous branch (512 in DOLG).
    dilations: rates of the dilated 3x3 branches (6, 12, 18 in DOLG).
    aspp_pointwise: also a plain 1x1 branch, as the official code has
      (feymanpriv/DOLG `ASPP`: image pooling, 1x1, and 3x3 at rates 6/12/18,
      512 channels each, concatenated, 1x1 conv to 1024 + ReLU). False gives
      the four-branch module (three dilated convs + image pooling) as the
      method is usually summarised.
    gemp_p: SuperGlobal GeM+ exponent (4.6); learnable iff model.learn_p
      (SuperGlobal keeps it fixed: set model.learn_p=False to reproduce).
    rgem_p: SuperGlobal Regional-GeM exponent (2.5).
    rgem_size: Regional-GeM window (5, odd).
    rgem_blend: weight of the regional map in the blend (0.5):
      out = (1 - rgem_blend) * map + rgem_blend * regional.
    relu_floor: ReLU+ floor applied to the map at the head input; 0 is off.
      SuperGlobal's ReLU+ is clamp(x, min=0.014), but its official code
      applies it inside the backbone (stages 1-3), not to the last map (which
      keeps a plain ReLU) - see `relu_plus`.
  """

  local_dim: int = 1024
  local_in_features: int | None = None
  with_ma: bool = False
  aspp_dim: int = 512
  dilations: tuple[int, ...] = (6, 12, 18)
  aspp_pointwise: bool = True
  gemp_p: float = 4.6
  rgem_p: float = 2.5
  rgem_size: int = 5
  rgem_blend: float = 0.5
  relu_floor: float = 0.0

  def __post_init__(self):
    """Raises ValueError naming `model.baseline.<field>` for a bad value."""
    def bad(field, why):
      return ValueError(f"model.baseline.{field}={getattr(self, field)!r}: "
                        f"{why}.")

    for field in ("local_dim", "aspp_dim", "rgem_size"):
      v = getattr(self, field)
      if not _is_int(v) or v <= 0:
        raise bad(field, "must be a positive int")
      object.__setattr__(self, field, int(v))
    if self.rgem_size % 2 != 1:
      raise bad("rgem_size", "must be odd (a centred window)")
    if self.local_in_features is not None:
      if not _is_int(self.local_in_features) or self.local_in_features <= 0:
        raise bad("local_in_features", "must be None or a positive int")
      object.__setattr__(self, "local_in_features",
                         int(self.local_in_features))
    dil = self.dilations
    if (isinstance(dil, (str, bytes)) or not isinstance(dil, Sequence)
        or not all(_is_int(d) and d > 0 for d in dil)):
      raise bad("dilations", "must be a sequence of positive ints")
    object.__setattr__(self, "dilations", tuple(int(d) for d in dil))
    for field in ("with_ma", "aspp_pointwise"):
      if not isinstance(getattr(self, field), bool):
        raise bad(field, "must be a bool")
    for field in ("gemp_p", "rgem_p"):
      v = getattr(self, field)
      if not _is_real(v) or float(v) <= 0:
        raise bad(field, "must be a positive number")
      object.__setattr__(self, field, float(v))
    if not _is_real(self.rgem_blend) or not 0 <= float(self.rgem_blend) <= 1:
      raise bad("rgem_blend", "must be in [0, 1]")
    object.__setattr__(self, "rgem_blend", float(self.rgem_blend))
    if not _is_real(self.relu_floor) or float(self.relu_floor) < 0:
      raise bad("relu_floor", "must be a number >= 0")
    object.__setattr__(self, "relu_floor", float(self.relu_floor))


def settings_from_config(model_cfg: Mapping[str, Any]) -> BaselineSettings:
  """`model_cfg["baseline"]` (dict/ConfigDict, or absent) -> settings."""
  sub = model_cfg.get("baseline", None)
  if sub is None:
    sub = {}
  sub = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
  known = {f.name for f in dataclasses.fields(BaselineSettings)}
  unknown = sorted(set(sub) - known)
  if unknown:
    raise ValueError(f"Unknown model.baseline.{unknown[0]}; known fields: "
                     f"{sorted(known)}.")
  return BaselineSettings(**sub)


# -------------------------------------------------------------- shared pieces


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of [B, h, w, C] over the valid cells -> [B, C] float32.

  A row without any valid cell gives zeros.
  """
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x, axis=(1, 2))
  m = (mask > 0).astype(jnp.float32)[..., None]
  count = jnp.sum(m, axis=(1, 2))
  return jnp.sum(x * m, axis=(1, 2)) / jnp.maximum(count, 1.0)


def upsample_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Cell mask of the last map [B, h, w] -> mask of an earlier map [B, H, W].

  Cell (i, j) of the earlier map (stride ratio r = ceil(H / h)) takes the
  value of cell (i // r, j // r). With `retrieval.downsample_mask`'s rule (a
  cell is valid if it covers any valid pixel) this marks a superset of the
  cells the earlier map's own pixel mask would: for bottom/right padding at
  most one extra row/column of padded cells (exact when the valid size is a
  multiple of the last stride, or when r = 1, e.g. output_stride 16).
  """
  h, w = mask.shape[1:3]
  big_h, big_w = size
  rh, rw = -(-big_h // h), -(-big_w // w)
  rows = np.minimum(np.arange(big_h) // rh, h - 1)
  cols = np.minimum(np.arange(big_w) // rw, w - 1)
  return (mask > 0).astype(jnp.float32)[:, rows][:, :, cols]


# ----------------------------------------------------------------------- DOLG


def orthogonal_component(local: jax.Array, global_vec: jax.Array,
                         eps: float = 1e-12) -> jax.Array:
  """f_l - (f_l . f_g / ||f_g||^2) f_g at every cell, float32.

  Args:
    local: [B, h, w, C] local features f_l.
    global_vec: [B, C] global vector f_g.
    eps: floor of ||f_g||^2.

  Returns:
    [B, h, w, C], each cell orthogonal to its image's f_g.
  """
  local = local.astype(jnp.float32)
  g = global_vec.astype(jnp.float32)
  coeff = jnp.einsum("bhwc,bc->bhw", local, g, precision=_HIGHEST)
  coeff = coeff / jnp.maximum(jnp.sum(g * g, axis=-1), eps)[:, None, None]
  return local - coeff[..., None] * g[:, None, None, :]


class MultiAtrous(nnx.Module):
  """DOLG's multi-atrous module (ASPP-style).

  Branches, each `branch_features` wide: image pooling (masked mean over the
  valid cells -> 1x1 conv -> ReLU, broadcast to every cell), an optional
  plain 1x1 conv, and one dilated 3x3 conv per rate (zero padding = rate, so
  the size is kept). They are concatenated in that order and projected by a
  1x1 conv + ReLU. Convs have biases (as the official code).
  """

  def __init__(self, in_features: int, out_features: int, *,
               branch_features: int = 512,
               dilations: Sequence[int] = (6, 12, 18), pointwise: bool = True,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the module.

    Args:
      in_features: input channels.
      out_features: output channels.
      branch_features: channels of each branch.
      dilations: rates of the dilated 3x3 branches.
      pointwise: whether to add the plain 1x1 branch.
      rngs: parameter RNGs.
      dtype: compute dtype of the convs.
      param_dtype: storage dtype of the parameters.
    """
    def conv(cin, cout, k=1, d=1):
      pad = d * (k - 1) // 2
      return nnx.Conv(cin, cout, kernel_size=(k, k),
                      padding=((pad, pad), (pad, pad)),
                      kernel_dilation=(d, d), use_bias=True,
                      kernel_init=_conv_init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)

    self.dtype = dtype
    self.image_pool = conv(in_features, branch_features)
    self.pointwise = conv(in_features, branch_features) if pointwise else None
    self.atrous = nnx.List([conv(in_features, branch_features, 3, d)
                            for d in dilations])
    branches = 1 + int(pointwise) + len(dilations)
    self.project = conv(branches * branch_features, out_features)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """[B, h, w, C] (invalid cells already zeroed) -> [B, h, w, out]."""
    b, h, w, _ = x.shape
    x = x.astype(self.dtype)
    pooled = masked_mean(x, mask).astype(self.dtype)[:, None, None, :]
    image = nnx.relu(self.image_pool(pooled))
    outs = [jnp.broadcast_to(image, (b, h, w, image.shape[-1]))]
    if self.pointwise is not None:
      outs.append(self.pointwise(x))
    outs.extend(conv(x) for conv in self.atrous)
    return nnx.relu(self.project(jnp.concatenate(outs, axis=-1)))


class SpatialAttention(nnx.Module):
  """DOLG's attention (`SpatialAttention2d`): 1x1 conv -> BN -> (L2-normalised
  copy n) ; ReLU -> 1x1 conv to one channel -> softplus score a; output a * n
  per cell."""

  def __init__(self, in_features: int, features: int | None = None, *,
               bn_torch_stats: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the module (`in_features` in, `features` out; default the same).

    BN runs in float32 (momentum 0.1 / eps 1e-5 in torch terms);
    `bn_torch_stats` gives it torch's running-variance update
    (`resnet.TorchStatsBatchNorm`).
    """
    features = in_features if features is None else features
    kw = dict(kernel_size=(1, 1), use_bias=True, kernel_init=_conv_init,
              param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.conv1 = nnx.Conv(in_features, features, dtype=dtype, **kw)
    self.bn = resnet.batch_norm(features, torch_stats=bn_torch_stats,
                                rngs=rngs, param_dtype=param_dtype)
    self.conv2 = nnx.Conv(features, 1, dtype=jnp.float32, **kw)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, h, w, C] -> (attended features [B, h, w, C] f32, score [B, h, w])."""
    y = self.bn(self.conv1(x.astype(self.dtype))).astype(jnp.float32)
    normed = l2_normalize(y, axis=-1)
    score = jax.nn.softplus(self.conv2(nnx.relu(y)))
    return score * normed, score[..., 0]


class DOLGHead(nnx.Module):
  """DOLG: orthogonal fusion of a local (layer3) and a global (layer4) branch.

    local   layer3 [-> MultiAtrous] -> SpatialAttention      f_l [B, h3, w3, Cl]
    global  GeM(layer4) -> Linear C4 -> Cl (`global_fc`)    f_g [B, Cl]
    orth    f_orth = f_l - (f_l . f_g / ||f_g||^2) f_g       per cell
    fuse    concat(f_g, masked mean of f_orth) -> Linear 2 Cl -> D -> L2

  Concatenating f_orth with the broadcast f_g and then average-pooling, as
  the paper describes, equals concatenating f_g with the pooled f_orth, which
  is what is computed (as in the official code). The multi-atrous module runs
  only with `with_ma` (the official `MODEL.WITH_MA`, off in its release).

  Masks: the layer4 cell mask is used by GeM; the layer3 mask is
  `upsample_mask` of it. Invalid layer3 cells are zeroed before the convs (so
  they act as the zero padding of an unpadded map), the image-pooling branch
  and the final pooling average valid cells only. In eval mode (BatchNorm on
  running statistics) a padded map pair with its mask then gives the
  unpadded pair's descriptor whenever the upsampled mask is exact.

  Outputs: "descriptor", "local_orthogonal" (f_orth, [B, h3, w3, Cl]),
  "global_feature" (f_g), "attention" (softplus scores [B, h3, w3]).
  """

  stages: tuple[str, ...] = ("layer3",)

  def __init__(self, in_features: int, dim: int, *, local_in_features: int,
               local_dim: int = 1024, with_ma: bool = False,
               aspp_dim: int = 512, dilations: Sequence[int] = (6, 12, 18),
               aspp_pointwise: bool = True, p: float = 3.0,
               learn_p: bool = True, eps: float = 1e-6,
               bn_torch_stats: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the head.

    Args:
      in_features: channels of the last (layer4) map.
      dim: descriptor size D (512 in DOLG).
      local_in_features: channels of the layer3 map.
      local_dim: local-branch width Cl (1024 in DOLG).
      with_ma: whether the multi-atrous module runs before the attention.
      aspp_dim: channels of each multi-atrous branch.
      dilations: multi-atrous rates.
      aspp_pointwise: whether the multi-atrous module has a 1x1 branch.
      p: initial GeM exponent of the global branch.
      learn_p: whether p is trained.
      eps: GeM clamp.
      bn_torch_stats: torch's running-variance update in the attention BN.
      rngs: parameter RNGs.
      dtype: compute dtype of the local-branch convs.
      param_dtype: storage dtype of the parameters.
    """
    self.multi_atrous = MultiAtrous(
        local_in_features, local_dim, branch_features=aspp_dim,
        dilations=dilations, pointwise=aspp_pointwise, rngs=rngs,
        dtype=dtype, param_dtype=param_dtype) if with_ma else None
    attention_in = local_dim if with_ma else local_in_features
    self.attention = SpatialAttention(attention_in, local_dim,
                                      bn_torch_stats=bn_torch_stats,
                                      rngs=rngs, dtype=dtype,
                                      param_dtype=param_dtype)
    self.pool = pooling.GeM(p, learn_p=learn_p, eps=eps,
                            param_dtype=param_dtype)
    self.global_fc = nnx.Linear(in_features, local_dim, dtype=jnp.float32,
                                param_dtype=param_dtype, rngs=rngs)
    self.fuse_fc = nnx.Linear(2 * local_dim, dim, dtype=jnp.float32,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None,
               *, stages: Mapping[str, jax.Array] | None = None
               ) -> dict[str, jax.Array]:
    """layer4 map [B, h, w, C] + stages={"layer3": [B, h3, w3, C3]} -> dict."""
    if stages is None or "layer3" not in stages:
      raise ValueError("DOLGHead needs stages={'layer3': map}; run it inside "
                       "RetrievalModel or pass the map explicitly.")
    local = stages["layer3"]
    local_mask = None
    if mask is not None:
      local_mask = upsample_mask(mask, local.shape[1:3])
      local = local * local_mask[..., None].astype(local.dtype)
    if self.multi_atrous is not None:
      local = self.multi_atrous(local, local_mask)
    fl, score = self.attention(local)
    fg = self.global_fc(self.pool(feature_map, mask))
    orth = orthogonal_component(fl, fg)
    fused = jnp.concatenate([fg, masked_mean(orth, local_mask)], axis=-1)
    return {"descriptor": l2_normalize(self.fuse_fc(fused)),
            "local_orthogonal": orth, "global_feature": fg,
            "attention": score}


# ---------------------------------------------------------------- SuperGlobal


def relu_plus(x: jax.Array, floor: float = 0.014) -> jax.Array:
  """SuperGlobal's ReLU+: clamp(x, min=floor) (official `relup`, 0.014).

  In the official code it replaces the ReLU after each residual block of
  ResNet stages 1-3 (and the inner ReLUs of stage 1's bottlenecks); the last
  stage keeps a plain ReLU. Here it is available to backbones and, through
  `model.baseline.relu_floor`, at the SuperGlobal head's input.
  """
  return jnp.maximum(x, jnp.asarray(floor, x.dtype))


def _reflect(j: jax.Array, n: jax.Array) -> jax.Array:
  """Index j reflected into [0, n) without repeating the edge (n >= 1).

  Same as numpy's / torch's "reflect" padding, applied repeatedly when the
  pad exceeds n - 1 (numpy's behaviour; torch refuses that case).
  """
  period = jnp.maximum(2 * (n - 1), 1)
  j = jnp.mod(j, period)
  j = jnp.where(j >= n, period - j, j)
  return jnp.where(n > 1, j, 0)


def _window_counts(start: jax.Array, count: jax.Array, length: int,
                   size: int) -> jax.Array:
  """[B, L, L] matrix A: A[b, i, k] = how often source k falls in the window
  of output i, for windows reflected inside [start, start + count)."""
  r = size // 2
  i = jnp.arange(length)[None, :, None]                   # [1, L, 1]
  d = jnp.arange(-r, r + 1)[None, None, :]                # [1, 1, k]
  start = start[:, None, None]
  n = jnp.maximum(count, 1)[:, None, None]
  src = _reflect(i - start + d, n) + start               # [B, L, k]
  return jnp.sum(jax.nn.one_hot(src, length, dtype=jnp.float32), axis=2)


def _valid_box(mask: jax.Array | None, b: int, h: int, w: int):
  """Per-image (row start, row count, col start, col count) of the bounding
  box of the valid cells; the whole map without a mask."""
  if mask is None:
    zeros = jnp.zeros((b,), jnp.int32)
    return zeros, jnp.full((b,), h), zeros, jnp.full((b,), w)
  valid = mask > 0

  def extent(any_valid):                                  # [B, L] bool
    length = any_valid.shape[1]
    first = jnp.argmax(any_valid, axis=1)
    last = length - jnp.argmax(any_valid[:, ::-1], axis=1)
    has = jnp.any(any_valid, axis=1)
    return jnp.where(has, first, 0), jnp.where(has, last - first, length)

  r0, rn = extent(jnp.any(valid, axis=2))
  c0, cn = extent(jnp.any(valid, axis=1))
  return r0, rn, c0, cn


def superglobal_regional_gem(x: jax.Array, *, p: float = 2.5, size: int = 5,
                             blend: float = 0.5, mask: jax.Array | None = None,
                             eps: float = 1e-6) -> jax.Array:
  """SuperGlobal Regional-GeM: (1 - blend) * x + blend * LP-pool(x).

  The official `rgem` is `0.5 * LPPool2d(p, size, stride=1)(ReflectionPad(
  (size - 1) // 2)(x / (size^2)^(1/p))) + 0.5 * x`; dividing the input by
  (size^2)^(1/p) turns the LP norm (sum x^p)^(1/p) into the power mean

    regional(i, j) = (mean over the size x size window of x^p)^(1/p),

  with reflect padding, stride 1 (same size out). Inputs are clamped at eps
  inside the power (finite gradients); they are >= 0 after a ReLU anyway.

  With a mask the windows reflect at the border of each image's valid
  bounding box instead of the array's, so a bottom/right padded map gives the
  unpadded map's values on its valid cells (cells outside the box are
  meaningless and must stay masked downstream).

  Args:
    x: [B, h, w, C] feature map.
    p: power of the window mean (2.5).
    size: odd window size (5).
    blend: weight of the regional map.
    mask: optional [B, h, w], > 0 = valid cell.
    eps: clamp inside the power.

  Returns:
    [B, h, w, C] float32.
  """
  if size % 2 != 1:
    raise ValueError(f"size must be odd, got {size}")
  x = x.astype(jnp.float32)
  b, h, w, _ = x.shape
  r0, rn, c0, cn = _valid_box(mask, b, h, w)
  rows = _window_counts(r0, rn, h, size)                  # [B, h, h]
  cols = _window_counts(c0, cn, w, size)                  # [B, w, w]
  xp = jnp.power(jnp.maximum(x, eps), p)
  s = jnp.einsum("bik,bklc->bilc", rows, xp, precision=_HIGHEST)
  s = jnp.einsum("bjl,bilc->bijc", cols, s, precision=_HIGHEST)
  regional = jnp.power(s / float(size * size), 1.0 / p)
  return (1.0 - blend) * x + blend * regional


def scale_gem_max(descriptors: Sequence[jax.Array] | jax.Array) -> jax.Array:
  """SuperGlobal Scale-GeM (its `sgem` with p = inf): max over scales.

  normalize(max_s normalize(d_s)), element-wise max over the S extraction
  scales (SuperGlobal: 1/sqrt2, 1, sqrt2). The official code L2-normalises
  each scale's descriptor, takes the max, and normalises the result before
  search; the last normalisation is folded in here.

  Evaluation use: extract the head's descriptor of each image at every
  scale (as `evaluation.extract` does) and aggregate with this function
  instead of the mean of the per-scale normalised descriptors.

  Args:
    descriptors: a list of S arrays [..., D], or one array [S, ..., D].

  Returns:
    [..., D] float32, unit norm.
  """
  stacked = jnp.stack([jnp.asarray(d) for d in descriptors], axis=0)
  return l2_normalize(jnp.max(l2_normalize(stacked, axis=-1), axis=0))


class SuperGlobalHead(nnx.Module):
  """SuperGlobal pooling + whitening on a backbone map.

    x  = ReLU+(map) if relu_floor > 0
    x  = Regional-GeM(x)          (power mean p=2.5 over 5x5, blend 0.5)
    v  = normalize(GeM+(x))       (GeM with p = 4.6, mask-aware)
    descriptor = normalize(Linear(v))

  The order (normalise, then the whitening Linear, then normalise) follows
  the official `_forward_singlescale` (F.normalize before `head.fc`; the
  per-scale normalisation happens in `sgem`). Scale-GeM is the multi-scale
  aggregation at extraction: `scale_gem_max`.

  Outputs: "descriptor", "pooled" (v, before whitening).
  """

  stages: tuple[str, ...] = ()

  def __init__(self, in_features: int, dim: int, *, p: float = 4.6,
               learn_p: bool = False, rgem_p: float = 2.5, rgem_size: int = 5,
               rgem_blend: float = 0.5, relu_floor: float = 0.0,
               eps: float = 1e-8, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    """Builds the head.

    Args:
      in_features: channels C of the map.
      dim: descriptor size D.
      p: GeM+ exponent.
      learn_p: whether the GeM+ exponent is trained.
      rgem_p: Regional-GeM power.
      rgem_size: Regional-GeM window.
      rgem_blend: Regional-GeM blend weight.
      relu_floor: ReLU+ floor at the input; 0 = off.
      eps: clamp of GeM+ and Regional-GeM: 1e-8 as the official `gemp`
        ((1e-8)^4.6 ~ 1.6e-37 is still a normal float32); the official
        `rgem` (LPPool2d) has no clamp, which 1e-8 leaves unchanged in
        effect ((1e-8)^2.5 = 1e-20).
      rngs: parameter RNGs.
      dtype: unused (float32 head).
      param_dtype: storage dtype of the parameters.
    """
    del dtype
    self.rgem_p = rgem_p
    self.rgem_size = rgem_size
    self.rgem_blend = rgem_blend
    self.relu_floor = relu_floor
    self.eps = eps
    self.pool = pooling.GeM(p, learn_p=learn_p, eps=eps,
                            param_dtype=param_dtype)
    self.whiten = nnx.Linear(in_features, dim, dtype=jnp.float32,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """[B, h, w, C] -> {"descriptor": [B, D], "pooled": [B, C]}."""
    x = feature_map.astype(jnp.float32)
    if self.relu_floor > 0:
      x = relu_plus(x, self.relu_floor)
    x = superglobal_regional_gem(x, p=self.rgem_p, size=self.rgem_size,
                                 blend=self.rgem_blend, mask=mask,
                                 eps=self.eps)
    pooled = l2_normalize(self.pool(x, mask))
    return {"descriptor": l2_normalize(self.whiten(pooled)),
            "pooled": pooled}


# ------------------------------------------------------------------- builders


def build_delg_head(model_cfg: Mapping[str, Any], in_features: int, *,
                    rngs: nnx.Rngs, dtype, param_dtype) -> GeMHead:
  """DELG global head: GeM -> whitening Linear -> L2."""
  settings_from_config(model_cfg)  # Validates model.baseline if present.
  return GeMHead(in_features, model_cfg["dim"], p=model_cfg.get("gem_p", 3.0),
                 learn_p=model_cfg.get("learn_p", True), rngs=rngs,
                 dtype=dtype, param_dtype=param_dtype)


def build_cvnet_head(model_cfg: Mapping[str, Any], in_features: int, *,
                     rngs: nnx.Rngs, dtype, param_dtype) -> GeMHead:
  """CVNet global head: learnable GeM -> Linear -> L2 (same shape as DELG)."""
  return build_delg_head(model_cfg, in_features, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)


def build_dolg_head(model_cfg: Mapping[str, Any], in_features: int, *,
                    rngs: nnx.Rngs, dtype, param_dtype) -> DOLGHead:
  """DOLG head from `model.dim/gem_p/learn_p` and `model.baseline`."""
  s = settings_from_config(model_cfg)
  local_in = s.local_in_features or in_features // 2
  return DOLGHead(in_features, model_cfg["dim"], local_in_features=local_in,
                  local_dim=s.local_dim, with_ma=s.with_ma,
                  aspp_dim=s.aspp_dim, dilations=s.dilations,
                  aspp_pointwise=s.aspp_pointwise,
                  p=model_cfg.get("gem_p", 3.0),
                  learn_p=model_cfg.get("learn_p", True),
                  bn_torch_stats=bool(model_cfg.get("bn_torch_stats", False)),
                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def build_superglobal_head(model_cfg: Mapping[str, Any], in_features: int, *,
                           rngs: nnx.Rngs, dtype, param_dtype
                           ) -> SuperGlobalHead:
  """SuperGlobal head from `model.dim/learn_p` and `model.baseline`."""
  s = settings_from_config(model_cfg)
  return SuperGlobalHead(in_features, model_cfg["dim"], p=s.gemp_p,
                         learn_p=model_cfg.get("learn_p", True),
                         rgem_p=s.rgem_p, rgem_size=s.rgem_size,
                         rgem_blend=s.rgem_blend, relu_floor=s.relu_floor,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)
