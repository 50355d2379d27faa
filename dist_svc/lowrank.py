"""Merging LoRA adapters of one base as adapters: SVC in factored form, output as one PEFT adapter.

When every model is a LoRA adapter of the base, each task vector of a matrix is low rank,
`tau_i = L_i R_i^T` (L_i = scale_i * B_i, R_i = A_i^T; transposed for embeddings), and a linear
method's merge is `Wm = sum_i c_i tau_i`. With reduced QRs of the stacked factors,

    [L_1 .. L_K] = Q_l P        [R_1 .. R_K] = Q_r G        (P, G: p x R and q x R, R = sum_i r_i)

every matrix involved is `Q_l X Q_r^T` with a small core X: `tau_i -> T_i = P_i G_i^T` and
`Wm -> M = sum_i c_i T_i`. Orthonormal changes of basis keep singular values, singular vectors
(mapped by Q_l, Q_r) and every projection SVC measures, so

    SVC(Wm, {tau_i}) = Q_l  SVC(M, {T_i})  Q_r^T

exactly (to float64 rounding): the calibration runs on R x R matrices instead of m x n, and its
result is a LoRA of rank <= R: B' = Q_l SVC(M), A' = Q_r^T. Cost O((m + n) R^2 + R^3) per matrix
against O(m n^2 K) for the dense Gram path (`dist-svc bench lora` measures it).

`merge_adapters` is what `dist-svc merge` runs for `output: {format: peft}`: the whole merge in
one process (it reads only the adapters' factors and the tensors they replace, megabytes), the
result written as a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)
under a temporary name, read back against the hashes of what was written, and renamed into
place with its record (storage/adapter_output.py, which `status`, `verify` and `inspect` read):
OUT_DIR is absent or complete. A rerun finds the finished adapter with the same fingerprint and
does nothing; anything else in OUT_DIR is refused, never overwritten. `plan_adapters` says
beforehand what the merge computes and writes (`--dry-run`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dist_svc.calibration import calibrate_singular_values
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, Where

# Methods whose merge is linear in the task vectors (sum_i c_i tau_i): only these keep a merge
# of low-rank task vectors low rank.
LINEAR_METHODS = ("task_arithmetic",)


@dataclass(frozen=True)
class Factored:
    """One matrix as L @ R^T (float64): L is m x r, R is n x r."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T


def merge_factored(taus: Sequence[Factored], coefficients: Sequence[float], calibrate: bool, alpha: float,
                   side: str = "column", target: int | None = None) -> tuple[Factored, dict | None]:
    """`sum_i c_i tau_i`, calibrated (SVC) when asked, as a factored matrix of rank <= sum r_i,
    and the calibration's summary. Exact: no dense m x n matrix is formed."""
    lefts = torch.cat([t.left for t in taus], dim=1)
    rights = torch.cat([t.right for t in taus], dim=1)
    q_l, p = torch.linalg.qr(lefts)  # reduced: m x min(m, R), min(m, R) x R
    q_r, g = torch.linalg.qr(rights)
    spans, start = [], 0
    for t in taus:
        spans.append(slice(start, start + t.left.shape[1]))
        start += t.left.shape[1]
    cores = [p[:, s] @ g[:, s].T for s in spans]  # T_i = P_i G_i^T
    merged = sum(c * core for c, core in zip(coefficients, cores))
    if not calibrate:
        return Factored(q_l @ merged, q_r), None
    result = calibrate_singular_values(merged, cores, alpha, side, target)
    return Factored(q_l @ result.delta, q_r), result.summary()


def linear_coefficients(method_name: str, unit) -> list[float]:
    """c_i of a linear method on task vectors (`merged = sum_i c_i tau_i`, one per fine-tune of
    the unit), from the method itself: its merge of one-hot task vectors, so that lambda, weights
    and normalisation mean what they mean there."""
    method = METHODS[method_name]
    params = unit.call_params(method)
    where = Where(unit.name, lambda: torch.zeros((), dtype=torch.int64), unit.base)
    k = len(unit.fine_tunes)
    out = []
    for i in range(k):
        one_hot = [torch.tensor(1.0 if j == i else 0.0, dtype=torch.float64) for j in range(k)]
        out.append(float(method.merge(one_hot, params, where)))
    return out


# -- the PEFT output -----------------------------------------------------------------------------------


@dataclass
class AdapterReport:
    out_dir: Path
    plan_summary: str
    units_total: int  # tensors of the output adapter
    units_run: int
    already_complete: bool
    seconds: float
    calibration: dict


