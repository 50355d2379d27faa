"""A small, real-layout model family to merge where no weights can be downloaded.

`make_family` writes a Llama-layout base checkpoint (Hugging Face sharded safetensors with
index, config.json, generation_config.json, a word-level tokenizer) and K fine-tunes of it. Every fine-tune's update of
a weight matrix is a shared low-rank part (the same for all tasks: knowledge they share), a
low-rank part of its own, and a little noise: the situation in which task arithmetic counts the
shared part K times and calibration brings it back to one task's strength.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from dist_svc.errors import DistSvcError
from dist_svc.progress import say
from dist_svc.storage.types import INDEX_NAME


def _attention(p: str, h: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    """A decoder layer's attention projections (grouped-query: k and v have kv_heads heads)."""
    kv = h // heads * kv_heads
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h)}


def _norms(p: str, h: int) -> dict[str, tuple[int, ...]]:
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}


@dataclass(frozen=True)
class TinyLlama:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden_size, self.intermediate_size
        out = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out.update(_attention(p, h, self.num_attention_heads, self.num_key_value_heads))
            out.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i)})
            out.update(_norms(p, h))
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab_size, h)
        return out

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


@dataclass(frozen=True)
class TinyMoE:
    """A Qwen2-MoE-layout model with many small experts: thousands of tensors of a few KiB,
    where per-tensor costs (bookkeeping, scheduling, small I/O) dominate a merge."""

    vocab_size: int = 256
    hidden_size: int = 64
    moe_intermediate_size: int = 32
    num_experts: int = 16
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, e = self.hidden_size, self.moe_intermediate_size, self.num_experts
        out = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out.update(_attention(p, h, self.num_attention_heads, self.num_key_value_heads))
            out[p + "mlp.gate.weight"] = (e, h)
            out.update(_norms(p, h))
            for x in range(e):
                q = f"{p}mlp.experts.{x}."
                out.update({q + "gate_proj.weight": (i, h), q + "up_proj.weight": (i, h), q + "down_proj.weight": (h, i)})
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab_size, h)
        return out

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "moe_intermediate_size": self.moe_intermediate_size, "num_experts": self.num_experts,
            "num_experts_per_tok": 2, "shared_expert_intermediate_size": 0,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        }


def write_hf_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                        config: dict | None = None) -> None:
    """Save `tensors` as a Hugging Face checkpoint: `shards` files with an index (or a single
    model.safetensors when shards == 1), plus config.json when given."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        total = 0
        for k in range(shards):
            part = names[k * per:(k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, str(path / fname), metadata={"format": "pt"})
            for n in part:
                weight_map[n] = fname
                total += tensors[n].numel() * tensors[n].element_size()
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
        (path / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2)}, indent=2))


def write_tokenizer(path: Path, vocab_size: int, added: tuple[str, ...] = ()) -> None:
    """A real (word-level) Hugging Face fast tokenizer of `vocab_size` tokens: `<unk>`, `<s>`,
    `</s>`, then `w3`, `w4`, ..., and last the special tokens `added` (as a fine-tune that
    learnt a chat format has), so the generated checkpoints are complete models."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size - len(added))})
    extra = {tok: vocab_size - len(added) + i for i, tok in enumerate(added)}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for tok, i in {**vocab, **extra}.items()
                         if tok in specials or tok in extra],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": {**vocab, **extra}, "unk_token": "<unk>"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 512}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, indent=2))


