"""dist-svc: distributed, resumable model merging with Singular Value Calibration."""

__version__ = "0.1.0"

from dist_svc.errors import DistSvcError  # noqa: E402


def __getattr__(name: str):
    # `dist_svc.merge` loads the pipeline (and torch) on first use, not on `import dist_svc`:
    # the CLI's `--version`, `--help` and `status` stay fast.
    if name == "merge":
        from dist_svc.driver import merge

        return merge
    raise AttributeError(f"module 'dist_svc' has no attribute {name!r}")


__all__ = ["merge", "DistSvcError", "__version__"]
