"""`dist-svc inspect`: what calibration did to a merge, from its manifest (or, for a merge of
LoRA adapters written as one adapter, from its record: storage/adapter_output.py).

For every calibrated matrix the manifest holds the top singular values of the merged delta
before and after calibration, the overlap coefficients s_ri of those directions (how many
copies of task i's projection direction r holds), eta's quantiles over the whole spectrum, the
norm ratio ||Wm'|| / ||Wm||, and the share of the delta's energy in the directions calibration
shrank (eta > 1: held more than once, the shared part) and grew (eta < 1: task-specific). This
module turns them into a table (JSON and CSV) and one picture: a sentence saying whether
calibration mostly grew or shrank the updates and by how much; per layer and module, the norm
ratio and the over-counted share; eta's distribution in every matrix; and the spectra of the
matrices where over-accumulation was strongest (or of the ones asked for). Matrices the
fine-tunes left unchanged (a zero delta) are counted, not plotted.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import re
from pathlib import Path

import click

from dist_svc.resolution import layer_index, split_layer
from dist_svc.errors import DistSvcError
from dist_svc.manifest import Manifest

def spectra_table(out_dir: str | Path) -> list[dict]:
    """One row per calibrated matrix that is done, in plan order."""
    rows = []
    for name, shape, cal in _calibrated(out_dir):
        before, after = cal["sigma_before"], cal["sigma_after"]
        rows.append({
            "tensor": name, "layer": layer_index(name), "module": module_name(name),
            "shape": shape, "path": cal["path"], "rank": cal["rank"],
            "top_ratio": before[0] / after[0] if after and after[0] > 0 else 1.0,
            "norm_ratio": cal.get("norm_ratio", 1.0), "shrunk": cal.get("shrunk", [0.0, 0.0]),
            "grown": cal.get("grown", [0.0, 0.0]), "eta_quantiles": cal.get("eta_quantiles", [1.0] * 5),
            "eta_max": cal["eta_max"], "eta_mean": cal["eta_mean"], "eta_min": cal["eta_min"],
            "sigma_before": before, "sigma_after": after, "overlaps": cal.get("overlaps", []),
        })
    return rows


def _calibrated(out_dir: str | Path) -> list[tuple[str, list | None, dict]]:
    """(tensor, shape, calibration summary) of every finished calibrated matrix: from a merge's
    manifest (a local directory or a URL), or from the record of a merge of LoRA adapters."""
    from dist_svc.driver import out_path
    from dist_svc.storage import adapter_output
    from dist_svc.storage.outdir import output_dir

    adapter = adapter_output.find(out_dir)
    if adapter is not None:
        return [(name, cal.pop("shape"), cal) for name, cal in adapter_output.calibration(adapter).items()]
    manifest = Manifest.load(output_dir(out_path(out_dir)))
    return [(name, unit["shape"], unit["calibration"]) for name, unit in manifest.units.items()
            if unit["done"] and unit.get("calibration")]


def module_name(name: str) -> str:
    """What a tensor is within its layer, every part of its name after the layer's index (BERT's
    attention.output.dense and output.dense stay apart); outside the layers, the whole name."""
    split = split_layer(name)
    rest = split[2][1:] if split else name
    return re.sub(r"\.(weight|bias)$", "", rest)


def output_paths(prefix: str | Path) -> dict[str, Path]:
    """PREFIX.json, .csv, .png, appended (a prefix like `merged-0.2-spectra` keeps its dots)."""
    prefix = Path(prefix)
    return {ext: prefix.with_name(f"{prefix.name}.{ext}") for ext in ("json", "csv", "png")}


def inspect(out_dir: str | Path, prefix: str | Path, patterns: tuple[str, ...] = (), top: int = 6) -> dict:
    """Write PREFIX.json, PREFIX.csv and PREFIX.png; returns the paths, the strongest rows and
    what the whole merge's calibration did."""
    rows = spectra_table(out_dir)
    if not rows:
        raise DistSvcError(f"{out_dir}: no calibrated matrix is finished yet (or calibration was off); "
                           f"nothing to inspect. Run or resume the merge with calibration on.")
    changed = [r for r in rows if r["rank"] > 0]
    strongest = sorted(changed, key=lambda r: -r["top_ratio"])
    if patterns:
        chosen = [r for r in changed if any(fnmatch.fnmatchcase(r["tensor"], p) for p in patterns)]
        if not chosen:
            raise DistSvcError(f"no calibrated matrix with a non-zero delta matches {', '.join(patterns)}; "
                               f"names look like {rows[0]['tensor']}.")
        chosen = chosen[:max(top, 1) * 4]
    else:
        chosen = strongest[:top]
    effect = overall(changed)
    paths = output_paths(prefix)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps({"out_dir": str(out_dir), "overall": effect, "matrices": rows}, indent=1))
    k = max((len(r["overlaps"][0]) for r in rows if r["overlaps"]), default=0)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tensor", "layer", "module", "path", "rank", "sigma1_before", "sigma1_after", "top_ratio",
                    "norm_ratio", "shrunk_before", "shrunk_after", "grown_before", "grown_after", "eta_min", "eta_p10",
                    "eta_median", "eta_p90", "eta_max"] + [f"overlap1_task{i}" for i in range(k)])
        for r in rows:
            w.writerow([r["tensor"], r["layer"], r["module"], r["path"], r["rank"], r["sigma_before"][0],
                        r["sigma_after"][0], r["top_ratio"], r["norm_ratio"], *r["shrunk"], *r["grown"],
                        *r["eta_quantiles"]] + (r["overlaps"][0] if r["overlaps"] else []))
    if changed:
        _save(figure(changed, chosen, str(out_dir), effect), paths["png"])
    return {"paths": paths, "strongest": strongest[:top], "count": len(rows), "unchanged": len(rows) - len(changed),
            "overall": effect}


