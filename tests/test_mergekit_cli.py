"""The config and command line a mergekit user already has: mergekit-yaml's flags, YAML as
mergekit reads it, and files of several merges (stages) that resume stage by stage."""

from __future__ import annotations

import json

import pytest
import yaml

from dist_svc.config import load_config
from tests.conftest import file_bytes, run_cli, units_done, write_config
from tests.reference import load_output


def test_flags_that_change_nothing_say_so_in_one_line_and_the_merge_runs(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "out", "--lazy-unpickle", "--trust-remote-code",
                   "--low-cpu-memory", "--write-threads", "4", "--write-model-card", "--no-clone-tensors", "-v")
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: --")]
    assert [n.split()[1] for n in notes] == ["--lazy-unpickle", "--trust-remote-code", "--low-cpu-memory",
                                             "--write-threads"]
    assert (tmp_path / "out" / "README.md").exists()  # --write-model-card: done, not a no-op
    assert "unpickles nothing" in notes[0]
    assert "merge:" in proc.stderr and "\r" not in proc.stderr  # -v: log lines, not a bar
    assert units_done(tmp_path / "out")[0] > 0


@pytest.mark.parametrize("flags, needle", [
    (["--no-safe-serialization"], "writes safetensors (or zarr) only"),
    (["--unsafe-truncate-embeddings"], "tokenizer_source"),
])
def test_flags_dist_svc_cannot_honour_are_refused_before_anything_is_written(tmp_path, family, flags, needle):
    base, fts = family(2)
    proc = run_cli("mergekit-yaml", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", *flags,
                   check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["merge", "dry-run"])
@pytest.mark.parametrize("flags", [["--cuda"], ["--gpu-rich"], ["--device", "cuda"], ["--device", "cuda:1"]],
                         ids=" ".join)
