r"""Train and evaluate a set of variants on the demo data; write one table.

python -m qaff_jax.compare --set ablations --workdir workdirs/ablations
python -m qaff_jax.compare --set ablations --data mixed --seeds 3
python -m qaff_jax.compare --set baselines --workdir workdirs/baselines

Every variant is `configs/demo.py` (`--data mixed`: `configs/demo.py:mixed`,
scenes + small objects) plus a few overrides, trained by the one trainer and
scored by the same evaluation, so differences come from the method.
`--seeds N` trains each variant with seeds 0..N-1 (initialisation and data
order) and reports mean ± std. `--quick` runs each variant for a few steps
(smoke test); `--only a,b` picks variants. Results: `<workdir>/<set>.md`
and `.json` (every run's numbers, plus the per-variant summary).
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
_DATA = flags.DEFINE_enum("data", "demo", ["demo", "mixed"],
                          "Demo data: landmarks (demo) or scenes + small objects (mixed).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per variant (0..N-1); mean ± std reported.")

# QAFF ablations (by config alone). "qaff" is the method as configured in
# configs/demo.py; "adaptive MLP (gradient only)" is the fusion MLP trained by
# the descriptor loss alone, the QAFF of the first release.
ABLATIONS: dict[str, dict[str, Any]] = {
    "qaff": {"model.head": "qaff"},
    "adaptive MLP (gradient only)": {
        "model.head": "qaff", "model.qaff.fusion": "adaptive", "model.qaff.route_weight": 0.0,
        "model.qaff.entropy_weight": 0.0, "model.qaff.fusion_lr_mult": 1.0,
        "loss.aux_mode": "type_mean", "loss.aux_weight": 0.25},
    "learned static weights": {"model.head": "qaff", "model.qaff.fusion": "static",
                               "model.qaff.route_weight": 0.0},
    "uniform weights": {"model.head": "qaff", "model.qaff.fusion": "uniform"},
    "concatenation": {"model.head": "qaff", "model.qaff.fusion": "concat"},
    "global only (SC-GeM)": {"model.head": "qaff", "model.qaff.fusion": "global"},
    "regional only": {"model.head": "qaff", "model.qaff.fusion": "regional"},
    "scale only": {"model.head": "qaff", "model.qaff.fusion": "scale"},
    "gem": {"model.head": "gem"},
    "qaff, plain GeM global": {"model.head": "qaff", "model.qaff.global_pool": "gem"},
}
# Fixed fusions train no fusion weights: the routing / entropy terms are off
# for them (their weights cannot follow a target), the rest of the recipe
# (auxiliary losses included) is the same.
_FIXED = ("uniform", "concat", "global", "regional", "scale")

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
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: compare reads configs/demo.py from the source tree; run it from a "
        "checkout (pip install -e .), not from an installed wheel")
  return config_lib.load_config_module(path).get_config(arg)


def apply_overrides(config, overrides: dict[str, Any]):
  """The variant's overrides; a fixed fusion also switches the fusion-training terms off."""
  from qaff_jax import config_lib
  overrides = dict(overrides)
  if overrides.get("model.qaff.fusion") in _FIXED:
    overrides.setdefault("model.qaff.route_weight", 0.0)
    overrides.setdefault("model.qaff.entropy_weight", 0.0)
  return config_lib.apply_overrides(config, overrides)


def variant_config(overrides: dict, *, data: str = "demo", quick: bool = False,
                   epochs: float | None = None, seed: int = 0):
  args = [a for a in ("mixed" if data == "mixed" else "", "quick" if quick else "") if a]
  config = apply_overrides(demo_config(",".join(args) or None), overrides)
  if epochs is not None:
    config.num_epochs = epochs
  config.seed = seed
  return config


