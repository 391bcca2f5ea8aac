r"""ULTRON-style hybrid backbone (NHWC), Flax NNX.

Convolutional early stages, then transformer stages with local-window
self-attention (after ULTRON, Kweon & Park, ACCV 2024), built from two parts:

  stem     conv 3x3/2 -> BN -> GELU -> conv 3x3/2 -> BN          stride 4
  layer1   ConvBlock x d1      (CDConv token mixer)               stride 4
  down2    conv 3x3/2 -> BN;  layer2  ConvBlock x d2              stride 8
  down3    conv 3x3/2 -> LN;  layer3  TransformerBlock x d3       stride 16
  down4    conv 3x3/2 -> LN;  layer4  TransformerBlock x d4       stride 32
  norm     LayerNorm of the last map

`output_stride=16` gives `down4` stride 1 (layer4 then works at stride 16).

CDConv (channel-wise dilated convolution). The C input channels are split into
G = len(dilations) contiguous groups x_g; group g is convolved depthwise with
its own 3x3 kernel w_g at dilation d_g (zero padding d_g keeps the size):

  y_g[i, j, c] = b_g[c]
               + sum_{m, n in {-1,0,1}} w_g[m, n, c] x_g[i + m d_g, j + n d_g, c]
  CDConv(x)    = concat_g(y_g) W_pw + b_pw                     (W_pw: 1x1 conv)

so each channel group sees a (2 d_g + 1)^2 receptive field: several scales in
one layer.

SCALA (spatial-context-aware local attention), h heads of size d = C/h,
window w, shift s:

  Q, K, V = x W_q, x W_k, x W_v
  K~      = K + DW(K)              DW: depthwise 3x3 conv (with bias) over the
                                   whole map, so each key carries its 3x3
                                   neighbourhood, across window borders too
  a_ij    = softmax_{j in win(i)}( q_i . k~_j / sqrt(d)
                                    + B[dy_ij + w - 1, dx_ij + w - 1] )
  out_i   = sum_j a_ij v_j;   SCALA(x) = concat_heads(out) W_o + b_o

B is a learned relative-position bias table [2w-1, 2w-1, h] indexed by the
offset (dy, dx) = (y_i - y_j, x_i - x_j). win(i) is the w x w window holding
i in a tiling whose grid lines sit at s, s + w, s + 2w, ... (clipped to the
map); s = 0 on even blocks and w // 2 on odd ones (Swin's shifted windows,
without the cyclic roll: the map is zero-padded at the top/left by
(w - s) mod w, padded cells are never keys). On an axis no longer than w the
window is the whole axis and there is no shift.

Blocks (pre-norm residuals, MLP ratio r):

  ConvBlock:        x <- x + CDConv(BN(x));  x <- x + W2 GELU(W1 BN(x))
  TransformerBlock: x <- x + SCALA(LN(x));   x <- x + W2 GELU(W1 LN(x))

Normalisations and the softmax run in float32; everything else in `dtype`.
`return_stages=True` gives {"stem", "layer1".."layer4"} like `resnet.ResNet`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-6

_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.truncated_normal(0.02)


def _conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
          dilation: int = 1, groups: int = 1, use_bias: bool = False,
          rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Conv:
  """2D conv with torch-style symmetric padding (size kept at stride 1)."""
  pad = dilation * (kernel - 1) // 2
  return nnx.Conv(
      in_features, out_features, kernel_size=(kernel, kernel),
      strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), feature_group_count=groups,
      use_bias=use_bias, kernel_init=_conv_init, dtype=dtype,
      param_dtype=param_dtype, rngs=rngs)


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype,
            param_dtype) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=_linear_init,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _bn(features: int, *, rngs: nnx.Rngs, param_dtype) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, use_running_average=False,
                       momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


def _ln(features: int, *, rngs: nnx.Rngs, param_dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=LN_EPSILON, dtype=jnp.float32,
                       param_dtype=param_dtype, rngs=rngs)


def split_channels(channels: int, groups: int) -> list[int]:
  """Group sizes for CDConv: as equal as possible, the first ones larger."""
  if groups < 1 or channels < groups:
    raise ValueError(f"cannot split {channels} channels into {groups} groups")
  base, extra = divmod(channels, groups)
  return [base + (1 if g < extra else 0) for g in range(groups)]


class CDConv(nnx.Module):
  """Channel-wise dilated conv: per-group dilated depthwise 3x3, then 1x1.

  Attributes:
    dw: nnx.List of depthwise convs, one per channel group (with bias).
    pw: the pointwise 1x1 conv (with bias) mixing all groups.
  """

  def __init__(self, features: int, out_features: int | None = None, *,
               dilations: Sequence[int] = (1, 2, 3, 4), rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    out_features = features if out_features is None else out_features
    self.sizes = tuple(split_channels(features, len(dilations)))
    self.dilations = tuple(int(d) for d in dilations)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dw = nnx.List([
        _conv(c, c, 3, dilation=d, groups=c, use_bias=True, **kw)
        for c, d in zip(self.sizes, self.dilations)])
    self.pw = _conv(features, out_features, 1, use_bias=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, out_features]."""
    bounds = np.cumsum((0,) + self.sizes)
    groups = [conv(x[..., a:b]) for conv, a, b in
              zip(self.dw, bounds[:-1], bounds[1:])]
    return self.pw(jnp.concatenate(groups, axis=-1))


