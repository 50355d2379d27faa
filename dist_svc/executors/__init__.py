"""Executors run a merge's pending units through `Worker` and report each result to the driver.

An executor decides only where and in what order units run; the bytes come from the worker, so
every executor writes the same output. `run(job, units, on_result)` calls `on_result` in the
driver's thread, once per finished unit, and returns when all are done or raises on failure.
"""

from dist_svc.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
