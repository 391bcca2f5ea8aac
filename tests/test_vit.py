"""ViT backbones: position-embedding resampling, timm / DINOv2 weight import
against an independent NumPy forward, errors, build_model + jitted training."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from PIL import Image

from qaff_jax import convert
from qaff_jax import models
from qaff_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vit_tiny: patch 8, D 32, 2 blocks, 2 heads, 4x4 grid, 2 registers, LayerScale.
TINY = dict(width=32, depth=2, heads=2, patch=8, grid=4, registers=2)


def timm_vit(width, depth, heads, patch, grid, registers, *, seed=0,
             prefix_rows=1, layer_scale=True, num_classes=10):
  """{key: array} in timm's VisionTransformer.state_dict() layout."""
  del heads
  rng = np.random.default_rng(seed)
  n = lambda *s, sd=0.2: rng.normal(0.0, sd, s).astype(np.float32)
  u = lambda *s: rng.uniform(0.5, 1.5, s).astype(np.float32)
  sd = {"patch_embed.proj.weight": n(width, 3, patch, patch, sd=0.1),
        "patch_embed.proj.bias": n(width),
        "cls_token": n(1, 1, width),
        "pos_embed": n(1, prefix_rows + grid * grid, width),
        "norm.weight": u(width), "norm.bias": n(width),
        "head.weight": n(num_classes, width), "head.bias": n(num_classes)}
  if registers:
    sd["reg_token"] = n(1, registers, width)
  for i in range(depth):
    p = f"blocks.{i}"
    sd.update({
        f"{p}.norm1.weight": u(width), f"{p}.norm1.bias": n(width),
        f"{p}.attn.qkv.weight": n(3 * width, width),
        f"{p}.attn.qkv.bias": n(3 * width),
        f"{p}.attn.proj.weight": n(width, width),
        f"{p}.attn.proj.bias": n(width),
        f"{p}.norm2.weight": u(width), f"{p}.norm2.bias": n(width),
        f"{p}.mlp.fc1.weight": n(4 * width, width),
        f"{p}.mlp.fc1.bias": n(4 * width),
        f"{p}.mlp.fc2.weight": n(width, 4 * width),
        f"{p}.mlp.fc2.bias": n(width)})
    if layer_scale:
      sd[f"{p}.ls1.gamma"] = u(width)
      sd[f"{p}.ls2.gamma"] = u(width)
  return sd


# ---------------------------------------------------------------------------
# NumPy references (float64).


def _keys_cubic(t, a=-0.5):
  t = np.abs(t)
  return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                  np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a,
                           0.0))


def _cubic_matrix(n_in, n_out):
  """Rows: half-pixel bicubic weights (a=-0.5) renormalised at the borders.

  When shrinking, the kernel is widened by n_in / n_out (antialiasing, as
  PIL and torch's `antialias=True` do; timm resamples position embeddings
  with `F.interpolate(mode="bicubic", antialias=True)`).
  """
  m = np.zeros((n_out, n_in))
  shrink = min(1.0, n_out / n_in)
  for i in range(n_out):
    centre = (i + 0.5) * n_in / n_out - 0.5
    m[i] = _keys_cubic((centre - np.arange(n_in)) * shrink)
    m[i] /= m[i].sum()
  return m


def np_resample(grid, size):
  """[gh, gw, D] -> [size, D]."""
  return np.einsum("ai,bj,ijc->abc", _cubic_matrix(grid.shape[0], size[0]),
                   _cubic_matrix(grid.shape[1], size[1]), grid)


