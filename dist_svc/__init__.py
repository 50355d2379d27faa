"""dist-svc: distributed, resumable model merging with Singular Value Calibration."""

from dist_svc.errors import DistSvcError
from dist_svc.version import __version__

# The Python API, from dist_svc.driver: loaded (with the pipeline and torch) on first use, not
# on `import dist_svc`: the CLI's `--version`, `status` and `verify` stay fast.
_API = ("merge", "status", "verify", "dry_run", "MergeReport")
_SWEEP = ("sweep", "SweepReport")  # dist_svc.batch: many merges of one config's inputs


def __getattr__(name: str):
    if name in _API:
        from dist_svc import driver

        return getattr(driver, name)
    if name in _SWEEP:
        import importlib

        return getattr(importlib.import_module("dist_svc.batch"), name)
    raise AttributeError(f"module 'dist_svc' has no attribute {name!r}")


__all__ = [*_API, *_SWEEP, "DistSvcError", "__version__"]