def overall(rows: list[dict]) -> dict:
    """The merge as a whole: the delta's energy in over-counted and in task-specific directions,
    before and after calibration (weighted by each matrix's energy, which the table does not hold:
    the mean of the matrices' shares); how many updates grew and the median norm ratio; the
    median change of the top singular value (after / before) and how many grew; and all of that
    in one sentence (`verdict`) for the page and the terminal."""
    if not rows:
        return {"matrices": 0, "verdict": "No matrix was changed by the fine-tunes: calibration had nothing to do."}
    import statistics

    n = len(rows)
    norm = statistics.median(r["norm_ratio"] for r in rows)
    grew = sum(r["norm_ratio"] > 1 for r in rows)
    top = statistics.median(1 / r["top_ratio"] for r in rows)
    top_grew = sum(r["top_ratio"] < 1 for r in rows)
    if 2 * grew > n:
        verdict = f"Calibration mostly grew the merged updates: {grew} of {n} grew"
    elif 2 * grew < n:
        verdict = f"Calibration mostly shrank the merged updates: {n - grew} of {n} shrank"
    else:
        verdict = f"Calibration grew {grew} and shrank {n - grew} of {n} merged updates"
    verdict += (f" (median norm x{norm:.2f}); their top singular value x{top:.2f} "
                f"(median; {top_grew} of {n} grew).")
    return {"matrices": n, "norm_ratio_median": norm, "amplified": grew, "top_change_median": top,
            "top_grew": top_grew, "verdict": verdict,
            "shrunk": [statistics.fmean(r["shrunk"][i] for r in rows) for i in (0, 1)],
            "grown": [statistics.fmean(r["grown"][i] for r in rows) for i in (0, 1)]}


def short_name(row: dict) -> str:
    """A matrix's name on the page: its layer and module (`3.self_attn.q_proj`)."""
    return row["module"] if row["layer"] is None else f"{row['layer']}.{row['module']}"