def _ln(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def np_block(sd, p, x, heads):
  """One timm Block: x + ls1*attn(norm1 x); x + ls2*mlp(norm2 x)."""
  g = lambda k: np.asarray(sd[f"{p}.{k}"], np.float64)
  b, t, c = x.shape
  d = c // heads
  y = _ln(x, g("norm1.weight"), g("norm1.bias"))
  qkv = y @ g("attn.qkv.weight").T + g("attn.qkv.bias")
  out = np.zeros_like(x)
  for h in range(heads):
    q = qkv[..., h * d:(h + 1) * d]
    k = qkv[..., c + h * d:c + (h + 1) * d]
    v = qkv[..., 2 * c + h * d:2 * c + (h + 1) * d]
    s = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(d)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out[..., h * d:(h + 1) * d] = a @ v
  y = out @ g("attn.proj.weight").T + g("attn.proj.bias")
  x = x + y * g("ls1.gamma")
  y = _ln(x, g("norm2.weight"), g("norm2.bias"))
  y = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
  y = 0.5 * y * (1.0 + _erf(y / np.sqrt(2.0)))
  y = y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
  return x + y * g("ls2.gamma")


def np_vit(sd, x, *, patch, heads, depth, registers, prefix_rows=1):
  """timm forward_features -> patch tokens as [B, gh, gw, D]."""
  g = lambda k: np.asarray(sd[k], np.float64)
  b, h, w, _ = x.shape
  gh, gw = -(-h // patch), -(-w // patch)
  x = np.pad(np.asarray(x, np.float64),
             ((0, 0), (0, gh * patch - h), (0, gw * patch - w), (0, 0)))
  cells = x.reshape(b, gh, patch, gw, patch, 3)
  tok = np.einsum("bhiwjc,ocij->bhwo", cells, g("patch_embed.proj.weight"))
  tok = tok + g("patch_embed.proj.bias")
  pos = g("pos_embed")[0]
  side = math.isqrt(pos.shape[0] - prefix_rows)
  grid = pos[prefix_rows:].reshape(side, side, -1)
  if (gh, gw) != (side, side):
    grid = np_resample(grid, (gh, gw))
  tok = (tok + grid).reshape(b, gh * gw, -1)
  cls = g("cls_token")[0] + (pos[:1] if prefix_rows else 0.0)
  prefix = [cls] + ([g("reg_token")[0]] if registers else [])
  prefix = np.concatenate(prefix, axis=0)
  seq = np.concatenate([np.broadcast_to(prefix, (b,) + prefix.shape), tok], 1)
  for i in range(depth):
    seq = np_block(sd, f"blocks.{i}", seq, heads)
  seq = _ln(seq, g("norm.weight"), g("norm.bias"))
  return seq[:, 1 + registers:].reshape(b, gh, gw, -1)


def assert_close(got, want):
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------
# Position embeddings.


def test_resample_keeps_the_grid_exactly_when_unchanged():
  pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 7, 6)),
                    jnp.float32)
  same = vit.resample_pos_embed(pos, (5, 7))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(pos))
  # The bicubic kernel itself is also the identity at scale 1.
  np.testing.assert_array_equal(
      np.asarray(jax.image.resize(pos, pos.shape, "cubic")), np.asarray(pos))


