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
place: OUT_DIR is absent or complete. A rerun finds the finished adapter with the same
fingerprint and does nothing; anything else in OUT_DIR is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
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
RECORD_NAME = "dist-svc-adapter-merge.json"  # the fingerprint and checksums of a finished adapter merge


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
    units_total: int
    units_run: int
    already_complete: bool
    seconds: float
    calibration: dict


def merge_adapters(config, out_dir: Path, log: Callable[[str], None] = lambda line: None) -> AdapterReport:
    """The merge of `config`, whose models are all LoRA adapters of its base, written to
    `out_dir` as one PEFT adapter (see the module's docstring)."""
    from dist_svc.plan import build_plan, open_inputs
    from dist_svc.storage.durable import atomic_write, staged_directory
    from dist_svc.storage.types import Adapter, NAME_TO_ST

    start = time.perf_counter()
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
        record = {"fingerprint": plan.fingerprint}
        if _finished(out_dir, plan.fingerprint):
            return AdapterReport(out_dir, plan.summary(), len(plan.units), 0, True, time.perf_counter() - start, {})
        if out_dir.exists():
            raise DistSvcError(f"{out_dir} already exists and is not this adapter merge; dist-svc never overwrites. "
                               f"Choose a new output directory, or delete {out_dir}.")
        log(f"plan: {len(models)} LoRA adapters of {base.source}, merged as one adapter (SVC in factored form)")
        out_dtype = _torch_dtype(NAME_TO_ST.get(config.out_dtype or "float32"))
        tensors, modules, calibration, saved = _merge_all(config, plan, base, models, out_dtype)
        rank = max((m["rank"] for m in modules.values()), default=1)
        out_tensors = _padded(tensors, modules, rank, out_dtype)
        adapter_config = _adapter_config(base, models, modules, saved, rank)
    finally:
        base.close()
        for m in models:
            m.close()

    from safetensors.torch import save

    payload = save(out_tensors, metadata={"format": "pt"})
    files = {"adapter_model.safetensors": payload,
             "adapter_config.json": (json.dumps(adapter_config, indent=2) + "\n").encode()}
    record["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    record["calibration"] = calibration
    with staged_directory(out_dir, "merging") as tmp:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        for name, digest in record["files"].items():  # read back what the disk holds
            if hashlib.sha256((tmp / name).read_bytes()).hexdigest() != digest:
                raise DistSvcError(f"{tmp / name}: reads back differently from what was written; the storage is "
                                   f"not reliable.")
        atomic_write(tmp / RECORD_NAME, json.dumps(record, indent=2).encode())
    return AdapterReport(out_dir, plan.summary(), len(plan.units), len(plan.units), False,
                         time.perf_counter() - start, calibration)


def _finished(out_dir: Path, fingerprint: str) -> bool:
    try:
        record = json.loads((out_dir / RECORD_NAME).read_bytes())
        return record["fingerprint"] == fingerprint and all(
            hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == digest for name, digest in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
    checkpoints = [base, *models]
    for unit in plan.units:
        name = unit.name
        if unit.base is None or unit.inputs[unit.base].checkpoint != 0 or any(s.tensor != name for s in unit.inputs):
            raise DistSvcError(f"tensor '{name}': output format peft merges each tensor of the adapters with the "
                               f"base's own; this plan maps it differently.")
        adapters = [checkpoints[unit.inputs[i].checkpoint] for i in unit.fine_tunes]  # the method's order
        factors = [m.factors.get(name) for m in adapters]
        full = [m.replaces(name) for m in adapters]
        if not any(factors) and not any(full):
            continue  # no adapter changes it: the base's own
        coefficients = linear_coefficients(config.merge_method, unit)
        alpha = unit.alpha
        if any(full) or len(unit.shape) != 2:
            # modules_to_save, a bias, a vector: merged densely (they are small or rare)
            base_t = base.read(name).to(torch.float64)
            taus = [m.read(name).to(torch.float64) - base_t if full[i] else
                    m.delta(name, None, None, torch.float64) for i, m in enumerate(adapters)]
            merged = sum(c * t for c, t in zip(coefficients, taus))
            if unit.calibrate:
                result = calibrate_singular_values(merged, taus, alpha, cal.side, cal.target)
                merged = result.delta
                calibration[name] = result.summary()
            if name.endswith(".bias") and not any(full):  # lora_B.bias (the output's scale is 1)
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
