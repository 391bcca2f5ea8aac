"""The trainer: one pure `train_step` and the loop (the state lives in `state.py`).

`train_and_evaluate(config, workdir)` reads top to bottom:
mesh -> input -> model & optimizer -> shardings -> step -> restore -> loop.
Every method (GeM, QAFF, the baselines) trains through this one file; a method
is a head plus a loss chosen by config.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qaff_jax import checkpoint as ckpt_lib
from qaff_jax import losses
from qaff_jax import metric_writer
from qaff_jax import parallel
from qaff_jax.data import pipeline
from qaff_jax.data import transforms
from qaff_jax.evaluation import extract


from qaff_jax.state import (  # noqa: F401 (re-exported: the trainer's API)
    Trainable, TrainState, abstract_train_state, create_train_state, fusion_settings,
    init_train_state, load_config, make_optimizer, merge_model, num_class_rows,
    save_config, scale_updates_where, state_shardings, steps_per_epoch, total_steps)


# ---------------------------------------------------------------------------
# The step.


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, graphdef,
               tx: optax.GradientTransformation, schedule, config, mesh):
  """One optimizer update over `config.grad_accum` micro-batches. Pure; jit it."""
  del rng  # Augmentation randomness lives in the input pipeline; no dropout yet.
  num_classes = config.data.num_classes
  emb_sharding = parallel.replicated(mesh)
  logits_sharding = NamedSharding(mesh, P(None, parallel.CLASS_AXES))
  shard = dict(embedding_sharding=emb_sharding, logits_sharding=logits_sharding)
  fusion = fusion_settings(config)

  def loss_fn(params, model_state, loss_state, images, labels):
    module = nnx.merge(graphdef, params, model_state, copy=True)
    out = module.net(transforms.normalize_jnp(images))
    weight = module.classifier.weight[...]
    scale = module.loss_scale() if config.loss.learn_scale else config.loss.scale
    kw = dict(num_classes=num_classes, config=config.loss, scale=scale, **shard)
    loss, correct, new_loss_state = losses.classification_loss(
        out["descriptor"], weight, labels, loss_state, **kw)
    extra = {}
    aux = out.get("aux_descriptors")
    if fusion is not None and (fusion.route_weight > 0 or fusion.entropy_weight != 0
                               or config.loss.aux_mode != "type_mean"):
      # QAFF's fusion terms: per-feature margin losses (ArcFace/CosFace as
      # config.loss.name, ArcFace for the other losses) give the routing
      # target; see losses.fusion_terms.
      margin_name = config.loss.name if config.loss.name in ("arcface", "cosface") else "arcface"

      def per_example(emb, repeat):
        return losses.margin_softmax_loss(
            emb, weight, jnp.repeat(labels, repeat), num_classes=num_classes,
            name=margin_name, scale=scale, margin=config.loss.margin, **shard)[0]

      terms = losses.fusion_terms(
          out, per_example, types=fusion.feature_types(), route_over=fusion.route_over,
          route_tau=fusion.route_tau, aux_mode=config.loss.aux_mode,
          need_route=fusion.route_weight > 0, route_signal=fusion.route_signal,
          labels=labels)
      loss = (loss + config.loss.aux_weight * terms["aux"]
              + fusion.route_weight * terms["route"]
              + fusion.entropy_weight * terms["entropy"])
      extra = {"aux_loss": terms["aux"], "route_kl": terms["route"],
               "fusion_entropy": terms["entropy"], "route_target_max": terms["target_max"]}
    elif aux and config.loss.aux_weight > 0:
      # One auxiliary loss per feature type (QAFF: global, regional, scale), on
      # the type's mean descriptor, sharing the class matrix.
      aux_losses = [losses.classification_loss(
          d if d.ndim == 2 else jnp.mean(d, axis=1), weight, labels, loss_state, **kw)[0]
                    for d in aux.values()]
      loss = loss + config.loss.aux_weight * sum(aux_losses) / len(aux_losses)
    new_model_state = nnx.state(module, nnx.Not(nnx.Param))
    return loss, (correct, new_model_state, new_loss_state, extra)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = config.grad_accum
  images, labels = batch["image"], batch["label"]
  if accum == 1:
    (loss, (acc, model_state, loss_state, extra)), grads = grad_fn(
        state.params, state.model_state, state.loss_state, images, labels)
  else:
    micro = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
    extra_zeros = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype),
        jax.eval_shape(grad_fn, state.params, state.model_state, state.loss_state,
                       micro(images)[0], micro(labels)[0])[0][1][3])

    def body(carry, mb):
      grads, model_state, loss_state, loss, acc, extra = carry
      (l, (a, model_state, loss_state, e)), g = grad_fn(
          state.params, model_state, loss_state, *mb)
      grads = jax.tree.map(jnp.add, grads, g)
      extra = jax.tree.map(jnp.add, extra, e)
      return (grads, model_state, loss_state, loss + l, acc + a, extra), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, model_state, loss_state, loss, acc, extra), _ = jax.lax.scan(
        body, (zeros, state.model_state, state.loss_state, 0.0, 0.0, extra_zeros),
        (micro(images), micro(labels)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss, acc = loss / accum, acc / accum
    extra = jax.tree.map(lambda e: e / accum, extra)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, loss_state=loss_state)
  metrics = {
      "loss": loss,
      "accuracy": acc,
      "lr": schedule(state.step),
      "grad_norm": optax.tree.norm(grads),
      "skipped_records": jnp.sum(batch["skipped"]),
      **extra,
  }
  return new_state, metrics


def batch_shardings(mesh) -> dict:
  """Shardings of a global training batch (as `parallel.global_batch` makes it)."""
  return {"image": parallel.batch_sharding(mesh, 4),
          "label": parallel.batch_sharding(mesh, 1),
          "skipped": parallel.batch_sharding(mesh, 1)}


def abstract_batch(config, mesh) -> dict:
  """Shapes, dtypes and shardings of one global batch, with no data (AOT compiles)."""
  b, s = config.batch_size, config.data.image_size
  shapes = {"image": ((b, s, s, 3), np.uint8), "label": ((b,), np.int32),
            "skipped": ((b,), np.int32)}
  sh = batch_shardings(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh[k])
          for k, (shape, dtype) in shapes.items()}


def jit_train_step(graphdef, tx, schedule, config, mesh, shardings):
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           config=config, mesh=mesh)
  return jax.jit(step, in_shardings=(shardings, batch_shardings(mesh),
                                     parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM into a flag the loop polls (save, then exit cleanly).

  Single process only (`install=False` leaves the signal alone): in a
  multi-process run, jax's preemption sync manager (started by
  `jax.distributed.initialize`) owns SIGTERM and agrees on a stop step for all
  hosts, which `should_stop` reads through the checkpoint manager.
  """

  def __init__(self, install: bool = True):
    self.requested = False
    self._previous = None
    self._install = install

  def __enter__(self):
    if not self._install:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class DataStalled(RuntimeError):
  """The input pipeline produced no batch within `config.data.wait_limit_s`."""


