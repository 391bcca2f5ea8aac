"""Models: backbones, poolings, heads and `build_model(config.model)`.

Config fields read by `build_model` (an ml_collections ConfigDict or a dict):

  backbone       one of BACKBONES ('resnet18', ..., 'resnet_tiny')
  output_stride  32, or 16 (last stage dilated)           default 32
  head           one of HEADS ('gem', 'qaff', 'spca', 'delg', 'dolg',
                 'cvnet', 'superglobal')
  qaff           sub-dict for heads 'qaff' and 'spca', see qaff.QAFFSettings
                 (grid, scales, fusion, temperature, global_pool, projection,
                 num_tokens, token_dim, hops, heads, mlp_hidden)
  baseline       optional sub-dict for 'dolg' and 'superglobal', see
                 baselines.BaselineSettings
  relu_floor     ResNet ReLU+ floor (SuperGlobal: 0.014)   default 0 (off)
  bn_torch_stats BatchNorm with torch's running-variance    default False
                 update (resnet.TorchStatsBatchNorm; ResNet
                 backbones and the DOLG head)
  dim            descriptor size D
  gem_p          initial GeM exponent                     default 3.0
  learn_p        GeM p trainable                          default True
  dtype          compute dtype 'float32' | 'bfloat16'     default 'float32'
  param_dtype    storage dtype 'float32'                  default 'float32'

A new head plugs in by adding one entry to HEADS: a function
`(model_cfg, in_features, *, rngs, dtype, param_dtype) -> head module`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from qaff_jax.models import baselines
from qaff_jax.models import heads
from qaff_jax.models import pooling
from qaff_jax.models import qaff
from qaff_jax.models import resnet
from qaff_jax.models import ultron
from qaff_jax.models import vit
from qaff_jax.models.heads import GeMHead, l2_normalize
from qaff_jax.models.pooling import GeM, gem
from qaff_jax.models.retrieval import RetrievalModel, downsample_mask

BACKBONES: dict[str, Callable[..., nnx.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "resnet_tiny": resnet.resnet_tiny,
    "ultron_tiny": ultron.ultron_tiny,
    "ultron_small": ultron.ultron_small,
    "ultron_base": ultron.ultron_base,
    "vit_tiny": vit.vit_tiny,
    "vit_small_patch16": vit.vit_small_patch16,
    "vit_base_patch16": vit.vit_base_patch16,
    "vit_small_patch14": vit.vit_small_patch14,
    "vit_base_patch14": vit.vit_base_patch14,
    "vit_small_patch14_reg4": vit.vit_small_patch14_reg4,
    "vit_base_patch14_reg4": vit.vit_base_patch14_reg4,
}


def _gem_head(cfg: Mapping[str, Any], in_features: int, *, rngs: nnx.Rngs,
              dtype, param_dtype) -> GeMHead:
  return GeMHead(in_features, cfg["dim"], p=cfg.get("gem_p", 3.0),
                 learn_p=cfg.get("learn_p", True), rngs=rngs, dtype=dtype,
                 param_dtype=param_dtype)


HEADS: dict[str, Callable[..., nnx.Module]] = {
    "gem": _gem_head,
    "qaff": qaff.build_qaff_head,
    "spca": qaff.build_spca_head,
    # Published baselines (models/baselines.py; options in model.baseline).
    "delg": baselines.build_delg_head,
    "dolg": baselines.build_dolg_head,
    "cvnet": baselines.build_cvnet_head,
    "superglobal": baselines.build_superglobal_head,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPES = {"float32": jnp.float32}
OUTPUT_STRIDES = (16, 32)


def _choose(choices: Mapping[str, Any], value: Any, key: str) -> Any:
  """choices[value], or a ValueError naming the config key and the choices."""
  if value not in choices:
    raise ValueError(f"Unknown model.{key}={value!r}; choose one of "
                     f"{sorted(choices)}.")
  return choices[value]


def build_model(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs
                ) -> RetrievalModel:
  """Builds the `RetrievalModel` that `model_cfg` (config.model) describes.

  Args:
    model_cfg: see the module docstring for the fields.
    rngs: parameter RNGs.

  Returns:
    The model, in train mode (call `.eval()` for extraction).

  Raises:
    ValueError: an unknown backbone/head/dtype/output_stride, naming the config
      key (e.g. `model.backbone`) and the allowed choices.
  """
  make_backbone = _choose(BACKBONES, model_cfg["backbone"], "backbone")
  make_head = _choose(HEADS, model_cfg["head"], "head")
  dtype = _choose(DTYPES, model_cfg.get("dtype", "float32"), "dtype")
  param_dtype = _choose(PARAM_DTYPES, model_cfg.get("param_dtype", "float32"),
                        "param_dtype")
  output_stride = model_cfg.get("output_stride", 32)
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f"Unknown model.output_stride={output_stride!r}; choose "
                     f"one of {list(OUTPUT_STRIDES)}.")
  dim = model_cfg["dim"]
  if not isinstance(dim, int) or dim <= 0:
    raise ValueError(f"model.dim must be a positive int, got {dim!r}.")

  extra = {}
  relu_floor = model_cfg.get("relu_floor", 0.0)
  if relu_floor:
    if not model_cfg["backbone"].startswith("resnet"):
      raise ValueError(f"model.relu_floor={relu_floor} (SuperGlobal's ReLU+) needs a ResNet "
                       f"backbone, not model.backbone={model_cfg['backbone']!r}.")
    extra["relu_floor"] = float(relu_floor)
  bn_torch_stats = model_cfg.get("bn_torch_stats", False)
  if not isinstance(bn_torch_stats, bool):
    raise ValueError(f"model.bn_torch_stats must be a bool, got {bn_torch_stats!r}.")
  if bn_torch_stats:
    if not model_cfg["backbone"].startswith("resnet"):
      raise ValueError("model.bn_torch_stats=True (torch's BatchNorm statistics) needs a "
                       f"ResNet backbone, not model.backbone={model_cfg['backbone']!r}.")
    extra["bn_torch_stats"] = True
  backbone = make_backbone(output_stride=output_stride, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype, **extra)
  head = make_head(model_cfg, backbone.out_features, rngs=rngs, dtype=dtype,
                   param_dtype=param_dtype)
  return RetrievalModel(backbone, head, dtype=dtype)


__all__ = [
    "BACKBONES", "HEADS", "GeM", "GeMHead", "RetrievalModel", "build_model",
    "downsample_mask", "gem", "heads", "l2_normalize", "pooling", "resnet",
]
