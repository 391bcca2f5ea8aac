r"""From verified data to a published number: data checks -> training -> evaluation -> report.

python -m qaff_jax.reproduce --recipe gldv2_r101_qaff --data /data [--r1m] \
    [--records /data/gldv2/records] [--workdir runs/gldv2_r101_qaff] [--config.a.b=v]
python -m qaff_jax.reproduce --recipe demo            # the same pipeline on demo data (<1 min)

Recipes: gldv2_r101_<method>, method one of configs/baselines.py's METHODS (gem, delg,
dolg, cvnet, superglobal, spca, madacos, qaff): that file's recipe with ResNet-101 on
GLDv2-clean, evaluated on ROxf/RPar (+R1M with --r1m). `demo` runs every step on a
small built-in demo dataset (configs/demo.py:quick sized).

Steps:
1. Data: `<data>/manifest.json` (written by `python -m qaff_jax.data.download`) must say
   gldv2-clean, roxford5k, rparis6k (and revisitop1m with --r1m) are complete and
   verified, and `--records` must hold a finished `python -m qaff_jax.data.build_gldv2`
   build (its build_report.json). Anything missing stops here, with the command that
   fetches or builds it (exit 1).
2. Training: `train_lib.train_and_evaluate` with the recipe's config (resumes from
   --workdir; a finished run goes straight to evaluation).
3. Evaluation: ROxf/RPar by the trainer's end evaluation; +R1M through the evaluation
   CLI's library (`evaluation.cli.run`). Reports also land in <workdir>/eval/.
4. Report: <workdir>/reproduce/report.{md,json}: the measured mAP (M/H) beside the
   paper's number (PUBLISHED, with paper and table, and whether it was verified), and a
   protocol fingerprint: sha256 of each gnd file, query cropping, extraction scales,
   max side, scale reduction, search and re-ranking settings, image counts. Two numbers
   are comparable only when their fingerprints match; a paper's protocol is the
   standard revisitop one (cropped queries, Medium/Hard), its extraction settings those
   in configs/baselines.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from qaff_jax import cli_util

log = logging.getLogger(__name__)

METHODS = ("gem", "delg", "dolg", "cvnet", "superglobal", "spca", "madacos", "qaff")
RECIPES = tuple(f"gldv2_r101_{m}" for m in METHODS) + ("demo",)
REPORT_DIR = "reproduce"
PROTOCOLS = ("M", "H")

# ---------------------------------------------------------------------------
# Published numbers: mAP (%) with ResNet-101 trained on GLDv2-clean, global descriptor
# only unless noted. `verified` says whether the number was read in the cited source
# when this table was written; unverified entries are None or marked so.

PUBLISHED: dict[str, dict[str, Any]] = {
    "dolg": {
        "paper": "Yang et al., DOLG: Single-Stage Image Retrieval with Deep Orthogonal "
                 "Fusion of Local and Global Features, ICCV 2021",
        "table": "feymanpriv/DOLG README.md @63b117d7, 'modified results (should follow "
                 "cropping results)' table, row 'DOLG-R101(with query cropping)'; R101, "
                 "GLDv2-clean, single-stage global descriptor, cropped queries. The paper's "
                 "Table 1 (imgs/result_overview.png, same commit) row 'R101-DOLG "
                 "(GLDv2-clean)' reads M 81.50/77.43/91.02/83.29, H 61.10/54.81/80.30/66.69 "
                 "(ROxf/+1M/RPar/+1M); the README's 'modified results' replace them, and a "
                 "later paper (ViTGaL, Table 1) marks them 'queries are not cropped', so "
                 "they are not used",
        "verified": True,
        "numbers": {"roxford5k": {"M": 82.37, "H": 64.93},
                    "rparis6k": {"M": 90.97, "H": 81.71},
                    "roxford5k+1m": {"M": 73.63, "H": 51.57},
                    "rparis6k+1m": {"M": 80.44, "H": 62.95}},
    },
    "delg": {
        "paper": "Cao et al., Unifying Deep Local and Global Features for Image Search, "
                 "ECCV 2020",
        "table": "as quoted in the DOLG paper's Table 1 (feymanpriv/DOLG "
                 "imgs/result_overview.png @63b117d7), group '(B) Global features', row "
                 "'R101-DELG(GLDv2-clean)[9]': global descriptor only (the re-ranked row "
                 "of group (C) is not used), R101, GLDv2-clean, cropped queries (DELG "
                 "protocol, tensorflow/models delf/python/delg/DELG_INSTRUCTIONS.md). "
                 "The DELG paper's own table was not read: the stored DELG_INSTRUCTIONS.md "
                 "gives only the GLDv1 R50 model's ROxf numbers",
        "verified": True,
        "numbers": {"roxford5k": {"M": 76.30, "H": 55.60},
                    "rparis6k": {"M": 86.60, "H": 72.40},
                    "roxford5k+1m": {"M": 63.70, "H": 37.50},
                    "rparis6k+1m": {"M": 70.60, "H": 46.90}},
    },
    "superglobal": {
        "paper": "Shao et al., Global Features are All You Need for Image Retrieval and "
                 "Reranking, ICCV 2023",
        "table": "NOT VERIFIED in the paper: Hard only, from paperswithcode's 'Results from "
                 "the Paper' (ROxford (Hard) 80.2, RParis (Hard) 86.7), which names neither "
                 "the backbone nor whether re-ranking is on; taken as SuperGlobal with "
                 "re-ranking, matching configs/baselines.py (eval.rerank='superglobal'). "
                 "ShihaoShao-GH/SuperGlobal README.md @8694696 (and its history) has no "
                 "numbers; the paper's table was not readable here. Medium and +1M unknown",
        "verified": False,
        "numbers": {"roxford5k": {"M": None, "H": 80.2},
                    "rparis6k": {"M": None, "H": 86.7}},
    },
    "cvnet": {
        "paper": "Lee et al., Correlation Verification for Image Retrieval, CVPR 2022",
        "table": "wanted: CVNet-Global R101 (no re-ranking) row; not found: "
                 "sungonce/CVNet README.md @5f5bf24 (and its history) and assets/ carry no "
                 "numbers, and no stored copy of the paper's table could be read",
        "verified": False, "numbers": {},
    },
    "spca": {
        "paper": "Zhang et al., Learning Spatial-context-aware Global Visual Feature "
                 "Representation for Instance Image Retrieval, ICCV 2023",
        "table": "wanted: R101 GLDv2-clean main comparison row; not found: Zy-Zhang/SpCa "
                 "README.md @966db3f (and its history) is a title line only, and no stored "
                 "copy of the paper's table could be read",
        "verified": False, "numbers": {},
    },
    "madacos": {
        "paper": "MadaCos loss as used by CFCD (Zhu et al., Coarse-to-Fine: Learning Compact "
                 "Discriminative Representation for Single-Stage Image Retrieval, ICCV 2023; "
                 "bassyess/CFCD)",
        "table": "wanted: R101 stage-1 (MadaCos, global only) row; not found: bassyess/CFCD "
                 "README.md @5db8545 (and its history) carries no numbers, and no stored "
                 "copy of the paper's table could be read",
        "verified": False, "numbers": {},
    },
    "gem": {
        "paper": "Weyand et al., Google Landmarks Dataset v2, CVPR 2020: the RN101-ArcFace "
                 "baseline trained on GLDv2-clean",
        "table": "tensorflow/models research/delf/delf/python/datasets/"
                 "google_landmarks_dataset/README.md @f16a7b5b, 'Perform retrieval', the "
                 "metrics.txt it says a reproduction 'should look approximately like' "
                 "(ROxf only; RPar and +1M not given there). R101, GLDv2-clean, global "
                 "descriptor, cropped queries. That text does not name the pooling (GeM "
                 "not confirmed) and its ArcFace settings may differ from this recipe's; no "
                 "GeM+ArcFace GLDv2-clean row was found in the SpCa/DOLG sources",
        "verified": True,
        "numbers": {"roxford5k": {"M": 76.23, "H": 55.54}},
    },
    "qaff": {"paper": "this project (no published number yet)", "table": "-",
             "verified": False, "numbers": {}},
}


class DataNotReady(RuntimeError):
  """A needed dataset is not present and verified; the message says how to get it."""


# ---------------------------------------------------------------------------
# Recipes.


@dataclasses.dataclass
class Plan:
  recipe: str
  method: str
  config: Any
  data_root: str          # the revisitop root the evaluation reads
  datasets: list[str]
  r1m: tuple[str, str] | None   # (list file, folder) of the R1M distractors
  checks: list[dict]


def _configs_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(os.path.dirname(here), "configs")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: reproduce reads configs/ from the source tree; run it "
                            "from a checkout (pip install -e .)")
  return path


def _load_config(name: str, arg: str | None):
  from qaff_jax import config_lib  # noqa: PLC0415
  module = config_lib.load_config_module(os.path.join(_configs_dir(), name))
  return module.get_config(arg)


def demo_spec():
  """The demo recipe's data: small enough that the whole pipeline runs in under a minute."""
  from qaff_jax.data import demo  # noqa: PLC0415
  return demo.DemoSpec(num_train_classes=6, views_per_class=4, num_test_landmarks=3,
                       db_views_per_landmark=4, queries_per_landmark=1, num_distractors=4,
                       train_size=64, num_shards=2, seed=0)