class _BatchWaiter:
  """Fetches the next host batch on one worker thread, so the loop can give up.

  `next(it)` of a stalled pipeline (a hung file system, a dead mount) blocks
  the main thread, where neither SIGTERM's flag nor a time limit would be
  looked at. Here the main thread polls: a preemption request while waiting
  returns None (the caller stops without saving: the iterator is mid-batch,
  and the last checkpoint is the resume point); a wait past `limit_s`
  raises `DataStalled` naming the shards. One batch at a time, never ahead,
  so a checkpoint's iterator state is exactly the next unread batch.
  """

  def __init__(self, data_iter, *, limit_s: float, what: str, poll_s: float = 0.25):
    import concurrent.futures  # noqa: PLC0415
    self._iter = data_iter
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
    self._limit = float(limit_s)
    self._what = what
    self._poll = poll_s

  def next(self, preempt=None):
    import concurrent.futures  # noqa: PLC0415
    future = self._pool.submit(next, self._iter)
    start = time.monotonic()
    while True:
      try:
        return future.result(timeout=self._poll)
      except concurrent.futures.TimeoutError:
        pass
      if preempt is not None and preempt.requested:
        return None
      waited = time.monotonic() - start
      if self._limit > 0 and waited > self._limit:
        raise DataStalled(
            f"no training batch for {waited:.0f} s (config.data.wait_limit_s="
            f"{self._limit:g}) while reading {self._what}; check the files / mount")

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)


def should_stop(preempt: _Preemption, ckpt, step: int, process_count: int) -> bool:
  """Whether to save and stop after `step`.

  One process: its own SIGTERM flag, or the checkpoint manager's notice. Several
  processes: ONLY the checkpoint manager's `reached_preemption`, which every
  host answers alike for the same step; a local flag would let hosts enter the
  collective save at different steps and hang.
  """
  if process_count > 1:
    return bool(ckpt.reached_preemption(step))
  return preempt.requested or bool(ckpt.reached_preemption(step))


