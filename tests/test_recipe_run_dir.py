"""Run directories: atomic appearance, refusal to overwrite, the working-tree guard, failed stages kept as
`<run>.failed`, paths relative to the recipe file, multi-stage runs, and a report that matches the saved weights."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from recipes import apply
from recipes.run_dir import RUN_MARKER
from recipes.schema import RecipeError, load_recipe, parse_recipe
from recipes.tasks import TextClassificationTask


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def two_stage_recipe(model_dir, slim=True):
    """mask_search (then slimming) followed by Wanda on what remains: both one-shot, no fine-tune."""
    return {
        "name": "two-stage",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"max_length": 16, "dev_size": 24, "max_train_samples": 40},
        "pruning": [
            {"pruning_type": "mask_search", "target_sparsity": 0.3, "calibration_samples": 16, "batch_size": 8},
            {"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "calibration_samples": 8,
             "batch_size": 8, "op_names": ["bert.encoder"]},
        ],
        "slim": slim,
        "evaluation": {"batch_size": 24},
    }


def test_two_stages_slim_in_between_and_the_report_matches_the_saved_weights(workspace):
    tmp_path, model_dir = workspace
    run_dir = apply.run(parse_recipe(two_stage_recipe(model_dir)))
    assert run_dir.parent == tmp_path / "runs"  # the default output dir is relative to the working directory
    assert {p.name for p in run_dir.iterdir()} == {"model", "recipe.yaml", "report.json", "summary.md", "sparsity.png",
                                                   RUN_MARKER}
    assert not [p for p in run_dir.parent.iterdir() if p != run_dir]  # no staging or failed leftovers
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert report["completed_stages"] == ["load", "evaluate_before", "prune_0_mask_search", "slim", "prune_1_wanda",
                                          "evaluate_after", "save"]
    assert report["model"]["slimmed"] is True

    # recount every layer's sparsity from the saved safetensors: it must be what the report says
    assert not [p for p in (run_dir / "model").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    weights = load_file(run_dir / "model" / "model.safetensors")
    assert len(report["layer_sparsity"]) == 2 * 6 + 2  # 2 blocks x 6 Linear, the pooler and the classifier
    for layer, sparsity in report["layer_sparsity"].items():
        weight = weights[f"{layer}.weight"]
        assert (weight == 0).float().mean().item() == pytest.approx(sparsity, abs=1e-7), layer
    nonzero = sum(int((t != 0).sum()) for t in weights.values())
    total = sum(t.numel() for t in weights.values())
    assert (total, nonzero) == (report["parameters"]["after"]["total"], report["parameters"]["after"]["nonzero"])
    # Wanda ran on the slimmed model: half of every remaining encoder weight, per output row
    encoder = {k: v for k, v in report["layer_sparsity"].items() if k.startswith("bert.encoder")}
    assert encoder and all(v == pytest.approx(0.5, abs=0.02) for v in encoder.values())
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]

    summary = (run_dir / "summary.md").read_text()
    assert "| dev accuracy |" in summary and "![heads and neurons kept, per-layer sparsity](sparsity.png)" in summary
    assert (run_dir / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_into_the_same_directory_is_refused_unless_overwrite(workspace, capsys):
    tmp_path, model_dir = workspace
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(two_stage_recipe(model_dir, slim=False)))
    assert apply.main([str(recipe_file), "--run-dir", "out/run"]) == 0
    first = (tmp_path / "out/run/report.json").read_text()

    assert apply.main([str(recipe_file), "--run-dir", "out/run"]) == 2
    err = capsys.readouterr().err
    assert "already exists; refusing to overwrite it (pass --overwrite" in err and "Traceback" not in err
    assert (tmp_path / "out/run/report.json").read_text() == first

    assert apply.main([str(recipe_file), "--run-dir", "out/run", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out/run/report.json").read_text())["started"] != json.loads(first)["started"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]  # no replaced or staging copies left


def test_a_run_directory_outside_the_working_tree_needs_the_flag(workspace, tmp_path_factory):
    tmp_path, model_dir = workspace
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "run"
    recipe = parse_recipe(two_stage_recipe(model_dir, slim=False))
    with pytest.raises(RecipeError, match="outside the working directory .* --allow-outside-cwd"):
        apply.run(recipe, elsewhere)
    assert not elsewhere.exists()
    assert apply.run(recipe, elsewhere, allow_outside_cwd=True) == elsewhere and (elsewhere / "report.json").is_file()


def test_a_failing_stage_keeps_the_earlier_outputs_as_failed_and_no_run_directory(workspace, monkeypatch):
    tmp_path, model_dir = workspace
    real_prune = TextClassificationTask.prune

    def second_stage_breaks(self, model, stage):
        if stage.pruning_type == "wanda":
            raise RuntimeError("calibration ran out of memory")
        return real_prune(self, model, stage)

    monkeypatch.setattr(TextClassificationTask, "prune", second_stage_breaks)
    with pytest.raises(RecipeError, match=r"stage 'prune_1_wanda' failed: RuntimeError: calibration ran out of memory"):
        apply.run(parse_recipe(two_stage_recipe(model_dir)), tmp_path / "runs" / "r")
    assert not (tmp_path / "runs" / "r").exists()
    failed = tmp_path / "runs" / "r.failed"
    report = json.loads((failed / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_stage"] == "prune_1_wanda"
    assert report["completed_stages"] == ["load", "evaluate_before", "prune_0_mask_search", "slim"]
    assert report["pruning_stages"][0]["mask_search"]["cost"] <= report["pruning_stages"][0]["mask_search"]["budget"]
    assert "accuracy" in report["metrics"]["before"]
    assert "RuntimeError: calibration ran out of memory" in (failed / "error.txt").read_text()


def test_paths_in_a_recipe_are_relative_to_the_recipe_file(workspace, monkeypatch):
    tmp_path, model_dir = workspace
    folder = tmp_path / "recipes" / "mine"
    folder.mkdir(parents=True)
    data = two_stage_recipe("../../tiny-bert", slim=False)
    data["output"] = {"dir": "my-runs"}
    (folder / "r.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.model.path == folder / "../../tiny-bert" and recipe.model.path.resolve() == model_dir.resolve()
    assert recipe.output.dir == folder / "my-runs"
    # the recipe's own output dir is outside this working directory: the guard applies to it too
    with pytest.raises(RecipeError, match="outside the working directory"):
        apply.run(recipe)
    assert apply.run(recipe, allow_outside_cwd=True).parent == folder / "my-runs"


def test_the_benchmark_stage_times_dense_and_pruned_on_the_harness_backends(workspace):
    tmp_path, model_dir = workspace
    data = two_stage_recipe(model_dir)
    data["benchmark"] = {"backends": ["eager-fp32"], "batch_size": 2, "seq_len": 16, "warmup": 1, "rounds": 3}
    report = json.loads((apply.run(parse_recipe(data)) / "report.json").read_text())
    timing = report["benchmark"]["backends"]["eager-fp32"]
    assert timing["available"] and timing["dense_seconds"] > 0 and timing["pruned_seconds"] > 0
    assert timing["speedup"] == pytest.approx(timing["dense_seconds"] / timing["pruned_seconds"])
    assert "benchmark" in report["completed_stages"]
    data["benchmark"]["backends"] = ["eager-fp33"]
    with pytest.raises(RecipeError, match=r"benchmark\.backends: unknown backend\(s\) \['eager-fp33'\]"):
        apply.run(parse_recipe(data), tmp_path / "runs" / "misspelt")
    assert not list((tmp_path / "runs").glob("misspelt*"))  # refused before anything ran
