"""The recipe runner end to end on a synthetic tiny BERT and a small slice of the real movie-snippet data."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from recipes import apply
from recipes.schema import RecipeError, load_recipe, parse_recipe, resolve_recipe_path


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    """Runs write under the working directory unless told otherwise: work in tmp_path."""
    monkeypatch.chdir(tmp_path)


def tiny_recipe(model_dir, out_dir, **pruning):
    stage = {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["bert.encoder"],
             "training_steps": 2, "batch_size": 16, "pruning_scope": "local", **pruning}
    return {
        "name": "tiny",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"max_length": 16, "dev_size": 32, "max_train_samples": 48},
        "finetune": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3},
        "pruning": [stage],
        "evaluation": {"batch_size": 16},
        "output": {"dir": str(out_dir)},
    }


def test_thin_slice_runs_saves_reports_and_caches_the_finetune(workspace):
    tmp_path, model_dir = workspace
    recipe = parse_recipe(tiny_recipe(model_dir, tmp_path / "runs"))

    run_dir = apply.run(recipe)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finetune"]["cached"] is False
    for name, sparsity in report["layer_sparsity"].items():
        expected = 0.5 if name.startswith("bert.encoder") else 0.0
        assert sparsity == pytest.approx(expected, abs=0.01), name
    assert 0 <= report["metrics"]["after"]["accuracy"] <= 1 and report["metrics"]["before"]["examples"] == 32
    assert report["parameters"]["after"]["nonzero"] < report["parameters"]["before"]["nonzero"]
    assert {"load", "finetune", "evaluate_before", "prune_0_magnitude", "evaluate_after"} <= set(report["stage_seconds"])
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["name"] == "tiny"

    saved = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    encoder_linears = [m for n, m in saved.named_modules() if n.startswith("bert.encoder") and isinstance(m, torch.nn.Linear)]
    assert all((m.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01) for m in encoder_linears)

    second = apply.run(recipe)
    assert second != run_dir
    assert json.loads((second / "report.json").read_text())["finetune"]["cached"] is True


def test_existing_run_directory_is_never_overwritten(workspace):
    tmp_path, model_dir = workspace
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier results")
    with pytest.raises(RecipeError, match="already exists"):
        apply.run(parse_recipe(tiny_recipe(model_dir, tmp_path / "runs")), run_dir=taken)
    assert (taken / "keep.txt").read_text() == "earlier results"


def test_training_aware_stage_without_steps_is_refused_before_loading(tmp_path):
    with pytest.raises(RecipeError, match=r"'magnitude' prunes during training: set training_steps >= 1"):
        parse_recipe(tiny_recipe(tmp_path / "no-model-here", tmp_path / "runs", training_steps=0))


def test_unknown_key_suggests_the_nearest_one(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["pruning"][0]["target_sparsty"] = 0.4
    with pytest.raises(RecipeError, match=r"unknown key 'pruning\.0\.target_sparsty'\. Did you mean 'target_sparsity'\?"):
        parse_recipe(data)


def test_out_of_range_values_are_rejected_before_loading(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path, target_sparsity=1.5)
    with pytest.raises(RecipeError, match=r"pruning\.0\.target_sparsity.*less than 1.*1\.5"):
        parse_recipe(data)


def test_model_needs_exactly_one_source(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["model"]["asset"] = "minilm-l6"
    with pytest.raises(RecipeError, match="exactly one of 'asset', 'path' or 'hub_id'"):
        parse_recipe(data)


def test_bare_names_resolve_to_shipped_recipes_and_unknown_names_list_them():
    assert resolve_recipe_path("minilm_sentiment.yaml").parent.name == "recipes"
    assert load_recipe("minilm_sentiment.yaml").model.asset == "minilm-l6"
    with pytest.raises(RecipeError, match="shipped recipes: .*minilm_sentiment.yaml"):
        resolve_recipe_path("nope.yaml")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {asset: minilm-l6}\npruning: []\n")
    assert apply.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'pruning': List should have at least 1 item" in err and "Traceback" not in err
