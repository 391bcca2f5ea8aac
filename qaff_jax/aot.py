"""Ahead-of-time compilation for TPU topologies that are not attached.

libtpu compiles for a described TPU slice on any machine (a CPU-only one
included): `jax.experimental.topologies.get_topology_desc` gives compile-only
devices, and the training program is built on them exactly as training builds
it (`parallel.make_mesh`, `state.abstract_train_state`,
`train_lib.jit_train_step`, `extract.forward_program`). What the compiled
program says is reported per device:

* memory: arguments, temporaries, outputs (minus the donated aliases) and the
  generated code, against the chip's HBM;
* FLOPs per step from the compiled program's cost analysis, and the ideal
  step time at the chip's peak bf16 rate (an upper bound on speed: 100% MFU);
* collectives in the optimised HLO: a static count per kind and the bytes of
  their results (an op inside a loop is counted once);
* whether any array that holds all class rows ([batch, classes] logits, the
  [classes, D] class matrix, its optimizer moments) sits whole on one device.

`python -m qaff_jax.compile` is the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from qaff_jax import cli_util
from qaff_jax import models
from qaff_jax import parallel
from qaff_jax import state as state_lib

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float   # dense bf16 FLOP/s per chip
  hbm_bytes: float         # HBM per chip
  source: str


# Google Cloud's published per-chip figures (the "system architecture" page of
# each TPU version). HBM is read as the pages' "GB" times 1e9 bytes, the
# smaller reading of the unit, so a "fits" is never optimistic on that count.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 16e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, "https://cloud.google.com/tpu/docs/v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_3D = ("v4", "v5p")   # 3-D torus chips; their `-N` names count TensorCores (2 per chip)


def _default_shape(generation: str, chips: int) -> tuple[int, ...]:
  """The usual slice shape of `chips` chips (doubling the last of the smallest axes)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: a slice named by its size must have a power-of-two "
                     "chip count; name the shape instead (e.g. v5p:4x4x8)")
  shape = [2, 2, 1] if generation in _3D else [1, 1]
  if generation in _3D and chips < 4:
    raise ValueError(f"{generation} slices have at least 4 chips (got {chips})")
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_topology(spec: str) -> tuple[str, str]:
  """('v5p', 'v5p:4x4x4') from 'v5p-128', 'v5p:4x4x4', 'v5litepod-16', 'v6e-256', ...

  The `-N` form follows Cloud TPU accelerator types: N counts TensorCores on
  v4 and v5p (two per chip) and chips on v5e and v6e.
  """
  text = spec.strip().lower()
  m = re.fullmatch(r"(v\d+[a-z]*)(?:pod)?([:-])([\dx]+)", text)
  if not m:
    raise ValueError(f"--topology={spec!r}: expected e.g. v5e-16, v5p-128, v6e-256 or "
                     "v5e:4x4, v4:2x2x1")
  gen, sep, rest = m.groups()
  gen = _ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise ValueError(f"--topology={spec!r}: unknown TPU generation {gen!r}; known: "
                     f"{sorted(CHIPS)}")
  if sep == ":":
    dims = tuple(int(d) for d in rest.split("x"))
    want = 3 if gen in _3D else 2
    if len(dims) != want or min(dims) < 1:
      raise ValueError(f"--topology={spec!r}: {gen} shapes have {want} axes")
  else:
    n = int(rest)
    if gen in _3D:
      if n % 2:
        raise ValueError(f"--topology={spec!r}: {gen}-N counts TensorCores (2 per chip)")
      n //= 2
    dims = _default_shape(gen, n)
  return gen, f"{gen}:{'x'.join(map(str, dims))}"


def topology_devices(name: str) -> list:
  """Compile-only devices of the TPU slice `name` ('v5e:4x4'); needs libtpu."""
  try:
    import libtpu  # noqa: F401,PLC0415
  except ImportError as err:
    raise RuntimeError('compiling for a TPU topology needs libtpu: '
                       'pip install -e ".[tpu]"') from err
  from jax.experimental import topologies  # noqa: PLC0415
  return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