def _sha256_of(path: str) -> str:
  from qaff_jax.data import download  # noqa: PLC0415
  return download.file_digest(path)


def _check_demo(root: str) -> tuple[dict, list[dict]]:
  from qaff_jax.data import demo, download, pipeline  # noqa: PLC0415
  spec = demo_spec()
  paths = demo.ensure_demo_data(root, spec)
  checks = [{"what": "demo data marker", "ok": os.path.isfile(paths["marker"]),
             "detail": paths["marker"]}]
  counts = download.verify_gnd(paths["gnd_path"])   # the download's gnd verification
  checks.append({"what": f"gnd_{paths['test_name']}.pkl (restricted unpickler)", "ok": True,
                 "detail": counts})
  shards = pipeline.resolve_files(paths["train_files"])
  checks.append({"what": "training records", "ok": len(shards) == spec.num_shards,
                 "detail": f"{len(shards)} shard(s) in {paths['train_files']}"})
  return paths, checks


def check_data(data: str, records_dir: str, *, r1m: bool) -> tuple[dict, list[dict]]:
  """The manifest and build checks of a real recipe; raises DataNotReady listing every gap.

  Returns (the build report, the checks made).
  """
  from qaff_jax.data import build_gldv2, download  # noqa: PLC0415
  problems, checks = [], []
  try:
    manifest = download.load_manifest(data)
  except ValueError as e:
    raise DataNotReady(str(e)) from None
  needed = ["gldv2-clean", "roxford5k", "rparis6k"] + (["revisitop1m"] if r1m else [])
  for name in needed:
    st = (manifest or {"datasets": {}})["datasets"].get(name)
    ok = bool(st and st.get("complete"))
    checks.append({"what": f"manifest: {name}", "ok": ok,
                   "detail": st and {k: st.get(k) for k in ("verified", "files",
                                                           "images_missing", "checked_at")}})
    if not ok:
      why = "not in the manifest" if not st else (
          f"{st.get('verified')}/{st.get('files')} files verified"
          + (f", {st.get('images_missing')} images missing" if st.get("images_missing")
             else ""))
      problems.append(f"{name}: {why}; run python -m qaff_jax.data.download {name} "
                      f"--out {data}")
  report_path = os.path.join(records_dir, build_gldv2.REPORT)
  report = None
  if not os.path.isfile(report_path):
    problems.append(f"no finished build in {records_dir} ({build_gldv2.REPORT} absent); run "
                    f"python -m qaff_jax.data.build_gldv2 --images {data}/gldv2/train --csv "
                    f"{data}/gldv2/metadata/train_clean.csv --out {records_dir}")
  else:
    with open(report_path, encoding="utf-8") as f:
      report = json.load(f)
    bad = report.get("num_missing_images", 0) + report.get("num_bad_images", 0)
    checks.append({"what": "records build", "ok": True,
                   "detail": {k: report.get(k) for k in ("records", "classes", "format",
                                                         "num_shards", "plan_sha256")}})
    if bad:
      checks.append({"what": "records build: images left out", "ok": False,
                     "detail": f"{bad} (see {report_path}); the numbers are not on the full "
                               "GLDv2-clean"})
  if problems:
    raise DataNotReady("data not ready:\n  " + "\n  ".join(problems))
  return report, checks


