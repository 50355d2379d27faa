"""`dist-svc inspect`: what calibration did to a merge, from its manifest.

For every calibrated matrix the manifest holds the top singular values of the base method's
delta before and after calibration, the overlap coefficients s_ri of those directions (how many
copies of task i's projection direction r holds) and eta's range. This module turns them into
a table (JSON and CSV) and one picture: a heat map of over-accumulation per layer and module
(the top singular value's before/after ratio), and the spectra of the matrices where it was
strongest (or of the ones asked for).
"""

from __future__ import annotations

import csv
import fnmatch
import json
from pathlib import Path

from dist_svc.config import layer_index
from dist_svc.errors import DistSvcError
from dist_svc.manifest import Manifest



def spectra_table(out_dir: str | Path) -> list[dict]:
    """One row per calibrated matrix that is done, in plan order."""
    manifest = Manifest.load(Path(out_dir).expanduser().resolve())
    rows = []
    for name, unit in manifest.units.items():
        cal = unit.get("calibration")
        if not unit["done"] or not cal:
            continue
        before, after = cal["sigma_before"], cal["sigma_after"]
        layer = layer_index(name)
        rows.append({
            "tensor": name, "layer": layer, "module": _module(name),
            "shape": unit["shape"], "path": cal["path"], "rank": cal["rank"],
            "top_ratio": before[0] / after[0] if after and after[0] > 0 else 1.0,
            "eta_max": cal["eta_max"], "eta_mean": cal["eta_mean"], "eta_min": cal["eta_min"],
            "sigma_before": before, "sigma_after": after, "overlaps": cal.get("overlaps", []),
        })
    return rows


def _module(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    return parts[-1] if parts else name


def inspect(out_dir: str | Path, prefix: str | Path, patterns: tuple[str, ...] = (), top: int = 6) -> dict:
    """Write PREFIX.json, PREFIX.csv and PREFIX.png; returns the paths and the strongest rows."""
    rows = spectra_table(out_dir)
    if not rows:
        raise DistSvcError(f"{out_dir}: no calibrated matrix is finished yet (or calibration was off); "
                           f"nothing to inspect. Run or resume the merge with calibration on.")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    strongest = sorted(rows, key=lambda r: -r["top_ratio"])
    if patterns:
        chosen = [r for r in rows if any(fnmatch.fnmatchcase(r["tensor"], p) for p in patterns)]
        if not chosen:
            raise DistSvcError(f"no calibrated matrix matches {', '.join(patterns)}; "
                               f"names look like {rows[0]['tensor']}.")
        chosen = chosen[:max(top, 1) * 4]
    else:
        chosen = strongest[:top]
    paths = {"json": prefix.with_suffix(".json"), "csv": prefix.with_suffix(".csv"), "png": prefix.with_suffix(".png")}
    paths["json"].write_text(json.dumps({"out_dir": str(out_dir), "matrices": rows}, indent=1))
    k = len(rows[0]["overlaps"][0]) if rows[0]["overlaps"] else 0
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tensor", "layer", "module", "path", "rank", "sigma1_before", "sigma1_after", "top_ratio",
                    "eta_max", "eta_mean", "eta_min"] + [f"overlap1_task{i}" for i in range(k)])
        for r in rows:
            w.writerow([r["tensor"], r["layer"], r["module"], r["path"], r["rank"], r["sigma_before"][0],
                        r["sigma_after"][0], r["top_ratio"], r["eta_max"], r["eta_mean"], r["eta_min"]]
                       + (r["overlaps"][0] if r["overlaps"] else []))
    _plot(rows, chosen, paths["png"], str(out_dir))
    return {"paths": paths, "strongest": strongest[:top], "count": len(rows)}


def _plot(rows: list[dict], chosen: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise DistSvcError("dist-svc inspect draws with matplotlib, which is missing from this "
                           "environment: pip install matplotlib.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules = sorted({r["module"] for r in rows})
    cols = max(1, min(3, len(chosen)))
    spectra_rows = -(-len(chosen) // cols)
    fig = plt.figure(figsize=(5 * cols + 1, 4 + 3.2 * spectra_rows), dpi=100)
    grid = fig.add_gridspec(1 + spectra_rows, cols, height_ratios=[1.3] + [1] * spectra_rows)

    heat = fig.add_subplot(grid[0, :])
    if layers:
        data = np.full((len(modules), len(layers)), np.nan)
        for r in rows:
            if r["layer"] is not None:
                data[modules.index(r["module"]), layers.index(r["layer"])] = r["top_ratio"]
        im = heat.imshow(data, aspect="auto", cmap="magma", interpolation="nearest")
        heat.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        heat.set_yticks(range(len(modules)), modules, fontsize=8)
        heat.set_xlabel("layer")
        fig.colorbar(im, ax=heat, label="sigma_1 before / after")
    else:
        names = [r["tensor"] for r in rows]
        heat.bar(range(len(rows)), [r["top_ratio"] for r in rows])
        heat.set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
        heat.set_ylabel("sigma_1 before / after")
    heat.set_title(f"Spectral over-accumulation undone by calibration: {title}", fontsize=10)

    for i, r in enumerate(chosen):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        x = np.arange(1, len(r["sigma_before"]) + 1)
        ax.semilogy(x, r["sigma_before"], "o-", label="base method", color="tab:red", markersize=4)
        ax.semilogy(x, r["sigma_after"], "s-", label="calibrated", color="tab:blue", markersize=4)
        ax.set_title(f"{r['tensor']}\neta max {r['eta_max']:.2f}", fontsize=8)
        ax.set_xlabel("singular direction", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