def test_resample_matches_numpy_bicubic():
  grid = np.random.default_rng(1).normal(size=(4, 5, 3))
  got = vit.resample_pos_embed(jnp.asarray(grid[None], jnp.float32), (7, 9))
  np.testing.assert_allclose(np.asarray(got)[0], np_resample(grid, (7, 9)),
                             rtol=1e-5, atol=1e-5)
  big = np.random.default_rng(2).normal(size=(9, 7, 3))
  got = vit.resample_pos_embed(jnp.asarray(big[None], jnp.float32), (4, 5))
  np.testing.assert_allclose(np.asarray(got)[0], np_resample(big, (4, 5)),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Weight import.


def test_timm_safetensors_round_trip_matches_numpy(tmp_path):
  sd = timm_vit(**TINY)
  src = str(tmp_path / "vit.safetensors")
  safetensors.numpy.save_file(sd, src)
  converted, folder = convert.convert_file(src, "vit_tiny",
                                           str(tmp_path / "out"))
  assert sorted(converted.unused) == ["head.bias", "head.weight"]
  # Same grid: the file's patch position embeddings are stored unchanged.
  np.testing.assert_array_equal(
      converted.params["pos_embed"],
      sd["pos_embed"][:, 1:].reshape(1, 4, 4, 32))
  np.testing.assert_allclose(converted.params["cls_token"],
                             sd["cls_token"] + sd["pos_embed"][:, :1])

  model = convert.load_backbone(folder, "vit_tiny")
  run = nnx.jit(lambda m, t: m(t))
  kw = dict(patch=8, heads=2, depth=2, registers=2)
  rng = np.random.default_rng(2)
  for shape in [(2, 32, 32, 3), (1, 37, 20, 3)]:  # native; resampled
    x = rng.normal(size=shape).astype(np.float32)
    assert_close(np.asarray(run(model, x)), np_vit(sd, x, **kw))


def test_one_block_matches_numpy():
  sd = timm_vit(**TINY, seed=4)
  converted = convert.convert_tensors(sd, "vit_tiny")
  model = convert.materialize(models.BACKBONES["vit_tiny"], converted.params,
                              converted.model_state)
  x = np.random.default_rng(5).normal(size=(2, 7, 32)).astype(np.float32)
  got = nnx.jit(lambda m, t: m.blocks[1](t))(model, x)
  assert_close(np.asarray(got), np_block(sd, "blocks.1", x, heads=2))


def _dinov2_layout(sd, chunks=2):
  """timm keys -> DINOv2's: register_tokens, mask_token, chunked blocks."""
  out = {}
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  per_chunk = -(-depth // chunks)
  for k, v in sd.items():
    if k.startswith("blocks."):
      i = int(k.split(".")[1])
      k = f"blocks.{i // per_chunk}.{k[len('blocks.'):]}"
    elif k == "reg_token":
      k = "register_tokens"
    elif k.startswith("head."):
      continue
    out[k] = v
  out["mask_token"] = np.zeros((1, sd["cls_token"].shape[-1]), np.float32)
  return out


def test_dinov2_and_no_embed_class_layouts_give_the_same_params():
  sd = timm_vit(**TINY, seed=6)
  want = convert.convert_tensors(sd, "vit_tiny").params
  dino = convert.convert_tensors(_dinov2_layout(sd), "vit_tiny")
  assert dino.unused == ["mask_token"]
  # timm `no_embed_class`: pos_embed has no class row, cls_token holds it.
  folded = dict(sd, pos_embed=sd["pos_embed"][:, 1:],
                cls_token=sd["cls_token"] + sd["pos_embed"][:, :1])
  plain = convert.convert_tensors(folded, "vit_tiny").params
  for got in (dino.params, plain):
    jax.tree.map(np.testing.assert_allclose, got, want)


def pil_resample(grid, size):
  """[gh, gw, D] -> [size, D], channel by channel with PIL's float bicubic.

  PIL's resampler (Keys a=-0.5, support widened when shrinking, weights
  normalised) is what torch's `F.interpolate(mode="bicubic", antialias=True)`
  reimplements, i.e. timm's `resample_abs_pos_embed`.
  """
  out = [np.asarray(Image.fromarray(np.asarray(grid[..., c], np.float32), mode="F")
                    .resize((size[1], size[0]), Image.BICUBIC))
         for c in range(grid.shape[-1])]
  return np.stack(out, -1)


def test_numpy_reference_is_pils_bicubic():
  rng = np.random.default_rng(3)
  for (h, w), size in [((6, 6), (4, 4)), ((3, 3), (4, 4)), ((4, 5), (7, 9)),
                       ((37, 37), (16, 24))]:
    grid = rng.normal(size=(h, w, 2))
    np.testing.assert_allclose(np_resample(grid, size), pil_resample(grid, size),
                               atol=1e-6)


@pytest.mark.parametrize("grid", [6, 3])  # shrunk (antialiased) / enlarged to 4x4
def test_other_grid_is_resampled_and_reported(grid):
  sd = timm_vit(**dict(TINY, grid=grid), seed=7)
  converted = convert.convert_tensors(sd, "vit_tiny")
  assert any(f"{grid}x{grid} to 4x4" in n for n in converted.notes)
  table = sd["pos_embed"][0, 1:].reshape(grid, grid, 32)
  got = converted.params["pos_embed"][0]
  np.testing.assert_allclose(got, pil_resample(table, (4, 4)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, np_resample(table, (4, 4)), rtol=1e-5, atol=1e-6)
  # The class row is folded into the class token, not resampled.
  np.testing.assert_allclose(converted.params["cls_token"],
                             sd["cls_token"] + sd["pos_embed"][:, :1])


def test_wrong_vit_is_a_clear_error():
  sd = timm_vit(**dict(TINY, registers=0), seed=8)
  with pytest.raises(convert.ConversionError,
                     match=r"x\.safetensors.*0 register tokens.*has 2"):
    convert.convert_tensors(sd, "vit_tiny", source="x.safetensors")
  sd = timm_vit(**dict(TINY, patch=16), seed=8)
  with pytest.raises(convert.ConversionError,
                     match=r"patch_embed\.proj\.weight: file has "
                           r"\(32, 3, 16, 16\).*wants \(32, 3, 8, 8\)"):
    convert.convert_tensors(sd, "vit_tiny")
  sd = timm_vit(**TINY, layer_scale=False)
  with pytest.raises(convert.ConversionError,
                     match=r"missing keys \(blocks\.0\.ls1\.gamma"):
    convert.convert_tensors(sd, "vit_tiny")


# ---------------------------------------------------------------------------
# Models.


def _cfg(backbone, dtype="float32"):
  return ml_collections.ConfigDict(dict(backbone=backbone, head="gem", dim=16,
                                        dtype=dtype))


# The architecture of every ViT backbone, as their timm / DINOv2 names say:
# (patch p, width D, blocks, position grid g, registers R, LayerScale).
ARCH = {
    "vit_tiny": (8, 32, 2, 4, 2, True),
    "vit_small_patch16": (16, 384, 12, 14, 0, False),
    "vit_base_patch16": (16, 768, 12, 14, 0, False),
    "vit_small_patch14": (14, 384, 12, 37, 0, True),
    "vit_base_patch14": (14, 768, 12, 37, 0, True),
    "vit_small_patch14_reg4": (14, 384, 12, 37, 4, True),
    "vit_base_patch14_reg4": (14, 768, 12, 37, 4, True),
}


def vit_param_count(patch, width, depth, grid, registers, layer_scale, mlp_ratio=4):
  """Parameters of the backbone, term by term (no classifier head)."""
  d, h = width, mlp_ratio * width
  layer_norm = 2 * d                                   # scale + bias
  block = (layer_norm                                  # norm1
           + d * 3 * d + 3 * d                         # attn.qkv
           + d * d + d                                 # attn.proj
           + layer_norm                                # norm2
           + d * h + h + h * d + d                     # mlp.fc1, mlp.fc2
           + (2 * d if layer_scale else 0))            # ls1, ls2 gamma
  return (patch * patch * 3 * d + d                    # patch_embed.proj
          + d                                          # cls_token
          + registers * d                              # reg_token
          + grid * grid * d                            # pos_embed (patch rows only)
          + depth * block
          + layer_norm)                                # final norm


def test_param_formula_gives_timms_published_counts():
  """timm's vit_{small,base}_patch16_224 (22,050,664 / 86,567,656 parameters)
  also hold a class row in pos_embed and a 1000-class head."""
  for name, published in (("vit_small_patch16", 22_050_664),
                          ("vit_base_patch16", 86_567_656)):
    d = ARCH[name][1]
    assert vit_param_count(*ARCH[name]) + d + (d * 1000 + 1000) == published


@pytest.mark.parametrize("name", sorted(ARCH))
def test_param_count_is_the_architectures(name):
  backbone = nnx.eval_shape(lambda: models.BACKBONES[name](rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
  assert n == vit_param_count(*ARCH[name])
  assert backbone.num_registers == ARCH[name][4]


def test_readme_model_card_params_are_the_architectures():
  """README's model card: params (M) and + GeM head D=512 (M) of the ViT rows."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    rows = [line for line in f if line.startswith("| vit_")]
  assert len(rows) >= 4
  for row in rows:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    name = cells[0].split()[0]
    n = vit_param_count(*ARCH[name])
    d = ARCH[name][1]
    assert cells[1] == f"{n / 1e6:.2f}", row
    assert cells[2] == f"{(n + d * 512 + 512 + 1) / 1e6:.2f}", row  # whiten + GeM p


@pytest.mark.parametrize("name,size,grid,dtype", [
    ("vit_small_patch16", 224, 14, "float32"),
    ("vit_base_patch14_reg4", 518, 37, "bfloat16")])
def test_variant_shapes(name, size, grid, dtype):
  model = nnx.eval_shape(lambda: models.build_model(_cfg(name, dtype),
                                                    rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x, return_features=True), model,
                       jax.ShapeDtypeStruct((1, size, size - 30, 3),
                                            jnp.float32))
  p = model.backbone.output_stride
  assert p == ARCH[name][0]
  assert out["feature_map"].shape == (1, grid, -(-(size - 30) // p), ARCH[name][1])
  assert out["feature_map"].dtype == jnp.dtype(dtype)


def test_vit_tiny_builds_and_trains():
  model = nnx.eval_shape(lambda: models.build_model(_cfg("vit_tiny"),
                                                    rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(9)
  state = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), state)
  model = nnx.merge(graphdef, state)
  x = jnp.asarray(rng.normal(size=(2, 40, 28, 3)), jnp.float32)

  def loss(m, t):
    out = m(t, return_features=True)
    return jnp.sum(out["descriptor"][0] * out["descriptor"][1]), out

  (value, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(
      model, x)
  assert out["feature_map"].shape == (2, 5, 4, 32)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert float(jnp.abs(grads["backbone"]["pos_embed"][...]).sum()) > 0