def _window_plan(size: int, window: int, shift: int) -> tuple[int, int, int]:
  """(window, pad_before, pad_after) along one axis; see the module docstring."""
  if size <= window:
    return size, 0, 0
  before = (window - shift) % window
  after = (-(before + size)) % window
  return window, before, after


def _partition(x: jax.Array, wh: int, ww: int) -> jax.Array:
  """[B, Hp, Wp, ...] -> [B, nH*nW, wh*ww, ...] (row-major windows)."""
  b, hp, wp = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape((b, hp // wh, wh, wp // ww, ww) + rest)
  x = jnp.moveaxis(x, 3, 2)
  return x.reshape((b, (hp // wh) * (wp // ww), wh * ww) + rest)


def _unpartition(x: jax.Array, hp: int, wp: int, wh: int, ww: int
                 ) -> jax.Array:
  """Inverse of `_partition`."""
  b = x.shape[0]
  rest = x.shape[3:]
  x = x.reshape((b, hp // wh, wp // ww, wh, ww) + rest)
  x = jnp.moveaxis(x, 3, 2)
  return x.reshape((b, hp, wp) + rest)


class SCALA(nnx.Module):
  """Spatial-context-aware local (windowed) multi-head self-attention.

  Attributes:
    qkv: Linear C -> 3C (queries, keys, values; heads contiguous in each).
    key_context: depthwise 3x3 conv (with bias) whose output is added to keys.
    rel_bias: nnx.Param [2w-1, 2w-1, heads] relative-position bias table.
    proj: output Linear C -> C.
  """

  def __init__(self, features: int, heads: int, window: int, *,
               shift: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if features % heads:
      raise ValueError(f"{features} channels do not split into {heads} heads")
    if not 0 <= shift < window:
      raise ValueError(f"shift must be in [0, {window}), got {shift}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.window = window
    self.shift = shift
    self.dtype = dtype
    self.qkv = _linear(features, 3 * features, **kw)
    self.key_context = _conv(features, features, 3, groups=features,
                             use_bias=True, **kw)
    self.rel_bias = nnx.Param(_linear_init(
        rngs.params(), (2 * window - 1, 2 * window - 1, heads), param_dtype))
    self.proj = _linear(features, features, **kw)

  def _bias_and_mask(self, hp: int, wp: int, wh: int, ww: int,
                     valid: np.ndarray) -> tuple[jax.Array, np.ndarray]:
    """Bias [heads, T, T] for one window and key mask [nW, T] (static)."""
    r, c = np.divmod(np.arange(wh * ww), ww)
    dy = r[:, None] - r[None, :] + self.window - 1
    dx = c[:, None] - c[None, :] + self.window - 1
    bias = self.rel_bias[...][dy, dx].astype(jnp.float32)   # [T, T, heads]
    v = valid.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3)
    return jnp.moveaxis(bias, -1, 0), v.reshape(-1, wh * ww)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    heads, d = self.heads, c // self.heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    k = k + self.key_context(k)

    wh, top, bottom = _window_plan(h, self.window, self.shift)
    ww, left, right = _window_plan(w, self.window, self.shift)
    pads = ((0, 0), (top, bottom), (left, right), (0, 0))
    hp, wp = h + top + bottom, w + left + right
    valid = np.zeros((hp, wp), bool)
    valid[top:top + h, left:left + w] = True
    bias, key_mask = self._bias_and_mask(hp, wp, wh, ww, valid)

    def windows(t):
      t = _partition(jnp.pad(t, pads), wh, ww)     # [B, nW, T, C]
      return t.reshape(t.shape[:3] + (heads, d))   # [B, nW, T, heads, d]

    q, k, v = windows(q), windows(k), windows(v)
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k,
                        preferred_element_type=jnp.float32) / np.sqrt(d)
    logits = logits + bias
    # Finite fill: a fully padded query window row stays NaN-free (cropped).
    logits = jnp.where(key_mask[None, :, None, None, :], logits, -1e30)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", attn, v)
    out = _unpartition(out.reshape(out.shape[:3] + (c,)), hp, wp, wh, ww)
    return self.proj(out[:, top:top + h, left:left + w])


class Mlp(nnx.Module):
  """Pointwise MLP: fc1 (C -> rC) -> GELU -> fc2 (rC -> C)."""

  def __init__(self, features: int, ratio: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    hidden = int(features * ratio)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = _linear(features, hidden, **kw)
    self.fc2 = _linear(hidden, features, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class ConvBlock(nnx.Module):
  """x + CDConv(BN(x)), then x + MLP(BN(x))."""

  def __init__(self, features: int, *, dilations: Sequence[int],
               mlp_ratio: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = _bn(features, rngs=rngs, param_dtype=param_dtype)
    self.mixer = CDConv(features, dilations=dilations, **kw)
    self.norm2 = _bn(features, rngs=rngs, param_dtype=param_dtype)
    self.mlp = Mlp(features, mlp_ratio, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.mixer(self.norm1(x).astype(self.dtype))
    return x + self.mlp(self.norm2(x).astype(self.dtype))


class TransformerBlock(nnx.Module):
  """x + SCALA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, features: int, *, heads: int, window: int, shift: int,
               mlp_ratio: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = _ln(features, rngs=rngs, param_dtype=param_dtype)
    self.attn = SCALA(features, heads, window, shift=shift, **kw)
    self.norm2 = _ln(features, rngs=rngs, param_dtype=param_dtype)
    self.mlp = Mlp(features, mlp_ratio, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x).astype(self.dtype))
    return x + self.mlp(self.norm2(x).astype(self.dtype))


class Downsample(nnx.Module):
  """conv 3x3 (stride 2, or 1 for a dilated output stride) -> BN or LN."""

  def __init__(self, in_features: int, out_features: int, *, stride: int,
               norm: str, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.conv = _conv(in_features, out_features, 3, stride=stride,
                      use_bias=True, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)
    make_norm = _bn if norm == "bn" else _ln
    self.norm = make_norm(out_features, rngs=rngs, param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x)).astype(self.dtype)


class Stem(nnx.Module):
  """conv 3x3/2 -> BN -> GELU -> conv 3x3/2 -> BN (stride 4)."""

  def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    mid = max(features // 2, 8)
    self.conv1 = _conv(in_features, mid, 3, stride=2, **kw)
    self.bn1 = _bn(mid, rngs=rngs, param_dtype=param_dtype)
    self.conv2 = _conv(mid, features, 3, stride=2, **kw)
    self.bn2 = _bn(features, rngs=rngs, param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.gelu(self.bn1(self.conv1(x)), approximate=False).astype(self.dtype)
    return self.bn2(self.conv2(x)).astype(self.dtype)


class Ultron(nnx.Module):
  """ULTRON-style hybrid trunk; returns the last NHWC feature map.

  Attributes:
    out_features: channels of the last map (`widths[3]`).
    output_stride: input pixels per feature cell (32 or 16).
  """

  def __init__(self, widths: Sequence[int] = (64, 128, 256, 512),
               depths: Sequence[int] = (2, 2, 6, 2),
               heads: Sequence[int] = (4, 8), *, window: int = 7,
               dilations: Sequence[int] = (1, 2, 3, 4),
               mlp_ratio: float = 4.0, output_stride: int = 32,
               in_features: int = 3, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    """Builds the trunk.

    Args:
      widths: channels of the four stages.
      depths: blocks per stage (stages 1-2 convolutional, 3-4 attention).
      heads: attention heads of stages 3 and 4.
      window: SCALA window size w.
      dilations: CDConv dilation of each channel group.
      mlp_ratio: hidden/width ratio of every block's MLP.
      output_stride: 32, or 16 (stage 4 keeps stride 16).
      in_features: input channels.
      rngs: parameter RNGs.
      dtype: compute dtype (norms and softmax run in float32).
      param_dtype: storage dtype.
    """
    if len(widths) != 4 or len(depths) != 4 or len(heads) != 2:
      raise ValueError(f"Ultron needs 4 widths/depths and 2 heads, got "
                       f"{widths}, {depths}, {heads}")
    if output_stride not in (16, 32):
      raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.stem = Stem(in_features, widths[0], **kw)
    self.layer1 = nnx.List([
        ConvBlock(widths[0], dilations=dilations, mlp_ratio=mlp_ratio, **kw)
        for _ in range(depths[0])])
    self.down2 = Downsample(widths[0], widths[1], stride=2, norm="bn", **kw)
    self.layer2 = nnx.List([
        ConvBlock(widths[1], dilations=dilations, mlp_ratio=mlp_ratio, **kw)
        for _ in range(depths[1])])
    self.down3 = Downsample(widths[1], widths[2], stride=2, norm="ln", **kw)
    self.layer3 = nnx.List([
        TransformerBlock(widths[2], heads=heads[0], window=window,
                         shift=(i % 2) * (window // 2), mlp_ratio=mlp_ratio,
                         **kw)
        for i in range(depths[2])])
    self.down4 = Downsample(widths[2], widths[3],
                            stride=1 if output_stride == 16 else 2,
                            norm="ln", **kw)
    self.layer4 = nnx.List([
        TransformerBlock(widths[3], heads=heads[1], window=window,
                         shift=(i % 2) * (window // 2), mlp_ratio=mlp_ratio,
                         **kw)
        for i in range(depths[3])])
    self.norm = _ln(widths[3], rngs=rngs, param_dtype=param_dtype)
    self.out_features = widths[3]
    self.output_stride = output_stride
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, return_stages: bool = False
               ) -> jax.Array | dict[str, jax.Array]:
    """[B, H, W, C] images -> [B, ceil(H/s), ceil(W/s), out_features]."""
    x = self.stem(x.astype(self.dtype))
    stages = {"stem": x}
    for down, name in ((None, "layer1"), (self.down2, "layer2"),
                       (self.down3, "layer3"), (self.down4, "layer4")):
      if down is not None:
        x = down(x)
      for block in getattr(self, name):
        x = block(x)
      stages[name] = x
    x = self.norm(x).astype(self.dtype)
    stages["layer4"] = x
    return stages if return_stages else x


def ultron_tiny(**kwargs) -> Ultron:
  """Test-sized: widths (16, 32, 64, 128), one block per stage, window 4."""
  return Ultron((16, 32, 64, 128), (1, 1, 1, 1), (2, 4), window=4,
                mlp_ratio=2.0, **kwargs)


def ultron_small(**kwargs) -> Ultron:
  """widths (64, 128, 256, 512), depths (2, 2, 6, 2), head size 64."""
  return Ultron((64, 128, 256, 512), (2, 2, 6, 2), (4, 8), **kwargs)


def ultron_base(**kwargs) -> Ultron:
  """widths (96, 192, 384, 768), depths (2, 3, 12, 3), head size 64."""
  return Ultron((96, 192, 384, 768), (2, 3, 12, 3), (6, 12), **kwargs)
