"""Statistics of QAFF fusion weights over a set of images.

The QAFF head outputs per image a weight vector w [1+g^2+S] (sum 1) over its
features: index 0 the global (SC-GeM) feature, then g^2 regional cells in
row-major order, then S scales in config order. `fusion_summary` condenses
an [N, K] matrix of them into JSON-serialisable numbers that say how the
weight is spread over feature types and, through the spread across images,
how much the fusion actually adapts to the image; `format_fusion_summary`
renders them as Markdown.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

TYPES = ("global", "regional", "scale")


def feature_labels(grid: int, scales: Sequence[float]) -> list[str]:
  """Names of the K = 1+g^2+S features: 'global', 'r0c0'.., 'x0.5'.."""
  regional = [f"r{r}c{c}" for r in range(grid) for c in range(grid)]
  return ["global"] + regional + [f"x{float(s):g}" for s in scales]


def type_totals(weights: np.ndarray, grid: int) -> np.ndarray:
  """[N, K] weights -> [N, 3] total weight of global, regional, scale."""
  w = np.asarray(weights, np.float64)
  n_reg = grid * grid
  return np.stack([w[:, 0], w[:, 1:1 + n_reg].sum(axis=1),
                   w[:, 1 + n_reg:].sum(axis=1)], axis=1)


def entropy(weights: np.ndarray) -> np.ndarray:
  """Shannon entropy (nats) of each row of [N, K] weights (0 log 0 = 0)."""
  w = np.asarray(weights, np.float64)
  logs = np.log(np.where(w > 0, w, 1.0))
  return -np.sum(w * logs, axis=-1)


def _check(weights: np.ndarray, grid: int, scales: Sequence[float]) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  k = 1 + grid * grid + len(scales)
  if w.ndim != 2 or w.shape[1] != k:
    raise ValueError(f"fusion weights of shape {w.shape}; expected [N, {k}] "
                     f"for grid={grid} and {len(scales)} scales")
  if w.shape[0] == 0:
    raise ValueError("no fusion weights to summarise (N = 0)")
  if not np.all(np.isfinite(w)):
    raise ValueError("fusion weights contain NaN or inf")
  return w


def _by_type(values: np.ndarray) -> dict[str, float]:
  return {t: float(v) for t, v in zip(TYPES, values)}


def _fractions(index: np.ndarray) -> dict[str, float]:
  counts = np.bincount(index, minlength=len(TYPES))
  return _by_type(counts / index.size)


def fusion_summary(weights: np.ndarray, grid: int,
                   scales: Sequence[float]) -> dict[str, Any]:
  """Summarises fusion weights [N, K] (K = 1+g^2+S) of N images.

  Args:
    weights: per-image fusion weights, rows summing to 1.
    grid: g of the regional grid.
    scales: the S scale factors (config order), used for labels.

  Returns:
    A JSON-serialisable dict:
      num_images, num_features, grid, scales, labels (K names);
      type_mean / type_std: per feature type (global, regional, scale) the
        mean and the standard deviation across images of its total weight
        (the std measures how much the fusion adapts between images);
      component_mean / component_std: the same per feature (K lists);
      entropy_mean / entropy_std (nats), entropy_max = log K and
        entropy_ratio = entropy_mean / log K (1 = uniform weights);
      argmax_type_fraction: fraction of images whose largest type total is
        global / regional / scale (ties go to the earlier type);
      argmax_component_fraction: fraction of images whose single largest
        weight belongs to each type (ties go to the earlier feature);
      regional_map: g x g mean regional weights (row-major grid).
  """
  w = _check(weights, grid, scales)
  n, k = w.shape
  totals = type_totals(w, grid)
  ent = entropy(w)
  kinds = np.array([0] + [1] * grid * grid + [2] * len(scales))
  max_ent = math.log(k)
  mean = w.mean(axis=0)
  return {
      "num_images": int(n),
      "num_features": int(k),
      "grid": int(grid),
      "scales": [float(s) for s in scales],
      "labels": feature_labels(grid, scales),
      "type_mean": _by_type(totals.mean(axis=0)),
      "type_std": _by_type(totals.std(axis=0)),
      "component_mean": [float(v) for v in mean],
      "component_std": [float(v) for v in w.std(axis=0)],
      "entropy_mean": float(ent.mean()),
      "entropy_std": float(ent.std()),
      "entropy_max": float(max_ent),
      "entropy_ratio": float(ent.mean() / max_ent) if max_ent > 0 else 1.0,
      "argmax_type_fraction": _fractions(np.argmax(totals, axis=1)),
      "argmax_component_fraction": _fractions(kinds[np.argmax(w, axis=1)]),
      "regional_map": mean[1:1 + grid * grid].reshape(grid, grid).tolist(),
  }


def format_fusion_summary(summary: dict[str, Any]) -> str:
  """A short Markdown rendering of `fusion_summary`'s dict."""
  g = summary["grid"]
  n_of = {"global": 1, "regional": g * g, "scale": len(summary["scales"])}
  lines = [
      f"Fusion weights of {summary['num_images']} images "
      f"(K = {summary['num_features']}: 1 global, {g}x{g} regional, "
      f"{n_of['scale']} scales).",
      "",
      "| type | features | mean | std across images | argmax (type total) "
      "| argmax (component) |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for t in TYPES:
    lines.append(
        f"| {t} | {n_of[t]} | {summary['type_mean'][t]:.4f} "
        f"| {summary['type_std'][t]:.4f} "
        f"| {summary['argmax_type_fraction'][t]:.1%} "
        f"| {summary['argmax_component_fraction'][t]:.1%} |")
  lines += [
      "",
      f"Entropy {summary['entropy_mean']:.4f} ± {summary['entropy_std']:.4f} "
      f"nats = {summary['entropy_ratio']:.1%} of the maximum "
      f"log K = {summary['entropy_max']:.4f}.",
      "",
  ]
  scale_labels = summary["labels"][1 + g * g:]
  if scale_labels:
    means = summary["component_mean"][1 + g * g:]
    lines += ["Scales: " + ", ".join(
        f"{name} {m:.4f}" for name, m in zip(scale_labels, means)) + ".", ""]
  lines += ["Mean regional weights (image grid):", "",
            "| | " + " | ".join(f"c{c}" for c in range(g)) + " |",
            "|---|" + "---:|" * g]
  for r, row in enumerate(summary["regional_map"]):
    lines.append(f"| r{r} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
  return "\n".join(lines) + "\n"