@dataclass(frozen=True)
class AdapterPlan:
    """What the merge of adapters computes and writes, from the inputs' metadata."""

    adapters: int
    base: str
    factored: dict[str, int]  # tensor -> rank of its merged factors (sum of the adapters' ranks, at most its width)
    dense: list[str]  # merged whole: biases, vectors, tensors an adapter replaces (modules_to_save)
    unchanged: int  # tensors of the base no adapter changes (not in the output)
    calibrated: int  # matrices calibrated
    rank: int  # the output's r: every factor is padded to it
    tensors: int  # tensors of the output adapter
    nbytes: int  # their bytes

    def computes(self) -> str:
        how = "SVC in factored form" if self.calibrated else "weighted sum in factored form, no calibration"
        return f"merged as one adapter ({how})"

    def summary(self) -> str:
        return (f"{self.adapters} LoRA adapters of {self.base} {self.computes()}: {self.tensors} adapter tensors "
                f"(r = {self.rank}), {self.nbytes} bytes")


def plan_adapters(config, plan, base, models) -> AdapterPlan:
    """The adapter merge of `plan` (see `_merge_all`, which follows it), known before anything
    is computed: per tensor of the base whether it is merged as factors, densely, or not at all,
    the output's rank and its tensors."""
    from dist_svc.storage.types import NAME_TO_ST, tensor_nbytes

    factored, dense, sizes, unchanged = {}, [], {}, 0
    out_dtype = NAME_TO_ST.get(config.out_dtype or "float32")
    for unit, adapters, factors, full in _changes(plan, [base, *models]):
        if full is None:
            unchanged += 1
        elif _is_factored(unit, full):
            width = sum(m.weights.tensors[f.a].shape[0] for m, f in zip(adapters, factors) if f is not None)
            factored[unit.name] = min(unit.shape[1], width)
        else:
            dense.append(unit.name)
            sizes[unit.name] = tensor_nbytes(out_dtype if _is_bias(unit, full) else unit.out_dtype, unit.shape)
    rank = max(factored.values(), default=1)
    units = {u.name: u for u in plan.units}
    # A (r x n) and B (m x r) of every factored matrix, padded to the one rank
    nbytes = sum(sizes.values()) + sum(tensor_nbytes(out_dtype, (rank, sum(units[name].shape))) for name in factored)
    return AdapterPlan(len(models), str(base.source), factored, dense, unchanged,
                       sum(units[name].calibrate for name in (*factored, *dense)), rank,
                       2 * len(factored) + len(dense), nbytes)


def open_adapter_merge(config, out_dir: Path | str):
    """(the plan, its adapter plan, base, models) of a merge of adapters, the inputs open (the
    caller closes them); refuses in one paragraph what is not a merge of adapters of the base,
    or not to a local directory."""
    from dist_svc.plan import build_plan, open_inputs
    from dist_svc.storage.types import Adapter

    if not isinstance(out_dir, Path):
        raise DistSvcError(f"{out_dir}: a merge of adapters (output format peft) is written to a local directory; "
                           f"upload the adapter (two small files) afterwards.")
    if config.merge_method not in LINEAR_METHODS:
        raise DistSvcError(f"{config.source}: output format peft needs a method that is linear in the task vectors "
                           f"({', '.join(LINEAR_METHODS)}), so that the merge of LoRA adapters is a LoRA again; "
                           f"'{config.merge_method}' is not. Write safetensors or zarr output instead.")
    if config.base != 0 or not config.whole_models:
        raise DistSvcError(f"{config.source}: output format peft merges whole LoRA adapters of a base_model; "
                           f"this config has {'no base_model' if config.base is None else 'slices'}.")
    base, models = open_inputs(config)
    try:
        for model in models:
            if not isinstance(model, Adapter) or model.inner is not base:
                raise DistSvcError(f"{model.source}: output format peft merges LoRA adapters of the base model only "
                                   f"(each model an adapter directory, applied to base_model {base.source}); this "
                                   f"one is not. Write safetensors or zarr output instead.")
        plan = build_plan(config, base, models)
        return plan, plan_adapters(config, plan, base, models), base, models
    except BaseException:
        for checkpoint in (base, *models):
            checkpoint.close()
        raise


