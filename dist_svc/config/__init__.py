"""The merge configuration: mergekit's YAML (and a few dist-svc fields), parsed once into typed
objects. A file may hold several YAML documents (mergekit-multimerge's stages, dist_svc.stages).

    yaml.py      reading the file, bounded (size, nesting, alias expansion; no repeated keys)
    schema.py    the typed configuration (`MergeConfig` and its parts)
    validate.py  parsing and validation, every problem at once; sizes (`parse_size`)

Per-tensor resolution of the settings is the plan's (dist_svc.resolution).
"""

from dist_svc.config.schema import (
    DEFAULT_SKIP, CalibrationSpec, MergeConfig, OutputSpec, SliceSpec, SourceSpec, TokenizerSpec, TokenSource,
)
from dist_svc.config.validate import CHAT_TEMPLATE_NAMES, load_config, parse_config, parse_size
from dist_svc.config.yaml import read_documents
from dist_svc.resolution import layer_index, layer_position, resolve, split_layer

__all__ = [
    "CHAT_TEMPLATE_NAMES", "DEFAULT_SKIP", "CalibrationSpec", "MergeConfig", "OutputSpec", "SliceSpec", "SourceSpec",
    "TokenSource", "TokenizerSpec", "layer_index", "layer_position", "load_config", "parse_config", "parse_size",
    "read_documents", "resolve", "split_layer",
]
