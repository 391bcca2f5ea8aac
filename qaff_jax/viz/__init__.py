"""Visualisations (PIL only).

  fusion   QAFF fusion weights drawn on the images: per-image heat maps of
           the regional weights with global / scale bars, a gallery of the
           most global- and most region-leaning images, and summary
           statistics. CLI: `python -m qaff_jax.viz.fusion --help`.

The submodule is imported on first attribute access (so that running it with
`python -m` does not import it twice).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"render_image": "fusion", "render_gallery": "fusion",
            "run": "fusion"}


def __getattr__(name: str) -> Any:
  if name == "fusion":
    return importlib.import_module(f"{__name__}.fusion")
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["fusion", "render_gallery", "render_image", "run"]
