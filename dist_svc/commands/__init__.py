"""The commands of `dist-svc`, each defining its click command in its own module (`merge`,
`status`, `verify`, `inspect`, `convert`, `demo`, `bench`), assembled by dist_svc.cli. They use
the pipeline (driver, storage) and are not part of it: nothing of the pipeline imports them."""
