"""csdm_dist: CSDM dataset distillation for long-tailed image data (README.md).

`from csdm_dist import load_distilled` reads a distilled set (a run directory, its distilled.pt, or an export of
`python -m csdm_dist.export`) as a torch Dataset; it is imported on first use, so `import csdm_dist.config` stays
light.
"""
from __future__ import annotations

__all__ = ["load_distilled"]


def __getattr__(name: str):
    if name == "load_distilled":
        from .distilled import load_distilled

        return load_distilled
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
