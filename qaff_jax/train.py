r"""Train a retrieval model.

python -m qaff_jax.train --config configs/demo.py --workdir workdirs/demo
python -m qaff_jax.train --config configs/gldv2.py:backbone=resnet50 --workdir /runs/r50 \
    --config.data.train_files='/data/gldv2/train/train-*' --config.optim.lr=0.005
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from qaff_jax import cli_util

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gldv2.py:backbone=resnet50.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, config.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Checkpoint folder whose backbone weights start the run "
    "(another run's checkpoints/ or a converted PyTorch checkpoint).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of Orbax/Grain/absl internals; warnings still pass."""

  def filter(self, record):
    noisy = ("orbax" in record.pathname or "grain" in record.pathname)
    return record.levelno >= logging.logging.WARNING or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from qaff_jax import parallel, train_lib
  from qaff_jax.data import demo
  from qaff_jax.evaluation import report

  parallel.maybe_initialize_distributed()
  config = _CONFIG.value
  if config.get("demo_root"):
    demo.ensure_demo_data(config.demo_root, demo.spec_for(config.get("demo_layout", "landmarks")))
  if not (config.data.class_allowlist and config.data.relabel):  # else counted from the data
    try:
      train_lib.check_config(config)  # e.g. no --config.data.train_files: one line, exit 2
    except ValueError as err:
      cli_util.usage_error(str(err))
  result = train_lib.train_and_evaluate(config, _WORKDIR.value, init_from=_INIT_FROM.value)
  if "eval" in result:
    print(report.markdown_table(result["eval"]))
    for name, metrics in result["eval"].items():
      if "fusion" in metrics:
        from qaff_jax.evaluation import fusion_stats
        print(f"\nQAFF fusion weights, {name}:\n" + fusion_stats.format_fusion_summary(metrics["fusion"]))
  logging.info("done: %s", {k: v for k, v in result.items() if k != "eval"})


if __name__ == "__main__":
  cli_util.run(main, example="python -m qaff_jax.train --config configs/demo.py "
               "--workdir workdirs/demo")
