"""Official SpCa checkpoint (Zy-Zhang/SpCa) -> a whole `head='spca'` model.

The authors' `spca_train.py` saves {'epoch', 'state_dict', 'optim'} with
`state_dict` = `SpCa(...).state_dict()` (networks/spca.py, `combine='cro'`).
Every tensor maps by name onto `RetrievalModel(resnet, spca.SpCaHead)`:

  official key                          Flax path (net/...)                 transform
  backbone.block1.0.* / block1.1.*      backbone/conv1, backbone/bn1         (ResNet map)
  backbone.block{2..5}.N.*              backbone/layer{1..4}/N/*             (ResNet map)
  pos_branch.proj_kv.weight [d,C,1,1]   head/pool/assign/proj/kernel [C,d]   1x1 conv -> linear
  pos_branch.clusters [1,K,d]           head/pool/assign/templates [K,d]     drop the 1
  pos_branch.pi [1,K]                   head/pool/assign/mix_logits [K]      log (softmax-equivalent)
  pos_branch.cov [1,K]                  head/pool/assign/log_var [K]         log
  pos_branch.norm_templates.*           head/pool/assign/template_norm/*
  pos_branch.p_norm.*                   head/pool/context_norm/*
  fuser.proj.*                          head/pool/fuser/context_proj/*       [out,in] -> [in,out]
  fuser.ln.*                            head/pool/fuser/query_norm/*
  fuser.cross_attn.{q,k,v,proj}.*       head/pool/fuser/{query,key,value,out}/*
  fuser.mlp.fc1.* / fuser.mlp.fc2.*     head/pool/fuser/mlp_in/*, mlp_out/*
  whiten.weight [D,C,1,1], whiten.bias  head/whiten/kernel [C,D], bias       1x1 conv -> linear

The ResNet part is `torch_resnet`'s map with torchvision's names replaced by
the official wrapper's (`ResNet.block1 = [conv1, bn1, relu, maxpool]`,
`block2..5 = layer1..4`). Left out on purpose: `classifier.weight` (the
ArcFace class matrix) and BatchNorm's `num_batches_tracked`. The sizes K, d,
m (hops) and D are read from the tensors; the official GeM has p = 3 fixed
(no tensor), so the model is built with learn_p=False. Any missing, misshapen
or unexpected key is an error naming the official key.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from qaff_jax.convert import common
from qaff_jax.convert import torch_resnet

IGNORABLE = (r"^classifier\.", r"num_batches_tracked$")
# Official `Fuser` / `Attention` default (networks/spca.py, RetrievalNet.py).
HEADS = 8
# --arch names of the two published backbones; `spca_<resnet name>` also works.
ARCHS = {"spca_r50": "resnet50", "spca_r101": "resnet101"}

# Flax path under head/ (without the leaf) -> official module name.
_HEAD_MODULES = {
    ("pool", "assign", "template_norm"): "pos_branch.norm_templates",
    ("pool", "context_norm"): "pos_branch.p_norm",
    ("pool", "fuser", "context_proj"): "fuser.proj",
    ("pool", "fuser", "query_norm"): "fuser.ln",
    ("pool", "fuser", "query"): "fuser.cross_attn.q",
    ("pool", "fuser", "key"): "fuser.cross_attn.k",
    ("pool", "fuser", "value"): "fuser.cross_attn.v",
    ("pool", "fuser", "out"): "fuser.cross_attn.proj",
    ("pool", "fuser", "mlp_in"): "fuser.mlp.fc1",
    ("pool", "fuser", "mlp_out"): "fuser.mlp.fc2",
    ("whiten",): "whiten",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def backbone_for(arch: str) -> str | None:
  """The ResNet name of an SpCa --arch ('spca_r101' -> 'resnet101'), or None."""
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  if arch in ARCHS:
    return ARCHS[arch]
  if arch.startswith("spca_"):
    name = arch[len("spca_"):]
    if name.startswith("resnet") and name in models.BACKBONES:
      return name
  return None


def _official_backbone_key(path: tuple[str, ...]) -> str:
  """Flax backbone path -> the official `backbone.blockN...` key."""
  key = torch_resnet.torch_key(path)
  head, _, rest = key.partition(".")
  if head == "conv1":
    return f"backbone.block1.0.{rest}"
  if head == "bn1":
    return f"backbone.block1.1.{rest}"
  if head.startswith("layer"):
    return f"backbone.block{int(head[len('layer'):]) + 1}.{rest}"
  raise KeyError(f"no official name for the backbone leaf {'/'.join(path)}")


def _sizes(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, int]:
  """K, d, m and D from the tensor shapes (errors name the key)."""
  def shape(key, ndim):
    if key not in tensors:
      raise common.ConversionError(
          f"{source}: missing key {key!r}; not an official SpCa state dict "
          f"(networks/spca.py, combine='cro')")
    s = tuple(np.shape(tensors[key]))
    if len(s) != ndim:
      raise common.ConversionError(f"{source}: {key} has shape {s}, expected "
                                   f"{ndim} dimensions")
    return s

  _, k, d = shape("pos_branch.clusters", 3)
  (km,) = shape("pos_branch.p_norm.weight", 1)
  out_dim = shape("whiten.weight", 4)[0]
  if km % k:
    raise common.ConversionError(
        f"{source}: pos_branch.p_norm.weight has {km} channels, not a multiple "
        f"of K={k} (pos_branch.clusters)")
  return {"num_tokens": k, "token_dim": d, "hops": km // k, "dim": out_dim}


def model_config(backbone: str, sizes: Mapping[str, int]
                 ) -> ml_collections.ConfigDict:
  """The `config.model` that the official checkpoint fits (SpCa recipe)."""
  return ml_collections.ConfigDict(dict(
      backbone=backbone, output_stride=32, head="spca", dim=sizes["dim"],
      gem_p=3.0, learn_p=False, dtype="float32", param_dtype="float32",
      qaff=dict(num_tokens=sizes["num_tokens"], token_dim=sizes["token_dim"],
                hops=sizes["hops"], heads=HEADS)))


def _positive_log(value: np.ndarray, key: str, source: str) -> np.ndarray:
  value = np.asarray(value, np.float64).reshape(-1)
  if not np.all(value > 0):
    raise common.ConversionError(
        f"{source}: {key} has entries <= 0; the official forward takes their "
        f"log, so this checkpoint is unusable")
  return np.log(value)


def convert_spca(tensors: Mapping[str, np.ndarray], *, backbone: str,
                 source: str = "<state dict>", arch: str | None = None,
                 allow_unused: bool = False) -> common.Converted:
  """Maps an official SpCa state dict onto `build_model(model_config(...))`.

  Args:
    tensors: {official key: array} (see `common.read_state_dict`).
    backbone: a ResNet name of `models.BACKBONES` (resnet101 for SpCa R101).
    source: file name for messages.
    arch: architecture name for messages.
    allow_unused: accept unexpected extra keys.

  Returns:
    The converted variables, params / model_state = {"backbone": ...,
    "head": ...} (the `net` subtree of a train state), and a note with the
    model config the checkpoint needs.

  Raises:
    common.ConversionError: missing keys, shape mismatches, unexpected keys
      (each named), or non-positive `pi` / `cov`.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  arch = arch or f"spca_{backbone}"
  sizes = _sizes(tensors, source)
  cfg = model_config(backbone, sizes)
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  matcher = common.KeyMatcher(tensors, source, arch)

  def take_reshaped(key, torch_shape, flax_shape, fn):
    value = matcher.get(key)
    if value is None:
      return None
    if tuple(value.shape) != torch_shape:
      matcher.mismatch(f"{key}: file has {tuple(value.shape)}, --arch {arch} "
                       f"wants {torch_shape}")
      return None
    return np.asarray(fn(np.asarray(value)), np.float32).reshape(flax_shape)

  def head_value(path, leaf):
    shape = tuple(leaf.shape)
    *module, name = path
    module = tuple(module)
    if path == ("pool", "assign", "proj", "kernel"):
      c, d = shape
      return take_reshaped("pos_branch.proj_kv.weight", (d, c, 1, 1), shape,
                           lambda w: w[:, :, 0, 0].T)
    if path == ("pool", "assign", "templates"):
      return take_reshaped("pos_branch.clusters", (1,) + shape, shape,
                           lambda w: w[0])
    if path in (("pool", "assign", "mix_logits"), ("pool", "assign", "log_var")):
      key = "pos_branch.pi" if name == "mix_logits" else "pos_branch.cov"
      return take_reshaped(key, (1,) + shape, shape,
                           lambda w, key=key: _positive_log(w, key, source))
    if path == ("whiten", "kernel"):
      c, dim = shape
      return take_reshaped("whiten.weight", (dim, c, 1, 1), shape,
                           lambda w: w[:, :, 0, 0].T)
    if module in _HEAD_MODULES and name in _LEAF:
      key = f"{_HEAD_MODULES[module]}.{_LEAF[name]}"
      transform = common.linear_kernel if name == "kernel" else None
      got = matcher.take(key, shape, transform)
      return None if got is None else np.asarray(got, np.float32)
    matcher.mismatch(f"head/{'/'.join(path)}: no official SpCa tensor "
                     f"(is a model.qaff deviation switched on?)")
    return None

  def value_of(path, leaf):
    part, *inner = path
    inner = tuple(inner)
    if part == "backbone":
      got = matcher.take(_official_backbone_key(inner), tuple(leaf.shape),
                         common.kernel_transform(inner, len(leaf.shape)))
      return None if got is None else np.asarray(got, leaf.dtype)
    return head_value(inner, leaf)

  out_params = common.fill(params, value_of)
  out_state = common.fill(rest, value_of)
  unused = matcher.finish(IGNORABLE, allow_unused=allow_unused)
  note = ("official SpCa sizes K={num_tokens}, d={token_dim}, hops={hops}, "
          "D={dim}: use configs/baselines.py:method=spca with "
          "--config.model.qaff.num_tokens={num_tokens} "
          "--config.model.qaff.token_dim={token_dim} "
          "--config.model.qaff.hops={hops} --config.model.dim={dim}").format(
              **sizes)
  where = ("the checkpoint holds backbone and head: --init_from starts a run from its "
           "backbone; convert.spca.load_model(folder) builds the whole model")
  return common.Converted(out_params, out_state, sorted(matcher.used), unused,
                          notes=[note, where])


def load_model(folder: str, *, backbone: str = "resnet101",
               model_cfg: Any = None):
  """The `RetrievalModel` holding a converted SpCa checkpoint, in eval mode.

  Args:
    folder: what `convert_file` wrote for an SpCa --arch.
    backbone: the ResNet the checkpoint holds (ignored with `model_cfg`).
    model_cfg: the `config.model` to build; default `model_config` with the
      sizes read from the checkpoint.
  """
  from qaff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  tree = checkpoint.restore_params_from(folder)
  params, state = tree["params"]["net"], tree["model_state"].get("net", {})
  if model_cfg is None:
    head = params["head"]
    k, d = np.shape(head["pool"]["assign"]["templates"])
    km = np.shape(head["pool"]["context_norm"]["scale"])[0]
    model_cfg = model_config(backbone, {
        "num_tokens": k, "token_dim": d, "hops": km // k,
        "dim": np.shape(head["whiten"]["bias"])[0]})
  net = common.materialize(
      lambda rngs: models.build_model(model_cfg, rngs=rngs), params, state)
  net.eval()
  return net
