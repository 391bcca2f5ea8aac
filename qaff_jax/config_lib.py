"""Shared pieces of the ml_collections configs in `configs/`.

Config files are plain Python: `get_config(arg)` builds a ConfigDict from
`base_config()` and the variant string after `:` on the command line
(`configs/gldv2.py:backbone=resnet50,runlocal`), parsed by `parse_arg`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections
import numpy as np

GLDV2_CLEAN_IMAGES = 1_580_470
GLDV2_CLEAN_CLASSES = 81_313


def is_int(v) -> bool:
  """An integer config value (bools excluded)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_real(v) -> bool:
  """A finite real config value (bools excluded)."""
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, bool) and math.isfinite(float(v)))


def parse_arg(arg: str | None, **defaults):
  """Parses `key=value,flag` into a ConfigDict typed after `defaults`.

  A bare `flag` sets a bool default to True. Unknown keys are an error that
  names them and lists the known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; "
                       f"known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} wants true/false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
  """Sets dotted fields (`{"model.qaff.fusion": "uniform"}`); an unknown one is a KeyError."""
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    if last not in node:
      raise KeyError(f"config override {key!r}: no such config field")
    node[last] = value
  return config


def load_config_module(path: str):
  """Imports a config file by path (config files are not a package)."""
  name = "qaff_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shrink_for_local_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `runlocal` variant: tiny model, small batches, 10 steps, same code path."""
  c.model.backbone = "resnet_tiny"
  c.model.dtype = "float32"
  c.data.image_size = 64
  c.data.num_workers = 0
  c.data.shuffle_buffer = 64
  c.batch_size = 16
  c.total_steps = 10
  c.log_every = 2
  c.checkpoint_every = 5
  c.eval.max_side = 128
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with GLDv2-scale defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ""          # glob, comma list, or a folder of train-*-of-* shards
  c.data.format = "auto"           # tfrecord | arrayrecord | auto (by extension)
  c.data.num_classes = GLDV2_CLEAN_CLASSES
  c.data.num_train_images = GLDV2_CLEAN_IMAGES
  c.data.image_size = 512
  c.data.min_scale = 0.2           # random-resized-crop area range lower bound
  c.data.color_jitter = 0.2
  c.data.shuffle_buffer = 8192
  c.data.num_workers = 8
  c.data.class_allowlist = ""      # RGLDv2: text file of kept labels
  c.data.relabel = False
  c.data.wait_limit_s = 900.0      # a training batch slower than this is an error; 0 = no limit

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet101"
  c.model.output_stride = 32
  c.model.relu_floor = 0.0         # SuperGlobal's ReLU+ in ResNet stages 1-3 (0.014); 0 = off
  c.model.head = "gem"
  c.model.dim = 512
  c.model.gem_p = 3.0
  c.model.learn_p = True
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # BatchNorm statistics as PyTorch computes them: two-pass batch variance, and the
  # running variance updated with the unbiased (n/(n-1)) batch variance. The
  # recipes of PyTorch-trained methods turn it on; off = Flax's (biased) update.
  c.model.bn_torch_stats = False
  # QAFF head (model.head='qaff'; SC-GeM settings also serve head='spca'). The
  # last five switch SC-GeM away from the official SpCa code (all off =
  # official; see models.spca.Deviations).
  c.model.qaff = ml_collections.ConfigDict(dict(
      grid=3, scales=(0.5, 0.75, 1.5), fusion="adaptive", temperature=1.0,
      global_pool="scgem", projection="per_type", num_tokens=16, token_dim=128,
      hops=3, heads=8, mlp_hidden=256, attn_dim=64, route_weight=0.0, route_tau=1.0,
      route_over="features", route_signal="loss", entropy_weight=0.0, fusion_lr_mult=1.0,
      hops_from_one=False, legacy_layernorm=False, fuser_mlp_norm=False,
      gelu_tanh=False, legacy_init=False))
  # Baseline heads 'dolg' and 'superglobal' (models.baselines.BaselineSettings);
  # local_in_features None = half the map's channels (an int may override it);
  # with_ma = DOLG's MODEL.WITH_MA (multi-atrous module; off in its released code).
  c.model.baseline = ml_collections.ConfigDict(dict(
      local_dim=1024,
      local_in_features=ml_collections.FieldReference(None, field_type=int),
      with_ma=False, aspp_dim=512, dilations=(6, 12, 18), aspp_pointwise=True,
      gemp_p=4.6, rgem_p=2.5, rgem_size=5, rgem_blend=0.5, relu_floor=0.0))

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "arcface"          # arcface | cosface | curricularface | madacos | contrastive | triplet
  c.loss.scale = 30.0
  c.loss.margin = 0.15
  c.loss.learn_scale = False       # DELG: train the softmax scale (starts at loss.scale)
  c.loss.madacos_alpha = 0.02      # MadaCos target probability of the median sample
  c.loss.pair_margin = 0.7         # contrastive (0.7) / triplet (0.1) margin
  c.loss.aux_weight = 0.0          # auxiliary loss per feature type (QAFF heads)
  c.loss.aux_mode = "type_mean"    # type_mean | per_feature | routed (losses.fusion_terms)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"             # sgd (nesterov momentum) | adamw
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 5.0
  c.optim.grad_clip = 0.0          # global-norm clip; 0 disables
  # Weight decay applies to matrices and conv kernels (ndim > 1) except these
  # parameter names: ViT tokens and position embeddings and ULTRON's relative
  # position bias tables, as timm's `no_weight_decay` excludes them.
  c.optim.no_decay_names = ("cls_token", "reg_token", "pos_embed", "rel_bias")

  c.batch_size = 256               # global, across all devices and hosts
  c.grad_accum = 1                 # micro-batches per update
  c.num_epochs = 50.0
  c.total_steps = 0                # > 0 overrides num_epochs

  c.mesh = ml_collections.ConfigDict()
  c.mesh.model = 1                 # size of the `model` axis; `data` takes the rest
  c.mesh.fsdp = False              # shard params + optimizer state over `data`

  c.log_every = 50
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.data_root = ""            # revisitop root holding <name>/gnd_<name>.pkl
  c.eval.datasets = "roxford5k,rparis6k"
  c.eval.max_side = 1024
  c.eval.scales = (0.7071067811865476, 1.0, 1.4142135623730951)
  c.eval.batch_size = 8
  c.eval.bucket = 64               # images are padded up to multiples of this (pixels)
  c.eval.scale_reduce = "mean"     # mean | max (SuperGlobal's Scale-GeM) over scales
  c.eval.at_end = False            # evaluate after training finishes
  c.eval.every_steps = 0           # also evaluate every N steps during training (0: off)
  c.eval.search = "exact"          # exact | scann
  c.eval.rerank = "none"           # none | superglobal | aqe | dba
  c.eval.superglobal = ml_collections.ConfigDict(dict(m=400, knn=9, beta=0.15))
  c.eval.qe = ml_collections.ConfigDict(dict(n=2, alpha=3.0))   # aQE and DBA
  # ScaNN: 0 = choose from the database size (sqrt(n) leaves, 16% searched, reorder 5k).
  # target_recall > 0: tune build + search settings for that recall@k instead
  # (ann.tune_for_recall: SOAR builds at AH 2 and 4 dims/block, ann.default_build_options;
  # the other fields are then unused).
  c.eval.scann = ml_collections.ConfigDict(dict(
      num_leaves=0, num_leaves_to_search=0, reorder=0, training_sample_size=250_000,
      dims_per_block=2, anisotropic_quantization_threshold=0.2, target_recall=0.0))
  return c
