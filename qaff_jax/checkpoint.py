"""Orbax checkpoints: train state + Grain iterator, async, keep-N, atomic.

Orbax writes every step into a temporary folder and renames it when complete
(`commit_success.txt` on object stores), so a crash mid-write never leaves a
checkpoint that `latest_step()` would pick up. The Grain iterator state is
saved beside the model, so a resumed run continues the exact data order.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items `state` and `data`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores `state` (shaped/sharded like `abstract_state`) and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"]

  def restore_model(self, step: int, abstract_state):
    """Restores only `params` and `model_state` (what inference needs).

    Optimizer and loss state are not read, so evaluation works on checkpoints
    whose train state had other fields. Returns the state with those two
    fields filled (the others stay abstract). Use a fresh Checkpointer: one
    that has saved in this process keeps Orbax's save handler for `state`.
    """
    item = {"params": abstract_state.params, "model_state": abstract_state.model_state}
    restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
    logging.info("checkpoint: restored the model of step %d from %s", step, self.directory)
    return abstract_state.replace(params=restored["params"],
                                  model_state=restored["model_state"])

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a multi-host preemption notice has arrived."""
    return self._mngr.reached_preemption(step)

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_params_from(path: str):
  """Reads the `state` item of another run's checkpoint (latest step) as arrays.

  `path` is a run's checkpoint folder (holding numbered steps) or one step
  folder. Used by `--init_from` to take backbone weights from another run or a
  converted PyTorch checkpoint.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--init_from: no checkpoint folder at {path}")
  step_dir = path
  if not os.path.isdir(os.path.join(path, "state")):
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"--init_from: {path} holds no finished checkpoint")
    step_dir = os.path.join(path, str(step))
  state_dir = os.path.join(step_dir, "state")
  with ocp.StandardCheckpointer() as ckptr:
    # No target: arrays come back as saved, on this process's devices.
    meta = ckptr.metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.local_devices()[0])),
        tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return ckptr.restore(state_dir, target)