def make_plan(recipe: str, *, data: str, records_dir: str | None, r1m: bool,
              workdir: str, overrides: dict[str, str] | None = None) -> Plan:
  """Checks the data and builds the recipe's config."""
  if recipe not in RECIPES:
    raise cli_util.UsageError(f"--recipe {recipe}: choose one of {list(RECIPES)}")
  if recipe == "demo":
    root = data or os.path.join(workdir, "demo_data")
    paths, checks = _check_demo(root)
    spec = demo_spec()
    c = _load_config("demo.py", "quick")
    c.demo_root = paths["root"]
    c.data.train_files = paths["train_files"]
    c.data.num_classes = spec.num_train_classes
    c.data.num_train_images = spec.num_train_classes * spec.views_per_class
    c.data.image_size = 64
    c.eval.data_root = paths["test_root"]
    c.eval.datasets = paths["test_name"]
    c.eval.scales = (1.0,)
    c.eval.max_side = 96
    c.eval.bucket = 96           # one shape bucket: extraction is compile-bound on CPU
    c.eval.at_end = True
    method, r1m_files = "qaff", None
    datasets = [paths["test_name"]]
    data_root = paths["test_root"]
  else:
    method = recipe.removeprefix("gldv2_r101_")
    records_dir = records_dir or os.path.join(data, "gldv2", "records")
    report, checks = check_data(data, records_dir, r1m=r1m)
    c = _load_config("baselines.py", f"method={method},backbone=resnet101")
    c.data.train_files = records_dir
    c.data.num_train_images = int(report["records"]["train"])
    c.data.num_classes = int(report["classes"])
    data_root = os.path.join(data, "revisitop")
    c.eval.data_root = data_root
    c.eval.datasets = "roxford5k,rparis6k"
    c.eval.at_end = True
    datasets = ["roxford5k", "rparis6k"]
    base = os.path.join(data_root, "revisitop1m")
    r1m_files = (os.path.join(base, "revisitop1m.txt"), os.path.join(base, "jpg")) if r1m \
        else None
  if overrides:
    cli_util.apply_config_overrides(c, overrides)
  return Plan(recipe, method, c, data_root, datasets, r1m_files, checks)


