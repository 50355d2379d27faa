"""The promise to people coming from mergekit: a config they publish runs with dist-svc and gives
mergekit's model. Checked against the real tools (the `compat` extra: pip install -e
'.[test,compat]'; skipped, with the reason shown, without it): mergekit 0.1.5 and dist-svc run
the same YAML on the same tiny Llama-layout models, and transformers loads and runs the output.

Each config below is written after a config people publish (the comment names where), adapted to
the generated models: their paths, and `dtype: float32` where the original computes in bf16/fp16
(mergekit computes in the dtype given, dist-svc promotes half precision to float32; compared in
float32). mergekit runs once for all of them, in one process (module fixture); so do dist-svc and
transformers, so the module takes about a minute.

Deterministic methods must agree within 1e-6 in float32 (both compute in float32; the order of
summation differs by a few roundings of values below 1). Random methods (DARE, DELLA) draw from
different generators (docs/methods.md): compared on their deterministic setting (density 1),
and with drops on statistics of what is kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_svc import merge
from dist_svc.commands.demo import TinyLlama, make_family, write_hf_checkpoint, write_tokenizer
from tests.conftest import run_cli
from tests.reference import load_checkpoint, load_output

pytest.importorskip("mergekit", reason="mergekit is not installed: pip install -e '.[test,compat]'")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                                          "pip install -e '.[test,compat]'")

# Real Llama dimensions in miniature (mergekit and transformers need a loadable architecture).
ARCH = TinyLlama(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)
CHATML = ("<|im_start|>", "<|im_end|>")
TOL = 1e-6  # float32 in both tools; see the module's docstring


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # where the config comes from
    yaml: str  # with {base}, {ft1}, {ft2}, {ft3}, {chat}, {tool} for the generated models
    check: str = "exact"  # exact | dare | della-rank | della
    args: tuple[str, ...] = ()  # mergekit-yaml flags, given to both tools
    cli: bool = False  # dist-svc runs as `dist-svc mergekit-yaml CONFIG OUT ARGS` (else the Python API)


CASES = [
    Case("linear", "mergekit examples/linear.yml", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0}}
          - model: {ft2}
            parameters: {{weight: 0.3}}
          - model: {ft3}
            parameters: {{weight: 0.5}}
        merge_method: linear
        dtype: float32  # float16 in the original
    """),
    Case("linear-union", "model card of a Llama-3 linear merge with `tokenizer_source: union` "
                         "(github.com/Naveenpoliasetty/Llama3-linear-merge-llms)", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0}}
          - model: {chat}
            parameters: {{weight: 1.0}}
          - model: {ft3}
            parameters: {{weight: 1.0}}
        merge_method: linear
        tokenizer_source: union
        dtype: float32
    """),
    Case("task-arithmetic", "mergekit README, Task Arithmetic (weights, normalize)", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.6}}
          - model: {ft2}
            parameters: {{weight: 0.4}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{normalize: true}}
        dtype: float32
    """),
    Case("task-negation", "Ilharco et al., Editing models with task arithmetic: forgetting by negation", """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {ft1}
            parameters: {{weight: -1.0}}
        parameters: {{lambda: 0.5}}
        dtype: float32
    """),
    Case("ties-gradients", "mergekit examples/ties.yml (density and weight gradients, a filter)", """
        models:
          - model: {ft1}
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: {ft2}
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: {ft3}
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: {base}
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32  # float16 in the original
    """),
    Case("gradients-filters", "mergekit README, Parameter Specification: gradients and filters at every level, "
                              "a filtered list with no entry for a tensor falling through to the next level", """
        merge_method: ties
        base_model: {base}
        models:
          - model: {ft1}
            parameters: {{weight: [0.2, 1.0], density: 0.6}}
          - model: {ft2}
            parameters:
              weight:
                - {{filter: self_attn, value: 0.4}}
                - {{filter: mlp, value: [1.0, 0.3]}}
          - model: {ft3}
            parameters:
              density: [{{filter: down_proj, value: 0.3}}]
        parameters:
          weight: 0.8
          density: [0.9, 0.5]
          lambda: [{{filter: norm, value: 0.5}}, {{value: 1.0}}]
        dtype: float32
    """),
    Case("ties-blog", "M. Labonne, 'Merge Large Language Models with mergekit' (2024), TIES example", """
        models:
          - model: {base}
            # no parameters necessary for base model
          - model: {ft1}
            parameters:
              density: 0.5
              weight: 0.5
          - model: {ft2}
            parameters:
              density: 0.5
              weight: 0.3
        merge_method: ties
        base_model: {base}
        parameters:
          normalize: true
        dtype: float32
    """),
    Case("ties-rescale", "mergekit 0.1.5's TIES `rescale` (magnitude pruning rescaled to the L1 norm)", """
        models:
          - model: {ft1}
            parameters: {{density: 0.3, weight: 1.0}}
          - model: {ft2}
            parameters: {{density: 0.6, weight: 0.5}}
          - model: {ft3}
            parameters: {{density: 0.001, weight: 1.0}}  # keeps one entry per tensor
        merge_method: ties
        base_model: {base}
        parameters: {{rescale: true, lambda: 0.8}}
        dtype: float32
    """),
    Case("ties-slices", "LazyMergekit configs that write TIES as whole-range slices", """
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 4]
              - model: {ft1}
                layer_range: [0, 4]
                parameters: {{density: 0.5, weight: 0.5}}
              - model: {ft2}
                layer_range: [0, 4]
                parameters: {{density: 0.5, weight: 0.3}}
        merge_method: ties
        base_model: {base}
        parameters:
          normalize: true
        dtype: float32
    """),
    Case("evolve", "mergekit-evolve's output: per-slice weights, float-valued booleans", """
        base_model: {base}
        dtype: float32
        merge_method: task_arithmetic
        parameters:
          int8_mask: 1.0
          normalize: 0.0
        slices:
        - sources:
          - layer_range: [0, 2]
            model: {ft1}
            parameters: {{weight: 0.4312}}
          - layer_range: [0, 2]
            model: {ft2}
            parameters: {{weight: 0.2177}}
          - layer_range: [0, 2]
            model: {base}
        - sources:
          - layer_range: [2, 4]
            model: {ft1}
            parameters: {{weight: 0.0895}}
          - layer_range: [2, 4]
            model: {ft2}
            parameters: {{weight: 0.7381}}
          - layer_range: [2, 4]
            model: {base}
    """),
    Case("dare-ties-exact", "M. Labonne's DARE TIES example, at density 1 (DARE's deterministic setting)", """
        models:
          - model: {base}
          - model: {ft1}
            parameters: {{density: 1.0, weight: 0.4}}
          - model: {ft2}
            parameters: {{density: 1.0, weight: 0.3}}
          - model: {ft3}
            parameters: {{density: 1.0, weight: 0.3}}
        merge_method: dare_ties
        base_model: {base}
        parameters:
          int8_mask: true
        dtype: float32
    """),
    Case("dare-ties", "M. Labonne's DARE TIES example (Daredevil-7B style), density 0.53", """
        models:
          - model: {base}
          - model: {ft1}
            parameters: {{density: 0.53, weight: 0.4}}
          - model: {ft2}
            parameters: {{density: 0.53, weight: 0.3}}
          - model: {ft3}
            parameters: {{density: 0.53, weight: 0.3}}
        merge_method: dare_ties
        base_model: {base}
        parameters:
          int8_mask: true
        dtype: float32
    """, check="dare", args=("--random-seed", "7")),
    Case("dare-linear-exact", "mergekit README, DARE task arithmetic, at density 1", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.7, density: 1.0}}
          - model: {ft2}
            parameters: {{weight: 0.3, density: 1.0}}
        merge_method: dare_linear
        base_model: {base}
        parameters: {{lambda: 0.9}}
        dtype: float32
    """),
    Case("breadcrumbs", "mergekit docs, Model Breadcrumbs (density 0.9, gamma 0.01)", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0, density: 0.9, gamma: 0.01}}
          - model: {ft2}
            parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
        merge_method: breadcrumbs
        base_model: {base}
        dtype: float32
    """),
    Case("breadcrumbs-ties", "model cards using breadcrumbs_ties (normalize, lambda)", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.5, density: 0.7}}
          - model: {ft2}
            parameters: {{weight: 0.3, density: 0.7}}
          - model: {ft3}
            parameters: {{weight: 0.2, density: 0.7}}
        merge_method: breadcrumbs_ties
        base_model: {base}
        parameters:
          gamma: 0.02
          normalize: true
          lambda: 1.1
        dtype: float32
    """),
    Case("della-exact", "mergekit docs, DELLA, at density 1 (its deterministic setting)", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0, density: 1.0}}
          - model: {ft2}
            parameters: {{weight: 0.5, density: 1.0}}
        merge_method: della
        base_model: {base}
        parameters:
          epsilon: 0.1
          lambda: 1.0
          normalize: true
        dtype: float32
    """),
    Case("della-linear-rank", "DELLA's MAGPRUNE alone: one model, no rescale, to compare what is kept", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0, density: 0.5, epsilon: 0.3}}
        merge_method: della_linear
        base_model: {base}
        parameters: {{rescale: false}}
        dtype: float32
    """, check="della-rank", args=("--random-seed", "3")),
    Case("della", "model cards of DELLA merges (density 0.7, epsilon 0.1, lambda 1)", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.5, density: 0.7}}
          - model: {ft2}
            parameters: {{weight: 0.5, density: 0.7}}
        merge_method: della
        base_model: {base}
        parameters:
          epsilon: 0.1
          lambda: 1.0
          int8_mask: true
        dtype: float32
    """, check="della", args=("--random-seed", "5")),
    Case("sce", "mergekit docs, SCE (select_topk)", """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: sce
        base_model: {base}
        parameters:
          select_topk: 0.6
        dtype: float32
    """),
    Case("model-stock", "model cards of Model Stock merges (three fine-tunes and their base)", """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: model_stock
        base_model: {base}
        dtype: float32
    """),
    Case("model-stock-filter-wise", "mergekit README, Model Stock's `filter_wise`", """
        models:
          - model: {ft1}
          - model: {ft2}
        merge_method: model_stock
        base_model: {base}
        parameters: {{filter_wise: true}}
        dtype: float32
    """),
    Case("slerp-marcoro", "model card of mlabonne/Marcoro14-7B-slerp (LazyMergekit's SLERP template)", """
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 4]
              - model: {ft2}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {ft1}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32  # bfloat16 in the original
    """),
    Case("slerp-models", "a SLERP model card written with `models:` and a t gradient", """
        models:
          - model: {ft2}
          - model: {base}
        base_model: {base}
        merge_method: slerp
        dtype: float32
        parameters:
          t: [0, 0.5, 1, 0.5, 0]
    """),
    Case("nuslerp", "mergekit docs, NuSLERP of two fine-tunes' task vectors", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.6}}
          - model: {ft2}
            parameters: {{weight: 0.4}}
        merge_method: nuslerp
        base_model: {base}
        dtype: float32
    """),
    Case("nuslerp-rows", "mergekit docs, NuSLERP without a base, row by row", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0}}
          - model: {ft3}
            parameters: {{weight: 3.0}}
        merge_method: nuslerp
        parameters:
          nuslerp_flatten: false
        dtype: float32
    """),
    Case("karcher", "mergekit docs, Karcher mean (`tol: 1e-5` is a string to YAML 1.1)", """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: karcher
        parameters:
          max_iter: 20
          tol: 1e-5
        dtype: float32
    """),
    Case("passthrough-44layer", "mergekit examples/orcamini-platy-44layer.yml (a frankenmerge of two models)", """
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 3]
          - sources:
              - model: {ft2}
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: float32
    """),
    Case("passthrough-solar", "SOLAR 10.7B's depth up-scaling (Kim et al. 2023): one model, overlapping ranges", """
        slices:
          - sources:
              - model: {ft3}
                layer_range: [0, 3]
          - sources:
              - model: {ft3}
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: float32
    """),
    Case("passthrough-scaled", "self-merges that zero the repeated layers' output projections", """
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 3]
          - sources:
              - model: {ft1}
                layer_range: [2, 3]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0.0
                    - filter: down_proj
                      value: 0.0
                    - value: 1.0
          - sources:
              - model: {ft1}
                layer_range: [3, 4]
        merge_method: passthrough
        dtype: float32
    """),
    Case("bakllama", "mergekit examples/bakllama.yml (layers from three models)", """
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 2]
          - sources:
              - model: {ft2}
                layer_range: [1, 3]
          - sources:
              - model: {ft3}
                layer_range: [3, 4]
        merge_method: passthrough
        dtype: float32
    """),
    Case("flags", "mergekit README usage: `mergekit-yaml config.yml ./out --cuda --lazy-unpickle --allow-crimes`, "
                  "here with the flags a CPU run takes", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.5}}
          - model: {tool}
            parameters: {{weight: 0.5}}
        merge_method: linear
        tokenizer_source: union
        dtype: float32
    """, args=("--out-shard-size", "30K", "--no-copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "-v",
               "--random-seed", "1"), cli=True),
    Case("tokenizer-tokens", "mergekit README, Tokenizer Configuration (union, tokens with sources)", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.5}}
          - model: {chat}
            parameters: {{weight: 0.5}}
          - model: {tool}
            parameters: {{weight: 0.5}}
        merge_method: task_arithmetic
        base_model: {base}
        dtype: float32
        tokenizer:
          source: union
          tokens:
            <|im_start|>:
              source: {chat}
            <tool>:
              source:
                kind: model_token
                model: {tool}
                token: <tool>
            w9:
              source: {ft1}
              force: true
    """),
    Case("tokenizer-tokens-in-vocab", "mergekit README, Tokenizer Configuration: a `tokens:` entry naming a "
                                      "token the vocabulary has, without `force`", """
        models:
          - model: {ft1}
            parameters: {{weight: 0.5}}
          - model: {tool}
            parameters: {{weight: 0.5}}
        merge_method: task_arithmetic
        base_model: {base}
        dtype: float32
        tokenizer:
          source: union
          tokens:
            w5:
              source: {ft1}
    """),
    Case("tokenizer-base-chatml", "ChatML merges: `tokenizer_source: base` and `chat_template: chatml`", """
        models:
          - model: {chat}
            parameters: {{weight: 1.0, density: 0.6}}
          - model: {ft2}
            parameters: {{weight: 1.0, density: 0.6}}
        merge_method: ties
        base_model: {base}
        tokenizer_source: base
        chat_template: chatml
        dtype: float32
    """),
    Case("tokenizer-model", "a merge taking its vocabulary from one model (`tokenizer_source: PATH`)", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0}}
          - model: {chat}
            parameters: {{weight: 0.5}}
        merge_method: task_arithmetic
        base_model: {base}
        tokenizer_source: {chat}
        chat_template: auto
        dtype: float32
    """),
    Case("chat-template-copied", "a merge that names its chat template and copies the base's tokenizer", """
        models:
          - model: {ft1}
            parameters: {{weight: 1.0}}
          - model: {ft2}
            parameters: {{weight: 1.0}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{lambda: 0.5}}
        chat_template: llama3
        dtype: float32
    """),
    Case("tokenizer-padded", "mergekit README: `pad_to_multiple_of` for the embedding rows", """
        models:
          - model: {tool}
            parameters: {{weight: 1.0}}
          - model: {ft2}
            parameters: {{weight: 1.0}}
        merge_method: linear
        base_model: {base}
        parameters: {{weight: 1.0}}
        tokenizer:
          source: union
          pad_to_multiple_of: 16
        dtype: float32
    """),
]

_MERGEKIT_RUNNER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
from mergekit.scripts.multimerge import main as multimerge
failures = {}
for job in json.load(open(sys.argv[1])):
    try:
        if job.get("multi"):
            multimerge([job["config"], "--intermediate-dir", job["intermediate"], "--out-path", job["out"], "--quiet",
                        "--no-write-model-card"], standalone_mode=False)
        else:
            main([job["config"], job["out"], "--quiet", "--no-write-model-card", *job["args"]], standalone_mode=False)
    except BaseException:
        failures[job["id"]] = traceback.format_exc()[-3000:]
json.dump(failures, open(sys.argv[2], "w"))
"""

