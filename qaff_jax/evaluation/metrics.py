"""Retrieval metrics: the Revisited Oxford/Paris protocol and GLDv2 mAP@100.

Revisited Oxford/Paris (Radenović et al., CVPR 2018) — this module reproduces the
official revisitop `compute_map` / `compute_ap` numbers (same arithmetic, same order
of floating-point accumulation), with these conventions:

* `ranks` has shape (n_db, n_queries); column `i` lists database indices for query
  `i`, best first (0-based). A truncated ranking (k < n_db rows) is accepted:
  positives missing from it simply contribute nothing.
* Per query, `ok` are the positives and `junk` the images to ignore. Junk images are
  removed from the ranking: each positive moves up by the number of junk images
  ranked strictly before it.
* AP is the trapezoidal area under the precision-recall curve: for the j-th positive
  (0-based) at junk-free 0-based position r,
  `p0 = j / r` (1 when r == 0), `p1 = (j + 1) / (r + 1)`, `ap += (p0 + p1) / 2 / n_ok`
  where `n_ok = len(ok)` counts ALL positives, ranked or not.
* Precision at k is the official, slightly unusual one: with 1-based junk-free
  positions `pos`, `kk = min(max(pos), k)` and `P = #(pos <= kk) / kk`. So when every
  positive is ranked above k (max(pos) < k) the denominator shrinks to max(pos)
  and P = 1; e.g. 2 positives at positions 1 and 2 give P@10 = 2/2 = 1, not 2/10.
* A query without positives gets AP = P@k = NaN and is excluded from the means
  (divided by n_queries - n_empty).
* Deviation (documented, never hit by full rankings): if none of a query's positives
  appear in a truncated ranking, the official code crashes on `max([])`; here that
  query gets AP = 0 and P@k = 0 and stays in the means.

The protocols (SPEC): Easy ok = easy, junk = junk + hard; Medium ok = easy + hard,
junk = junk; Hard ok = hard, junk = junk + easy.

GLDv2 retrieval (Weyand et al., CVPR 2020; Kaggle "landmark-retrieval" metric, as in
the DELF `metrics.MeanAveragePrecision`): per query
`AP@k = 1/min(m_q, k) * sum_{i<=k} P_q(i) rel_q(i)`, where repeated predictions are
skipped (they still occupy their slot), averaged over the queries with a non-empty
solution; a scored query without predictions counts as AP 0.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")
_SHORT = {"easy": "E", "medium": "M", "hard": "H"}
DEFAULT_KAPPAS = (1, 5, 10)
_COLUMN_BLOCK = 16


def _ids(entry: Mapping[str, Any], key: str) -> np.ndarray:
  """`entry[key]` as a 1-D int64 array; missing or None gives an empty array."""
  value = entry.get(key)
  if value is None:
    return np.zeros((0,), np.int64)
  return np.asarray(value, dtype=np.int64).reshape(-1)


def protocol_gnd(gnd: Sequence[Mapping[str, Any]],
                 protocol: str) -> list[dict[str, np.ndarray]]:
  """Per-query {'ok', 'junk'} for one protocol of the revisited ground truth.

  Args:
    gnd: per-query dicts with 'easy', 'hard', 'junk' index lists (as in
      `gnd_roxford5k.pkl`); a missing key counts as empty.
    protocol: 'easy', 'medium' or 'hard' (or 'E', 'M', 'H').

  Returns:
    One dict per query with int64 arrays 'ok' and 'junk', concatenated in the
    official order.
  """
  name = {"e": "easy", "m": "medium", "h": "hard"}.get(protocol.lower(),
                                                       protocol.lower())
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  out = []
  for entry in gnd:
    easy, hard, junk = _ids(entry, "easy"), _ids(entry, "hard"), _ids(entry, "junk")
    if name == "easy":
      ok, bad = easy, np.concatenate([junk, hard])
    elif name == "medium":
      ok, bad = np.concatenate([easy, hard]), junk
    else:
      ok, bad = hard, np.concatenate([junk, easy])
    out.append({"ok": ok, "junk": bad})
  return out


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
  """Trapezoidal average precision, as revisitop's `compute_ap`.

  Args:
    ranks: sorted 0-based positions of the positives in the ranking, after junk
      removal.
    nres: total number of positives of the query (ranked or not).

  Returns:
    The average precision (0.0 when no positive was ranked).
  """
  r = np.asarray(ranks, dtype=np.float64).reshape(-1)
  if r.size == 0:
    return 0.0
  j = np.arange(r.size, dtype=np.float64)
  safe_r = np.where(r == 0, 1.0, r)
  p0 = np.where(r == 0, 1.0, j / safe_r)
  p1 = (j + 1.0) / (r + 1.0)
  terms = (p0 + p1) * (1.0 / nres) / 2.0
  # Left-to-right accumulation, like the reference loop (bit-identical result).
  return float(np.add.accumulate(terms)[-1])


def _check_ranks(ranks: Any, nq: int) -> np.ndarray:
  ranks = np.asarray(ranks)
  if ranks.ndim != 2:
    raise ValueError(f"ranks must be (n_db, n_queries), got shape {ranks.shape}")
  if ranks.shape[1] != nq:
    raise ValueError(f"ranks has {ranks.shape[1]} query columns but gnd has {nq} "
                     "queries; ranks must be (n_db, n_queries)")
  return ranks


def _check_kappas(kappas: Sequence[int]) -> list[int]:
  kappas = [int(k) for k in kappas]
  if any(k < 1 for k in kappas):
    raise ValueError(f"kappas must be >= 1, got {kappas}")
  return kappas


def _columns(ranks: np.ndarray) -> Iterator[np.ndarray]:
  """Yields the ranking of each query as a contiguous 1-D array."""
  if ranks.flags.f_contiguous:
    yield from ranks.T
    return
  # Columns of a C-ordered (n_db, nq) array are strided; copying a few at a
  # time into rows of one reused buffer keeps the per-query scans contiguous.
  buf = np.empty((min(_COLUMN_BLOCK, ranks.shape[1]), ranks.shape[0]), ranks.dtype)
  for b0 in range(0, ranks.shape[1], _COLUMN_BLOCK):
    block = buf[:min(_COLUMN_BLOCK, ranks.shape[1] - b0)]
    np.copyto(block, ranks[:, b0:b0 + block.shape[0]].T)
    yield from block


def _positions(column: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Sorted 0-based positions in `column` holding any of `ids`."""
  if ids.size == 0:
    return np.zeros((0,), np.int64)
  return np.flatnonzero(np.isin(column, ids))


