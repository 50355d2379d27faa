"""The commands around the merge pipeline: `demo`, `convert`, `inspect`, `bench` and the dry
run's `estimate`. They use the pipeline (driver, storage) and are not part of it."""