# mergekit examples/mega.yml, a mergekit-multimerge file: a SLERP stage whose output a TIES stage
# merges (adapted: two layers of models, float32).
MULTI = """
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 4]
      - model: {ft2}
        layer_range: [0, 4]
merge_method: slerp
base_model: {ft1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
name: gradient-slerp
---
models:
  - model: gradient-slerp
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {ft3}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""


def _fine_tune(root: Path, name: str, donor: Path, added: tuple[str, ...], seed: int) -> Path:
    """A fine-tune that learnt tokens of its own: the donor's weights, a little more training,
    and one embedding and LM-head row per added token."""
    tensors = {n: torch.from_numpy(a.astype(np.float32)) for n, a in load_checkpoint(donor).items()}
    gen = torch.Generator().manual_seed(seed)
    for n, t in tensors.items():
        tensors[n] = t + 0.003 * torch.randn(t.shape, generator=gen)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[n] = torch.cat([tensors[n], 0.02 * torch.randn(len(added), ARCH.hidden_size, generator=gen)])
    config = {**ARCH.hf_config(torch.float32), "vocab_size": ARCH.vocab_size + len(added)}
    out = root / name
    write_hf_checkpoint(out, tensors, 1, config)
    write_tokenizer(out, ARCH.vocab_size + len(added), added)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base, fts = make_family(root, k=3, arch=ARCH, dtype=torch.float32, shards=2)
    for ft in fts:
        write_tokenizer(ft, ARCH.vocab_size)
    chat = _fine_tune(root, "chat", fts[0], CHATML, seed=1)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    tool = _fine_tune(root, "tool", fts[1], ("<tool>",), seed=2)
    return {"base": base, "ft1": fts[0], "ft2": fts[1], "ft3": fts[2], "chat": chat, "tool": tool, "root": root}


@pytest.fixture(scope="module")
def outputs(models):
    """Every case merged by mergekit (one process for all) and by dist-svc (calibration off)."""
    root = models["root"] / "runs"
    root.mkdir()
    jobs = []
    for case in CASES:
        cfg = root / f"{case.id}.yaml"
        cfg.write_text(textwrap.dedent(case.yaml).format(**{k: v for k, v in models.items() if k != "root"}))
        jobs.append({"id": case.id, "config": str(cfg), "out": str(root / f"{case.id}-mk"), "args": list(case.args)})
    cfg = root / "multi.yaml"
    cfg.write_text(MULTI.format(**{k: v for k, v in models.items() if k != "root"}))
    jobs.append({"id": "multi", "multi": True, "config": str(cfg), "out": str(root / "multi-mk"),
                 "intermediate": str(root / "multi-mk-stages")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", _MERGEKIT_RUNNER, str(root / "jobs.json"), str(root / "failed.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads((root / "failed.json").read_text())
    return root, failed


def _run_dist_svc(root: Path, case: Case) -> Path:
    out = root / f"{case.id}-ds"
    if not out.exists() and case.cli:  # mergekit-yaml's own arguments, unchanged, to dist-svc's command of that name
        run_cli("mergekit-yaml", root / f"{case.id}.yaml", out, *case.args)
    elif not out.exists():
        from dist_svc.config import load_config

        config = load_config(root / f"{case.id}.yaml", calibrate=False)
        seed = int(case.args[case.args.index("--random-seed") + 1]) if "--random-seed" in case.args else None
        merge(config.with_options(random_seed=seed), out, progress="off")
    return out


def _vocab(out: Path) -> dict[str, int] | None:
    tok = out / "tokenizer.json"
    if not tok.exists():
        return None
    return transformers.AutoTokenizer.from_pretrained(out).get_vocab()


def _aligned(ours: Path, theirs: Path) -> tuple[dict, dict]:
    """Both outputs' tensors; vocabulary rows of mergekit's put in dist-svc's token order (the two
    may number new tokens differently: docs/methods.md)."""
    a, b = load_output(ours), load_output(theirs)
    assert set(a) == set(b), set(a) ^ set(b)
    va, vb = _vocab(ours), _vocab(theirs)
    if va is not None and vb is not None and va != vb:
        assert set(va) == set(vb), set(va) ^ set(vb)
        order = torch.tensor([vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])])
        for name in a:
            if a[name].shape[0] >= len(va) and "layers" not in name:
                b[name] = torch.cat([b[name][order], b[name][len(va):]])
    return a, b


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_published_config_gives_mergekits_model(outputs, case):
    root, failed = outputs
    assert case.id not in failed, f"mergekit failed on {case.id}:\n{failed[case.id]}"
    ours, theirs = _aligned(_run_dist_svc(root, case), root / f"{case.id}-mk")
    ours_cfg = json.loads((root / f"{case.id}-ds" / "config.json").read_text())
    theirs_cfg = json.loads((root / f"{case.id}-mk" / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size"):
        assert ours_cfg[key] == theirs_cfg[key], key
    if case.check == "exact":
        worst = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in ours)
        assert worst <= TOL, f"{case.id}: max abs difference {worst:.3g}"
    else:
        _compare_random(case, root, ours, theirs)


def _deltas(ours, theirs, base):
    names = [n for n in ours if "layers" in n and ours[n].ndim == 2]
    d_ours = np.concatenate([(ours[n].double().numpy() - base[n]).ravel() for n in names])
    d_theirs = np.concatenate([(theirs[n].double().numpy() - base[n]).ravel() for n in names])
    return d_ours, d_theirs, names


def _compare_random(case: Case, root: Path, ours, theirs) -> None:
    """Different generators, the same distribution: each tool's merged deltas agree in how many
    entries survive and how large they are, within what sampling explains."""
    base = load_checkpoint(root.parent / "base")
    d_ours, d_theirs, names = _deltas(ours, theirs, base)
    n = d_ours.size
    zero_ours, zero_theirs = np.mean(d_ours == 0), np.mean(d_theirs == 0)
    sigma = np.sqrt(zero_theirs * (1 - zero_theirs) / n) * np.sqrt(2)
    assert abs(zero_ours - zero_theirs) < 6 * sigma + 1e-4, (zero_ours, zero_theirs)
    if case.check == "della-rank":
        # One model, no rescale: each entry is the fine-tune's or the base's. By its rank in its
        # row, kept with probability density - epsilon + 2 epsilon rank / (n - 1) in both tools.
        ft = load_checkpoint(root.parent / "ft-1")
        for d, tensors in (("dist-svc", ours), ("mergekit", theirs)):
            for lo, hi in ((0.0, 0.2), (0.8, 1.0)):
                kept, total, expect = 0, 0, 0.0
                for name in names:
                    tau = ft[name] - base[name]
                    rank = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1) / (tau.shape[1] - 1)
                    sel = (rank >= lo) & (rank <= hi)
                    kept += np.count_nonzero((tensors[name].double().numpy() != base[name])[sel])
                    total += sel.sum()
                    expect += (0.5 - 0.3 + 0.6 * rank[sel]).sum()
                p = expect / total
                assert abs(kept / total - p) < 5 * np.sqrt(p * (1 - p) / total), (d, lo, kept / total, p)
    else:
        # With rescaling, the mass of what survives: mergekit restores each task vector's L1 norm
        # exactly, dist-svc in expectation (kept entries divided by their keep probability).
        ratio = np.abs(d_ours).sum() / np.abs(d_theirs).sum()
        assert 0.95 < ratio < 1.05, ratio


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_merged_model_loads_in_transformers_and_generates(outputs, case):
    """What transformers loads is what dist-svc wrote, and it runs: a few generated tokens, and
    for deterministic methods the same logits as mergekit's model (to float32 rounding)."""
    root, _ = outputs
    ours_dir, theirs_dir = _run_dist_svc(root, case), root / f"{case.id}-mk"
    model = transformers.AutoModelForCausalLM.from_pretrained(ours_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours_dir)
    state = model.state_dict()
    for name, tensor in load_output(ours_dir).items():
        assert torch.equal(state[name], tensor), name
    ids = tokenizer("w3 w17 w42", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 17, 42]]
    with torch.no_grad():
        logits = model(ids).logits
        reference = transformers.AutoModelForCausalLM.from_pretrained(theirs_dir)(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if case.check == "exact" and _vocab(ours_dir) == _vocab(theirs_dir):
        assert float((logits - reference).abs().max()) < 1e-4
    assert generated.shape == (1, 7) and torch.isfinite(logits).all()


def test_tokenizers_are_mergekits_and_match_the_rows(outputs, models):
    """The written tokenizer holds the vocabulary mergekit builds, each token's row follows it, and
    the chat template is the one asked for."""
    root, _ = outputs
    for case in [c for c in CASES if "tokenizer" in c.yaml or "chat_template" in c.yaml]:
        ours_dir, theirs_dir = _run_dist_svc(root, case), root / f"{case.id}-mk"
        ours, theirs = (transformers.AutoTokenizer.from_pretrained(d) for d in (ours_dir, theirs_dir))
        assert set(ours.get_vocab()) == set(theirs.get_vocab()), case.id
        text = "w3 <|im_start|> w5 <tool> w9 w55 w99"  # w5, w9 under tokens: still plain tokens, so w55 is one
        assert ours.convert_ids_to_tokens(ours(text)["input_ids"]) == \
            theirs.convert_ids_to_tokens(theirs(text)["input_ids"]), case.id
        assert ours.tokenize("w55 w99") == ["w55", "w99"], case.id
        if "chat_template" in case.yaml:  # else each copies its donor's (mergekit's: a set's first, without a base)
            assert ours.chat_template == theirs.chat_template, case.id
        embed = load_output(ours_dir)["model.embed_tokens.weight"]
        assert embed.shape[0] == json.loads((ours_dir / "config.json").read_text())["vocab_size"]
    chat_rows = load_checkpoint(models["chat"])["model.embed_tokens.weight"]
    tokens = load_output(root / "tokenizer-tokens-ds")["model.embed_tokens.weight"]
    vocab = _vocab(root / "tokenizer-tokens-ds")
    # <|im_start|> is only in the chat model: its row there, in every model's aligned embedding,
    # so the merged delta is 0 and the output row is the chat model's.
    assert np.allclose(tokens[vocab["<|im_start|>"]].double().numpy(), chat_rows[128], atol=1e-6)


# Every method on task vectors: each may be given a config whose only model is the base.
ONLY_THE_BASE = {"task_arithmetic": "", "ties": "density: 0.5", "dare_linear": "density: 0.5",
                 "dare_ties": "density: 0.5", "breadcrumbs": "density: 0.8, gamma: 0.1",
                 "breadcrumbs_ties": "density: 0.8, gamma: 0.1", "della": "density: 0.5, epsilon: 0.1",
                 "della_linear": "density: 0.5, epsilon: 0.1", "sce": "select_topk: 0.5"}


def test_a_merge_whose_only_model_is_the_base_writes_the_base_as_mergekit_does(tmp_path):
    """No task vector at all: mergekit's task-arithmetic family and SCE return the base (a
    LoRA-slices config can reduce to this); dist-svc wrote a manifest and a .partial shard and
    stopped with a traceback. The methods mergekit lacks (TSV, ISO-C, ISO-CTS, STAR) do the same."""
    from dist_svc.methods import METHODS

    base, _ = make_family(tmp_path / "family", k=1, arch=ARCH, dtype=torch.float32)
    on_deltas = [m.name for m in METHODS.values() if m.operates_on == "deltas" and m.min_fine_tunes == 0]
    assert set(ONLY_THE_BASE) <= set(on_deltas)
    configs = {}
    for method in on_deltas:
        params = ONLY_THE_BASE.get(method, "")
        configs[method] = tmp_path / f"{method}.yaml"
        configs[method].write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                                   f"    parameters: {{weight: 1.0}}\n"
                                   + (f"parameters: {{{params}}}\n" if params else "") + "dtype: float32\n")
    script = textwrap.dedent("""
        import sys, yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
            config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
            run_merge(config, out, MergeOptions(copy_tokenizer=False, quiet=True))
    """)
    args = [str(a) for m in ONLY_THE_BASE for a in (configs[m], tmp_path / f"mk-{m}")]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_checkpoint(base)
    for method in on_deltas:
        merge(configs[method], tmp_path / f"ds-{method}", progress="off")
        ours = load_output(tmp_path / f"ds-{method}")
        assert ours.keys() == original.keys(), method
        assert all(np.array_equal(ours[n].numpy(), original[n]) for n in ours), method
        if method in ONLY_THE_BASE:
            theirs = load_output(tmp_path / f"mk-{method}")
            assert theirs.keys() == ours.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours), method


