"""ResNet backbones (NHWC) in the torchvision layout, Flax NNX.

Attribute names mirror torchvision's state-dict keys, so a weight import maps
1:1 (`layer1.0.downsample.1.running_mean` <-> `layer1/0/downsample/1/mean`):

  conv1, bn1                  stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool)
  layer1 .. layer4            nnx.List of blocks
    BasicBlock                conv1, bn1, conv2, bn2, downsample
    Bottleneck                conv1, bn1, conv2, bn2, conv3, bn3, downsample
    downsample                None or nnx.List([conv 1x1, BatchNorm])

Kernels are HWIO (torch: OIHW); the classifier `fc` is not part of the
backbone. Padding is explicit and symmetric as in torch, so outputs match a
torchvision model given the same weights. Bottleneck strides on the 3x3 conv
(torchvision "ResNet v1.5").

BatchNorm runs in float32 with momentum 0.9 (torch 0.1) and eps 1e-5; its
output is cast back to the compute dtype. With `bn_torch_stats=True` it is
`TorchStatsBatchNorm`: batch statistics and the running-variance update as
torch's (two-pass variance; running var fed the unbiased n/(n-1) variance). Train/eval mode is NNX's standard
`model.train()` / `model.eval()` (BatchNorm `use_running_average`); modules
start in train mode, like torch.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision's conv init: kaiming normal, fan_out, ReLU gain.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
          dilation: int = 1, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Conv:
  """Bias-free 2D conv with torch-style symmetric padding."""
  pad = dilation * (kernel - 1) // 2
  return nnx.Conv(
      in_features, out_features, kernel_size=(kernel, kernel),
      strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), use_bias=False,
      kernel_init=_conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TorchStatsBatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm (channels last) with torch.nn.BatchNorm2d's statistics.

  In training mode the batch is normalised with its biased variance
  mean((x - mean)^2) (two-pass), as both libraries do, but the running
  variance is fed the unbiased one, var * n / (n - 1) with n the elements per
  channel (torch's update; Flax feeds the biased variance). Under `jax.jit`
  with a sharded batch the statistics are over the global batch (torch's
  SyncBatchNorm; plain DDP BatchNorm uses each GPU's part). Same variables
  and names as nnx.BatchNorm, so checkpoints and converters are unchanged.
  Eval mode is nnx.BatchNorm's.
  """

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    use_running = (self.use_running_average if use_running_average is None
                   else use_running_average)
    if use_running:
      return super().__call__(x, use_running_average=True, mask=mask)
    if mask is not None:
      raise ValueError("TorchStatsBatchNorm does not take a mask in training mode")
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    n = math.prod(x.shape[:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


def batch_norm(features: int, *, torch_stats: bool = False, rngs: nnx.Rngs,
               param_dtype=jnp.float32) -> nnx.BatchNorm:
  """BatchNorm computed in float32 (momentum 0.9 = torch 0.1, eps 1e-5).

  `torch_stats` selects `TorchStatsBatchNorm` (torch's running-variance
  update) over nnx.BatchNorm.
  """
  cls = TorchStatsBatchNorm if torch_stats else nnx.BatchNorm
  return cls(features, use_running_average=False, momentum=BN_MOMENTUM,
             epsilon=BN_EPSILON, dtype=jnp.float32, param_dtype=param_dtype,
             rngs=rngs)


def _bn(features: int, *, rngs: nnx.Rngs, param_dtype,
        torch_stats: bool = False) -> nnx.BatchNorm:
  return batch_norm(features, torch_stats=torch_stats, rngs=rngs,
                    param_dtype=param_dtype)


def _downsample(in_features: int, out_features: int, stride: int, *,
                rngs: nnx.Rngs, dtype, param_dtype,
                torch_stats: bool = False) -> nnx.List | None:
  """1x1 conv + BN projection shortcut, or None when shapes already match."""
  if stride == 1 and in_features == out_features:
    return None
  return nnx.List([
      _conv(in_features, out_features, 1, stride=stride, rngs=rngs,
            dtype=dtype, param_dtype=param_dtype),
      _bn(out_features, rngs=rngs, param_dtype=param_dtype,
          torch_stats=torch_stats),
  ])


def _shortcut(downsample: nnx.List | None, x: jax.Array, dtype) -> jax.Array:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x)).astype(dtype)


def _act(x: jax.Array, floor: float) -> jax.Array:
  """ReLU, or SuperGlobal's ReLU+ (max(x, floor)) when `floor` > 0."""
  return jnp.maximum(x, jnp.asarray(floor, x.dtype)) if floor > 0 else nnx.relu(x)


