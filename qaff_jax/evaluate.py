r"""Evaluate retrieval on Revisited Oxford/Paris (+R1M): from a checkpoint,
from precomputed descriptors, or from rankings.

python -m qaff_jax.evaluate --workdir runs/r101 --data_dir /data/revisitop \
    --datasets roxford5k,rparis6k [--r1m /data/revisitop1m] [--search exact|scann] \
    [--rerank none|superglobal|aqe|dba]
python -m qaff_jax.evaluate --query_features Q.npy --db_features X.npy \
    --gnd gnd_roxford5k.pkl --rerank superglobal --json
python -m qaff_jax.evaluate --query_features Q.npy --db_features X.npy \
    --gnd gnd_roxford5k.pkl --search scann --target_recall 0.95 --scann_dir index/
python -m qaff_jax.evaluate --ranks R.npy --gnd gnd_roxford5k.pkl --json
python -m qaff_jax.evaluate --gldv2_solution retrieval_solution_v2.1.csv \
    --query_features test.npy --query_ids test_ids.txt --db_features index.npy --db_ids index_ids.txt
python -m qaff_jax.evaluate --workdir runs/r101 --data_dir /data/revisitop \
    --config.eval.max_side=512 --config.eval.scales=1.0

Without `--config FILE`, `--config.a.b=v` sets single fields of the run's
saved config.json (in the other modes: of the default config); with it, the
file replaces the saved config and `--config.a.b=v` sets the file's fields.
Exit codes: 0 done, 1 a bad input file, 2 a usage mistake (missing or
conflicting flags, a --workdir that is not a finished training run).

Descriptor files hold one row per image in `qimlist` / `imlist` order; a ranks
file has shape (n_db, n_queries), column i ranking the database for query i
(the revisitop convention), and `--ranks_out` writes the same convention.
With --json, stdout carries exactly one JSON object of metrics (fractions in
[0, 1]): flat keys (mAP_E, mP@1_E, ...) for one dataset, nested by dataset
name for several.
"""

import json
import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from qaff_jax import cli_util

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file replacing the run's saved config.json. Without it, "
    "--config.a.b=v sets single fields of the saved config, e.g. --config.eval.max_side=512.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "revisitop root: <root>/<name>/gnd_<name>.pkl, jpg/.")
_DATASETS = flags.DEFINE_string("datasets", None, "Comma list, e.g. roxford5k,rparis6k "
                                "(default: config.eval.datasets).")
_R1M = flags.DEFINE_string("r1m", None, "R1M distractors: a folder of images, or a list "
                           "file of paths relative to --r1m_root.")
_R1M_ROOT = flags.DEFINE_string("r1m_root", None, "Folder the --r1m list is relative to "
                                "(default: the list file's folder).")
_SEARCH = flags.DEFINE_enum("search", None, ["exact", "scann"], "Search backend "
                            "(default: config.eval.search).")
_RERANK = flags.DEFINE_enum("rerank", None, ["none", "superglobal", "aqe", "dba"],
                            "Re-ranking (default: config.eval.rerank).")
_K = flags.DEFINE_integer("k", None, "Ranking length (default: whole database for exact, "
                          "1000 for ScaNN).")
_QUERY_FEATURES = flags.DEFINE_string("query_features", None, "Query descriptors .npy.")
_DB_FEATURES = flags.DEFINE_string("db_features", None, "Database descriptors .npy.")
_RANKS = flags.DEFINE_string("ranks", None, "Rankings .npy, shape (n_db, n_queries).")
_GND = flags.DEFINE_string("gnd", None, "Ground truth gnd_<name>.pkl.")
_RANKS_OUT = flags.DEFINE_string("ranks_out", None, "Write the final ranking (.npy; "
                                 "<name> in the path is replaced by the dataset name).")
_JSON = flags.DEFINE_bool("json", False, "Print metrics as one JSON object on stdout.")
_SKIP_MISSING = flags.DEFINE_bool("skip_missing", False, "Count missing/unreadable images "
                                  "instead of failing.")
_SCANN_DIR = flags.DEFINE_string("scann_dir", None, "Save the ScaNN index here (its size "
                                 "per image is reported).")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", None, "With --search scann: choose the ScaNN build and search settings "
    "(or exact search, if faster) for this recall@k, verified on held-out database rows "
    "(default: config.eval.scann.target_recall; 0 = fixed settings).")
_GLDV2 = flags.DEFINE_string("gldv2_solution", None, "GLDv2 retrieval_solution_v2.1.csv: "
                             "score --query_features/--db_features with mAP@100.")
_QUERY_IDS = flags.DEFINE_string("query_ids", None, "GLDv2: test image ids, one per line.")
_DB_IDS = flags.DEFINE_string("db_ids", None, "GLDv2: index image ids, one per line.")
_OUT = flags.DEFINE_string("out", None, "Report folder (default: <workdir>/eval or ./eval_report).")


def _parse_flags(argv):
  """The flags, and `--config.a.b=v` set aside when no `--config FILE` is given.

  Returns (remaining argv, {"a.b": "v"}): what `main` gets.
  """
  argv, overrides = cli_util.split_config_overrides(argv, "config")
  return cli_util.parse_flags(argv), overrides


def main(args):
  _, overrides = args
  from qaff_jax.evaluation import cli, runner
  config = _CONFIG.value
  request = cli.Request(
      workdir=_WORKDIR.value, step=_STEP.value, data_dir=_DATA_DIR.value,
      datasets=_DATASETS.value, r1m=_R1M.value, r1m_root=_R1M_ROOT.value,
      search=_SEARCH.value, rerank=_RERANK.value, k=_K.value,
      query_features=_QUERY_FEATURES.value, db_features=_DB_FEATURES.value,
      ranks=_RANKS.value, gnd=_GND.value, ranks_out=_RANKS_OUT.value,
      skip_missing=_SKIP_MISSING.value, out=_OUT.value, scann_dir=_SCANN_DIR.value,
      target_recall=_TARGET_RECALL.value,
      gldv2_solution=_GLDV2.value, query_ids=_QUERY_IDS.value, db_ids=_DB_IDS.value,
      config_overrides=overrides)
  try:
    results, info, report_dir = cli.run(request, config)
  except cli_util.UsageError:
    raise  # missing/conflicting flags: one line, exit 2 (cli_util.run)
  except (ValueError, FileNotFoundError) as err:
    # Bad inputs (unreadable or refused files, wrong shapes): the message
    # names the file; a traceback would only bury it (--verbosity=1 logs it).
    logging.debug("evaluation failed", exc_info=True)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value:
    flat = {name: runner.flat_metrics(r) for name, r in results.items()}
    payload = next(iter(flat.values())) if len(flat) == 1 else flat
    sys.stdout.write(json.dumps(payload) + "\n")
  else:
    from qaff_jax.evaluation import report
    if "gldv2" in results:
      print(" ".join(f"{k}={100 * v:.2f}" for k, v in results["gldv2"].items()))
    else:
      print(report.markdown_table(results))
    from qaff_jax.evaluation import fusion_stats
    for name, extra in info.items():
      print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in extra.items() if not isinstance(v, dict)))
      if "fusion" in extra:
        print(fusion_stats.format_fusion_summary(extra["fusion"]))
      if "scann_tuning" in extra:
        from qaff_jax.evaluation import ann
        print(f"{name} search tuning: " + ann.format_report(extra["scann_tuning"]))
  logging.info("report: %s", os.path.abspath(report_dir))


if __name__ == "__main__":
  cli_util.run(main, flags_parser=_parse_flags)