def _query_scores(pos: np.ndarray, junk_pos: np.ndarray, nres: int,
                  kappas: Sequence[int]) -> tuple[float, np.ndarray]:
  """AP and precision@k of one query from the positions of positives and junk."""
  # Junk images are dropped: each positive moves up by the junk ranked before it.
  pos = pos - np.searchsorted(junk_pos, pos, side="left")
  ap = compute_ap(pos, nres)
  prs = np.zeros(len(kappas))
  if pos.size:
    pos1 = pos + 1  # 1-based positions
    last = int(pos1[-1])
    for j, kappa in enumerate(kappas):
      kk = min(last, kappa)
      prs[j] = (pos1 <= kk).sum() / kk
  return ap, prs


class _Accumulator:
  """Sums per-query results in query order, exactly like the reference."""

  def __init__(self, nq: int, n_kappas: int):
    self.total_ap = 0.0
    self.aps = np.zeros(nq)
    self.pr = np.zeros(n_kappas)
    self.prs = np.zeros((nq, n_kappas))
    self.nempty = 0

  def add(self, i: int, result: tuple[float, np.ndarray] | None) -> None:
    if result is None:  # no positives: excluded from the means
      self.aps[i] = np.nan
      self.prs[i, :] = np.nan
      self.nempty += 1
      return
    ap, prs = result
    self.total_ap = self.total_ap + ap
    self.aps[i] = ap
    self.prs[i, :] = prs
    self.pr = self.pr + prs

  def result(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    n_scored = self.aps.shape[0] - self.nempty
    if n_scored == 0:
      return float("nan"), self.aps, np.full(self.pr.shape, np.nan), self.prs
    return self.total_ap / n_scored, self.aps, self.pr / n_scored, self.prs


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """mAP and mean precision@k over queries, as revisitop's `compute_map`.

  Args:
    ranks: (n_db, n_queries) integer array; column i ranks database indices for
      query i, best first (may be truncated to fewer rows).
    gnd: per-query dicts with 'ok' and optionally 'junk' (see `protocol_gnd`).
    kappas: the k values of precision@k.

  Returns:
    (mAP, aps [n_queries], mpr [len(kappas)], prs [n_queries, len(kappas)]), as
    fractions; queries without positives are NaN in aps/prs and excluded from the
    means (the means are NaN when every query is empty).
  """
  ranks = _check_ranks(ranks, len(gnd))
  kappas = _check_kappas(kappas)
  acc = _Accumulator(len(gnd), len(kappas))
  for i, column in enumerate(_columns(ranks)):
    ok = _ids(gnd[i], "ok")
    if ok.shape[0] == 0:
      acc.add(i, None)
      continue
    pos = _positions(column, ok)
    junk_pos = _positions(column, _ids(gnd[i], "junk"))
    acc.add(i, _query_scores(pos, junk_pos, ok.shape[0], kappas))
  return acc.result()


# Which ground-truth lists make up 'ok' and 'junk' in each protocol.
_PROTOCOL_PARTS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def evaluate_revisited(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict[str, Any]:
  """All three revisited protocols.

  Same numbers as `compute_map(ranks, protocol_gnd(gnd, p), kappas)` for each
  protocol, but every ranking column is scanned once for all three.

  Args:
    ranks: (n_db, n_queries) ranking (see `compute_map`).
    gnd: the raw per-query ground truth with 'easy', 'hard', 'junk'.
    kappas: the k values of mP@k.

  Returns:
    Flat dict with 'mAP_E', 'mAP_M', 'mAP_H' and 'mP@{k}_{E,M,H}' as fractions in
    [0, 1], plus 'per_query': {'E': [...], 'M': [...], 'H': [...]} holding each
    query's AP (NaN for a query without positives under that protocol).
  """
  ranks = _check_ranks(ranks, len(gnd))
  kappas = _check_kappas(kappas)
  accs = {p: _Accumulator(len(gnd), len(kappas)) for p in PROTOCOLS}
  for i, column in enumerate(_columns(ranks)):
    ids = {key: _ids(gnd[i], key) for key in ("easy", "hard", "junk")}
    where = {key: _positions(column, v) for key, v in ids.items()}
    for protocol, (ok_keys, junk_keys) in _PROTOCOL_PARTS.items():
      nres = sum(ids[key].shape[0] for key in ok_keys)
      if nres == 0:
        accs[protocol].add(i, None)
        continue
      # A position is counted once even if its id sits in two lists (as isin).
      pos = functools.reduce(np.union1d, [where[key] for key in ok_keys])
      junk_pos = functools.reduce(np.union1d, [where[key] for key in junk_keys])
      accs[protocol].add(i, _query_scores(pos, junk_pos, nres, kappas))
  out: dict[str, Any] = {}
  per_query: dict[str, list[float]] = {}
  for protocol in PROTOCOLS:
    s = _SHORT[protocol]
    m, aps, mpr, _ = accs[protocol].result()
    out[f"mAP_{s}"] = float(m)
    for kappa, value in zip(kappas, mpr):
      out[f"mP@{kappa}_{s}"] = float(value)
    per_query[s] = [float(a) for a in aps]
  out["per_query"] = per_query
  return out


def format_revisited(results: Mapping[str, Any],
                     kappas: Sequence[int] = DEFAULT_KAPPAS) -> str:
  """Two report lines in percent (2 decimals), like revisitop's example output."""
  maps = " ".join(f"{s}: {100 * results[f'mAP_{s}']:.2f}" for s in "EMH")
  prs = " ".join(
      f"{s}: " + "/".join(f"{100 * results[f'mP@{k}_{s}']:.2f}" for k in kappas)
      for s in "EMH")
  return f"mAP {maps}\nmP@{list(kappas)} {prs}"


# ---------------------------------------------------------------------------
# GLDv2 retrieval
# ---------------------------------------------------------------------------


def gldv2_average_precisions(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Iterable[str] | None],
    k: int = 100,
) -> dict[str, float]:
  """Per-query AP@k for every query with a non-empty solution.

  Args:
    predictions: query id -> ranked index ids (best first).
    solution: query id -> relevant index ids; None or empty means "not scored".
    k: the cut-off (100 for GLDv2).

  Returns:
    query id -> AP@k. Predictions for unscored or unknown queries are ignored;
    a scored query missing from `predictions` gets 0.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  out = {}
  for query, relevant in solution.items():
    if not relevant:
      continue
    relevant = set(relevant)
    ranked = predictions.get(query) or []
    seen = set()
    hits = 0
    ap = 0.0
    for i, item in enumerate(list(ranked)[:k]):
      if item in seen:
        continue  # a repeat scores nothing but keeps its slot
      seen.add(item)
      if item in relevant:
        hits += 1
        ap += hits / (i + 1)
    out[query] = ap / min(len(relevant), k)
  return out


def gldv2_map_at_k(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Iterable[str] | None],
    k: int = 100,
) -> float:
  """GLDv2 retrieval mAP@k (Kaggle metric); NaN when no query is scored."""
  aps = gldv2_average_precisions(predictions, solution, k)
  if not aps:
    return float("nan")
  return math.fsum(aps.values()) / len(aps)


@dataclasses.dataclass
class GldRetrievalSolution:
  """The GLDv2 retrieval ground truth, split by Kaggle 'Usage'."""
  public: dict[str, set[str]]
  private: dict[str, set[str]]
  ignored: list[str]

  @property
  def scored(self) -> dict[str, set[str]]:
    """Public and Private queries together (the usual "GLDv2 test" number)."""
    return {**self.public, **self.private}

  def subset(self, usage: str) -> dict[str, set[str]]:
    """'public', 'private' or 'all' (both)."""
    usage = usage.lower()
    if usage == "public":
      return self.public
    if usage == "private":
      return self.private
    if usage in ("all", "scored"):
      return self.scored
    raise ValueError(f"unknown usage {usage!r}; expected public/private/all")


def load_gldv2_retrieval_solution(path: str | os.PathLike) -> GldRetrievalSolution:
  """Reads `retrieval_solution_v2.1.csv`.

  Format: header `id,images,Usage`; `images` is a space-separated list of index ids
  ('None' for queries without landmark); Usage is Public, Private or Ignored.
  Ignored rows are only listed in `.ignored`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: a column is missing or a Usage value is unknown (names the file
      and line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GLDv2 retrieval solution not found: {path}")
  public: dict[str, set[str]] = {}
  private: dict[str, set[str]] = {}
  ignored: list[str] = []
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"id", "images", "Usage"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected "
                       f"id,images,Usage, got {reader.fieldnames}")
    for row in reader:
      query, usage = row["id"].strip(), (row["Usage"] or "").strip()
      if not query:
        continue
      images = (row["images"] or "").split()
      relevant = set() if images in ([], ["None"]) else set(images)
      if usage == "Ignored":
        ignored.append(query)
      elif usage == "Public":
        public[query] = relevant
      elif usage == "Private":
        private[query] = relevant
      else:
        raise ValueError(f"{path}:{reader.line_num}: query {query} has unknown "
                         f"Usage {usage!r} (expected Public/Private/Ignored)")
  return GldRetrievalSolution(public, private, ignored)
