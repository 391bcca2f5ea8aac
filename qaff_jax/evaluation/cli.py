"""What `python -m qaff_jax.evaluate` does, as an importable function.

Three entry modes, chosen by which inputs are given:
  ranks       --ranks R.npy --gnd G.pkl                 -> metrics
  features    --query_features Q.npy --db_features X.npy --gnd G.pkl
                                                        -> search -> re-rank -> metrics
  checkpoint  --workdir RUN --data_dir ROOT --datasets a,b [--r1m ...]
                                                        -> extract -> search -> re-rank -> metrics

Usage mistakes (no mode, two modes, a missing companion flag, a --workdir
that is not a finished training run) raise `UsageError` (a ValueError) before
anything slow starts; bad input files raise ValueError / FileNotFoundError.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from qaff_jax import cli_util
from qaff_jax.data import revisited
from qaff_jax.evaluation import report
from qaff_jax.evaluation import runner
from qaff_jax.evaluation import search

IMAGE_EXTS = (".jpg", ".jpeg", ".png")

UsageError = cli_util.UsageError


@dataclasses.dataclass
class Request:
  workdir: str | None = None
  step: int | None = None
  data_dir: str | None = None
  datasets: str | None = None
  r1m: str | None = None
  r1m_root: str | None = None
  search: str | None = None
  rerank: str | None = None
  k: int | None = None
  query_features: str | None = None
  db_features: str | None = None
  ranks: str | None = None
  gnd: str | None = None
  ranks_out: str | None = None
  skip_missing: bool = False
  out: str | None = None
  scann_dir: str | None = None
  target_recall: float | None = None  # ScaNN tuned for this recall@k (config: eval.scann)
  gldv2_solution: str | None = None   # retrieval_solution_v2.1.csv
  query_ids: str | None = None        # text files, one image id per line,
  db_ids: str | None = None           # in the row order of the feature files
  # Dotted config fields as command-line text ({"eval.max_side": "512"}), set
  # on top of the config (default: the run's saved one, or the defaults).
  config_overrides: dict[str, str] | None = None


def _name_of_gnd(path: str) -> str:
  base = os.path.splitext(os.path.basename(path))[0]
  return base[4:] if base.startswith("gnd_") else base


def _load_npy(path: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file {path}")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:
    raise ValueError(f"{what}: cannot read {path} as .npy ({e})") from None


def _check_features(q: np.ndarray, db: np.ndarray, gnd: dict, gnd_path: str, req: Request):
  nq, n_db = len(gnd["qimlist"]), len(gnd["imlist"])
  if q.ndim != 2 or q.shape[0] != nq:
    raise ValueError(f"--query_features {req.query_features}: shape {q.shape}, want "
                     f"({nq}, D) rows in qimlist order of {gnd_path}")
  if db.ndim != 2 or db.shape[0] != n_db:
    raise ValueError(f"--db_features {req.db_features}: shape {db.shape}, want "
                     f"({n_db}, D) rows in imlist order of {gnd_path}")
  if q.shape[1] != db.shape[1]:
    raise ValueError(f"descriptor sizes differ: queries {q.shape[1]}, database {db.shape[1]}")


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _write_ranks(path: str | None, name: str, indices: np.ndarray, several: bool) -> None:
  if not path:
    return
  if several and "<name>" not in path:
    root, ext = os.path.splitext(path)
    path = f"{root}_{name}{ext or '.npy'}"
  path = path.replace("<name>", name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, search.ranks_from_indices(indices))


def _search_kwargs(req: Request, config) -> dict:
  kwargs = runner.search_kwargs(config, search=req.search, rerank=req.rerank, k=req.k,
                                scann_dir=req.scann_dir)
  if req.target_recall is not None:
    if not 0.0 < req.target_recall <= 1.0:
      raise UsageError(f"--target_recall={req.target_recall}: give a recall in (0, 1]")
    if kwargs["backend"] != "scann":
      raise UsageError("--target_recall tunes ScaNN: add --search scann")
    kwargs["target_recall"] = float(req.target_recall)
  return kwargs


def run(req: Request, config) -> tuple[dict, dict, str]:
  """Returns (results {dataset: metrics incl. per-query APs}, info {dataset: ...}, report dir).

  `config` None: the run's saved config.json (checkpoint mode) or the
  defaults (search / re-ranking settings), plus `req.config_overrides`.
  """
  mode = _mode(req)
  if mode == "--workdir":
    _check_workdir(req.workdir, req.step, need_config=config is None)
  config = _resolve_config(req, config)
  if mode == "--gldv2_solution":
    return _run_gldv2(req, config)
  if mode == "--ranks":
    return _run_ranks(req)
  if mode == "--workdir":
    return _run_checkpoint(req, config)
  return _run_features(req, config)


def _mode(req: Request) -> str:
  """The one entry mode the flags pick; none or several is a `UsageError`."""
  modes = [flag for flag, given in (
      ("--gldv2_solution", req.gldv2_solution),
      ("--ranks", req.ranks),
      ("--query_features/--db_features",
       (req.query_features or req.db_features) and not req.gldv2_solution),
      ("--workdir", req.workdir)) if given]
  if not modes:
    raise UsageError("nothing to evaluate: give --workdir (a training run), or "
                     "--query_features/--db_features with --gnd, or --ranks with --gnd")
  if len(modes) > 1:
    raise UsageError(f"{' and '.join(modes)} pick different modes: give only one of "
                     "--workdir, --query_features/--db_features, --ranks, --gldv2_solution")
  return modes[0]


def _check_workdir(workdir: str, step: int | None, need_config: bool) -> None:
  """A local --workdir must be a training run with a finished checkpoint."""
  if "://" in workdir:
    return  # object stores: the config and checkpoint loaders report
  pass_run = "pass the --workdir of a `python -m qaff_jax.train` run"
  if not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir}: no such folder; {pass_run}")
  if need_config and not os.path.isfile(os.path.join(workdir, "config.json")):
    raise UsageError(f"--workdir {workdir}: not a training run (no config.json); {pass_run}")
  ckpt = os.path.join(workdir, "checkpoints")
  # Orbax names a finished step's folder by the step; unfinished ones get a suffix.
  steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []
  if not steps:
    raise UsageError(f"--workdir {workdir}: no finished checkpoint in checkpoints/; "
                     f"train first, or {pass_run}")
  if step is not None and step not in steps:
    raise UsageError(f"--step {step}: no such checkpoint in {ckpt}; steps there: {steps}")


def _resolve_config(req: Request, config):
  """`config`, else the run's saved one (--workdir) or the defaults; plus the overrides."""
  if config is None:
    if req.workdir:
      from qaff_jax import state as state_lib
      config = state_lib.load_config(req.workdir)
    else:
      from qaff_jax import config_lib  # pylint: disable=import-outside-toplevel
      config = config_lib.base_config()  # search / re-ranking defaults
  if req.config_overrides:
    config = cli_util.apply_config_overrides(config, req.config_overrides)
  return config


