"""The merge method seam: a method is one pure function, registered next to it with its
parameters declared as data (as mergekit's `MergeMethodSpec` and `ParameterSpec` do).

Config parsing, validation, per-tensor resolution (gradients, filters), the plan's fingerprint
and the manifest's record of what each tensor was merged with all follow from the declaration;
nothing is written per method outside its own module. docs/extending.md.

A method function is called as `fn(tensors, p, where)`:
- `tensors`: for `operates_on="deltas"` the task vectors `tau_i = x_i - base` of the fine-tunes (the
  raw weights when the tensor has no base, as if the base were zero), and it returns the merged
  delta; for `operates_on="weights"` every input's weights in the config's order (the base among them
  where mergekit includes it, `where.base` says which), and it returns the merged weights;
- `p`: every declared parameter resolved for this tensor: a shared one as a value, a per-model
  one as a tuple with one value per input it applies to (`scope`), in order;
- `where`: the tensor's name and, lazily, the flat index of each element of the block (what
  counter-based random numbers are keyed by).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

import torch


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()

# What a method needs of a tensor at once: any block of elements, whole rows (a block of rows
# along axis 0: every element of each row, as a row-local method ranks or normalises along the
# other axes), or the whole tensor.
GRANULARITIES = ("element", "row", "tensor")
SCOPES = ("shared", "model", "input")


@dataclass(frozen=True)
class Param:
    """One parameter, as mergekit's ParameterSpec: `scope` "shared" (one value per tensor),
    "model" (one per fine-tune; mergekit's NON_BASE) or "input" (one per input, the base
    included; mergekit's INPUT)."""

    name: str
    default: Any = REQUIRED
    kind: type = float  # float, int or bool
    low: float | None = None  # bounds: low < value <= high (low <= value with low_inclusive)
    high: float | None = None
    low_inclusive: bool = False
    scope: str = "shared"
    nullable: bool = False  # None is a value (mergekit's Optional[float])
    doc: str = ""

    def __post_init__(self):
        assert self.scope in SCOPES and self.kind in (float, int, bool), self

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def per_model(self) -> bool:
        return self.scope != "shared"

    def check(self, value: Any) -> Any:
        """The value as this parameter holds it, or ValueError saying what is wrong. Lenient as
        mergekit's pydantic validation is: 1.0 and "true" are booleans, "1e-3" is a number."""
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            return as_bool(value)
        number = as_number(value)
        if self.kind is int:
            if number != int(number):
                raise ValueError(f"expected an integer (got {show(value)})")
            number = int(number)
        if self.low is not None or self.high is not None:
            low_ok = self.low is None or (number >= self.low if self.low_inclusive else number > self.low)
            high_ok = self.high is None or number <= self.high
            if not (low_ok and high_ok):
                lo = "-inf" if self.low is None else f"{self.low:g}"
                hi = "inf" if self.high is None else f"{self.high:g}"
                raise ValueError(f"must be in {'[' if self.low_inclusive else '('}{lo}, {hi}] (got {number:g})")
        return number


@dataclass(frozen=True)
class Where:
    """Which elements a call works on: the output tensor's name, the flat index of each element
    of the block in the whole tensor (lazily), and for methods on weights which input is the
    base (None: the tensor has no base)."""

    name: str
    indices: Callable[[], torch.Tensor]
    base: int | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[list, Mapping[str, Any], Where], torch.Tensor]
    params: tuple[Param, ...] = ()
    needs: str | Callable[[Mapping[str, Any]], str] = "element"  # a granularity, or one from the shared params
    operates_on: str = "deltas"  # "deltas" or "weights" (see the module's docstring)
    base: str = "required"  # "required", "optional" or "ignored" (mergekit's BasePolicy)
    # How many inputs one tensor takes (the base included, where it is an input) and how many
    # fine-tunes (non-base inputs): mergekit's InputContract.
    min_inputs: int = 1
    max_inputs: int | None = None
    min_fine_tunes: int = 0
    max_fine_tunes: int | None = None
    # Per-tensor checks of the resolved parameters beyond each one's bounds: a message, or None.
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    random: bool = False  # draws counter-based random numbers (dist_svc.methods.random)
    alpha_is_one: bool = False  # calibration's alpha when the config gives none: 1.0 (else 1/K)
    reference: str = ""
    # A setting to try the method with, as a config's `parameters:` are written (a per-model
    # parameter: every model's value): every required parameter given, values that exercise the
    # method (a density below 1). The contract tests and `dist-svc demo --methods` run it.
    sample: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # The streaming form of a method that needs whole tensors (`Passes`), set by `@streams`.
    passes: "Passes | None" = None
    # A shared parameter that multiplies the result last, exactly (`result * value`): lambda,
    # for every method declaring it. Merges that differ only in it compute the method once
    # and scale, and share their calibration's Grams (the worker; dist_svc.batch).
    scale: str | None = None

    def __post_init__(self):
        names = [p.name for p in self.params]
        assert len(set(names)) == len(names), f"{self.name}: a parameter is declared twice"
        assert set(self.sample) <= set(names), f"{self.name}: sample= names an undeclared parameter"
        missing = [p.name for p in self.params if p.required and p.name not in self.sample]
        assert not missing, f"{self.name}: give the required {', '.join(missing)} in sample="
        assert self.operates_on in ("deltas", "weights") and self.base in ("required", "optional", "ignored")
        assert self.scale is None or self.scale in names, f"{self.name}: scale= names an undeclared parameter"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def most_fine_tunes(self) -> int | None:
        """The most fine-tunes one tensor takes beside a base (None: any number)."""
        limits = [self.max_fine_tunes, None if self.max_inputs is None else self.max_inputs - 1]
        return min((n for n in limits if n is not None), default=None)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def granularity(self, params: Mapping[str, Any]) -> str:
        g = self.needs(params) if callable(self.needs) else self.needs
        assert g in GRANULARITIES, (self.name, g)
        return g

    def merge(self, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], where: Where,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """The method on one block. A method on deltas given no task vector at all (the base is
        the tensor's only model: a config listing just the base, or slices that reduce to it)
        merges to a zero delta, so the output is the base, as mergekit returns it; `base` (the
        base's block) gives its shape. -0.0, not 0.0: x + -0.0 is x bit for bit, -0.0 too."""
        if self.operates_on == "deltas" and not tensors:
            if base is None:
                raise ValueError(f"{self.name}: no task vector and no base")
            return torch.full_like(base, -0.0)
        return self.fn(list(tensors), params, where)


