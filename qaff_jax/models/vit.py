r"""Vision Transformer backbones (ViT-S/B, patch 14/16, optional registers), Flax NNX.

The backbone returns the patch tokens after the final LayerNorm as an NHWC map
[B, ceil(H/p), ceil(W/p), D]; a head pools it. Images whose sides are not
multiples of the patch size p are zero-padded at the bottom/right, so the map
has the ceil size that `retrieval.downsample_mask` expects, and
`output_stride` is p (the `output_stride` argument of the constructors is
accepted for the common backbone signature and has no effect).

Token sequence: [cls, reg_1..reg_R, patches]. Attribute names follow timm /
DINOv2 state-dict keys so the weight import (`qaff_jax.convert.vit`) maps 1:1:

  patch_embed.proj          conv p x p / p (with bias), HWIO
  cls_token   [1, 1, D]     reg_token [1, R, D] (timm name; DINOv2 "register_tokens")
  pos_embed   [1, gh, gw, D]  patch positions only, on the pre-training grid
  blocks      nnx.List of Block: norm1, attn.{qkv, proj}, ls1, norm2,
              mlp.{fc1, fc2}, ls2  (ls* = LayerScale `gamma`, DINOv2 only)
  norm        final LayerNorm

Position embeddings: the class token's own position embedding (timm/DINOv2
keep it in pos_embed[:, 0]) is a constant added to a constant, so the import
folds it into `cls_token`; registers get none (DINOv2). For an input grid
other than (gh, gw) the patch embeddings are resampled with 2-D bicubic
interpolation (`resample_pos_embed`: Keys cubic a=-0.5, half-pixel centres,
weights renormalised at the borders, antialiased when shrinking, i.e.
`jax.image.resize(method="cubic")`; the PIL-style kernel that torch uses for
`antialias=True` bicubic, as in timm's `resample_abs_pos_embed`, not checked
against torch here); an unchanged grid is returned as is. DINOv2's own code
resamples with torch's plain bicubic (a=-0.75) and a 0.1 size offset: the
same on the native grid, slightly different values on others.

Block (pre-norm):  x <- x + ls1 * Attn(LN1(x));  x <- x + ls2 * MLP(LN2(x)),
Attn = multi-head softmax attention with a joint qkv projection, MLP =
fc1 -> GELU (erf) -> fc2, LayerNorm eps 1e-6. Norms and softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPSILON = 1e-6

_linear_init = nnx.initializers.truncated_normal(0.02)


def resample_pos_embed(pos: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bicubic 2-D resampling of [..., gh, gw, D] position embeddings to `size`.

  Returns `pos` itself when the grid is already `size`. Computed in float32.
  """
  gh, gw = pos.shape[-3:-1]
  if (gh, gw) == tuple(size):
    return pos
  shape = pos.shape[:-3] + tuple(size) + pos.shape[-1:]
  out = jax.image.resize(jnp.asarray(pos, jnp.float32), shape, method="cubic",
                         antialias=True)
  return out.astype(pos.dtype)


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype,
            param_dtype) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=_linear_init,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _ln(features: int, *, rngs: nnx.Rngs, param_dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=LN_EPSILON, dtype=jnp.float32,
                       param_dtype=param_dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> D channels (conv with bias)."""

  def __init__(self, patch: int, in_features: int, features: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.proj = nnx.Conv(
        in_features, features, kernel_size=(patch, patch),
        strides=(patch, patch), padding="VALID", use_bias=True,
        kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class Attention(nnx.Module):
  """Multi-head self-attention with a joint qkv Linear (D -> 3D) and proj."""

  def __init__(self, features: int, heads: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if features % heads:
      raise ValueError(f"{features} channels do not split into {heads} heads")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.qkv = _linear(features, 3 * features, **kw)
    self.proj = _linear(features, features, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, c = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Logits and softmax in float32 (jax.nn.dot_product_attention's XLA path).
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out.reshape(b, t, c))


class Mlp(nnx.Module):
  """fc1 (D -> rD) -> GELU (erf) -> fc2."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = _linear(features, hidden, **kw)
    self.fc2 = _linear(hidden, features, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
  """Per-channel residual scale `gamma` (CaiT / DINOv2)."""

  def __init__(self, features: int, init: float, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((features,), init, param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block with optional LayerScale."""

  def __init__(self, features: int, heads: int, *, mlp_ratio: float = 4.0,
               layer_scale: float | None = None, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = _ln(features, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(features, heads, **kw)
    self.norm2 = _ln(features, rngs=rngs, param_dtype=param_dtype)
    self.mlp = Mlp(features, int(features * mlp_ratio), **kw)
    if layer_scale is None:
      self.ls1 = self.ls2 = None
    else:
      self.ls1 = LayerScale(features, layer_scale, param_dtype=param_dtype)
      self.ls2 = LayerScale(features, layer_scale, param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.attn(self.norm1(x).astype(self.dtype))
    x = x + (y if self.ls1 is None else self.ls1(y))
    y = self.mlp(self.norm2(x).astype(self.dtype))
    return x + (y if self.ls2 is None else self.ls2(y))


class VisionTransformer(nnx.Module):
  """ViT trunk returning the patch-token map.

  Attributes:
    out_features: token width D.
    output_stride: the patch size p.
    num_registers: register tokens R.
    grid: (gh, gw) of the stored position embeddings.
  """

  def __init__(self, *, patch: int = 16, features: int = 384, depth: int = 12,
               heads: int = 6, mlp_ratio: float = 4.0, grid: int = 14,
               registers: int = 0, layer_scale: float | None = None,
               in_features: int = 3, output_stride: int | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the trunk.

    Args:
      patch: patch size p (the output stride).
      features: token width D.
      depth: number of blocks.
      heads: attention heads.
      mlp_ratio: MLP hidden / D.
      grid: side of the pre-training patch grid (224/16 = 14, DINOv2 518/14
        = 37); position embeddings are stored on it.
      registers: number of register tokens (DINOv2 "with registers").
      layer_scale: initial LayerScale value, or None for no LayerScale.
      in_features: input channels.
      output_stride: ignored (the stride is `patch`); kept for the common
        backbone signature.
      rngs: parameter RNGs.
      dtype: compute dtype (norms and softmax run in float32).
      param_dtype: storage dtype.
    """
    del output_stride
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = PatchEmbed(patch, in_features, features, **kw)
    self.cls_token = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (1, 1, features), param_dtype))
    self.reg_token = (nnx.Param(1e-6 * jax.random.normal(
        rngs.params(), (1, registers, features), param_dtype))
                      if registers else None)
    self.pos_embed = nnx.Param(_linear_init(
        rngs.params(), (1, grid, grid, features), param_dtype))
    self.blocks = nnx.List([
        Block(features, heads, mlp_ratio=mlp_ratio, layer_scale=layer_scale,
              **kw) for _ in range(depth)])
    self.norm = _ln(features, rngs=rngs, param_dtype=param_dtype)
    self.out_features = features
    self.output_stride = patch
    self.num_registers = registers
    self.grid = (grid, grid)
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, return_stages: bool = False
               ) -> jax.Array | dict[str, jax.Array]:
    """Runs the trunk on NHWC images.

    Args:
      x: [B, H, W, C] images (already normalised).
      return_stages: if True, return {"layer3": tokens after block
        3*depth//4 (no final norm), "layer4": the output map}.

    Returns:
      [B, ceil(H/p), ceil(W/p), D] in the compute dtype, or the dict.
    """
    p = self.output_stride
    b, h, w, _ = x.shape
    gh, gw = -(-h // p), -(-w // p)
    x = jnp.pad(x.astype(self.dtype),
                ((0, 0), (0, gh * p - h), (0, gw * p - w), (0, 0)))
    tokens = self.patch_embed(x)                       # [B, gh, gw, D]
    pos = resample_pos_embed(self.pos_embed[...], (gh, gw))
    tokens = (tokens + pos.astype(self.dtype)).reshape(b, gh * gw, -1)
    prefix = [self.cls_token[...]]
    if self.reg_token is not None:
      prefix.append(self.reg_token[...])
    prefix = jnp.concatenate(prefix, axis=1).astype(self.dtype)
    n_prefix = prefix.shape[1]
    seq = jnp.concatenate(
        [jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), tokens], axis=1)

    def as_map(s):
      return s[:, n_prefix:].reshape(b, gh, gw, -1)

    stages = {}
    tap = 3 * len(self.blocks) // 4
    for i, block in enumerate(self.blocks):
      seq = block(seq)
      if i + 1 == tap:
        stages["layer3"] = as_map(seq)
    out = as_map(self.norm(seq).astype(self.dtype))
    if return_stages:
      stages["layer4"] = out
      return stages
    return out


def vit_tiny(**kwargs) -> VisionTransformer:
  """Test-sized: patch 8, D 32, 2 blocks, 2 heads, 2 registers, LayerScale."""
  return VisionTransformer(patch=8, features=32, depth=2, heads=2, grid=4,
                           registers=2, layer_scale=1.0, **kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:
  """ViT-S/16 (timm `vit_small_patch16_224`): D 384, 12 blocks, 6 heads."""
  return VisionTransformer(patch=16, features=384, depth=12, heads=6, grid=14,
                           **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
  """ViT-B/16 (timm `vit_base_patch16_224`): D 768, 12 blocks, 12 heads."""
  return VisionTransformer(patch=16, features=768, depth=12, heads=12,
                           grid=14, **kwargs)


def vit_small_patch14(**kwargs) -> VisionTransformer:
  """ViT-S/14 DINOv2 (`dinov2_vits14`): LayerScale, 37x37 position grid."""
  return VisionTransformer(patch=14, features=384, depth=12, heads=6, grid=37,
                           layer_scale=1e-5, **kwargs)


def vit_base_patch14(**kwargs) -> VisionTransformer:
  """ViT-B/14 DINOv2 (`dinov2_vitb14`)."""
  return VisionTransformer(patch=14, features=768, depth=12, heads=12,
                           grid=37, layer_scale=1e-5, **kwargs)


def vit_small_patch14_reg4(**kwargs) -> VisionTransformer:
  """ViT-S/14 DINOv2 with 4 registers (`dinov2_vits14_reg`)."""
  return VisionTransformer(patch=14, features=384, depth=12, heads=6, grid=37,
                           registers=4, layer_scale=1e-5, **kwargs)


def vit_base_patch14_reg4(**kwargs) -> VisionTransformer:
  """ViT-B/14 DINOv2 with 4 registers (`dinov2_vitb14_reg`)."""
  return VisionTransformer(patch=14, features=768, depth=12, heads=12,
                           grid=37, registers=4, layer_scale=1e-5, **kwargs)