def test_ties_on_bf16_checkpoints_differs_from_mergekit_only_at_ties(tmp_path):
    """bf16 task vectors hold many equal magnitudes. Where TIES's threshold falls among equal
    magnitudes, mergekit's choice depends on torch's sort; dist-svc keeps the lowest indices.
    Everywhere else the two agree within float32 rounding."""
    base, fts = make_family(tmp_path, k=2, arch=TinyLlama(vocab_size=64, hidden_size=64, intermediate_size=96,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2), dtype=torch.bfloat16)
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{density: 0.3, weight: 1.0}}\n" for f in fts)
        + "dtype: float32\nout_dtype: float32\n")
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(tmp_path / "mk"),
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge(cfg, tmp_path / "ds", calibrate=False, progress="off")
    ours, theirs = load_output(tmp_path / "ds"), load_output(tmp_path / "mk")
    b = load_checkpoint(base)
    taus = [{n: a - b[n] for n, a in load_checkpoint(f).items()} for f in fts]
    ties_seen = 0
    for name in ours:
        differ = (ours[name].double() - theirs[name].double()).abs().numpy() > TOL
        at_threshold = np.zeros_like(differ)
        for tau in taus:
            mag = np.abs(tau[name]).ravel()
            k = max(1, int(0.3 * mag.size))
            threshold = np.sort(mag)[::-1][k - 1]
            tied = np.abs(tau[name]) == threshold
            if tied.sum() > 1:
                at_threshold |= tied
        ties_seen += int(at_threshold.sum())
        assert not (differ & ~at_threshold).any(), name
    assert ties_seen > 0  # the family's bf16 task vectors do tie at the threshold


