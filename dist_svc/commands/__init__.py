"""The commands around the merge pipeline: `demo`, `convert`, `inspect` and the dry
run's `estimate` (the benchmarks are `dist_svc.bench`). They use the pipeline (driver,
storage) and are not part of it."""
