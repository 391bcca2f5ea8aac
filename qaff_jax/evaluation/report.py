"""Result tables in the form papers print them (percentages, E/M/H)."""

from __future__ import annotations

import json
import os

PROTOCOLS = ("E", "M", "H")


def markdown_table(results: dict[str, dict], kappas=(1, 5, 10)) -> str:
  """`results[name]` holds flat metric keys (`mAP_E`, `mP@1_E`, ...) as fractions."""
  head = ["dataset"] + [f"mAP {p}" for p in PROTOCOLS] + [
      f"mP@{k} {p}" for p in PROTOCOLS for k in kappas]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  other = {name: m for name, m in results.items() if "mAP_E" not in m}
  for name, m in results.items():
    if name in other:
      continue
    cells = [name] + [f"{100 * m[f'mAP_{p}']:.2f}" for p in PROTOCOLS] + [
        f"{100 * m[f'mP@{k}_{p}']:.2f}" for p in PROTOCOLS for k in kappas]
    lines.append("| " + " | ".join(cells) + " |")
  if len(other) == len(results):
    lines = []
  for name, m in other.items():  # e.g. GLDv2 retrieval: mAP@100_public / _private / _all
    lines += ["", f"| {name} | value |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.2f} |" for k, v in m.items() if isinstance(v, float)]
  return "\n".join(lines).strip("\n")


def write_report(results: dict[str, dict], out_dir: str, extra: dict | None = None) -> str:
  """Writes `report.json` (all numbers, per-query APs) and `report.md`; returns the md path."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump({"results": results, **(extra or {})}, f, indent=1, default=float)
  md = os.path.join(out_dir, "report.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown_table(results) + "\n")
    fusions = {name: r["fusion"] for name, r in results.items() if "fusion" in r}
    fusions.update({name: i["fusion"] for name, i in (extra or {}).get("info", {}).items()
                    if isinstance(i, dict) and "fusion" in i})
    if fusions:
      from qaff_jax.evaluation import fusion_stats
      for name, summary in fusions.items():
        f.write(f"\n## QAFF fusion weights: {name}\n\n"
                + fusion_stats.format_fusion_summary(summary) + "\n")
  return md
