r"""Compile the train / extraction steps for a TPU slice that is not attached.

python -m qaff_jax.compile --config configs/gldv2.py --topology v5e-16
python -m qaff_jax.compile --config configs/gldv2.py --topology v5p:4x4x4 --what both \
    --max_batch --config.mesh.fsdp=True

Runs on any machine with libtpu installed (`pip install -e ".[tpu]"`), CPU-only
ones included: nothing executes, the programs are only compiled. Prints a table
and then one JSON object (the last line of stdout) with per-device memory and
whether it fits the chip's HBM, FLOPs and the ideal step time at peak bf16,
collectives, and the check that no array with every class row sits whole on one
device (exit 1 when that check fails or a program does not fit).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from qaff_jax import cli_util

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gldv2.py (overrides: --config.batch_size=512).",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice: an accelerator type (v5e-16, v5p-128, v6e-256, v4-32; "
    "v4/v5p count TensorCores, v5e/v6e chips) or a shape (v5e:4x4, v5p:4x4x4, v4:2x2x1).")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "extract", "both"],
                          "Which programs: the train step, the evaluation extraction "
                          "step (at each scale's largest shape bucket), or both.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Also search the largest global batch whose train step fits "
    "(several compiles).")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "Compile budget of --max_batch.")
_JSON = flags.DEFINE_string("json", None, "Also write the JSON object to this file.")
flags.mark_flags_as_required(["config", "topology"])


def _gib(x) -> str:
  return f"{x:.3f}"


def format_report(result: dict) -> str:
  t = result["target"]
  lines = [f"{t['topology']}: {t['devices']} devices on {t['hosts']} host(s), "
           f"{t['devices_per_chip']} per chip ({t['chip']}); per device "
           f"{t['peak_bf16_tflops_per_device']:g} TFLOP/s bf16 peak, "
           f"{t['hbm_gib_per_device']:.2f} GiB HBM (figures: {t['chip_figures_source']})",
           "",
           "| program | shape | args GiB | temp GiB | out GiB | peak GiB | fits (margin GiB) "
           "| TFLOP/device | ideal ms at peak | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]

  def row(name, shape, r):
    m = r["memory_gib"]
    lines.append(f"| {name} | {shape} | {_gib(m['argument'])} | {_gib(m['temp'])} | "
                 f"{_gib(m['output'] - m['alias'])} | {_gib(m['peak'])} | "
                 f"{'yes' if r['fits'] else 'NO'} ({r['margin_gib']:+.2f}) | "
                 f"{r['flops_per_device'] / 1e12:.4g} | {r['ideal_ms']} | {r['compile_s']} |")

  train = result.get("train")
  if train:
    row("train", f"batch {train['global_batch']} ({train['batch_per_device']:g}/device), "
        f"{train['image_size']} px", train)
  for r in (result.get("extract") or {}).get("buckets", []):
    b, h, w = r["shape"]
    row("extract", f"{b} x {h}x{w}", r)
  if train:
    coll = ", ".join(f"{k} {v['count']} ({v['mib']:.1f} MiB)"
                     for k, v in train["collectives"].items() if v["count"])
    lines += ["", f"train collectives (static count, result bytes): {coll or 'none'}",
              "class rows: " + ("sharded: no [batch, classes] or [classes, D] array whole "
                                "on one device" if train["class_arrays_sharded"] else
                                "WHOLE on one device: " + ", ".join(train["whole_class_arrays"]))]
  mb = result.get("max_batch")
  if mb:
    lines.append(f"largest fitting global batch: {mb['max_global_batch']} "
                 f"({'proved: the next step fails' if mb['proved_largest'] else 'not proved'}; "
                 f"tried {mb['tried']})")
  return "\n".join(lines)


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; keep accelerators free
  from qaff_jax import aot

  try:
    target = aot.Target.from_topology(_TOPOLOGY.value)
  except ValueError as err:
    cli_util.usage_error(str(err))
  config = _CONFIG.value
  result = {"config": config_flags.get_config_filename(flags.FLAGS["config"]), "target": target.describe()}
  if _WHAT.value in ("train", "both"):
    result["train"] = aot.compile_train(config, target)
    if _MAX_BATCH.value:
      result["max_batch"] = aot.max_batch(config, target, max_compiles=_MAX_COMPILES.value,
                                          first=result["train"])
  if _WHAT.value in ("extract", "both"):
    result["extract"] = aot.compile_extract(config, target)
  print(format_report(result))
  text = json.dumps(result)
  print(text)
  if _JSON.value:
    tmp = _JSON.value + ".tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, _JSON.value)
  ok = all(r.get("fits", True) for r in (result.get("train"), result.get("extract")) if r)
  ok = ok and (result.get("train") or {}).get("class_arrays_sharded", True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  cli_util.run(main, example="python -m qaff_jax.compile --config configs/gldv2.py "
               "--topology v5e-16")