def output_state(out_dir: Path, fingerprint: str) -> str | None:
    """None when OUT_DIR is free for this merge, "finished" when it holds it; refuses anything
    else in one paragraph (dist-svc never overwrites)."""
    from dist_svc.storage import adapter_output

    if adapter_output.finished(out_dir, fingerprint):
        return "finished"
    if not out_dir.exists():
        return None
    record = adapter_output.read_record(out_dir)
    if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
        raise DistSvcError(f"{out_dir} holds this merge of adapters, damaged: "
                           f"{'; '.join(adapter_output.problems(out_dir))}. Delete {out_dir} and rerun the same "
                           f"command: the adapter is merged again whole, in seconds.")
    raise DistSvcError(f"{out_dir} already exists and is not this adapter merge; dist-svc never overwrites. "
                       f"Choose a new output directory, or delete {out_dir}.")


def dry_run_adapters(config, out_dir: Path | str) -> tuple[AdapterPlan, str | None]:
    """The adapter merge's plan and what OUT_DIR holds of it (None: a new merge, "finished"),
    refusing what `merge_adapters` would refuse; nothing is computed or written."""
    plan, adapters, base, models = open_adapter_merge(config, out_dir)
    try:
        return adapters, output_state(out_dir, plan.fingerprint)
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()


def merge_adapters(config, out_dir: Path, log: Callable[[str], None] = lambda line: None) -> AdapterReport:
    """The merge of `config`, whose models are all LoRA adapters of its base, written to
    `out_dir` as one PEFT adapter (see the module's docstring)."""
    from safetensors.torch import save

    from dist_svc.storage import adapter_output
    from dist_svc.storage.types import NAME_TO_ST

    start = time.perf_counter()
    plan, adapters, base, models = open_adapter_merge(config, out_dir)
    try:
        if output_state(out_dir, plan.fingerprint) == "finished":
            return AdapterReport(out_dir, adapters.summary(), adapters.tensors, 0, True, time.perf_counter() - start, {})
        log(f"plan: {adapters.summary()}")
        out_dtype = _torch_dtype(NAME_TO_ST.get(config.out_dtype or "float32"))
        tensors, modules, calibration, saved = _merge_all(config, plan, base, models, out_dtype)
        rank = max((m["rank"] for m in modules.values()), default=1)
        out_tensors = _padded(tensors, modules, rank, out_dtype)
        adapter_config = _adapter_config(base, models, modules, saved, rank)
    finally:
        base.close()
        for m in models:
            m.close()

    files = {adapter_output.WEIGHTS_NAME: save(out_tensors, metadata={"format": "pt"}),
             adapter_output.CONFIG_NAME: (json.dumps(adapter_config, indent=2) + "\n").encode()}
    shapes = {u.name: list(u.shape) for u in plan.units if u.name in calibration}
    adapter_output.write(out_dir, files, {"fingerprint": plan.fingerprint, "tensors": len(out_tensors),
                                          "plan": adapters.summary(), "calibration": calibration, "shapes": shapes})
    return AdapterReport(out_dir, adapters.summary(), len(out_tensors), len(out_tensors), False,
                         time.perf_counter() - start, calibration)


def _torch_dtype(code: str) -> torch.dtype:
    from dist_svc.storage.types import DTYPES

    return DTYPES[code][0]