def figure(rows: list[dict], chosen: list[dict], title: str, effect: dict):
    """The page as a matplotlib Figure: per layer and module the norm ratio and the over-counted
    share, eta over every matrix's spectrum, and the spectra of the `chosen` matrices."""
    try:
        import matplotlib
    except ImportError:
        raise DistSvcError("dist-svc inspect draws with matplotlib, which is missing from this "
                           "environment: pip install matplotlib.") from None
    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    import numpy as np

    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules = sorted({r["module"] for r in rows if r["layer"] is not None})
    cols = max(1, min(3, len(chosen)))
    spectra_rows = -(-len(chosen) // cols)
    height = 10.5 + 3.2 * spectra_rows
    fig = plt.figure(figsize=(5 * cols + 2, height), dpi=100)
    grid = fig.add_gridspec(3 + spectra_rows, cols, height_ratios=[1.3, 1.3, 1.6] + [1] * spectra_rows)
    fig.suptitle(f"{title}\n{effect['verdict']}", fontsize=11)

    def heat(ax, value, label, norm, cmap, heading):
        if layers:
            data = np.full((len(modules), len(layers)), np.nan)
            for r in rows:
                if r["layer"] is not None:
                    data[modules.index(r["module"]), layers.index(r["layer"])] = value(r)
            im = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
            ax.set_yticks(range(len(modules)), modules, fontsize=8)
            ax.set_xlabel("layer")
        else:
            im = ax.scatter(range(len(rows)), [value(r) for r in rows], c=[value(r) for r in rows], cmap=cmap, norm=norm)
            ax.set_xticks(range(len(rows)), [r["tensor"] for r in rows], rotation=90, fontsize=6)
        ax.set_title(heading, fontsize=9)
        return fig.colorbar(im, ax=ax, label=label)

    ratios = [r["norm_ratio"] for r in rows]
    spread = max(max(ratios) / 1.0, 1.0 / min(ratios), 1.05)
    bar = heat(fig.add_subplot(grid[0, :]), lambda r: r["norm_ratio"], "||calibrated|| / ||merged||",
               mcolors.LogNorm(1 / spread, spread), "RdBu_r",
               "What calibration did to each merged update: its norm after / before "
               "(blue < 1: over-accumulation undone; red > 1: task-specific directions grown)")
    ticks = _log_ticks(1 / spread, spread)
    bar.set_ticks(ticks, labels=[_plain(v) for v in ticks])
    bar.ax.yaxis.set_minor_locator(mticker.NullLocator())
    heat(fig.add_subplot(grid[1, :]), lambda r: r["shrunk"][0], "share of energy", mcolors.Normalize(0, 1), "magma",
         "Share of each merged update's energy in directions held more than once (eta > 1), before calibration")

    ax = fig.add_subplot(grid[2, :])
    order = sorted(range(len(rows)), key=lambda i: rows[i]["norm_ratio"])
    q = np.array([rows[i]["eta_quantiles"] for i in order])
    x = np.arange(len(order))
    ax.fill_between(x, q[:, 0], q[:, 4], color="tab:gray", alpha=0.25, step="mid", label="eta min..max")
    ax.fill_between(x, q[:, 1], q[:, 3], color="tab:blue", alpha=0.35, step="mid", label="eta 10%..90%")
    ax.plot(x, q[:, 2], ".", color="tab:blue", markersize=3, label="eta median")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    _plain_log_y(ax)
    step = 1 + len(order) // 80  # every matrix named while the names fit
    ax.set_xticks(x[::step], [short_name(rows[i]) for i in order][::step], rotation=90, fontsize=6)
    ax.set_xlabel("matrix (layer.module), by norm ratio", fontsize=8)
    ax.set_ylabel("eta (divides sigma_r)", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("The whole spectrum: eta per singular direction, every matrix (> 1 shrinks, < 1 grows)", fontsize=9)

    for i, r in enumerate(chosen):
        ax = fig.add_subplot(grid[3 + i // cols, i % cols])
        x = np.arange(1, len(r["sigma_before"]) + 1)
        ax.semilogy(x, r["sigma_before"], "o-", label="merged", color="tab:red", markersize=4)
        ax.semilogy(x, r["sigma_after"], "s-", label="calibrated", color="tab:blue", markersize=4)
        _plain_log_y(ax)
        ax.set_title(f"{r['tensor']}\nnorm x{r['norm_ratio']:.2f}, sigma_1 x{1 / r['top_ratio']:.2f}, "
                     f"eta {r['eta_min']:.2f}..{r['eta_max']:.2f}", fontsize=8)
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.set_xlabel("singular direction", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))  # room for the two lines of the title
    return fig


def _log_ticks(low: float, high: float) -> list[float]:
    """Ticks of a log axis from `low` to `high`: powers of ten, or 1-2-5 steps, whichever first
    gives three; on a narrow range (less than a factor of ~3) evenly spaced round numbers."""
    import math

    from matplotlib.ticker import MaxNLocator

    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1,), (1, 2, 5)):
        ticks = [t for t in (round(m * 10.0**e, 12) for e in decades for m in mantissas) if low <= t <= high]
        if len(ticks) >= 3:
            return ticks
    return [round(t, 12) for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
            if low <= t <= high]


def _plain(value: float) -> str:
    return f"{value:g}"


def _plain_log_y(ax) -> None:
    """Plain numbers (0.5, 1, 2) on a log y axis, where matplotlib writes 5x10^-1; its range as
    the data gave it."""
    import matplotlib.ticker as mticker

    low, high = ax.get_ylim()
    ax.yaxis.set_major_locator(mticker.FixedLocator(_log_ticks(low, high)))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _plain(v)))
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_ylim(low, high)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


