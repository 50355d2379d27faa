"""Merge methods: pure functions from a tensor's inputs to one merged tensor, each registered
with its parameters as data (dist_svc.methods.base). Importing this package registers them all
in `METHODS`, by family:

    linear.py     task_arithmetic, linear, passthrough
    sparse.py     ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, sce
    geometric.py  slerp, nuslerp, karcher, model_stock
    spectral.py   tsv, iso_c, iso_cts, star

No files, no Ray, no globals: the worker reads and writes, and the calibration rescales the
merged delta afterwards.
"""

from __future__ import annotations

from dist_svc.methods.base import METHODS, REQUIRED, Method, Param, Where
from dist_svc.methods import geometric, linear, sparse, spectral  # noqa: F401  (they register)

__all__ = ["METHODS", "REQUIRED", "Method", "Param", "Where"]
