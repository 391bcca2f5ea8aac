"""What the trainer and the evaluation both need of a train state.

The trained module (`Trainable`: retrieval network + class matrix), the state
layout (`TrainState`), its optimizer and shardings, building the abstract
state a checkpoint restores into, merging the eval-mode network, and the
run's saved config. `train_lib` (the loop) and `qaff_jax.evaluation` both
import this module, so evaluation never imports the trainer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding

from qaff_jax import config_lib
from qaff_jax import losses
from qaff_jax import losses_baselines
from qaff_jax import models
from qaff_jax import parallel

# ---------------------------------------------------------------------------
# Model + classifier, and the train state.


class Trainable(nnx.Module):
  """What gets trained: the retrieval network and the margin-loss class matrix."""

  def __init__(self, config, *, num_rows: int, rngs: nnx.Rngs):
    self.net = models.build_model(config.model, rngs=rngs)
    self.classifier = losses.MarginClassifier(
        config.data.num_classes, config.model.dim, num_rows=num_rows, rngs=rngs)
    if config.loss.learn_scale:  # DELG: a trained softmax scale, starting at config.loss.scale
      self.loss_scale = losses_baselines.LearnableScale(config.loss.scale)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State        # nnx.Param variables
  model_state: nnx.State   # everything else (BatchNorm statistics, ...)
  opt_state: Any
  loss_state: dict         # CurricularFace's running mean positive cosine `t`


def num_class_rows(num_classes: int, mesh) -> int:
  """Class rows padded so they split evenly over all devices."""
  n = parallel.num_shards(mesh)
  return -(-num_classes // n) * n


def steps_per_epoch(config) -> int:
  return max(1, config.data.num_train_images // config.batch_size)


def total_steps(config) -> int:
  if config.total_steps > 0:
    return int(config.total_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch(config))))


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (nesterov) or AdamW; linear warm-up then cosine to zero.

  Weight decay on parameters with ndim > 1 (kernels, class matrix, QAFF/SpCa
  embeddings) whose name is not in `config.optim.no_decay_names`; biases,
  norm scales and other vectors and scalars are not decayed.
  """
  o = config.optim
  steps = total_steps(config)
  warmup = min(int(o.warmup_epochs * steps_per_epoch(config)), steps - 1)
  if warmup > 0:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, warmup_steps=warmup, decay_steps=steps, end_value=0.0)
  else:
    schedule = optax.cosine_decay_schedule(o.lr, decay_steps=steps)

  skip = set(o.get("no_decay_names", ()))

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not skip.intersection(map(str, key_names(path))),
        params)

  if o.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=o.momentum, nesterov=True))
  elif o.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"config.optim.name={o.name!r}; choose 'sgd' or 'adamw'")
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  fusion = fusion_settings(config)
  if fusion is not None and fusion.fusion_lr_mult != 1.0:
    tx = optax.chain(tx, scale_updates_where(_is_fusion_param, fusion.fusion_lr_mult))
  return tx, schedule


def fusion_settings(config):
  """The QAFF head's `QAFFSettings` (validated), or None for other heads."""
  if config.model.head != "qaff":
    return None
  from qaff_jax.models import qaff  # noqa: PLC0415 (only QAFF needs it)
  return qaff.settings_from_config(config.model)


def _is_fusion_param(names: list) -> bool:
  return any(isinstance(n, str) and n.startswith("fusion_") for n in names)


def key_names(path) -> list:
  """The names along a pytree key path (dict keys, attribute names; None else)."""
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def scale_updates_where(predicate: Callable[[list], bool], factor: float
                        ) -> optax.GradientTransformation:
  """Multiplies the updates of the leaves whose key path satisfies `predicate`.

  Applied after the optimizer (SGD with momentum, AdamW with its decoupled
  decay), scaling an update is scaling that parameter's learning rate.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    def one(path, u):
      return u * factor if predicate(key_names(path)) else u
    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(init, update)


def state_shardings(abstract_state: TrainState, mesh, fsdp: bool):
  """Class rows split over all devices; other leaves replicated or FSDP-sharded."""
  data_size = mesh.shape["data"]

  def one(path, leaf):
    names = key_names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if "classifier" in names and len(shape) == 2:
      return parallel.class_rows_sharding(mesh)
    if fsdp:
      return NamedSharding(mesh, parallel.fsdp_spec(shape, data_size))
    return parallel.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def _init_fn(config, tx, rows: int):
  def init(rng):
    module = Trainable(config, num_rows=rows, rngs=nnx.Rngs(rng))
    _, params, rest = nnx.split(module, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=rest, opt_state=tx.init(params),
                      loss_state={"t": jnp.zeros((), jnp.float32)})
  return init


def abstract_train_state(config, mesh, tx):
  """(graphdef, abstract state with shardings, shardings), computing nothing.

  `graphdef` is the static module structure that `nnx.merge` combines with
  `state.params` / `state.model_state`; the abstract state is what a
  checkpoint restores into.
  """
  rows = num_class_rows(config.data.num_classes, mesh)
  graphdef = nnx.split(nnx.eval_shape(
      lambda: Trainable(config, num_rows=rows, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
  abstract = jax.eval_shape(_init_fn(config, tx, rows), jax.random.key(config.seed))
  shardings = state_shardings(abstract, mesh, config.mesh.fsdp)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, shardings


def init_train_state(config, mesh, tx, shardings) -> TrainState:
  """Initialises the state directly into `shardings` (no unsharded copy is made)."""
  init = _init_fn(config, tx, num_class_rows(config.data.num_classes, mesh))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))


def create_train_state(config, mesh, tx):
  """(graphdef, freshly initialised sharded state, shardings)."""
  graphdef, _, shardings = abstract_train_state(config, mesh, tx)
  return graphdef, init_train_state(config, mesh, tx, shardings), shardings


def merge_model(graphdef, state: TrainState, *, train: bool = False) -> nnx.Module:
  """The retrieval network of a state, in train or eval (running BN stats) mode."""
  module = nnx.merge(graphdef, state.params, state.model_state)
  net = module.net
  net.train() if train else net.eval()
  return net


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not a training workdir (no config.json)")
  with open(path, encoding="utf-8") as f:
    saved = _lists_to_tuples(json.load(f))
  # Fields added since the run was made take their defaults.
  return ml_collections.ConfigDict(_merge(config_lib.base_config().to_dict(), saved))


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def _lists_to_tuples(d):
  if isinstance(d, dict):
    return {k: _lists_to_tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(d)
  return d
