"""dist-svc: distributed, resumable model merging with Singular Value Calibration."""

__version__ = "0.1.0"

from dist_svc.errors import DistSvcError  # noqa: E402
from dist_svc.driver import merge  # noqa: E402

__all__ = ["merge", "DistSvcError", "__version__"]