class BasicBlock(nnx.Module):
  """Two 3x3 convs (ResNet-18/34). `dilation` applies to both convs."""

  expansion = 1

  def __init__(self, in_features: int, width: int, *, stride: int = 1,
               dilation: int = 1, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, out_floor: float = 0.0,
               inner_floor: float = 0.0, bn_torch_stats: bool = False):
    out = width * self.expansion
    self.out_floor, self.inner_floor = float(out_floor), float(inner_floor)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    bn = functools.partial(_bn, rngs=rngs, param_dtype=param_dtype,
                           torch_stats=bn_torch_stats)
    self.conv1 = _conv(in_features, width, 3, stride=stride, dilation=dilation,
                       **kw)
    self.bn1 = bn(width)
    self.conv2 = _conv(width, out, 3, dilation=dilation, **kw)
    self.bn2 = bn(out)
    self.downsample = _downsample(in_features, out, stride,
                                  torch_stats=bn_torch_stats, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _act(self.bn1(self.conv1(x)).astype(self.dtype), self.inner_floor)
    y = self.bn2(self.conv2(y)).astype(self.dtype)
    return _act(y + _shortcut(self.downsample, x, self.dtype), self.out_floor)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 bottleneck (ResNet-50/101/152)."""

  expansion = 4

  def __init__(self, in_features: int, width: int, *, stride: int = 1,
               dilation: int = 1, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, out_floor: float = 0.0,
               inner_floor: float = 0.0, bn_torch_stats: bool = False):
    out = width * self.expansion
    self.out_floor, self.inner_floor = float(out_floor), float(inner_floor)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    bn = functools.partial(_bn, rngs=rngs, param_dtype=param_dtype,
                           torch_stats=bn_torch_stats)
    self.conv1 = _conv(in_features, width, 1, **kw)
    self.bn1 = bn(width)
    self.conv2 = _conv(width, width, 3, stride=stride, dilation=dilation, **kw)
    self.bn2 = bn(width)
    self.conv3 = _conv(width, out, 1, **kw)
    self.bn3 = bn(out)
    self.downsample = _downsample(in_features, out, stride,
                                  torch_stats=bn_torch_stats, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _act(self.bn1(self.conv1(x)).astype(self.dtype), self.inner_floor)
    y = _act(self.bn2(self.conv2(y)).astype(self.dtype), self.inner_floor)
    y = self.bn3(self.conv3(y)).astype(self.dtype)
    return _act(y + _shortcut(self.downsample, x, self.dtype), self.out_floor)


class ResNet(nnx.Module):
  """ResNet trunk without the classifier; returns the last NHWC feature map.

  Attributes:
    out_features: channels of the last feature map.
    output_stride: input pixels per feature cell (32, or 16 when the last stage
      is dilated instead of strided).
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck],
               blocks: Sequence[int],
               widths: Sequence[int] = (64, 128, 256, 512), *,
               stem_width: int | None = None, output_stride: int = 32,
               in_features: int = 3, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, relu_floor: float = 0.0,
               bn_torch_stats: bool = False):
    """Builds the trunk.

    Args:
      block: `BasicBlock` or `Bottleneck`.
      blocks: number of blocks in each of the four stages.
      widths: per-stage block width (output channels = width * expansion).
      stem_width: channels of the stem conv; defaults to `widths[0]`.
      output_stride: 32, or 16 to replace the last stage's stride by dilation 2
        (torchvision `replace_stride_with_dilation=[False, False, True]`: the
        first block of that stage keeps dilation 1, later blocks use 2).
      in_features: input channels.
      rngs: parameter RNGs.
      dtype: compute dtype of the convs (BatchNorm always runs in float32).
      param_dtype: storage dtype of the parameters.
      relu_floor: SuperGlobal's ReLU+ (0 = plain ReLU): block outputs of stages
        1-3 become max(x, relu_floor), and so do the inner activations of
        stage 1's blocks, as in the SuperGlobal code (0.014 there); stage 4
        keeps plain ReLUs. Parameters are unchanged, so any checkpoint loads.
      bn_torch_stats: `TorchStatsBatchNorm` everywhere (torch's running
        variance update); same variables, so any checkpoint loads.
    """
    if len(blocks) != 4 or len(widths) != 4:
      raise ValueError(f"ResNet needs 4 stages, got blocks={blocks}, "
                       f"widths={widths}")
    if output_stride not in (16, 32):
      raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    stem_width = widths[0] if stem_width is None else stem_width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(in_features, stem_width, 7, stride=2, **kw)
    self.bn1 = _bn(stem_width, rngs=rngs, param_dtype=param_dtype,
                   torch_stats=bn_torch_stats)

    features = stem_width
    dilation = 1
    stages = []
    for i, (n, width) in enumerate(zip(blocks, widths)):
      stride = 1 if i == 0 else 2
      previous_dilation = dilation
      if i == 3 and output_stride == 16:
        dilation *= stride
        stride = 1
      layer = []
      for j in range(n):
        layer.append(block(
            features, width, stride=stride if j == 0 else 1,
            dilation=previous_dilation if j == 0 else dilation,
            out_floor=relu_floor if i < 3 else 0.0,
            inner_floor=relu_floor if i == 0 else 0.0,
            bn_torch_stats=bn_torch_stats, **kw))
        features = width * block.expansion
      stages.append(nnx.List(layer))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages

    self.out_features = features
    self.output_stride = output_stride
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, return_stages: bool = False
               ) -> jax.Array | dict[str, jax.Array]:
    """Runs the trunk on NHWC images.

    Args:
      x: [B, H, W, C] images (already normalised).
      return_stages: if True, return a dict with the maps after the stem
        (`"stem"`, stride 4) and after each stage (`"layer1"`..`"layer4"`).

    Returns:
      The last feature map [B, ceil(H/s), ceil(W/s), out_features] in the
      compute dtype (s = output_stride), or the dict of stage maps.
    """
    x = x.astype(self.dtype)
    x = nnx.relu(self.bn1(self.conv1(x)).astype(self.dtype))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = {"stem": x}
    for name in ("layer1", "layer2", "layer3", "layer4"):
      for block in getattr(self, name):
        x = block(x)
      stages[name] = x
    return stages if return_stages else x


def resnet18(**kwargs) -> ResNet:
  return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
  return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
  return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
  return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


def resnet152(**kwargs) -> ResNet:
  return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)


def resnet_tiny(**kwargs) -> ResNet:
  """Basic blocks, widths (16, 32, 64, 128), one block per stage (tests/demo)."""
  return ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), **kwargs)
