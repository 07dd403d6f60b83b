"""`retrain_steps` of a one-shot stage: fine-tuning after pruning holds the pruned weights at zero, and stages in a
row make the prune / fine-tune iterations of network trimming. Synthetic tiny BERT, real movie-snippet slice."""

import json

import pytest
import torch
from safetensors.torch import load_file

from recipes import apply
from recipes.schema import RecipeError, parse_recipe

FFN = r"intermediate\.dense$"


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def recipe(model_dir, out_dir, stages):
    return parse_recipe({
        "name": "tiny",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"max_length": 16, "dev_size": 32, "max_train_samples": 64},
        "pruning": stages,
        "evaluation": {"batch_size": 16},
        "output": {"dir": str(out_dir)},
    })


def wanda(**extra):
    return {"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": "1x1", "op_names": ["bert.encoder"],
            "calibration_samples": 16, "batch_size": 16, "learning_rate": 1e-3, **extra}


def trimming(fraction, **extra):
    return {"pruning_type": "network_trimming", "target_sparsity": fraction, "pattern": "1xchannel",
            "op_names": [FFN], "pruning_scope": "local", "apoz_threshold": 0.05, "calibration_samples": 16,
            "batch_size": 16, "learning_rate": 1e-3, **extra}


def run_and_load(tmp_path, model_dir, stages, name):
    run_dir = apply.run(recipe(model_dir, tmp_path / "runs", stages), run_dir=tmp_path / "runs" / name)
    return json.loads((run_dir / "report.json").read_text()), load_file(run_dir / "model" / "model.safetensors")


def test_finetuning_after_wanda_keeps_its_zeros_and_changes_the_rest(workspace):
    tmp_path, model_dir = workspace
    _, pruned = run_and_load(tmp_path, model_dir, [wanda()], "pruned")
    report, tuned = run_and_load(tmp_path, model_dir, [wanda(retrain_steps=4)], "tuned")

    stage = report["pruning_stages"][0]
    assert stage["retrain"]["steps"] == 4 and stage["retrain"]["zeros_held"] > 0
    for name, weight in pruned.items():
        if name.startswith("bert.encoder") and weight.dim() == 2:
            # the same calibration gives the same mask; fine-tuning kept exactly those zeros
            assert torch.equal(tuned[name] == 0, weight == 0), name
            assert (weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    changed = [name for name in pruned if not torch.equal(pruned[name], tuned[name])]
    assert any(name.startswith("bert.encoder") for name in changed), "fine-tuning changed no weight"
    assert "retrained 4 steps" in (tmp_path / "runs" / "tuned" / "summary.md").read_text()


def test_trimming_iterations_prune_further_from_the_finetuned_model(workspace):
    tmp_path, model_dir = workspace
    report, model = run_and_load(tmp_path, model_dir, [trimming(0.25, retrain_steps=3),
                                                       trimming(0.5, retrain_steps=3)], "iterated")
    assert [stage["retrain"]["steps"] for stage in report["pruning_stages"]] == [3, 3]
    ffn_rows = {name: weight for name, weight in model.items() if name.endswith("intermediate.dense.weight")}
    assert ffn_rows
    for name, weight in ffn_rows.items():
        pruned_rows = (weight == 0).all(dim=1)
        assert pruned_rows.float().mean() == pytest.approx(0.5, abs=1 / len(pruned_rows)), name
        assert (model[name.replace("weight", "bias")][pruned_rows] == 0).all(), name
    zeros = [stage["retrain"]["zeros_held"] for stage in report["pruning_stages"]]
    assert zeros[1] > zeros[0]  # the second iteration pruned more rows, and the first one's stayed pruned


def test_retrain_steps_on_a_training_aware_type_is_refused(tmp_path):
    stage = {"pruning_type": "magnitude", "target_sparsity": 0.5, "training_steps": 5, "retrain_steps": 5}
    with pytest.raises(RecipeError, match="retrain_steps is for one-shot pruning types; 'magnitude' already trains"):
        recipe(tmp_path, tmp_path, [stage])


def test_a_recipe_stage_distils_when_it_names_a_temperature(workspace):
    tmp_path, model_dir = workspace
    stage = wanda(retrain_steps=3, distillation_temperature=2.0)
    run_dir = apply.run(recipe(model_dir, tmp_path / "runs", [stage]), run_dir=tmp_path / "runs" / "distilled")
    retrain = json.loads((run_dir / "report.json").read_text())["pruning_stages"][0]["retrain"]
    assert retrain["steps"] == 3 and retrain["zeros_held"] > 0 and retrain["distillation_temperature"] == 2.0


def test_a_temperature_without_retraining_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="distillation_temperature applies to the retraining after pruning: set "
                                          "retrain_steps >= 1"):
        recipe(tmp_path, tmp_path, [wanda(distillation_temperature=2.0)])