def _merge_all(config, plan, base, models, out_dtype):
    """Per tensor of the base: factored (every adapter changes it by factors, or not at all),
    dense (some adapter replaces it whole: modules_to_save), or unchanged (skipped)."""
    cal = config.calibration
    tensors: dict[str, torch.Tensor] = {}  # output key -> tensor
    saved: list[str] = []  # tensors the output adapter holds whole (modules_to_save)
    modules: dict[str, dict] = {}  # module -> {rank, transpose, embedding, bias}
    calibration: dict[str, dict] = {}
    for unit, adapters, factors, full in _changes(plan, [base, *models]):
        if full is None:
            continue  # no adapter changes it: the base's own
        name = unit.name
        coefficients = linear_coefficients(config.merge_method, unit)
        alpha = unit.alpha
        if not _is_factored(unit, full):
            # modules_to_save, a bias, a vector: merged densely (they are small or rare)
            base_t = base.read(name).to(torch.float64)
            taus = [m.read(name).to(torch.float64) - base_t if full[i] else
                    m.delta(name, None, None, torch.float64) for i, m in enumerate(adapters)]
            merged = sum(c * t for c, t in zip(coefficients, taus))
            if unit.calibrate:
                result = calibrate_singular_values(merged, taus, alpha, cal.side, cal.target)
                merged = result.delta
                calibration[name] = result.summary()
            if _is_bias(unit, full):  # lora_B.bias (the output's scale is 1)
                module = name.removesuffix(".bias")
                modules.setdefault(module, {"rank": 0, "transpose": False})["bias"] = True
                tensors[f"{module}.lora_B.bias"] = merged
            else:  # a full tensor of the output adapter (modules_to_save)
                tensors[name] = (base_t + merged).to(_torch_dtype(unit.out_dtype))
                saved.append(name)
            continue
        taus = []
        transpose = None
        for i, (m, f) in enumerate(zip(adapters, factors)):
            if f is None:
                taus.append(Factored(torch.zeros(unit.shape[0], 0, dtype=torch.float64),
                                     torch.zeros(unit.shape[1], 0, dtype=torch.float64)))
                continue
            a, b = m.factor(f.a), m.factor(f.b)
            # W = scale * B @ A, or its transpose (embeddings, fan_in_fan_out)
            taus.append(Factored(a.T, f.scale * b) if f.transpose else Factored(f.scale * b, a.T))
            if transpose is not None and transpose != f.transpose:
                raise DistSvcError(f"tensor '{name}': the adapters disagree on its layout (fan_in_fan_out or "
                                   f"embedding); they cannot be adapters of one base.")
            transpose = f.transpose
        result, summary = merge_factored(taus, coefficients, unit.calibrate, alpha, cal.side, cal.target)
        if summary is not None:
            calibration[name] = summary
        module = name.removesuffix(".weight")
        embedding = any(f is not None and "lora_embedding_A" in f.a for f in factors)
        rank = result.left.shape[1]
        modules[module] = {**modules.get(module, {}), "rank": rank, "transpose": bool(transpose),
                           "embedding": embedding}
        if transpose:  # W = (B @ A)^T = A^T B^T: A = L^T, B = R
            a_out, b_out = result.left.T, result.right
        else:  # W = B @ A: B = L, A = R^T
            a_out, b_out = result.right.T, result.left
        key = "lora_embedding" if embedding else "lora"
        tensors[f"{module}.{key}_A{'' if embedding else '.weight'}"] = a_out
        tensors[f"{module}.{key}_B{'' if embedding else '.weight'}"] = b_out
    return tensors, modules, calibration, saved


def _changes(plan, checkpoints):
    """Per unit of the plan: (unit, its adapters in the method's order, their factors, which of
    them replace it whole), `full` None when no adapter changes it."""
    for unit in plan.units:
        name = unit.name
        if unit.base is None or unit.inputs[unit.base].checkpoint != 0 or any(s.tensor != name for s in unit.inputs):
            raise DistSvcError(f"tensor '{name}': output format peft merges each tensor of the adapters with the "
                               f"base's own; this plan maps it differently.")
        adapters = [checkpoints[unit.inputs[i].checkpoint] for i in unit.fine_tunes]  # the method's order
        factors = [m.factors.get(name) for m in adapters]
        full = [m.replaces(name) for m in adapters]
        yield unit, adapters, factors, (full if any(factors) or any(full) else None)


def _is_factored(unit, full: list[bool]) -> bool:
    return not any(full) and len(unit.shape) == 2


def _is_bias(unit, full: list[bool]) -> bool:
    """An adapted bias (lora_B.bias), as opposed to a tensor the output holds whole."""
    return unit.name.endswith(".bias") and not any(full)


def _padded(tensors: dict[str, torch.Tensor], modules: dict[str, dict], rank: int, dtype: torch.dtype):
    """Every factor padded to one rank with zero rows (A) and columns (B), which change nothing:
    PEFT then needs one `r`. Keys as PEFT saves them."""
    out = {}
    for key, t in tensors.items():
        if re.search(r"\.lora(_embedding)?_A(\.weight)?$", key):
            t = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])]) if t.shape[0] < rank else t
        elif re.search(r"\.lora(_embedding)?_B(\.weight)?$", key):
            t = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1) if t.shape[1] < rank else t
        if re.search(r"\.lora(_embedding)?_[AB](\.weight|\.bias)?$", key):
            t = t.to(dtype)
        out[f"base_model.model.{key}"] = t.contiguous()
    return out


def _adapter_config(base, models, modules: dict[str, dict], saved: list[str], rank: int) -> dict:
    first = models[0].config
    full = sorted({name.rsplit(".", 1)[0] for name in saved})
    return {
        "peft_type": "LORA", "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path") or str(base.source),
        "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "bias": "none", "lora_bias": any(m.get("bias") for m in modules.values()),
        "fan_in_fan_out": any(m["transpose"] and not m.get("embedding") for m in modules.values()),
        # Exactly the merged modules (a regular expression over module names, as PEFT reads a string).
        "target_modules": "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$",
        "modules_to_save": [m.rsplit(".", 1)[-1] for m in full] or None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
        "revision": None,
    }
