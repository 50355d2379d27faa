"""The model card (README.md) a finished merge writes beside its tensors, in the spirit of
mergekit's (mergekit/card.py): front matter for the Hub (base_model, tags, library_name), the
method, the models, the config as YAML, and what Singular Value Calibration did.

The card is made from the config and the merged tensors' calibration facts alone, never from
where the output went or when, so that two runs of one merge write the same bytes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

import yaml

if TYPE_CHECKING:
    from dist_svc.config import MergeConfig

CARD_NAME = "README.md"

_TEMPLATE = """---
{metadata}---
# {title}

This is a merge of pre-trained language models created with dist-svc, a distributed, resumable
merger of [mergekit](https://github.com/arcee-ai/mergekit) configs with Singular Value Calibration.

## Merge Details
### Merge Method

This model was merged using the {method} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{models}

### Singular Value Calibration

{calibration}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{config_yaml}```
"""


def model_card(config: MergeConfig, alphas: Iterable[float], calibration: dict[str, Any] | None) -> str:
    """The card of a merge of `config`: `alphas` are the calibration's alpha of the calibrated
    tensors, `calibration` the merge's summary (`MergeReport.calibration_summary`)."""
    base = config.base_model
    if config.merge_method == "slerp":
        base = None  # as mergekit: SLERP's base is one of the two models it interpolates
    models = [m for m in config.checkpoints if m != base]
    metadata = {"base_model": sorted({repo for m in config.checkpoints for repo in _hub_repos(m)}),
                "tags": ["mergekit", "merge", "dist-svc"] + (["svc"] if calibration else []),
                "library_name": "transformers"}
    method = config.method
    return _TEMPLATE.format(
        metadata=yaml.safe_dump(metadata, sort_keys=False),
        title=f"{config.merge_method} merge of {len(models)} models" + (f" on {_short(base)}" if base else ""),
        method=f"[{method.name}]({method.reference})" if method.reference else method.name,
        base_text=f" using {_name(base)} as a base" if base else "",
        models="\n".join(f"* {_name(m)}" for m in models),
        calibration=_calibration_text(config, sorted(set(alphas)), calibration),
        config_yaml=yaml.safe_dump(_plain(config.document), sort_keys=False, allow_unicode=True),
    )


def _calibration_text(config: MergeConfig, alphas: list[float], summary: dict[str, Any] | None) -> str:
    if summary is None:
        reason = "turned off" if not config.calibration.enabled else "nothing to calibrate"
        return f"None ({reason}): each tensor is the {config.merge_method} merge as it is."
    alpha = f"{alphas[0]:.4g}" if len(alphas) == 1 else f"{alphas[0]:.4g} to {alphas[-1]:.4g}"
    how = "as configured" if config.calibration.alpha is not None else "1/K of each tensor's fine-tunes by default"
    return (f"Each merged matrix's update (merged - base) was calibrated against the K = {config.k} task "
            f"vectors, alpha = {alpha} ({how}): a direction the merge holds more than once is scaled back "
            f"towards one task's strength, one a single task holds may grow (by at most 1/alpha). "
            f"{summary['matrices']} matrices calibrated; the top singular value of the merged update, before / "
            f"after calibration: {summary['top_ratio_median']:.4g} (median; from {summary['top_ratio_min']:.4g} "
            f"to {summary['top_ratio_max']:.4g}; above 1: shrunk).")


def _name(model) -> str:
    """A model as the card shows it: a Hub model as a link, anything else as the config names it."""
    parts = str(model).split("+")
    return " + ".join(f"[{repo}](https://huggingface.co/{repo})" if (repo := _hub_repo(p)) else p for p in parts)


def _short(model) -> str:
    """A model in a few words: a Hub repository's name, or a path's last part."""
    return "+".join(_hub_repo(p) or os.path.basename(p.rstrip("/")) or p for p in str(model).split("+"))


def _hub_repos(model) -> list[str]:
    return [repo for part in str(model).split("+") if (repo := _hub_repo(part))]


def _hub_repo(part: str) -> str | None:
    from dist_svc.storage import hub

    return part.removeprefix(hub.PREFIX).split("@")[0] if part.startswith(hub.PREFIX) else None


def _plain(value: Any) -> Any:
    """The config as YAML writes it: paths (a dict config may hold `Path`s) as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