METHODS: dict[str, Method] = {}


def register(name: str, *params: Param, **options) -> Callable:
    """Register the decorated function as merge method `name` with its parameters."""

    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        if LAMBDA in params:
            options.setdefault("scale", LAMBDA.name)
        METHODS[name] = Method(name, fn, tuple(params), **options)
        return fn

    return wrap


# -- streaming forms: whole-tensor methods in passes over blocks ------------------------------------

@dataclass(frozen=True)
class Extent:
    """What a streaming form knows of a tensor before any pass: its name and shape, which input
    is the base (methods on weights), and whether its blocks come in flat-index order (blocks of
    rows) or not (blocks of columns of a wide matrix that is calibrated)."""

    name: str
    shape: tuple[int, ...]
    base: int | None = None
    ordered: bool = True
    dtype: torch.dtype = torch.float32  # the compute dtype of the blocks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# A reduction: one pass over every block of the tensor, `fn(tensors, where)` of each block
# (blocks in order), the results summed over the blocks (a new tensor, or a tuple of them).
Reduction = Callable[[list, Where], Any]
# An output pass: `begin()` gives the function of each block's output, called on the blocks in
# order; `begin` is called anew for each traversal (a calibrated merge makes two).
Output = Callable[[], Callable[[list, Where], torch.Tensor]]
# A streaming form: `passes(p, extent)` is a generator that yields reductions, is sent each one's
# sum, and returns the output pass. Exact: the same values as the whole tensor, in memory that
# does not depend on the tensor's size. docs/methods.md counts each method's passes.
Passes = Callable[[Mapping[str, Any], Extent], Generator[Reduction, Any, Output]]


def streams(name: str) -> Callable[[Passes], Passes]:
    """Declare the decorated generator the streaming form of registered method `name`."""

    def wrap(passes: Passes) -> Passes:
        import dataclasses

        METHODS[name] = dataclasses.replace(METHODS[name], passes=passes)
        return passes

    return wrap


def drive(passes: Passes, p: Mapping[str, Any], extent: Extent,
          traverse: Callable[[], Iterable[tuple[list, Where]]]) -> Output:
    """Run a streaming form's reductions over `traverse()` (every block's method inputs and
    where, in order; called once per pass) and return its output pass."""
    steps = passes(p, extent)
    total = None
    try:
        while True:
            reduction = steps.send(total)
            total = None
            for tensors, where in traverse():
                part = reduction(tensors, where)
                total = part if total is None else _add(total, part)
    except StopIteration as done:
        return done.value


def _add(total, part):
    if isinstance(total, tuple):
        return tuple(_add(a, b) for a, b in zip(total, part))
    return total.add_(part)  # in place: each block's result is a tensor of its own


def whole(passes: Passes, tensors: list, p: Mapping[str, Any], where: Where) -> torch.Tensor:
    """A streaming form on the whole tensor as its one block: the method's whole-tensor call."""
    extent = Extent(where.name, tuple(tensors[0].shape), where.base, dtype=tensors[0].dtype)
    return drive(passes, p, extent, lambda: [(tensors, where)])()(tensors, where)


# -- values as mergekit's (pydantic) validation accepts them -------------------------------------

_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def as_bool(value: Any) -> bool:
    """true/false, and what pydantic takes for them: 1/0, 1.0/0.0 (mergekit-evolve writes
    `int8_mask: 1.0`), "true"/"yes"/"on"/"1" and their opposites."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false (got {show(value)})")


def as_number(value: Any) -> float:
    """A finite number; a numeric string too ("1e-3": YAML 1.1 reads exponents without a dot
    as strings, and mergekit accepts them)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number (got {show(value)})")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number (got {show(value)})") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"expected a number (got {show(value)})")
    if not math.isfinite(value):
        raise ValueError(f"must be finite (got {value})")
    return float(value)


def show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: never walks more of a value than it prints (a YAML alias bomb
    is a few bytes that expand into gigabytes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Shared declarations, as mergekit declares them for its task-arithmetic family.
LAMBDA = Param("lambda", 1.0, doc="scales the merged delta")
INT8_MASK = Param("int8_mask", False, bool, doc="mergekit's memory option for masks; no effect on the bytes")
WEIGHT = Param("weight", 1.0, scope="model", doc="multiplies each task vector")
DENSITY = Param("density", 1.0, float, 0.0, 1.0, low_inclusive=True, scope="model",
                doc="fraction of each task vector kept")
SEED = Param("seed", 0, int, doc="dist-svc: the seed of the counter-based random numbers")


def normalize(default: bool) -> Param:
    return Param("normalize", default, bool, doc="divide by the summed weights")


def rescale(default: bool) -> Param:
    return Param("rescale", default, bool, doc="rescale what sparsification kept")