def check_config(config, *, need_data: bool = True) -> None:
  """Errors that name the config key, before anything expensive starts
  (`need_data=False`: an ahead-of-time compile, which reads no files)."""
  if need_data and not config.data.train_files:
    raise ValueError("config.data.train_files is empty: point it at GLDv2 shards "
                     "(a glob, a comma list, or a folder of train-*-of-* files)")
  if config.data.num_classes <= 0:
    raise ValueError(f"config.data.num_classes={config.data.num_classes} must be > 0")
  if config.batch_size <= 0 or config.batch_size % config.grad_accum:
    raise ValueError(f"config.batch_size={config.batch_size} must be a positive "
                     f"multiple of config.grad_accum={config.grad_accum}")
  if config.loss.name not in losses.LOSSES:
    raise ValueError(f"config.loss.name={config.loss.name!r}; choose one of {losses.LOSSES}")
  check_eval_config(config)


def check_eval_config(config) -> None:
  """The extraction settings, checked before training so a typo does not
  surface only at the end-of-training evaluation."""
  scales = config.eval.scales
  if (not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                            and s > 0 for s in scales)):
    raise ValueError(f"config.eval.scales={tuple(scales)!r}: give positive numbers, "
                     "e.g. --config.eval.scales='(0.7071,1.0,1.4142)'")
  if not isinstance(config.eval.max_side, int) or config.eval.max_side <= 0:
    raise ValueError(f"config.eval.max_side={config.eval.max_side!r} must be a positive "
                     "integer")
  if config.eval.scale_reduce not in extract.SCALE_REDUCES:
    raise ValueError(f"config.eval.scale_reduce={config.eval.scale_reduce!r}; choose "
                     "'mean' or 'max'")


def _finite_or_raise(loss: float, step: int, last_saved: int | None) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping without saving. The last good "
        f"checkpoint is step {last_saved}. Lower config.optim.lr or set "
        f"config.optim.grad_clip.")