def make_family(root: Path, k: int = 3, arch: TinyLlama = TinyLlama(), dtype: torch.dtype = torch.bfloat16,
                shards: int = 2, seed: int = 0, shared_rank: int = 2, own_rank: int = 2,
                shared_scale: float = 0.005, own_scale: float = 0.004, noise: float = 1e-4
                ) -> tuple[Path, list[Path]]:
    """Write base + k fine-tunes under `root` (base/, ft-1/, ...). Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    shapes = arch.shapes()
    base = {}
    for name, shape in shapes.items():
        base[name] = (torch.ones(shape) + 0.01 * torch.randn(shape, generator=gen)) if len(shape) == 1 \
            else 0.02 * torch.randn(shape, generator=gen)
    shared = {name: _low_rank(shape, shared_rank, shared_scale, gen) for name, shape in shapes.items()}
    base_dir = root / "base"
    write_hf_checkpoint(base_dir, {n: t.to(dtype) for n, t in base.items()}, shards, arch.hf_config(dtype))
    write_tokenizer(base_dir, arch.vocab_size)
    ft_dirs = []
    for i in range(k):
        ft = {}
        for name, shape in shapes.items():
            update = shared[name] + _low_rank(shape, own_rank, own_scale, gen) + noise * torch.randn(shape, generator=gen)
            ft[name] = (base[name] + update).to(dtype)
        ft_dir = root / f"ft-{i + 1}"
        # Fine-tunes come as a single file: both input layouts are exercised.
        write_hf_checkpoint(ft_dir, ft, 1, arch.hf_config(dtype))
        ft_dirs.append(ft_dir)
    return base_dir, ft_dirs


def _low_rank(shape: tuple[int, ...], rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    if len(shape) != 2:
        return scale * torch.randn(shape, generator=gen)
    m, n = shape
    a = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
    b = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
    # Singular values ~ scale * (sqrt(m) + sqrt(n)): next to the weights' own spectral norm
    # (0.02 * (sqrt(m) + sqrt(n)) for the base), as a fine-tune's update is.
    strengths = scale * (m ** 0.5 + n ** 0.5) * torch.linspace(1.0, 0.5, rank)
    return (a * strengths) @ b.T


DEMO_SHARD_SIZE = "4MB"  # the demo's shards: several, even for its small model


def write_config(path: Path, base_dir: Path, ft_dirs: list[Path], lam: float = 1.0, calibrate: bool = True,
                 shard_size: str | None = None) -> Path:
    """A task arithmetic config of the family; `shard_size` written as `output: {shard_size: ...}`,
    so that the config alone describes the merge (its rerun on the same output is a no-op)."""
    lines = ["# A mergekit task_arithmetic config; `calibrate` and `output` are dist-svc's additions.",
             "merge_method: task_arithmetic", f"base_model: {base_dir}", "models:"]
    for d in ft_dirs:
        lines += [f"  - model: {d}", "    parameters:", "      weight: 1.0"]
    lines += ["parameters:", f"  lambda: {lam}", "dtype: float32", f"calibrate: {str(calibrate).lower()}"]
    if shard_size is not None:
        lines += ["output:", f"  shard_size: {shard_size}"]
    lines.append("")
    path.write_text("\n".join(lines))
    return path


class _DemoMethods(Mapping):
    """What each method's merge of the demo family is written as, from its registration's
    `sample=` (dist_svc.methods): method -> (parameters, each fine-tune's parameters, how many
    fine-tunes (None: all)). A mergekit config with a base model, so that it can be calibrated:
    a per-model parameter goes to each fine-tune (and, where the base is an input too, to the
    shared parameters: mergekit gives the base no entry of its own), a shared one to
    `parameters:`. Every registered method that merges a base and a fine-tune is here, in the
    order of the registry; read when used, so a method registered later is here too."""

    def __getitem__(self, name: str) -> tuple[dict, dict, int | None]:
        from dist_svc.methods import METHODS

        method = METHODS.get(name)
        if method is None or method.most_fine_tunes == 0:
            raise KeyError(name)
        params, own = {}, {}
        for pname, value in method.sample.items():
            param = method.param(pname)
            if param.per_model:
                own[pname] = value
            if not param.per_model or param.scope == "input":
                params[pname] = value
        return params, own, method.most_fine_tunes

    def __iter__(self):
        from dist_svc.methods import METHODS

        return (name for name, method in METHODS.items() if method.most_fine_tunes != 0)

    def __len__(self) -> int:
        return sum(1 for _ in self)


DEMO_METHODS: Mapping[str, tuple[dict, dict, int | None]] = _DemoMethods()


def write_method_config(path: Path, method: str, base_dir: Path, ft_dirs: list[Path],
                        shard_size: str | None = None) -> Path:
    import yaml

    params, own, count = DEMO_METHODS[method]
    config = {"merge_method": method, "base_model": str(base_dir), "dtype": "float32",
              "models": [{"model": str(d), **({"parameters": dict(own)} if own else {})} for d in ft_dirs[:count]]}
    if params:
        config["parameters"] = params
    if shard_size is not None:
        config["output"] = {"shard_size": shard_size}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def calibration_effect(calibration: dict[str, dict]) -> dict:
    """A merge's calibration in a few numbers: the median ratio of the top singular value
    before / after, the median norm ratio, and the mean share of each merged delta's energy in
    directions held more than once (eta > 1) and in task-specific ones (eta < 1), before and
    after."""
    import statistics

    rows = [c for c in calibration.values() if c["rank"] > 0]
    if not rows:
        return {"matrices": 0}
    return {"matrices": len(rows),
            "top_ratio": statistics.median(c["sigma_before"][0] / c["sigma_after"][0] for c in rows),
            "norm_ratio": statistics.median(c["norm_ratio"] for c in rows),
            "shrunk": [statistics.fmean(c["shrunk"][i] for c in rows) for i in (0, 1)],
            "grown": [statistics.fmean(c["grown"][i] for c in rows) for i in (0, 1)]}


@click.command("demo")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"))
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of fine-tunes to generate.")
@click.option("--layers", default=4, show_default=True, help="Decoder layers of the generated model.")
@click.option("--methods", default=None, metavar="M1,M2|all",
              help="Also merge the family with these methods (calibrated) and compare what calibration did "
                   "to each: the over-accumulation before and after.")
def demo_command(workdir: Path, k: int, layers: int, methods: str | None) -> None:
    """Generate a small Llama-layout base and K fine-tunes in WORKDIR, then merge them with
    task arithmetic + calibration, and show what calibration did.

    Nothing is downloaded. Rerunning reuses the generated models and the finished merges.

    \b
    Example:
      dist-svc demo ./demo-out
      dist-svc demo ./demo-out --methods all      # every method with a base model, side by side
    """
    import statistics

    from dist_svc.commands.merge import print_report
    from dist_svc.driver import merge as run_merge

    workdir = workdir.resolve()
    inputs = workdir / "inputs"
    if not (inputs / "base").is_dir():
        say(f"generating a {layers}-layer Llama-layout base and {k} fine-tunes (bf16) in {inputs}")
        make_family(inputs, k=k, arch=TinyLlama(num_hidden_layers=layers), dtype=torch.bfloat16)
    ft_dirs = sorted((d for d in inputs.iterdir() if d.name.startswith("ft-")), key=lambda d: int(d.name[3:]))
    # The shard size is in the config, not passed beside it: rerunning `dist-svc merge` on the
    # written config and output finds this very merge.
    config = write_config(workdir / "merge.yaml", inputs / "base", ft_dirs, shard_size=DEMO_SHARD_SIZE)
    report = run_merge(config, workdir / "merged", log=say)
    print_report(report)
    cal = report.calibration
    if cal:
        ratios = [c["sigma_before"][0] / c["sigma_after"][0] for c in cal.values() if c["sigma_after"][0] > 0]
        click.echo(f"\nWhat calibration did ({len(cal)} matrices, K={len(ft_dirs)}):")
        click.echo(f"  The {len(ft_dirs)} fine-tunes share a low-rank update in every matrix; task arithmetic counts "
                   f"it {len(ft_dirs)} times.")
        click.echo(f"  Top singular value of the merged update, before/after calibration: median ratio "
                   f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}x..{max(ratios):.2f}x).")
        worst = max(cal.items(), key=lambda kv: kv[1]["eta_max"])
        click.echo(f"  Strongest over-accumulation: {worst[0]}, eta {worst[1]['eta_max']:.2f} "
                   f"(sigma {worst[1]['sigma_before'][0]:.4f} -> {worst[1]['sigma_after'][0]:.4f}).")
    click.echo(f"\nConfig: {config}\nMerged model: {report.out_dir}")
    click.echo(f"See the spectra: dist-svc inspect {report.out_dir}")
    if methods:
        names = list(DEMO_METHODS) if methods == "all" else [m.strip() for m in methods.split(",")]
        unknown = [m for m in names if m not in DEMO_METHODS]
        if unknown:
            raise DistSvcError(f"--methods: {', '.join(unknown)} not among {', '.join(DEMO_METHODS)}.")
        _demo_methods(workdir, inputs / "base", ft_dirs, names)


def _demo_methods(workdir: Path, base: Path, ft_dirs: list[Path], names: list[str]) -> None:
    from dist_svc.driver import merge as run_merge

    click.echo(f"\nCalibration on each method's merge of the same family (K={len(ft_dirs)}; "
               f"energy: mean share of each merged delta's squared norm):")
    click.echo(f"{'method':<18}{'sigma_1 /':>10}{'norm':>7}{'held > once (eta>1)':>21}{'task-specific (eta<1)':>23}")
    click.echo(f"{'':<18}{'before/after':>10}{'ratio':>7}{'before -> after':>21}{'before -> after':>23}")
    for name in names:
        cfg = write_method_config(workdir / f"merge-{name}.yaml", name, base, ft_dirs, shard_size=DEMO_SHARD_SIZE)
        effect = calibration_effect(run_merge(cfg, workdir / f"merged-{name}").calibration)
        if not effect["matrices"]:
            click.echo(f"{name:<18}  (nothing calibrated)")
            continue
        click.echo(f"{name:<18}{effect['top_ratio']:>9.2f}x{effect['norm_ratio']:>7.2f}"
                   f"{100 * effect['shrunk'][0]:>12.0f}% -> {100 * effect['shrunk'][1]:.0f}%"
                   f"{100 * effect['grown'][0]:>14.0f}% -> {100 * effect['grown'][1]:.0f}%")
