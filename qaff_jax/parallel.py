"""Device mesh, shardings and multi-host start-up.

The mesh has two axes, `data` and `model`. Batches are split over both (every
device sees a different slice), parameters are replicated (data parallel) or
sharded over `data` (FSDP), and the class-weight matrix of the margin loss is
split by rows over all devices, so an 81k x D matrix is never replicated.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "model")   # a global batch is split over every device
CLASS_AXES = ("data", "model")   # class-weight rows too

# Parameters smaller than this stay replicated under FSDP: sharding them only
# adds collectives.
FSDP_MIN_SIZE = 2 ** 14


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when started as several processes.

  Cloud TPU pods, SLURM and the `JAX_COORDINATOR_ADDRESS` environment variable
  (set by `launch/gpu_multihost.sh`) are recognised; a single process is left
  alone.
  """
  env = os.environ
  multi = ("JAX_COORDINATOR_ADDRESS" in env
           or int(env.get("SLURM_NTASKS", "1")) > 1
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if multi and not jax.distributed.is_initialized():
    # Coordinator from JAX_COORDINATOR_ADDRESS (read by jax itself); the process
    # count and id from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set by hand,
    # else auto-detected (SLURM, TPU).
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env:
      kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
      kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh(model_axis: int = 1, devices=None) -> Mesh:
  """A (`data`, `model`) mesh over `devices` (default: all); `data` takes what `model` leaves.

  THE one mesh builder: `devices` may be this machine's devices or the
  compile-only devices of a TPU topology (`qaff_jax.aot`), so a pod's program
  is built exactly as training builds it. The device order follows the chips'
  physical layout (`jax.make_mesh`); where that layout cannot be assigned (a
  `model` axis that splits a torus axis, or the compile-only v4 topology,
  which lists one device per TensorCore), the devices are taken in
  (process, chip coordinates, core) order: a valid mesh, perhaps with longer
  ICI paths.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if model_axis < 1 or n % model_axis:
    raise ValueError(f"config.mesh.model={model_axis} does not divide the "
                     f"{n} available devices")
  shape = (n // model_axis, model_axis)
  # Auto axes: XLA's partitioner places the collectives; our code only pins
  # shardings at the boundaries (inputs, state, the class-matrix logits).
  auto = (jax.sharding.AxisType.Auto,) * 2
  try:
    return jax.make_mesh(shape, ("data", "model"), axis_types=auto, devices=devices)
  except (AssertionError, NotImplementedError, ValueError) as err:
    logging.info("mesh %s: no physical assignment (%s); devices in physical order",
                 shape, str(err).splitlines()[0][:120])
  ordered = sorted(devices, key=_physical_order)
  return Mesh(np.array(ordered, dtype=object).reshape(shape), ("data", "model"),
              axis_types=auto)


def _physical_order(device) -> tuple:
  coords = tuple(getattr(device, "coords", None) or ())
  return (device.process_index, tuple(reversed(coords)),
          getattr(device, "core_on_chip", 0), device.id)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def class_rows_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(CLASS_AXES, None))


def num_shards(mesh: Mesh, axes=CLASS_AXES) -> int:
  return int(np.prod([mesh.shape[a] for a in axes]))


def fsdp_spec(shape: tuple[int, ...], data_size: int) -> P:
  """Shards the largest dimension divisible by the `data` axis size."""
  if data_size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % data_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "data"
      return P(*spec)
  return P()


def param_shardings(abstract_tree, mesh: Mesh, fsdp: bool):
  """Shardings for a pytree of parameter-shaped leaves (params or optimizer state)."""
  data_size = mesh.shape["data"]

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    spec = fsdp_spec(shape, data_size) if fsdp else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """THE one place where host batches become globally sharded jax.Arrays.

  Each process passes its own slice (`local_batch_size` rows); the result has
  the global batch size and is split over all devices of the mesh.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(one, local_batch)


def local_batch_size(global_batch_size: int) -> int:
  """Rows each process loads; the global batch must split evenly over devices."""
  if global_batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by "
                     f"the {jax.device_count()} devices")
  return global_batch_size // jax.process_count()