def train_and_evaluate(config, workdir: str, *, init_from: str | None = None,
                       on_step: Callable[[int], None] | None = None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates.

  `on_step(step)` is called after every step on the host (tests use it to kill
  or preempt a run mid-way). Returns the last logged metrics and, with
  `config.eval.at_end`, the evaluation results.
  """
  if config.data.class_allowlist and config.data.relabel:
    config.data.num_classes = pipeline.num_classes(config.data)  # RGLDv2: count kept classes
  check_config(config)
  save_config(config, workdir)

  # --- Mesh.
  mesh = parallel.make_mesh(config.mesh.model)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape),
               jax.device_count(), jax.process_count())

  # --- Input.
  local_batch = parallel.local_batch_size(config.batch_size)
  dataset = pipeline.make_train_dataset(
      config.data, local_batch_size=local_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(dataset)

  # --- Model & optimizer: shapes and shardings first, nothing materialised yet.
  tx, schedule = make_optimizer(config)
  graphdef, abstract, shardings = abstract_train_state(config, mesh, tx)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info("parameters: %.2fM (class matrix included)", n_params / 1e6)

  # --- Step.
  step_fn = jit_train_step(graphdef, tx, schedule, config, mesh, shardings)

  # --- Restore (automatic resume), or initialise (optionally from another checkpoint).
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=config.keep_checkpoints)
  last_saved = ckpt.latest_step()
  if last_saved is not None:
    state = ckpt.restore(last_saved, abstract, data_iter)
    logging.info("resumed from step %d", last_saved)
  else:
    state = init_train_state(config, mesh, tx, shardings)
    if init_from:
      state = init_backbone_from(state, init_from, shardings)

  # --- Loop.
  steps = total_steps(config)
  start = int(state.step)
  rng = jax.random.key(config.seed + 1)
  writer = metric_writer.MetricWriter(workdir)
  writer.write_hparams(config, metrics=["loss", "accuracy"] + [
      f"eval/{name}/mAP_{p}" for name in _eval_sets(config) for p in "EMH"])
  every_eval = int(config.eval.every_steps) if config.eval.data_root else 0
  last = {}
  progress = _progress_bar(start, steps)
  t0, seen = time.perf_counter(), 0
  skipped_since_log, skipped_total = 0, 0  # device scalars: summing them does not sync
  waiter = _BatchWaiter(data_iter, limit_s=config.data.wait_limit_s,
                        what=f"config.data.train_files={config.data.train_files!r}")
  try:
    multi = jax.process_count() > 1
    with _Preemption(install=not multi) as preempt:
      for step in range(start + 1, steps + 1):
        host_batch = waiter.next(preempt)
        if host_batch is None:  # SIGTERM while the input pipeline was stalled
          logging.warning("stopped while waiting for data before step %d; the last "
                          "checkpoint (step %s) is the resume point", step,
                          ckpt.latest_step())
          return {"preempted_at": step - 1, **last}
        batch = parallel.global_batch(host_batch, mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
        seen += config.batch_size
        skipped_since_log = skipped_since_log + metrics["skipped_records"]
        should_log = step % config.log_every == 0 or step == steps
        should_save = step % config.checkpoint_every == 0 or step == steps
        stop = should_stop(preempt, ckpt, step, jax.process_count())
        if should_log or should_save or stop:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _finite_or_raise(last["loss"], step, ckpt.latest_step())
        if should_log:
          dt = time.perf_counter() - t0
          last["img_per_sec"] = seen / dt if dt > 0 else 0.0
          # Corrupt records skipped since the last log line, and in this run so far.
          last["skipped_records"] = float(skipped_since_log)
          skipped_total += last["skipped_records"]
          last["skipped_records_total"] = skipped_total
          skipped_since_log = 0
          writer.write(step, last)
          progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}",
                               img_s=f"{last['img_per_sec']:.1f}", refresh=False)
          t0, seen = time.perf_counter(), 0
        if should_save or stop:
          ckpt.save(step, state, data_iter, force=True)
        progress.update(1)
        if on_step is not None:
          on_step(step)
        if stop:
          logging.warning("stopped at step %d after preemption; rerun to resume", step)
          return {"preempted_at": step, **last}
        if every_eval and step % every_eval == 0 and step != steps:
          _evaluate(config, graphdef, state, mesh, workdir, writer)
    result = dict(last)
    if config.eval.at_end and config.eval.data_root:
      result["eval"] = _evaluate(config, graphdef, state, mesh, workdir, writer)
    return result
  finally:
    waiter.close()
    progress.close()
    writer.close()
    ckpt.close()


def _eval_sets(config) -> list[str]:
  from qaff_jax.evaluation import runner  # noqa: PLC0415
  return runner.dataset_names(config.eval.datasets) if config.eval.data_root else []


def _evaluate(config, graphdef, state, mesh, workdir, writer) -> dict:
  from qaff_jax.evaluation import hook  # evaluation reads the state, not the loop
  return hook.evaluate_state(config, graphdef, state, mesh, workdir, writer=writer)


def init_backbone_from(state: TrainState, path: str, shardings) -> TrainState:
  """Copies `net.backbone` parameters and statistics from another checkpoint."""
  source = ckpt_lib.restore_params_from(path)

  def take(target: nnx.State, source_tree, what: str):
    pure = nnx.to_pure_dict(target)
    if "backbone" not in pure.get("net", {}):
      return target  # e.g. a ViT has no BatchNorm statistics: nothing to copy
    src = source_tree.get("net", {}).get("backbone") if isinstance(source_tree, dict) else None
    if src is None:
      raise ValueError(f"--init_from {path}: the checkpoint has no {what}['net']['backbone']")
    dst = pure["net"]["backbone"]
    flat_src = {_key(k): v for k, v in jax.tree_util.tree_flatten_with_path(src)[0]}
    flat_dst = jax.tree_util.tree_flatten_with_path(dst)[0]
    missing = [jax.tree_util.keystr(k) for k, _ in flat_dst if _key(k) not in flat_src]
    if missing:
      raise ValueError(f"--init_from {path}: backbone {what} missing {missing[:10]}")
    new = []
    for k, v in flat_dst:
      s = np.asarray(flat_src[_key(k)])
      if s.shape != v.shape:
        raise ValueError(f"--init_from {path}: {what} {jax.tree_util.keystr(k)} has "
                         f"shape {s.shape}, the model wants {v.shape}")
      new.append(s.astype(v.dtype))
    pure["net"]["backbone"] = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(dst), new)
    out = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(out, pure)
    return out

  src_state = source if isinstance(source, dict) else flax.serialization.to_state_dict(source)
  params = take(state.params, _pure(src_state.get("params")), "params")
  model_state = take(state.model_state, _pure(src_state.get("model_state")), "model_state")
  new = state.replace(params=params, model_state=model_state)
  return jax.device_put(new, shardings)


def _key(path) -> tuple[str, ...]:
  """A tree path as strings: list index 0 and a restored dict key '0' agree."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _pure(tree):
  """A restored nnx.State subtree as plain nested dicts of arrays."""
  if tree is None:
    return {}
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  if isinstance(tree, dict):
    return {k: (v.get("value", v) if isinstance(v, dict) and set(v) == {"value"} else _pure(v))
            for k, v in tree.items()}
  return tree


def _progress_bar(start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=2.0)
