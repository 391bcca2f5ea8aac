r"""Train and evaluate a set of variants on the demo data; write one table.

python -m qaff_jax.compare --set ablations --workdir workdirs/ablations
python -m qaff_jax.compare --set baselines --workdir workdirs/baselines

Every variant is `configs/demo.py` plus a few overrides, trained by the one
trainer and scored by the same evaluation, so differences come from the
method. `--quick` runs each variant for a few steps (smoke test);
`--only a,b` picks variants. Results: `<workdir>/<set>.md` and `.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging

_SET = flags.DEFINE_string("set", "ablations", "Variant set: ablations | baselines.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the runs and the table.")
_ONLY = flags.DEFINE_string("only", None, "Comma list of variant names to run.")
_QUICK = flags.DEFINE_bool("quick", False, "A few steps per variant (smoke test).")
_EPOCHS = flags.DEFINE_float("epochs", None, "Override the demo's epochs.")

# QAFF ablations (issue: "ablations by config alone").
ABLATIONS: dict[str, dict[str, Any]] = {
    "qaff (adaptive)": {"model.head": "qaff"},
    "gem": {"model.head": "gem"},
    "uniform weights": {"model.head": "qaff", "model.qaff.fusion": "uniform"},
    "learned static weights": {"model.head": "qaff", "model.qaff.fusion": "static"},
    "concatenation": {"model.head": "qaff", "model.qaff.fusion": "concat"},
    "global only (SC-GeM)": {"model.head": "qaff", "model.qaff.fusion": "global"},
    "regional only": {"model.head": "qaff", "model.qaff.fusion": "regional"},
    "scale only": {"model.head": "qaff", "model.qaff.fusion": "scale"},
    "qaff, plain GeM global": {"model.head": "qaff", "model.qaff.global_pool": "gem"},
}

# Published baselines, each with its own head and loss, on the same demo recipe
# (backbone, data, schedule and descriptor size are the demo's for all of them).
BASELINES: dict[str, dict[str, Any]] = {
    "GeM (ArcFace)": {"model.head": "gem"},
    "DELG global (ArcFace m=0.1, learned scale)": {
        "model.head": "delg", "loss.margin": 0.1, "loss.learn_scale": True,
        "loss.scale": 11.31},  # sqrt(D) for the demo's D = 128
    "DOLG": {"model.head": "dolg"},
    "CVNet global (CurricularFace)": {"model.head": "cvnet", "loss.name": "curricularface"},
    "SuperGlobal pooling (GeM+, Regional-GeM, Scale-GeM max)": {
        "model.head": "superglobal", "eval.scale_reduce": "max"},
    "SpCa (SC-GeM)": {"model.head": "spca"},
    "MadaCos (GeM)": {"model.head": "gem", "loss.name": "madacos"},
    "QAFF": {"model.head": "qaff"},
}

SETS = {"ablations": ABLATIONS, "baselines": BASELINES}


def demo_config(arg: str | None = None):
  from qaff_jax import config_lib
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(os.path.dirname(here), "configs", "demo.py")
  return config_lib.load_config_module(path).get_config(arg)


def apply_overrides(config, overrides: dict[str, Any]):
  from qaff_jax import config_lib
  return config_lib.apply_overrides(config, overrides)


def run_variant(name: str, overrides: dict, workdir: str, quick: bool,
                epochs: float | None) -> dict:
  from qaff_jax import train_lib
  from qaff_jax.data import demo
  config = apply_overrides(demo_config("quick" if quick else None), overrides)
  if epochs is not None:
    config.num_epochs = epochs
  demo.ensure_demo_data(config.demo_root)
  slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
  out = train_lib.train_and_evaluate(config, os.path.join(workdir, slug))
  metrics = out["eval"]["demo"]
  return {"variant": name, "overrides": overrides,
          **{k: metrics[k] for k in ("mAP_E", "mAP_M", "mAP_H", "descriptor_bytes",
                                     "extract_ms_per_image")}}


def markdown(rows: list[dict]) -> str:
  lines = ["| variant | mAP E | mAP M | mAP H | bytes/image | extract ms/image |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {100 * r['mAP_E']:.2f} | {100 * r['mAP_M']:.2f} | "
                 f"{100 * r['mAP_H']:.2f} | {r['descriptor_bytes']} | "
                 f"{r['extract_ms_per_image']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _SET.value not in SETS:
    raise app.UsageError(f"--set={_SET.value!r}; choose one of {sorted(SETS)}")
  variants = SETS[_SET.value]
  if _ONLY.value:
    names = [n.strip() for n in _ONLY.value.split(",")]
    unknown = [n for n in names if n not in variants]
    if unknown:
      raise app.UsageError(f"unknown variants {unknown}; known: {list(variants)}")
    variants = {n: variants[n] for n in names}
  workdir = _WORKDIR.value or os.path.join("workdirs", _SET.value)
  rows = []
  for name, overrides in variants.items():
    logging.info("=== %s", name)
    rows.append(run_variant(name, overrides, workdir, _QUICK.value, _EPOCHS.value))
    table = markdown(rows)
    with open(os.path.join(workdir, f"{_SET.value}.md"), "w", encoding="utf-8") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, f"{_SET.value}.json"), "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