# ---------------------------------------------------------------------------
# Fingerprint and report.


def fingerprint(plan: Plan, *, r1m_count: int = 0) -> dict:
  """What decides whether two numbers are comparable; `sha256` hashes all of it."""
  from qaff_jax.data import revisited  # noqa: PLC0415
  from qaff_jax.evaluation import runner  # noqa: PLC0415
  ev = plan.config.eval
  sets = {}
  for name in plan.datasets:
    gnd_path = os.path.join(plan.data_root, name, f"gnd_{name}.pkl")
    gnd = revisited.load_gnd(gnd_path)
    sets[name] = {"gnd_sha256": _sha256_of(gnd_path), "db_images": len(gnd["imlist"]),
                  "queries": len(gnd["qimlist"])}
  kwargs = runner.search_kwargs(plan.config)
  kwargs.pop("scann_dir", None)
  fp = {
      "datasets": sets,
      "query_crop": True,        # runner.dataset_inputs crops every query to its bbx
      "protocol": "revisitop Easy/Medium/Hard mAP (junk ignored)",
      "extraction": {"scales": [round(float(s), 6) for s in ev.scales],
                     "max_side": int(ev.max_side), "scale_reduce": str(ev.scale_reduce)},
      "search": {"backend": kwargs["backend"], "k": kwargs["k"],
                 "scann": kwargs["scann_params"] if kwargs["backend"] == "scann" else None,
                 "target_recall": kwargs["target_recall"] if kwargs["backend"] == "scann"
                 else None},
      "rerank": {"method": kwargs["rerank"], "params": kwargs["rerank_params"]},
      "r1m_distractors": int(r1m_count),
  }
  if plan.r1m is not None and os.path.isfile(plan.r1m[0]):
    fp["r1m_list_sha256"] = _sha256_of(plan.r1m[0])
  fp["sha256"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  return fp


def _rows(plan: Plan, measured: dict[str, dict]) -> list[dict]:
  pub = PUBLISHED.get(plan.method, {}) if plan.recipe != "demo" else {}
  numbers = pub.get("numbers", {})
  rows = []
  for key, metrics in measured.items():
    for p in PROTOCOLS:
      value = metrics.get(f"mAP_{p}")
      paper = (numbers.get(key) or {}).get(p)
      rows.append({"dataset": key, "protocol": p,
                   "measured": None if value is None else round(100 * float(value), 2),
                   "paper": paper,
                   "delta": None if value is None or paper is None
                   else round(100 * float(value) - paper, 2),
                   "paper_source": (f"{pub['paper']}; {pub['table']}" if pub else
                                    "demo data: no published number"),
                   "paper_verified": bool(pub.get("verified")) if paper is not None else None})
  return rows


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.2f}"