def _need_gnd(req: Request) -> tuple[dict, str]:
  if not req.gnd:
    raise UsageError("--gnd <gnd_NAME.pkl> is required with --ranks or --*_features")
  return revisited.load_gnd(req.gnd), _name_of_gnd(req.gnd)


def _finish(results, info, req: Request, default_out: str):
  out = req.out or default_out
  report.write_report(results, out, extra={"info": info})
  return results, info, out


def _run_ranks(req: Request):
  if req.rerank not in (None, "none"):
    raise UsageError("--rerank needs descriptors: use --query_features/--db_features")
  gnd, name = _need_gnd(req)
  ranks = _load_npy(req.ranks, "--ranks")
  nq, n_db = len(gnd["qimlist"]), len(gnd["imlist"])
  if ranks.ndim != 2 or ranks.shape[1] != nq or ranks.shape[0] > n_db:
    raise ValueError(f"--ranks {req.ranks}: shape {ranks.shape}, want (n_db={n_db}, "
                     f"n_queries={nq}) (column i ranks the database for query i)")
  results = {name: runner.metrics.evaluate_revisited(ranks, gnd["gnd"])}
  _write_ranks(req.ranks_out, name, np.ascontiguousarray(ranks.T), False)
  return _finish(results, {name: {"mode": "ranks"}}, req, "eval_report")


