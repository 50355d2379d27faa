"""The version of dist-svc: recorded in every plan's fingerprint and manifest (dist_svc.plan,
dist_svc.manifest) and shown by `dist-svc --version`."""

__version__ = "0.3.0"
