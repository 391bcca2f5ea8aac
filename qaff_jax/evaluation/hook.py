"""Evaluation of a train state during and after training.

The same evaluation as `python -m qaff_jax.evaluate --workdir RUN`
(`runner.evaluate_network`: cached multi-scale extraction -> `eval.search`
-> `eval.rerank` -> revisited E/M/H mAP and mP@k), on the state in memory; the
report goes to `<workdir>/eval/<step, settings>/` (and `eval/LATEST`), the
headline numbers to `metrics.jsonl` and TensorBoard as `eval/<set>/<metric>`.
"""

from __future__ import annotations

from qaff_jax.evaluation import runner

HEADLINE = ("mAP_E", "mAP_M", "mAP_H", "mP@10_E", "mP@10_M", "mP@10_H")


def evaluate_state(config, graphdef, state, mesh, workdir: str, *, writer=None,
                   step: int | None = None) -> dict:
  """Evaluates the network in `state` on every dataset in `config.eval.datasets`.

  Returns {dataset: metrics plus `extract_ms_per_image`, `descriptor_bytes`
  and, for QAFF, `fusion`}; `writer` (a `MetricWriter`) gets the headline
  numbers at the state's step (`step` for a state restored without its step,
  as `runner.load_state` gives).
  """
  from qaff_jax import state as state_lib  # noqa: PLC0415
  step = int(state.step) if step is None else int(step)
  net = state_lib.merge_model(graphdef, state, train=False)
  kwargs = runner.search_kwargs(config)
  views = {}
  results, info = runner.evaluate_network(
      config, net, mesh, step=step, workdir=workdir, data_root=config.eval.data_root,
      datasets=runner.dataset_names(config.eval.datasets), kwargs=kwargs,
      views=views)
  settings = runner.ExtractSettings.from_config(config.eval)
  runner.write_run_report(results, info, workdir, runner.report_name(step, settings, kwargs),
                          extra={"step": step}, views=views, config=config)
  if writer is not None:
    writer.write(step, {f"eval/{name}/{k}": r[k] for name, r in results.items()
                        for k in HEADLINE if k in r})
  out = {}
  for name, r in results.items():
    out[name] = {**r, **{k: info[name][k] for k in ("extract_ms_per_image",
                                                    "descriptor_bytes", "fusion")
                         if k in info[name]}}
  return out
