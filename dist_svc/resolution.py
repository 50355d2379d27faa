"""A setting's value for one tensor, as mergekit evaluates it: gradients interpolated over the
layers, filters matched against the tensor's name. The plan resolves every parameter of every
unit with these (dist_svc.plan); `inspect` groups tensors by layer with them."""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\..+)$")


def split_layer(tensor: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a tensor inside a layer ("model.layers.", 3,
    ".mlp.up_proj.weight"); None outside the layers."""
    match = _LAYER.match(tensor)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def layer_index(tensor: str) -> int | None:
    split = split_layer(tensor)
    return split[1] if split else None


def layer_position(tensor: str, num_layers: int) -> float:
    """mergekit's t: layer i of L at i / (L - 1) (1 when L is 1); 0 outside the layers."""
    i = layer_index(tensor)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(setting: Any, tensor: str, t: float) -> Any:
    """mergekit's `evaluate_setting`: the value of a setting for one tensor at layer position t
    (0 for the first layer and for tensors outside the layers, 1 for the last); None when a
    filtered list has no entry for this tensor."""
    if setting is None or isinstance(setting, (bool, int, float)):
        return setting
    if all(not isinstance(v, dict) for v in setting):
        if any(isinstance(v, bool) or v is None for v in setting):  # discrete: no interpolation
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond["filter"] is None or cond["filter"] == "*" or cond["filter"] in tensor:
            return resolve(cond["value"], tensor, t)
    return None