@pytest.mark.parametrize("position", ["models", "base_model"])
def test_model_plus_lora_is_mergekits_adapted_model_in_either_position(tmp_path, position):
    """mergekit materializes `MODEL+LORA` as PEFT's merge_and_unload of the model loaded in its own
    dtype (bf16 here), under `models:` and `base_model:` alike; dist-svc's adapted weights are the
    same, rounded once to bf16 from float64 where PEFT rounds the change to bf16 first (so an
    element may sit one bf16 step away where the two roundings part)."""
    peft = pytest.importorskip("peft", reason="the LoRA comparison builds an adapter with PEFT")
    base, fts = make_family(tmp_path, k=2, arch=TinyLlama(vocab_size=64, hidden_size=64, intermediate_size=96,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2), dtype=torch.bfloat16)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path / "lora")
    adapted = f"{base}+{tmp_path / 'lora'}"
    models = [(adapted, 1.0), (fts[0], 0.5)] if position == "models" else [(fts[0], 1.0), (fts[1], 0.5)]
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {adapted if position == 'base_model' else base}\n"
                   f"models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in models)
                   + "dtype: float32\nout_dtype: float32\n")
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(tmp_path / "mk"),
                           "--lora-merge-cache", str(tmp_path / "lora-cache"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge(cfg, tmp_path / "ds", calibrate=False, progress="off")
    ours, theirs = load_output(tmp_path / "ds"), load_output(tmp_path / "mk")
    assert set(ours) == set(theirs)
    b = load_checkpoint(base)
    changed = parted = 0
    for name in ours:
        a, t = ours[name].double().numpy(), theirs[name].double().numpy()
        step = np.abs(b[name]) * 2.0**-7 + 1e-30  # one bf16 step at the base's magnitude
        apart = np.abs(a - t) / np.maximum(TOL, 1.01 * step)
        assert apart.max() <= 1, f"{name}: {apart.max():.3g} bf16 steps from mergekit's"
        parted += int((np.abs(a - t) > TOL).sum())
        if "q_proj" in name or "v_proj" in name or "down_proj" in name:
            changed += a.size
    assert changed and parted < 0.005 * changed, f"{parted} of {changed} adapted elements part"


def test_mergekit_yaml_flags_mean_what_they_mean_in_mergekit(outputs):
    """`dist-svc mergekit-yaml` took the flags above unchanged: shards of at most 30,000 bytes as
    mergekit's (its help says parameters, its writer counts bytes), no tokenizer files with
    --no-copy-tokenizer (the built vocabulary's tokenizer is still written, as mergekit does)."""
    root, _ = outputs
    ours, theirs = root / "flags-ds", root / "flags-mk"
    for out in (ours, theirs):
        shards = sorted(out.glob("*.safetensors"))
        assert len(shards) > 3
        sizes = [sum(t.numel() * t.element_size() for t in load_output_file(p).values()) for p in shards]
        largest = max(t.numel() * t.element_size() for t in load_output(out).values())
        assert all(size <= max(30_000, largest) for size in sizes), (out, sizes)
    names = {p.name for p in ours.iterdir()} & {p.name for p in theirs.iterdir()}
    assert "tokenizer.json" in names  # tokenizer_source: union writes the built tokenizer in both


def load_output_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_multimerge_file_runs_stage_by_stage_as_mergekit_multimerge(outputs, models):
    """mergekit-multimerge's file: the named stage's output is the next stage's model."""
    root, failed = outputs
    assert "multi" not in failed, failed.get("multi")
    run_cli("merge", root / "multi.yaml", root / "multi-ds", "-I", root / "multi-ds-stages", "--no-calibrate")
    for ours, theirs in ((root / "multi-ds", root / "multi-mk"),
                         (root / "multi-ds-stages" / "gradient-slerp", root / "multi-mk-stages" / "gradient-slerp")):
        a, b = load_output(ours), load_output(theirs)
        assert set(a) == set(b)
        worst = max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
        assert worst <= TOL, (ours, worst)
