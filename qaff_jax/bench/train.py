r"""Train-step benchmark on synthetic batches (no input pipeline in the timing).

python -m qaff_jax.bench.train --config configs/gldv2.py:backbone=resnet50 \
    --config.data.image_size=224 --config.batch_size=16 --config.model.dtype=float32

Prints compile time, step time, images/s (total and per device), peak memory,
the compiled step's FLOPs and, on a GPU/TPU with a known peak, the model FLOPs
utilisation (MFU).
"""

import json
import resource
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from qaff_jax import cli_util

FLAGS = flags.FLAGS


# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
# Dense bf16 peaks; the first name found in device_kind wins (PCIe before SXM).
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def run(config, steps: int, warmup: int) -> dict:
  from qaff_jax import parallel, train_lib

  mesh = parallel.make_mesh(config.mesh.model)
  tx, schedule = train_lib.make_optimizer(config)
  graphdef, state, shardings = train_lib.create_train_state(config, mesh, tx)
  step_fn = train_lib.jit_train_step(graphdef, tx, schedule, config, mesh, shardings)

  rng = np.random.default_rng(0)
  b, s = parallel.local_batch_size(config.batch_size), config.data.image_size
  local = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "label": rng.integers(0, config.data.num_classes, (b,), dtype=np.int32),
           "skipped": np.zeros((b,), np.int32)}
  batch = parallel.global_batch(local, mesh)
  key = jax.random.key(0)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  for _ in range(warmup):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps

  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  mem = compiled.memory_analysis()
  out = {
      "device": f"{jax.device_count()} x {dev.device_kind}",
      "backbone": config.model.backbone, "head": config.model.head,
      "image_size": s, "global_batch": config.batch_size, "dtype": config.model.dtype,
      "compile_s": round(compile_s, 2), "step_ms": round(1e3 * step_s, 2),
      "img_per_s": round(config.batch_size / step_s, 2),
      "img_per_s_per_device": round(config.batch_size / step_s / jax.device_count(), 2),
      "peak_device_mem_gib": round(peak / 2 ** 30, 3) if peak else None,
      "compiled_temp_gib": round(mem.temp_size_in_bytes / 2 ** 30, 3) if mem else None,
      "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
      "step_gflops": round(flops / 1e9, 4),
  }
  peak_f = peak_flops(dev)
  if peak_f and flops:
    # cost_analysis counts the per-device program's FLOPs.
    out["mfu"] = round(flops / step_s / peak_f, 4)
  return out


def main(argv):
  del argv
  print(json.dumps(run(FLAGS.config, FLAGS.steps, FLAGS.warmup)))


def define_flags():
  """Flags exist only when this runs as a program (the library imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  cli_util.run(main, example="python -m qaff_jax.bench.train --config configs/demo.py:quick")