def run_variant(name: str, overrides: dict, workdir: str, quick: bool,
                epochs: float | None, *, data: str = "demo", seed: int = 0) -> dict:
  from qaff_jax import train_lib
  from qaff_jax.data import demo
  config = variant_config(overrides, data=data, quick=quick, epochs=epochs, seed=seed)
  demo.ensure_demo_data(config.demo_root, demo.spec_for(config.demo_layout))
  slug = "".join(c if c.isalnum() else "_" for c in name).strip("_") + f"_seed{seed}"
  out = train_lib.train_and_evaluate(config, os.path.join(workdir, slug))
  metrics = out["eval"][config.eval.datasets.split(",")[0]]
  row = {"variant": name, "seed": seed, "overrides": overrides,
         **{k: metrics[k] for k in ("mAP_E", "mAP_M", "mAP_H", "descriptor_bytes",
                                    "extract_ms_per_image")}}
  fusion = metrics.get("fusion")
  if fusion is not None and name != "gem":
    row["weight_std"] = fusion.get("max_component_std")
    adaptivity = fusion.get("adaptivity") or {}
    row["region_follow"] = adaptivity.get("region_follow")
    row["region_follow_chance"] = adaptivity.get("region_follow_chance")
    row["global_weight_scene"] = adaptivity.get("global_weight_scene")
    row["global_weight_object"] = adaptivity.get("global_weight_object")
  return row


_COLUMNS = ("mAP_E", "mAP_M", "mAP_H", "region_follow", "weight_std")


def summarise(rows: list[dict]) -> list[dict]:
  """Per variant (in order of first appearance): mean and std over seeds of each number."""
  import numpy as np
  out = {}
  for r in rows:
    out.setdefault(r["variant"], []).append(r)
  summary = []
  for name, runs in out.items():
    entry = {"variant": name, "seeds": [r.get("seed", 0) for r in runs],
             "descriptor_bytes": runs[0]["descriptor_bytes"],
             "extract_ms_per_image": float(np.mean([r["extract_ms_per_image"] for r in runs]))}
    for k in _COLUMNS + ("region_follow_chance", "global_weight_scene",
                         "global_weight_object"):
      vals = [r[k] for r in runs if r.get(k) is not None]
      if vals:
        entry[k] = float(np.mean(vals))
        entry[k + "_std"] = float(np.std(vals))
    summary.append(entry)
  return summary


def _cell(entry: dict, key: str, scale: float, digits: int) -> str:
  if key not in entry:
    return "-"
  text = f"{scale * entry[key]:.{digits}f}"
  if len(entry.get("seeds", [0])) > 1:
    text += f" ± {scale * entry[key + '_std']:.{digits}f}"
  return text


def markdown(rows: list[dict]) -> str:
  """The table: one line per variant, mean ± std over its seeds (std when > 1 seed)."""
  summary = summarise(rows)
  lines = ["| variant | seeds | mAP E | mAP M | mAP H | region-follow (chance) | weight std "
           "| bytes/image | extract ms/image |",
           "|---|---|---|---|---|---|---|---|---|"]
  for e in summary:
    follow = _cell(e, "region_follow", 1.0, 2)
    if "region_follow_chance" in e:
      follow += f" ({e['region_follow_chance']:.2f})"
    lines.append(f"| {e['variant']} | {len(e['seeds'])} | {_cell(e, 'mAP_E', 100, 2)} "
                 f"| {_cell(e, 'mAP_M', 100, 2)} | {_cell(e, 'mAP_H', 100, 2)} | {follow} "
                 f"| {_cell(e, 'weight_std', 1.0, 3)} | {e['descriptor_bytes']} "
                 f"| {e['extract_ms_per_image']:.1f} |")
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
  if _SEEDS.value < 1:
    raise app.UsageError(f"--seeds={_SEEDS.value}: need at least 1")
  workdir = _WORKDIR.value or os.path.join("workdirs", f"{_SET.value}_{_DATA.value}")
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for name, overrides in variants.items():
    for seed in range(_SEEDS.value):
      logging.info("=== %s (seed %d)", name, seed)
      rows.append(run_variant(name, overrides, workdir, _QUICK.value, _EPOCHS.value,
                              data=_DATA.value, seed=seed))
      table = markdown(rows)
      _write_atomic(os.path.join(workdir, f"{_SET.value}.md"), table + "\n")
      _write_atomic(os.path.join(workdir, f"{_SET.value}.json"),
                    json.dumps({"data": _DATA.value, "runs": rows,
                                "summary": summarise(rows)}, indent=1))
  print(markdown(rows))


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


if __name__ == "__main__":
  from qaff_jax import cli_util
  cli_util.run(main)
