"""Training metrics as JSON lines and TensorBoard events, written by process 0 only."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:
  """`write(step, {name: scalar})` appends to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # optional at import time
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **{
        k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def write_hparams(self, config, metrics: list[str]) -> None:
    """The run's config as TensorBoard hparams (the HPARAMS tab), with the
    metric names it will log; a no-op without TensorBoard."""
    if self._tb is None:
      return
    from tensorboardX.summary import hparams  # noqa: PLC0415
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in _flatten(config.to_dict() if hasattr(config, "to_dict") else config)}
    experiment, start, end = hparams(flat, {m: 0.0 for m in metrics})
    writer = self._tb._get_file_writer()  # noqa: SLF001 (SummaryWriter.add_hparams' way)
    for summary in (experiment, start, end):
      writer.add_summary(summary)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _flatten(tree: dict, prefix: str = ""):
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from _flatten(v, key + ".")
    else:
      yield key, ("" if v is None else v)


def read_metrics(workdir: str) -> list[dict]:
  """All rows of a run's `metrics.jsonl` (later rows win for a repeated step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