def devices_per_chip(devices: Sequence) -> int:
  return 1 + max(int(getattr(d, "core_on_chip", 0) or 0) for d in devices)


# ---------------------------------------------------------------------------
# What a compiled program says.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
                "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
                "s64": 8, "u64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn|fnuz)?)?)\[([\d,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# `%name = <result shape> <op>(`: the op name right before the operand list.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(.*?)\s([a-z][\w-]*)\(", re.M)


def _bytes_of(shape_text: str) -> float:
  total = 0.0
  for dtype, dims in _SHAPE.findall(shape_text):
    size = _DTYPE_BYTES.get(dtype)
    if size is not None:
      total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collective_stats(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'bytes'}} over the collective instructions of an HLO module.

  Synchronous ops count by their result; asynchronous pairs by their `-done`
  (whose result is the collective's output), so a pair counts once.
  """
  stats = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
  for result, op in _INSTR.findall(hlo):
    kind = op.removesuffix("-done")
    if kind in stats and not op.endswith("-start"):
      stats[kind]["count"] += 1
      stats[kind]["bytes"] += _bytes_of(result)
  return stats


def whole_class_arrays(hlo: str, *, class_sizes: Sequence[int],
                       partners: Sequence[int]) -> list[str]:
  """Array shapes in `hlo` that hold every class row on one device.

  An array is flagged when one of its dimensions equals a full class count
  (`class_sizes`: the classes and the padded class rows) and another equals
  one of `partners` (the global / micro batch sizes and the descriptor size):
  [B, C] logits, the [C, D] class matrix or its moments, in any layout.
  """
  classes, others = set(class_sizes), set(partners)
  found = set()
  for dtype, dims in _SHAPE.findall(hlo):
    d = [int(x) for x in dims.split(",") if x]
    for i, size in enumerate(d):
      if size in classes and any(o in others for j, o in enumerate(d) if j != i):
        found.add(f"{dtype}[{','.join(map(str, d))}]")
  return sorted(found)


def significant(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def memory_of(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  # Donated arguments are reused for outputs: count those bytes once.
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return {k: float(v) for k, v in out.items()}


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def analyse(compiled, *, hbm_bytes: float, peak_flops: float, class_sizes=(),
            partners=()) -> dict[str, Any]:
  """The per-device report of one compiled program (see the module docstring)."""
  mem = memory_of(compiled)
  hlo = compiled.as_text()
  flops = flops_of(compiled)
  whole = whole_class_arrays(hlo, class_sizes=class_sizes, partners=partners) \
      if class_sizes else []
  return {
      "memory_gib": {k: round(v / GiB, 4) for k, v in mem.items()},
      "hbm_gib": round(hbm_bytes / GiB, 3),
      "fits": mem["peak"] <= hbm_bytes,
      "margin_gib": round((hbm_bytes - mem["peak"]) / GiB, 4),
      "flops_per_device": flops,
      "ideal_ms": significant(1e3 * flops / peak_flops) if math.isfinite(flops) else None,
      "collectives": {k: {"count": v["count"], "mib": round(v["bytes"] / 2 ** 20, 3)}
                      for k, v in collective_stats(hlo).items()},
      "class_arrays_sharded": not whole,
      "whole_class_arrays": whole,
  }


# ---------------------------------------------------------------------------
# The programs.


@contextlib.contextmanager
def no_persistent_cache():
  """Compile-only TPU executables cannot be reloaded from jax's persistent
  cache (there is no TPU client here), so they are neither written to nor
  read from it. jax decides once per process whether the cache is used;
  `reset_cache` (private) makes it look at the flag again."""
  from jax._src import compilation_cache  # noqa: PLC0415

  log = logging.getLogger(compilation_cache.__name__)  # "Resetting cache at ..." lines
  level = log.level
  log.setLevel(max(level, logging.WARNING))
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()
    log.setLevel(level)


@dataclasses.dataclass
class Target:
  """The devices a program is compiled for, and their per-device figures."""
  name: str
  devices: list
  chip: Chip
  per_chip: int = 1

  @classmethod
  def from_topology(cls, spec: str) -> "Target":
    gen, name = parse_topology(spec)
    cli_util.quiet_libtpu_without_tpu()
    devices = topology_devices(name)
    return cls(name, devices, CHIPS[gen], devices_per_chip(devices))

  @property
  def hbm_bytes(self) -> float:
    return self.chip.hbm_bytes / self.per_chip

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_bf16_flops / self.per_chip

  def describe(self) -> dict:
    return {"topology": self.name, "devices": len(self.devices),
            "hosts": len({d.process_index for d in self.devices}),
            "devices_per_chip": self.per_chip, "chip": self.chip.name,
            "peak_bf16_tflops_per_device": self.peak_flops / 1e12,
            "hbm_gib_per_device": round(self.hbm_bytes / GiB, 3),
            "chip_figures_source": self.chip.source}


def compile_train(config, target: Target) -> dict:
  """Compiles the real train step of `config` for `target`; returns its report."""
  from qaff_jax import train_lib  # noqa: PLC0415 (the trainer, only for its step)

  mesh = parallel.make_mesh(config.mesh.model, devices=target.devices)
  train_lib.check_config(config, need_data=False)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, abstract, shardings = state_lib.abstract_train_state(config, mesh, tx)
  step = train_lib.jit_train_step(graphdef, tx, schedule, config, mesh, shardings)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
  t0 = time.perf_counter()
  with no_persistent_cache():
    compiled = step.lower(abstract, train_lib.abstract_batch(config, mesh), rng).compile()
  seconds = time.perf_counter() - t0
  rows = state_lib.num_class_rows(config.data.num_classes, mesh)
  batches = {config.batch_size, config.batch_size // config.grad_accum}
  report = analyse(compiled, hbm_bytes=target.hbm_bytes, peak_flops=target.peak_flops,
                   class_sizes=sorted({config.data.num_classes, rows}),
                   partners=sorted(batches | {config.model.dim}))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  report.update(what="train", global_batch=config.batch_size,
                batch_per_device=config.batch_size / len(target.devices),
                image_size=config.data.image_size, mesh=dict(mesh.shape),
                fsdp=bool(config.mesh.fsdp), params_m=round(n_params / 1e6, 3),
                compile_s=round(seconds, 1))
  return report


def extract_shapes(config, devices: int) -> list[tuple[int, int, int]]:
  """(rows, height, width) of the largest extraction batch at each scale: a
  square image of `eval.max_side` in its shape bucket, a full batch."""
  from qaff_jax.evaluation import extract  # noqa: PLC0415

  rows = extract.batch_rows(config.eval.batch_size, devices)
  side = config.eval.max_side
  shapes = []
  for s in config.eval.scales:
    h, w = extract.bucket_of(extract.scaled_size(side, side, side, s), config.eval.bucket)
    shapes.append((rows, h, w))
  return sorted(set(shapes))


def compile_extract(config, target: Target) -> dict:
  """Compiles the evaluation extraction step at each scale's largest bucket."""
  from qaff_jax.evaluation import extract  # noqa: PLC0415

  mesh = parallel.make_mesh(config.mesh.model, devices=target.devices)
  net = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
  net.eval()
  graphdef, abstract = nnx.split(net)
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  fwd = extract.forward_program(graphdef, ("descriptor", "fusion_weights"))
  per_shape, t0 = [], time.perf_counter()
  for b, h, w in extract_shapes(config, len(target.devices)):
    images = jax.ShapeDtypeStruct((b, h, w, 3), np.uint8,
                                  sharding=parallel.batch_sharding(mesh, 4))
    mask = jax.ShapeDtypeStruct((b, h, w), np.float32,
                                sharding=parallel.batch_sharding(mesh, 3))
    t1 = time.perf_counter()
    with no_persistent_cache():
      compiled = fwd.lower(abstract, images, mask).compile()
    one = analyse(compiled, hbm_bytes=target.hbm_bytes, peak_flops=target.peak_flops)
    one.update(shape=[b, h, w], compile_s=round(time.perf_counter() - t1, 1))
    for key in ("class_arrays_sharded", "whole_class_arrays"):
      one.pop(key)
    per_shape.append(one)
  worst = max(per_shape, key=lambda r: r["memory_gib"]["peak"])
  return {"what": "extract", "max_side": config.eval.max_side,
          "scales": [round(s, 4) for s in config.eval.scales], "buckets": per_shape,
          "fits": all(r["fits"] for r in per_shape), "margin_gib": worst["margin_gib"],
          "peak_gib": worst["memory_gib"]["peak"],
          "compile_s": round(time.perf_counter() - t0, 1)}


def max_batch(config, target: Target, *, max_compiles: int = 6,
              first: dict | None = None) -> dict:
  """The largest global batch whose train step fits, found by compiling.

  Batches are multiples of the device count times `grad_accum`. A line fitted
  to (batch, peak memory) of the compiles so far proposes the next batch
  inside the bracket (largest fitting, smallest failing); the search stops
  when the bracket is one step wide (`proved_largest`) or `max_compiles`
  compiles are spent. Only compiled batches are reported as fitting.
  `first` is an already compiled report at `config.batch_size`.
  """
  unit = len(target.devices) * config.grad_accum
  tried: dict[int, dict] = {}
  if first is not None and config.batch_size % unit == 0:
    tried[config.batch_size] = first

  def compile_at(batch: int) -> None:
    c = config.copy_and_resolve_references()
    c.batch_size = batch
    tried[batch] = compile_train(c, target)

  b0 = max(unit, config.batch_size // unit * unit)
  for b in (b0, 2 * b0):
    if b not in tried:
      compile_at(b)
  while len(tried) < max_compiles:
    fit = [b for b, r in tried.items() if r["fits"]]
    fail = [b for b, r in tried.items() if not r["fits"]]
    lo, hi = max(fit, default=0), min(fail, default=None)
    if hi is not None and hi - lo <= unit:
      break
    # The line through the two compiles nearest the limit proposes a batch;
    # inside a bracket it is kept to the bracket's middle half, so the bracket
    # shrinks by at least a quarter per compile even where memory bends.
    near = sorted(tried, key=lambda b: abs(tried[b]["memory_gib"]["peak"] * GiB
                                           - target.hbm_bytes))[:2]
    (x0, x1) = sorted(near)
    y0, y1 = (tried[b]["memory_gib"]["peak"] * GiB for b in (x0, x1))
    slope = (y1 - y0) / (x1 - x0)
    guess = x0 + (target.hbm_bytes - y0) / slope if slope > 0 else 2.0 * max(tried)
    if hi is None:
      candidate = max(guess, lo + unit)
    else:
      quarter = (hi - lo) / 4
      candidate = min(max(guess, lo + quarter), hi - quarter)
    candidate = int(candidate) // unit * unit
    if candidate <= lo:
      candidate = lo + unit
    if candidate in tried or (hi is not None and candidate >= hi):
      break
    compile_at(candidate)
  fit = [b for b, r in tried.items() if r["fits"]]
  fail = [b for b, r in tried.items() if not r["fits"]]
  best = max(fit, default=None)
  return {"max_global_batch": best,
          "proved_largest": best is not None and min(fail, default=0) - best == unit,
          "step": unit, "compiles": len(tried),
          "tried": {str(b): {"peak_gib": tried[b]["memory_gib"]["peak"],
                             "fits": tried[b]["fits"]} for b in sorted(tried)}}