@pytest.mark.parametrize("command", ["merge", "mergekit-yaml"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_paragraph_with_or_without_dry_run(tmp_path, family, command,
                                                                                         flags, dry_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --cuda works here")
    base, fts = family(2)
    proc = run_cli(command, write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", *flags, *dry_run,
                   check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "this machine has no CUDA device" in errors[0] and "--device cpu" in errors[0]
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_transformers_cache_is_the_hugging_face_cache_hub_ids_are_read_from(tmp_path, family, monkeypatch):
    """mergekit's --transformers-cache DIR: Hub models come from DIR (here offline, with the
    default cache empty), and the merge equals the one of the same files read locally."""
    from tests.test_sources import checkpoint_files, hub_cache

    base, fts = family(2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub_cache(tmp_path / "mk-cache", "acme/ft-1", checkpoint_files(fts[0]))
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: acme/ft-1\n"
                   f"  - model: {fts[1]}\n")
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "hub", "--transformers-cache", tmp_path / "mk-cache")
    assert "--transformers-cache" not in proc.stderr  # honoured: no note
    run_cli("merge", write_config(tmp_path / "local.yaml", base, fts), tmp_path / "local")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")


def test_lora_merge_flags_say_that_dist_svc_applies_the_adapters_itself(tmp_path):
    """On a merge of LoRA adapters, --lora-merge-cache and --lora-merge-dtype say what dist-svc
    does with adapters (applies them from their factors, caches no merged copy), and change
    nothing: the same bytes as without them, and no cache directory."""
    from tests.test_sources import _exact_family

    base, adapters, _ = _exact_family(tmp_path, 2)
    cfg = write_config(tmp_path / "m.yaml", base, adapters)
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "with", "--lora-merge-cache", tmp_path / "lora-cache",
                   "--lora-merge-dtype", "bfloat16")
    notes = {line.split()[1]: line for line in proc.stderr.splitlines() if line.startswith("note: --")}
    assert set(notes) == {"--lora-merge-cache", "--lora-merge-dtype"}, proc.stderr
    for note in notes.values():
        assert "applies LoRA adapters" in note and "not LoRA adapters" not in note, note
    assert "never writes a merged copy" in notes["--lora-merge-cache"]
    assert "float64" in notes["--lora-merge-dtype"] and "not used" in notes["--lora-merge-dtype"]
    assert not (tmp_path / "lora-cache").exists()
    run_cli("merge", cfg, tmp_path / "without")
    assert file_bytes(tmp_path / "with") == file_bytes(tmp_path / "without")
    help_text = " ".join(run_cli("mergekit-yaml", "--help").stdout.split())
    assert "not LoRA adapters" not in help_text and "local checkpoints only" not in help_text
    assert "Hub model IDs are read from" in help_text


def test_random_seed_sets_the_drops_and_the_same_seed_gives_the_same_bytes(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method="dare_ties", parameters={"density": 0.5})
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_cli("mergekit-yaml", cfg, tmp_path / out, "--random-seed", seed, "--no-calibrate")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    a, c = load_output(tmp_path / "a"), load_output(tmp_path / "c")
    assert any(not (a[n] == c[n]).all() for n in a)
    seeds = json.loads((tmp_path / "c" / "dist-svc-manifest.json").read_text())["settings"]["config"]["parameters"]
    assert seeds["seed"] == 2  # part of the fingerprint: another seed is another merge


def test_allow_crimes_is_needed_to_merge_different_architectures(tmp_path, family):
    base, fts = family(2)
    config = json.loads((fts[1] / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (fts[1] / "config.json").write_text(json.dumps(config))
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "--allow-crimes" in proc.stderr and "MistralForCausalLM" in proc.stderr
    run_cli("mergekit-yaml", cfg, tmp_path / "out", "--allow-crimes")


def test_copy_tokenizer_off_leaves_the_tokenizer_out(tmp_path, family):
    base, fts = family(2)
    run_cli("mergekit-yaml", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", "--no-copy-tokenizer")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "config.json" in names and not {n for n in names if n.startswith("tokenizer")}


def test_yaml_as_mergekit_reads_it(tmp_path, family):
    """Float-valued booleans (mergekit-evolve writes them), numbers YAML 1.1 reads as strings, and
    a parameter of another method (left out with a note, as mergekit ignores it)."""
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method="ties",
                       parameters={"int8_mask": 1.0, "normalize": 0.0, "lambda": "7e-1", "t": 0.5})
    config = load_config(cfg)
    assert config.parameters == {"int8_mask": True, "normalize": False, "lambda": 0.7}
    assert config.notes == ("parameters.t is not a parameter of ties; it has no effect (mergekit ignores it too).",)


def _stages(tmp_path, base, fts) -> str:
    first = {"merge_method": "task_arithmetic", "base_model": str(base), "name": "ta",
             "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts[:2]]}
    final = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
             "models": [{"model": "ta"}, {"model": str(fts[2])}]}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(first) + "---\n" + yaml.safe_dump(final))
    return path


def test_stages_run_in_order_each_resumable_and_the_final_one_reads_the_first(tmp_path, family):
    base, fts = family(3)
    cfg = _stages(tmp_path, base, fts)
    proc = run_cli("merge", cfg, tmp_path / "out")
    assert "stage 1/2: ta" in proc.stderr and "stage 2/2: the final merge" in proc.stderr
    stage = tmp_path / "out.stages" / "ta"
    manifest = json.loads((tmp_path / "out" / "dist-svc-manifest.json").read_text())
    assert str(stage) in manifest["inputs"]  # the final merge read the first stage's output
    before = file_bytes(tmp_path / "out")
    again = run_cli("merge", cfg, tmp_path / "out")
    assert again.stdout.count("already complete") == 2
    import shutil

    shutil.rmtree(tmp_path / "out")  # the final stage lost: only it runs again, with the same bytes
    third = run_cli("merge", cfg, tmp_path / "out")
    assert "already complete" in third.stdout.splitlines()[0] and file_bytes(tmp_path / "out") == before


def test_stage_files_are_checked(tmp_path, family):
    base, fts = family(2)
    doc = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(fts[0])]})
    cfg = tmp_path / "two.yaml"
    cfg.write_text(doc + "---\n" + doc)
    proc = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "only the final merge may go without one" in proc.stderr
    loop = [dict(yaml.safe_load(doc), name="a", models=["b"]), dict(yaml.safe_load(doc), name="b", models=["a"])]
    cfg.write_text(yaml.safe_dump(loop[0]) + "---\n" + yaml.safe_dump(loop[1]))
    proc = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "depends on itself" in proc.stderr


def test_fields_mergekit_ignores_are_noted_and_typos_of_fields_refused(tmp_path, family):
    base, fts = family(2)
    config = load_config(write_config(tmp_path / "m.yaml", base, fts, model_name="MySlerpMerge-v1"))
    assert config.notes == ("model_name is not a merge field; it has no effect (mergekit ignores it too).",)
    proc = run_cli("merge", write_config(tmp_path / "t.yaml", base, fts, out_dype="bfloat16"), tmp_path / "o",
                   check=False)
    assert proc.returncode == 2 and "'out_dype': unknown field (did you mean 'out_dtype'?)" in proc.stderr


def test_a_gradient_is_interpolated_over_the_layers():
    from dist_svc.config import layer_position, resolve

    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, .25, .5, .75, 1]
    assert layer_position("model.embed_tokens.weight", 5) == 0 and layer_position("lm_head.weight", 5) == 0
    assert resolve([0.0, 1.0, 3.0], "x", 0.75) == pytest.approx(2.0)
    assert resolve([{"filter": "attn", "value": 2.0}], "mlp.w", 0.5) is None  # falls through
    assert resolve([{"filter": "attn", "value": 2.0}, {"filter": None, "value": [0.0, 4.0]}], "mlp", .5) == 2.0
    assert resolve([True, False], "x", 0.4) is True  # booleans are picked, not interpolated
