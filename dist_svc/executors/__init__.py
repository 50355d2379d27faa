"""Executors run a merge's pending units through `Worker` and report each result to the driver.

An executor decides only where and in what order units run; the bytes come from the worker, so
every executor writes the same output. `run(job, units, on_result)` calls `on_result` in the
driver's thread, once per finished unit, and returns when all are done or raises on failure.
Two attributes tell the driver what it must still do:
- `results_verified`: every reported unit's bytes are known to be on storage as hashed (so
  sealing need not read them again);
- `driver_syncs`: workers do not fsync; the driver must sync shard files before recording.

`LocalExecutor` is the embedded default; `RayExecutor` (dist_svc.executors.ray_cluster) needs
Ray and is imported only when asked for.
"""

from dist_svc.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