@click.command("inspect")
@click.argument("out_dir")
@click.option("--tensors", "patterns", multiple=True, metavar="PATTERN",
              help="Plot the spectra of these matrices (fnmatch, repeatable), e.g. '*layers.3.*'. "
                   "Default: where over-accumulation was strongest.")
@click.option("--top", default=6, show_default=True, help="How many matrices to plot and list.")
@click.option("--out", "prefix", type=click.Path(path_type=Path), default=None,
              help="Write PREFIX.png, PREFIX.json and PREFIX.csv (default: ./<OUT_DIR name>-spectra).")
def inspect_command(out_dir: str, patterns: tuple[str, ...], top: int, prefix: Path | None) -> None:
    """Show what calibration did to the merge in OUT_DIR (finished or in progress; a local
    directory, an s3:// URL, or a merge of adapters written as one PEFT adapter): per matrix,
    the norm of the merged delta after / before, the share of its energy in directions held more
    than once (shrunk) and in task-specific ones (grown), eta over the whole spectrum, the top
    singular values before and after and the overlap coefficients s_ri (copies of task i in
    direction r). Writes a PNG (heat maps per layer and module, eta per matrix, the spectra of
    chosen matrices) and the table as JSON and CSV. Nothing in OUT_DIR is changed.

    \b
    Example:
      dist-svc inspect ./merged
      dist-svc inspect ./merged --tensors '*layers.10.*' --out reports/llama-ta-svc
    """
    from dist_svc.driver import out_path

    prefix = prefix or Path(f"{Path(str(out_path(out_dir))).name}-spectra")
    result = inspect(out_dir, prefix, patterns, top)
    o = result["overall"]
    click.echo(f"{result['count']} calibrated matrices" + (f", {result['unchanged']} of them unchanged by the "
                                                          f"fine-tunes (a zero delta)" if result["unchanged"] else "") + ".")
    click.echo(o["verdict"])
    if o["matrices"]:
        click.echo(f"Over the whole spectra: the merged updates' energy in directions held more than once "
                   f"(eta > 1) {100 * o['shrunk'][0]:.0f}% -> {100 * o['shrunk'][1]:.0f}% after calibration, in "
                   f"task-specific ones (eta < 1) {100 * o['grown'][0]:.0f}% -> {100 * o['grown'][1]:.0f}%; "
                   f"median norm ratio {o['norm_ratio_median']:.2f} ({o['amplified']} of {o['matrices']} grew).")
        click.echo("Strongest over-accumulation (top singular value before -> after calibration):"
                   if 2 * o["amplified"] <= o["matrices"] else
                   "Top singular value most divided (before -> after calibration):")
    for r in result["strongest"]:
        overlap = ", ".join(f"{x:.2f}" for x in r["overlaps"][0]) if r["overlaps"] else "-"
        click.echo(f"  {r['tensor']:<48} {r['sigma_before'][0]:.4g} -> {r['sigma_after'][0]:.4g} "
                   f"({r['top_ratio']:.2f}x; s_1i = {overlap}; norm x{r['norm_ratio']:.2f})")
    click.echo("wrote " + ", ".join(str(p) for p in result["paths"].values()))
