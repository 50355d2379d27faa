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

import math

import torch

from dist_svc.methods.base import REQUIRED, Param, register, streams, whole

@register("slerp", Param("t", REQUIRED, doc="0: the base, 1: the other model"), operates_on="weights",
          needs="tensor", min_inputs=2, max_inputs=2, sample={"t": 0.5},
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(weights, p, where):
    return whole(slerp_passes, weights, p, where)


def _sums(a: torch.Tensor, b: torch.Tensor, dim=None) -> torch.Tensor:
    """(a.a, b.b, a.b) in float64, over every element (`dim` None) or along `dim`."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if dim is None:
        return torch.stack([a.square().sum(), b.square().sum(), (a * b).sum()])
    return torch.stack([a.square().sum(dim), b.square().sum(dim), (a * b).sum(dim)])


@streams("slerp")
def slerp_passes(p, extent, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """mergekit's `slerp` of the base and the other model, each tensor taken as one vector.
    Passes: the norms and the dot product (1), the output."""
    base, t = extent.base, p["t"]
    dtype = torch.float64 if extent.dtype == torch.float64 else torch.float32
    tt = torch.tensor(t, dtype=dtype)
    if extent.numel:
        aa, bb, ab = (yield lambda ws, where: _sums(ws[base], ws[1 - base])).tolist()
        norm_a, norm_b = (n if n > eps else 1.0 for n in (aa ** 0.5, bb ** 0.5))
        dot = torch.tensor(ab / (norm_a * norm_b), dtype=dtype).clamp(-1, 1)
        linear = dot.abs() > dot_threshold
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
        coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    else:
        coef_a, coef_b = 1 - tt, tt

    def output(ws, where):
        a, b = ws[base], ws[1 - base]
        return (coef_a.to(a.device) * a.to(dtype) + coef_b.to(a.device) * b.to(dtype)).to(a.dtype)

    return lambda: output


def nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `nuslerp` of each row (along the last axis); the whole-vector and per-column
    forms stream (`nuslerp_passes`)."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


def _nuslerp_needs(p) -> str:
    if p["nuslerp_flatten"] or p["nuslerp_row_wise"]:
        return "tensor"
    return "row"


@register("nuslerp", Param("weight", REQUIRED, scope="model", doc="t = w_2 / (w_1 + w_2)"),
          Param("nuslerp_row_wise", False, bool, doc="interpolate each column (dim 0)"),
          Param("nuslerp_flatten", True, bool, doc="interpolate the whole tensor as one vector"),
          needs=_nuslerp_needs, base="optional", min_fine_tunes=2, max_fine_tunes=2, sample={"weight": 1.0})
def nuslerp(tensors, p, where):
    if _nuslerp_needs(p) == "tensor":
        return whole(nuslerp_passes, tensors, p, where)
    return nuslerp_rows(_nuslerp_t(p), tensors[0], tensors[1])


def _nuslerp_t(p) -> float:
    w0, w1 = p["weight"]
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


@streams("nuslerp")
def nuslerp_passes(p, extent, eps: float = 1e-8):
    """NuSLERP of the whole tensor as one vector (`nuslerp_flatten`) or of each column
    (`nuslerp_row_wise`: along axis 0). Passes: the norms and dot products (1; per column, one
    each), the output. Blocks of columns (a wide matrix, calibrated) carry their columns' own."""
    t = _nuslerp_t(p)
    flatten = p["nuslerp_flatten"]
    columns = not flatten and len(extent.shape) > 1  # else the one vector along axis 0

    def sums(v, where):
        if not columns:
            return _sums(v[0], v[1])
        if extent.ordered:
            return _sums(v[0], v[1], 0)
        out = torch.zeros(3, *extent.shape[1:], dtype=torch.float64, device=v[0].device)
        out[:, where.indices()[:, 0]] = _sums(v[0], v[1], 1)  # a block's rows are columns of the tensor
        return out

    aa, bb, ab = (yield sums) if extent.numel else torch.zeros(3, *(extent.shape[1:] if columns else ()),
                                                                    dtype=torch.float64)
    # mergekit's cos of the unit vectors, x / max(|x|, 1e-7)
    cos_theta = (ab / (aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7))).to(extent.dtype).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    coef_0 = torch.where(colinear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    coef_1 = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)

    def output(v, where):
        c0, c1 = coef_0.to(v[0].device), coef_1.to(v[0].device)
        if columns and not extent.ordered:
            cols = where.indices()[:, 0]
            c0, c1 = c0[cols].unsqueeze(1), c1[cols].unsqueeze(1)
        return c0 * v[0] + c1 * v[1]

    return lambda: output


