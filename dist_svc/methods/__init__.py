"""Base merge methods: pure functions from task vectors to one merged delta.

A method takes the task vectors `tau_i = ft_i - base` of one tensor (or of one block of it, for
element-wise methods), each model's parameters (weight, density) and the method's parameters,
and returns the merged delta `Wm`. No files, no Ray, no globals: the worker reads and writes,
and the calibration rescales `Wm` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dist_svc.methods.sparse import dare, ties
from dist_svc.methods.spectral import iso_c, iso_cts, star, tsv
from dist_svc.methods.task_arithmetic import task_arithmetic


@dataclass(frozen=True)
class ParamSpec:
    default: Any
    kind: type = float
    low: float | None = None  # bounds checked by the config: low < value <= high
    high: float | None = None
    low_inclusive: bool = False  # low <= value instead


@dataclass(frozen=True)
class ModelParams:
    weight: float = 1.0
    density: float = 1.0


@dataclass(frozen=True)
class Where:
    """Which elements a call works on: the tensor's name and, lazily, the flat index of each
    element of the block in the whole tensor (what DARE's random numbers are keyed by)."""

    name: str
    indices: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]  # (deltas, models, params, where) -> merged delta
    parameters: dict[str, ParamSpec] = field(default_factory=dict)
    model_parameters: tuple[str, ...] = ("weight",)
    # Element-wise methods can run on any block of a tensor on its own, so workers stream them.
    elementwise: bool = True
    # Calibration's alpha when the config gives none: 1/K, or 1.0 for TSV (the authors' choice).
    alpha_is_one: bool = False

    def merge(self, deltas: Sequence[torch.Tensor], models: Sequence[ModelParams], params: dict[str, Any],
              where: Where) -> torch.Tensor:
        return self.fn(list(deltas), list(models), params, where)


def _weighted(deltas, models):
    return [d * m.weight if m.weight != 1.0 else d for d, m in zip(deltas, models)]


_LAMBDA = ParamSpec(1.0)
# mergekit's `int8_mask` stores TIES's sign mask as int8 to save memory; the result is the same,
# and dist-svc's masks are bool already: accepted, with no effect on the bytes.
_INT8_MASK = ParamSpec(False, bool)
_DENSITY = ParamSpec(1.0, float, 0.0, 1.0)  # mergekit's default: keep everything

METHODS: dict[str, Method] = {
    m.name: m for m in [
        Method(
            "task_arithmetic",
            lambda d, ms, p, w: task_arithmetic(d, [m.weight for m in ms], lam=p["lambda"], normalize=p["normalize"]),
            {"lambda": _LAMBDA, "normalize": ParamSpec(False, bool), "int8_mask": _INT8_MASK},
        ),
        Method(
            "ties",
            lambda d, ms, p, w: ties(d, [m.weight for m in ms], [m.density for m in ms], lam=p["lambda"],
                                     normalize=p["normalize"]),
            {"lambda": _LAMBDA, "normalize": ParamSpec(True, bool), "density": _DENSITY, "int8_mask": _INT8_MASK},
            model_parameters=("weight", "density"), elementwise=False,
        ),
        Method(
            "dare_linear",
            lambda d, ms, p, w: dare(d, [m.weight for m in ms], [m.density for m in ms], w.name, w.indices(),
                                     p["seed"], lam=p["lambda"], normalize=p["normalize"], rescale=p["rescale"]),
            {"lambda": _LAMBDA, "normalize": ParamSpec(False, bool), "rescale": ParamSpec(True, bool),
             "density": _DENSITY, "seed": ParamSpec(0, int), "int8_mask": _INT8_MASK},
            model_parameters=("weight", "density"),
        ),
        Method(
            "dare_ties",
            lambda d, ms, p, w: dare(d, [m.weight for m in ms], [m.density for m in ms], w.name, w.indices(),
                                     p["seed"], lam=p["lambda"], normalize=p["normalize"], rescale=p["rescale"],
                                     consensus=True),
            {"lambda": _LAMBDA, "normalize": ParamSpec(False, bool), "rescale": ParamSpec(True, bool),
             "density": _DENSITY, "seed": ParamSpec(0, int), "int8_mask": _INT8_MASK},
            model_parameters=("weight", "density"),
        ),
        Method("tsv", lambda d, ms, p, w: tsv(_weighted(d, ms), lam=p["lambda"]), {"lambda": _LAMBDA},
               elementwise=False, alpha_is_one=True),
        Method("iso_c", lambda d, ms, p, w: iso_c(_weighted(d, ms), lam=p["lambda"]), {"lambda": _LAMBDA},
               elementwise=False),
        Method("iso_cts", lambda d, ms, p, w: iso_cts(_weighted(d, ms), lam=p["lambda"],
                                                      common_fraction=p["common_fraction"]),
               {"lambda": _LAMBDA, "common_fraction": ParamSpec(0.8, float, 0.0, 1.0, low_inclusive=True)}, elementwise=False),
        Method("star", lambda d, ms, p, w: star(_weighted(d, ms), lam=p["lambda"], eta=p["eta"]),
               {"lambda": _LAMBDA, "eta": ParamSpec(0.4, float, 0.0, 1.0)}, elementwise=False),
    ]
}