def _run_features(req: Request, config):
  if not (req.query_features and req.db_features):
    raise UsageError("give both --query_features and --db_features")
  gnd, name = _need_gnd(req)
  q = _load_npy(req.query_features, "--query_features")
  db = _load_npy(req.db_features, "--db_features")
  _check_features(q, db, gnd, req.gnd, req)
  res = runner.search_and_rerank(_normalize(q), _normalize(db), **_search_kwargs(req, config))
  results = {name: runner.score(res.indices, gnd["gnd"])}
  _write_ranks(req.ranks_out, name, res.indices, False)
  return _finish(results, {name: res.info}, req, "eval_report")


def _read_ids(path: str | None, flag: str, n: int) -> list[str]:
  if not path:
    raise UsageError(f"--{flag} is required with --gldv2_solution")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{flag}: no file {path}")
  with open(path, encoding="utf-8") as f:
    ids = [line.strip() for line in f if line.strip()]
  if len(ids) != n:
    raise ValueError(f"--{flag} {path}: {len(ids)} ids for {n} feature rows")
  return ids


def _run_gldv2(req: Request, config):
  """GLDv2 retrieval: top-100 index images per test image, Kaggle mAP@100."""
  from qaff_jax.evaluation import metrics
  if not (req.query_features and req.db_features):
    raise UsageError("--gldv2_solution needs --query_features and --db_features "
                     "(with --query_ids and --db_ids)")
  solution = metrics.load_gldv2_retrieval_solution(req.gldv2_solution)
  q = _load_npy(req.query_features, "--query_features")
  db = _load_npy(req.db_features, "--db_features")
  q_ids = _read_ids(req.query_ids, "query_ids", q.shape[0])
  db_ids = _read_ids(req.db_ids, "db_ids", db.shape[0])
  kwargs = _search_kwargs(req, config)
  kwargs["k"] = min(100, db.shape[0]) if req.k is None else req.k
  res = runner.search_and_rerank(_normalize(q), _normalize(db), **kwargs)
  predictions = {qid: [db_ids[j] for j in row if j >= 0]
                 for qid, row in zip(q_ids, res.indices)}
  result = {f"mAP@100_{usage}": metrics.gldv2_map_at_k(predictions, solution.subset(usage))
            for usage in ("public", "private", "all")}
  return _finish({"gldv2": result}, {"gldv2": res.info}, req, "eval_report")


def _distractor_files(r1m: str, r1m_root: str | None) -> list[str]:
  if os.path.isdir(r1m):
    files = sorted(p for p in glob.glob(os.path.join(r1m, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTS))
    if not files:
      raise FileNotFoundError(f"--r1m {r1m}: no images in the folder")
    return files
  return revisited.distractor_paths(r1m, r1m_root or os.path.dirname(os.path.abspath(r1m)))


def _run_checkpoint(req: Request, config):
  root = req.data_dir or config.eval.data_root
  if not root:
    raise UsageError("--data_dir (or config.eval.data_root) is required with --workdir")
  config, net, mesh, step = runner.load_network(req.workdir, config, req.step)
  names = runner.dataset_names(req.datasets or config.eval.datasets)
  distractors = None
  if req.r1m:
    paths = _distractor_files(req.r1m, req.r1m_root)
    missing = revisited.check_paths(paths, skip_missing=req.skip_missing,
                                    what="R1M distractors")
    base = req.r1m if os.path.isdir(req.r1m) else (
        req.r1m_root or os.path.dirname(os.path.abspath(req.r1m)))
    distractors = (paths, [os.path.relpath(p, base) for p in paths], list(missing))
  kwargs = _search_kwargs(req, config)
  # report.html pictures the dataset's own images (not with R1M distractors ranked in).
  views = {} if distractors is None else None
  results, info = runner.evaluate_network(
      config, net, mesh, step=step, workdir=req.workdir, data_root=root, datasets=names,
      kwargs=kwargs, distractors=distractors, skip_missing=req.skip_missing,
      on_ranking=lambda name, idx: _write_ranks(req.ranks_out, name, idx, len(names) > 1),
      views=views)
  if req.out:
    return _finish(results, info, req, req.out)
  name = runner.report_name(step, runner.ExtractSettings.from_config(config.eval), kwargs,
                            r1m=len(distractors[0]) if distractors else 0)
  out = runner.write_run_report(results, info, req.workdir, name, extra={"step": step},
                                views=views, config=config)
  return results, info, out
