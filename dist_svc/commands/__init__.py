"""The commands of `dist-svc`, each defining its click command in its own module (`merge`,
`status`, `verify`, `inspect`, `convert`, `demo`, `sweep`), assembled by dist_svc.cli (the
benchmarks are `dist_svc.bench`). They use the pipeline (driver, storage) and are not part of
it: nothing of the pipeline imports them."""