@register("karcher", Param("max_iter", 10, int, 0, doc="iterations at most", low_inclusive=True),
          Param("tol", 1e-5, float, 0.0, doc="convergence tolerance"),
          operates_on="weights", base="ignored", needs="tensor", reference="https://arxiv.org/abs/2603.04972")
def karcher(weights, p, where):
    return whole(karcher_passes, weights, p, where)


@streams("karcher")
def karcher_passes(p, extent):
    """mergekit's weighted Karcher mean, from the inputs' Gram matrix: every iterate (the mean,
    the tangent) is a combination of the inputs, so the iterations run on the coefficients in
    float64, with inner products from the Gram, and no pass over the tensor each.
    Passes: the Gram (1), the output (the combination, times the mean norm)."""
    gram = yield lambda ws, where: _gram(ws)
    coefficients = karcher_coefficients(gram.cpu(), p["max_iter"], p["tol"])

    def output(ws, where):
        if len(ws) == 1:
            return ws[0]
        out = torch.zeros_like(ws[0])
        for c, w in zip(coefficients.tolist(), ws):
            if c:
                out.add_(w, alpha=c)
        return out

    return lambda: output


def _gram(tensors) -> torch.Tensor:
    x = torch.stack(tensors).reshape(len(tensors), -1).to(torch.float64)
    return x @ x.T


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of N inputs (equal weights) as coefficients of the inputs, from their
    Gram matrix: mergekit's iteration, with each vector held as its coefficients."""
    n = gram.shape[0]
    alphas = [1.0 / n] * n
    dot = lambda a, b: float(a @ gram @ b)  # noqa: E731
    norms = gram.diagonal().clamp_min(0).sqrt().tolist()
    units = [torch.zeros(n, dtype=torch.float64) if norm == 0.0 else torch.eye(n, dtype=torch.float64)[i] / norm
             for i, norm in enumerate(norms)]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = sum(alpha * unit for alpha, unit in zip(weights, valid_units))
    mean_norm = dot(mean, mean) ** 0.5
    mean = valid_units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for alpha, unit in zip(weights, valid_units):
            cos = min(max(dot(mean, unit), -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (unit - cos * mean)
        tangent_norm = max(dot(tangent, tangent), 0.0) ** 0.5
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = max(dot(mean, mean), 0.0) ** 0.5
        if unit_norm > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def _model_stock_needs(p) -> str:
    return "row" if p["filter_wise"] else "tensor"


@register("model_stock", Param("filter_wise", False, bool, doc="one t per row instead of per tensor"),
          operates_on="weights", needs=_model_stock_needs, min_inputs=3,
          reference="https://arxiv.org/abs/2403.19522")
def model_stock(weights, p, where):
    """mergekit's Model Stock (the base and at least two fine-tunes)."""
    if not p["filter_wise"]:
        return whole(model_stock_passes, weights, p, where)
    w_0 = weights[where.base]
    ws = [w for i, w in enumerate(weights) if i != where.base]
    out_shape = w_0.shape
    if w_0.dim() == 1:
        w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    return _model_stock_output(cos_theta, w_0, ws).reshape(out_shape)


def _model_stock_output(cos_theta: torch.Tensor, w_0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return t * average + (1 - t) * w_0


@streams("model_stock")
def model_stock_passes(p, extent):
    """Model Stock with one t per tensor. Passes: the task vectors' Gram (1), the output."""
    base = extent.base

    def offsets_gram(weights, where):
        return _gram([w - weights[base] for i, w in enumerate(weights) if i != base])

    gram = (yield offsets_gram).cpu()
    norms = gram.diagonal().clamp_min(0).sqrt()
    count = gram.shape[0]
    cos = [(gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
           for i in range(count) for j in range(i + 1, count)]
    cos_theta = torch.stack(cos).mean().to(extent.dtype)

    def output(weights, where):
        ws = [w for i, w in enumerate(weights) if i != base]
        return _model_stock_output(cos_theta.to(ws[0].device), weights[base], ws)

    return lambda: output
