"""The sharded exact search compiled for a TPU slice that is not attached.

`compile_sharded_search("v5e-256", n=100_000_000, dim=512, queries=1000, k=100)`
builds the program `search.sharded_exact_search` runs (the same
`search.sharded_search_program`) on the compile-only devices of the slice,
with the database only as an abstract, row-sharded `ShapeDtypeStruct` (no
memory is needed here), compiles it, and reports per chip:

* memory from the compiled program (`aot.analyse`): the database shard, the
  queries, the score blocks and the output, against the chip's HBM;
* the ideal time per 1,000 queries: the larger of the matmul FLOPs at the
  chip's peak rate for the scoring type and one read of the chip's database
  shard at its HBM bandwidth (the search is compute bound with batches of a
  few hundred queries and more). The FLOPs are counted from the shapes: XLA's
  cost analysis sees the chunk loop's body once. float32 scoring is counted at
  1/6 of the bf16 rate (HIGHEST precision is 6 bf16 passes on the MXU).

The mesh is (S / g, g) with g the largest divisor of S up to sqrt(S) (16 x 16
for 256 chips): the merge gathers k candidates per query from the g shards of
a row, then from the S / g rows; its all-gathers are listed among the
collectives.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from qaff_jax import aot
from qaff_jax import parallel
from qaff_jax.evaluation import search

# Per-chip HBM bandwidth (bytes/s) and int8 peak (ops/s), from the same Google
# Cloud system-architecture pages as `aot.CHIPS`.
HBM_BANDWIDTH = {"TPU v4": 1200e9, "TPU v5e": 819e9, "TPU v5p": 2765e9, "TPU v6e": 1640e9}
INT8_PEAK = {"TPU v4": 275e12, "TPU v5e": 394e12, "TPU v5p": 918e12, "TPU v6e": 1836e12}
F32_PASSES = 6   # bf16 passes per float32 (HIGHEST precision) matmul


@dataclasses.dataclass(frozen=True)
class SearchShape:
  n: int
  dim: int
  queries: int
  k: int
  storage: str = "float32"
  score_dtype: str = "bfloat16"
  rescore: bool = True
  candidates: int | None = None
  chunk: int = 65536


def _peak(chip: aot.Chip, score_dtype: str, per_chip: int) -> float:
  if score_dtype == "int8":
    peak = INT8_PEAK.get(chip.name, chip.peak_bf16_flops)
  elif score_dtype == "float32":
    peak = chip.peak_bf16_flops / F32_PASSES
  else:
    peak = chip.peak_bf16_flops
  return peak / per_chip


def merge_group(devices: int) -> int:
  """The `model` axis size of the search mesh: the largest divisor of `devices`
  not above sqrt(devices), so the two-stage merge moves about 2 sqrt(S) k
  candidates per query and device."""
  return max(d for d in range(1, math.isqrt(devices) + 1) if devices % d == 0)


def abstract_inputs(shape: SearchShape, mesh):
  """(queries, rows, scales) as sharded `ShapeDtypeStruct`s."""
  rows, scales = search.abstract_database(shape.n, shape.dim, mesh, dtype=shape.storage)
  queries = jax.ShapeDtypeStruct((shape.queries, shape.dim), np.float32,
                                 sharding=parallel.replicated(mesh))
  return queries, rows, scales


def compile_sharded_search(topology: str, *, n: int, dim: int, queries: int = 1000,
                           k: int = 100, storage: str = "float32",
                           score_dtype: str = "bfloat16", rescore: bool = True,
                           candidates: int | None = None, chunk: int = 65536) -> dict:
  """Compiles one query batch of the sharded search for `topology`; its report.

  Args:
    topology: a TPU slice, e.g. 'v5e-256', 'v5e:2x2' (`aot.parse_topology`).
    n, dim: database rows and descriptor size (abstract: nothing is allocated).
    queries: queries per batch (one compiled call).
    k, storage, score_dtype, rescore, candidates, chunk: as in
      `search.sharded_exact_search` / `search.place_database`.

  Returns:
    {'topology', 'devices', 'rows_per_device', 'memory_gib' (per device),
     'fits', 'flops_per_device', 'ideal_ms_per_1000_queries',
     'compute_ms_per_1000_queries', 'hbm_read_ms_per_1000_queries', 'collectives',
     'compile_s', ...}.
  """
  shape = SearchShape(n, dim, queries, k, storage, score_dtype, rescore, candidates, chunk)
  score_dtype = search._check_score_dtype(storage, score_dtype, rescore)  # noqa: SLF001
  rescore = rescore and score_dtype != "float32"
  target = aot.Target.from_topology(topology)
  mesh = parallel.make_mesh(merge_group(len(target.devices)), devices=target.devices)
  axes = search.ROW_AXES
  cands = max(k, 2 * k if candidates is None else int(candidates))
  program = search.sharded_search_program(mesh, axes, n=n, k=k, candidates=cands,
                                          chunk=chunk, score_dtype=score_dtype,
                                          rescore=rescore)
  q, rows, scales = abstract_inputs(shape, mesh)
  t0 = time.perf_counter()
  with aot.no_persistent_cache():  # compile-only executables
    compiled = program.lower(q, rows, scales).compile()
  compile_s = time.perf_counter() - t0
  report = aot.analyse(compiled, hbm_bytes=target.hbm_bytes, peak_flops=target.peak_flops)
  for key in ("class_arrays_sharded", "whole_class_arrays", "ideal_ms"):
    report.pop(key, None)
  devices = len(target.devices)
  n_local = rows.shape[0] // devices
  flops = 2.0 * queries * n_local * dim + (2.0 * queries * cands * dim if rescore else 0.0)
  peak = _peak(target.chip, score_dtype, target.per_chip)
  compute_s = flops / peak
  shard_bytes = n_local * dim * np.dtype(rows.dtype).itemsize
  read_s = shard_bytes / (HBM_BANDWIDTH.get(target.chip.name, float("inf")) / target.per_chip)
  per_1000 = 1000.0 / queries
  report.update(
      what="sharded_exact_search", topology=target.name, devices=devices,
      hosts=len({d.process_index for d in target.devices}), chip=target.chip.name,
      n=n, dim=dim, queries=queries, k=k, storage=storage, score_dtype=score_dtype,
      rescore=rescore, candidates=cands if rescore else k, rows_per_device=n_local,
      database_gib_per_device=round(shard_bytes / aot.GiB, 4),
      xla_flops_per_device=report.pop("flops_per_device"),
      flops_per_device=flops, peak_ops_per_device=peak,
      compute_ms_per_1000_queries=aot.significant(1e3 * compute_s * per_1000),
      hbm_read_ms_per_batch=aot.significant(1e3 * read_s),
      hbm_read_ms_per_1000_queries=aot.significant(1e3 * read_s * per_1000),
      ideal_ms_per_1000_queries=aot.significant(1e3 * max(compute_s, read_s) * per_1000),
      ideal_queries_per_s=aot.significant(queries / max(compute_s, read_s)),
      compile_s=round(compile_s, 1))
  return report


def main() -> None:
  """`python -m qaff_jax.evaluation.search_aot [topology] [n] [dim]`: one JSON line."""
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415
  args = sys.argv[1:]
  topology = args[0] if args else "v5e-256"
  n = int(float(args[1])) if len(args) > 1 else 100_000_000
  dim = int(args[2]) if len(args) > 2 else 512
  out = {}
  for score_dtype in ("bfloat16", "int8", "float32"):
    out[score_dtype] = compile_sharded_search(topology, n=n, dim=dim,
                                              score_dtype=score_dtype,
                                              rescore=score_dtype != "float32")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
