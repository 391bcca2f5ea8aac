r"""Model card: parameters and forward GFLOPs of every backbone + GeM head.

python -m qaff_jax.bench.model
python -m qaff_jax.bench.model --backbones=resnet50,ultron_small --sizes=224,512,1024

Nothing big is computed: the model is built with `nnx.eval_shape` and the
forward pass (batch 1, eval mode, float32) is only lowered with abstract
inputs; FLOPs come from XLA's cost analysis of the lowered program
(`--compiled` compiles it and reads the optimised program's analysis instead,
slower; the two agree within ~1%). XLA counts a multiply-add as 2 FLOPs and
skips conv taps that fall on zero padding, so ResNet-50 at 224 px is 7.9
GFLOPs here (the "4.1 GFLOPs" in papers are multiply-adds, padding included).
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

from absl import app
from absl import flags
from absl import logging

from qaff_jax import cli_util

_BACKBONES = flags.DEFINE_list(
    "backbones", [], "Backbones to report (default: all in models.BACKBONES).")
_SKIP = flags.DEFINE_list(
    "skip", [], "Backbones to leave out, e.g. the slow resnet152,vit_base_patch14.")
_SIZES = flags.DEFINE_list("sizes", ["224", "512"], "Square input sides (px).")
_DIM = flags.DEFINE_integer("dim", 512, "GeM head descriptor size D.")
_COMPILED = flags.DEFINE_bool(
    "compiled", False, "Use the compiled program's cost analysis (slower).")


def _flops(lowered, compiled: bool) -> float:
  analysis = (lowered.compile() if compiled else lowered).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device
    analysis = analysis[0]
  return float(analysis["flops"]) if analysis else float("nan")


def card_row(backbone: str, sizes: Sequence[int], *, dim: int = 512,
             compiled: bool = False) -> dict:
  """Parameters and forward GFLOPs of `backbone` + GeM head at `sizes`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  cfg = {"backbone": backbone, "head": "gem", "dim": dim}
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  model.eval()
  count = lambda m: sum(int(x.size) for x in jax.tree.leaves(
      nnx.state(m, nnx.Param)))
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)["descriptor"]

  row = {"backbone": backbone,
         "params_backbone_m": count(model.backbone) / 1e6,
         "params_total_m": count(model) / 1e6,
         "channels": model.backbone.out_features,
         "stride": model.backbone.output_stride}
  for size in sizes:
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    lowered = jax.jit(forward).lower(state, images)
    row[f"gflops_{size}"] = _flops(lowered, compiled) / 1e9
  return row


def model_card(backbones: Iterable[str], sizes: Sequence[int], *,
               dim: int = 512, compiled: bool = False) -> list[dict]:
  return [card_row(b, sizes, dim=dim, compiled=compiled) for b in backbones]


def format_card(rows: list[dict], sizes: Sequence[int]) -> str:
  """A Markdown table of `model_card` rows."""
  head = (["backbone", "params (M)", "+GeM head (M)", "C", "stride"]
          + [f"GFLOPs @{s}" for s in sizes])
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for r in rows:
    cells = [r["backbone"], f"{r['params_backbone_m']:.2f}",
             f"{r['params_total_m']:.2f}", str(r["channels"]),
             str(r["stride"])] + [f"{r[f'gflops_{s}']:.2f}" for s in sizes]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  names = _BACKBONES.value or list(models.BACKBONES)
  unknown = [n for n in names if n not in models.BACKBONES]
  if unknown:
    raise app.UsageError(f"unknown backbones {unknown}; choose from "
                         f"{sorted(models.BACKBONES)}")
  names = [n for n in names if n not in set(_SKIP.value)]
  sizes = [int(s) for s in _SIZES.value]
  t0 = time.perf_counter()
  rows = model_card(names, sizes, dim=_DIM.value, compiled=_COMPILED.value)
  print(format_card(rows, sizes))
  print(f"\nbatch 1, float32, eval mode; GeM head D={_DIM.value}; FLOPs from "
        f"XLA cost analysis ({'compiled' if _COMPILED.value else 'lowered'} "
        f"program; multiply-add = 2 FLOPs); {time.perf_counter() - t0:.0f}s.")


if __name__ == "__main__":
  cli_util.run(main)
