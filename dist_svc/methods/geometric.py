"""Merges by angles and means on the sphere, with mergekit 0.1.5's semantics (its order of
operations too, so that float32 results agree to rounding):

    slerp        spherical interpolation from the base (t = 0) to the one other model (t = 1),
                 each tensor flattened to one vector; nearly parallel vectors are interpolated linearly
    nuslerp      SLERP of two fine-tunes' task vectors (or weights, without a base) with t = w_2 / (w_1 + w_2),
                 per tensor (`nuslerp_flatten`), per row, or per column (`nuslerp_row_wise`)
    karcher      the weighted Karcher (Riemannian) mean of the inputs' directions, times their mean norm
    model_stock  Model Stock: base + t * mean of the task vectors, t from the task vectors' mean
                 pairwise cosine (per tensor, or per row with `filter_wise`)
"""

from __future__ import annotations

import torch

from dist_svc.methods.base import REQUIRED, Param, register

SLERP_CHUNK = 1 << 20  # elements per chunk of the norms and the dot product, as mergekit's


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `slerp` of two tensors, each taken as one vector."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=v0.device)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, a.shape[1], SLERP_CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + SLERP_CHUNK].to(dtype) / norm_a) * (b[:, s:s + SLERP_CHUNK].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + SLERP_CHUNK] = coef_a * a[:, s:s + SLERP_CHUNK].to(dtype) + coef_b * b[:, s:s + SLERP_CHUNK].to(dtype)
    return result.reshape(v0.shape)


@register("slerp", Param("t", REQUIRED, doc="0: the base, 1: the other model"), operates_on="weights",
          needs="tensor", min_inputs=2, max_inputs=2, sample={"t": 0.5},
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(weights, p, where):
    base = where.base
    return slerp_vectors(p["t"], weights[base], weights[1 - base])


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
                    flatten: bool = False) -> torch.Tensor:
    """mergekit's `nuslerp`: SLERP along `dim` (or of the flattened tensors)."""
    out_shape = v0.shape

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def _nuslerp_needs(p) -> str:
    if p["nuslerp_flatten"] or p["nuslerp_row_wise"]:
        return "tensor"
    return "row"


@register("nuslerp", Param("weight", REQUIRED, scope="model", doc="t = w_2 / (w_1 + w_2)"),
          Param("nuslerp_row_wise", False, bool, doc="interpolate each column (dim 0)"),
          Param("nuslerp_flatten", True, bool, doc="interpolate the whole tensor as one vector"),
          needs=_nuslerp_needs, base="optional", min_fine_tunes=2, max_fine_tunes=2, sample={"weight": 1.0})
def nuslerp(tensors, p, where):
    w0, w1 = p["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    return nuslerp_vectors(t, tensors[0], tensors[1], dim=0 if p["nuslerp_row_wise"] else -1,
                           flatten=p["nuslerp_flatten"])


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's weighted Karcher mean on the unit sphere, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


@register("karcher", Param("max_iter", 10, int, 0, doc="iterations at most", low_inclusive=True),
          Param("tol", 1e-5, float, 0.0, doc="convergence tolerance"),
          operates_on="weights", base="ignored", needs="tensor", reference="https://arxiv.org/abs/2603.04972")
def karcher(weights, p, where):
    if len(weights) == 1:
        return weights[0]
    return karcher_mean(weights, [1.0 / len(weights)] * len(weights), p["max_iter"], p["tol"])


def _model_stock_needs(p) -> str:
    return "row" if p["filter_wise"] else "tensor"


@register("model_stock", Param("filter_wise", False, bool, doc="one t per row instead of per tensor"),
          operates_on="weights", needs=_model_stock_needs, min_inputs=3,
          reference="https://arxiv.org/abs/2403.19522")
def model_stock(weights, p, where):
    """mergekit's Model Stock (the base and at least two fine-tunes)."""
    w_0 = weights[where.base]
    ws = [w for i, w in enumerate(weights) if i != where.base]
    out_shape = w_0.shape
    if p["filter_wise"]:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)