def write_report(plan: Plan, workdir: str, measured: dict[str, dict], fp: dict,
                 extra: dict) -> tuple[str, str]:
  """`<workdir>/reproduce/report.{json,md}`; returns both paths."""
  out = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  rows = _rows(plan, measured)
  body = {"recipe": plan.recipe, "method": plan.method, "rows": rows, "fingerprint": fp,
          "checks": plan.checks, "measured": measured, **extra}
  json_path = os.path.join(out, "report.json")
  tmp = json_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(body, f, indent=1, default=float)
  os.replace(tmp, json_path)
  lines = [f"# Reproduction: {plan.recipe}", "",
           f"method `{plan.method}`, workdir `{os.path.abspath(workdir)}`, step "
           f"{extra.get('step')}, {extra.get('train_images')} training images, "
           f"{extra.get('classes')} classes", "",
           "| dataset | protocol | measured mAP | paper mAP | delta | paper source | verified |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    verified = {True: "yes", False: "NO", None: "-"}[r["paper_verified"]]
    lines.append(f"| {r['dataset']} | {r['protocol']} | {_fmt(r['measured'])} | "
                 f"{_fmt(r['paper'])} | {_fmt(r['delta'])} | {r['paper_source']} | "
                 f"{verified} |")
  lines += ["", "## Protocol fingerprint", "",
            f"`{fp['sha256']}`: numbers are comparable only when this matches.", "",
            "```json", json.dumps({k: v for k, v in fp.items() if k != "sha256"}, indent=1,
                                  sort_keys=True), "```", "",
            "Paper numbers follow the paper's own protocol (standard revisitop: cropped "
            "queries, Medium/Hard); its extraction settings are the ones "
            "configs/baselines.py records for the method.", "", "## Data checks", ""]
  for c in plan.checks:
    lines.append(f"- {'ok' if c['ok'] else 'PROBLEM'}: {c['what']}: {c['detail']}")
  md_path = os.path.join(out, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return md_path, json_path


# ---------------------------------------------------------------------------
# The pipeline.


def reproduce(recipe: str, *, data: str | None = None, records_dir: str | None = None,
              workdir: str | None = None, r1m: bool = False,
              overrides: dict[str, str] | None = None) -> dict:
  """Runs the four steps; returns the report body (also written under the workdir)."""
  workdir = workdir or os.path.join("workdirs", f"reproduce_{recipe}")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  # --- 1. Data.
  plan = make_plan(recipe, data=data or ("" if recipe == "demo" else "data"),
                   records_dir=records_dir, r1m=r1m, workdir=workdir, overrides=overrides)
  # --- 2 + 3. Training, then the trainer's end evaluation (ROxf/RPar).
  from qaff_jax import train_lib  # noqa: PLC0415
  out = train_lib.train_and_evaluate(plan.config, workdir)
  if "preempted_at" in out:
    raise RuntimeError(f"training stopped at step {out['preempted_at']} (preempted); "
                       "rerun the same command to resume")
  measured = {name: _headline(m) for name, m in out.get("eval", {}).items()}
  r1m_count = 0
  if plan.r1m is not None:
    from qaff_jax.evaluation import cli as eval_cli  # noqa: PLC0415
    results, info, _ = eval_cli.run(eval_cli.Request(
        workdir=workdir, data_dir=plan.data_root, datasets=",".join(plan.datasets),
        r1m=plan.r1m[0], r1m_root=plan.r1m[1]), plan.config)
    for name, m in results.items():
      measured[f"{name}+1m"] = _headline(m)
      r1m_count = info[name].get("r1m", 0)
  # --- 4. Report.
  fp = fingerprint(plan, r1m_count=r1m_count)
  extra = {"step": _latest_step(workdir), "train_images": plan.config.data.num_train_images,
           "classes": plan.config.data.num_classes, "seconds": time.perf_counter() - t0,
           "config_method": plan.method}
  md, js = write_report(plan, workdir, measured, fp, extra)
  with open(js, encoding="utf-8") as f:
    body = json.load(f)
  body["report_md"], body["report_json"] = md, js
  return body


def _headline(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items()
          if k.startswith(("mAP_", "mP@")) and isinstance(v, (int, float))}


def _latest_step(workdir: str) -> int | None:
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps) if steps else None


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else ["reproduce", *argv])
  argv, overrides = cli_util.split_config_overrides(argv, "config")
  parser = cli_util.ArgumentParser(
      prog="python -m qaff_jax.reproduce",
      description="Data checks -> training -> evaluation -> a report beside the paper's "
                  "numbers.")
  parser.add_argument("--recipe", required=True, choices=RECIPES, metavar="RECIPE",
                      help=f"one of: {', '.join(RECIPES)}")
  parser.add_argument("--data", default=None,
                      help="download root with manifest.json (default: data; demo: "
                      "<workdir>/demo_data)")
  parser.add_argument("--records", default=None,
                      help="build_gldv2 output (default: <data>/gldv2/records)")
  parser.add_argument("--workdir", default=None,
                      help="run folder (default: workdirs/reproduce_<recipe>)")
  parser.add_argument("--r1m", action="store_true",
                      help="also evaluate with the revisitop1m distractors")
  args = parser.parse_args(argv[1:])
  cli_util.quiet_backend_probe()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    body = reproduce(args.recipe, data=args.data, records_dir=args.records,
                     workdir=args.workdir, r1m=args.r1m, overrides=overrides)
  except cli_util.UsageError as e:
    cli_util.usage_error(str(e))
  except (DataNotReady, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with open(body["report_md"], encoding="utf-8") as f:
    print(f.read())
  print(f"report: {body['report_md']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
