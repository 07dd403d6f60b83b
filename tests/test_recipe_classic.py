"""The classic methods' recipes: every shipped one validates, bad ones fail naming the key, and a tiny copy of a
digits recipe runs end to end through `python -m recipes.apply`."""

import json

import pytest
import yaml

from recipes import apply
from recipes.classic_stages import accuracy_on_test
from recipes.digits import load_digits_split
from recipes.schema import RECIPES_DIR, ImageClassificationRecipe, RecipeError, load_recipe, parse_recipe
from recipes.vision_models import load_digits_model

DIGITS_RECIPES = ["digits_network_slimming.yaml", "digits_network_trimming.yaml", "digits_lottery_ticket.yaml",
                  "digits_particle_filter.yaml"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", DIGITS_RECIPES)
def test_shipped_digits_recipes_validate(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, ImageClassificationRecipe)
    assert recipe.name == name.removesuffix(".yaml")
    text = (RECIPES_DIR / name).read_text()
    assert text.startswith("# ") and "python -m recipes.apply" in text  # the comment header says how to run it


def test_minilm_trimming_recipe_iterates_with_a_gelu_threshold():
    recipe = load_recipe("minilm_network_trimming.yaml")
    assert [stage.target_sparsity for stage in recipe.pruning] == [0.3, 0.5, 0.65]  # cumulative iterations
    for stage in recipe.pruning:
        settings = stage.inc_settings()
        assert settings["pruning_type"] == "network_trimming" and settings["apoz_threshold"] == 0.05
        assert settings["pattern"] == "1xchannel" and settings["op_names"] == ["intermediate\\.dense$"]
        assert stage.retrain_steps == 100


def _recipe_data(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / name).read_text())


def test_bad_digits_recipes_name_the_key():
    data = _recipe_data("digits_network_slimming.yaml")
    data["pruning"][0]["retrain"]["epoch"] = 3
    with pytest.raises(RecipeError, match=r"pruning\.0\.network_slimming\.retrain\.epoch'\. Did you mean 'epochs'"):
        parse_recipe(data)
    data = _recipe_data("digits_network_slimming.yaml")
    data["model"] = {"architecture": "digits_mlp"}
    with pytest.raises(RecipeError, match="network_slimming prunes convolution channels.*digits_cnn"):
        parse_recipe(data)
    data = _recipe_data("digits_lottery_ticket.yaml")
    data["pruning"][0]["rewind_to"] = "epoch:2"
    with pytest.raises(RecipeError, match="rewind_to.*epoch:2"):
        parse_recipe(data)
    data = _recipe_data("digits_particle_filter.yaml")
    data["data"]["val_fraction"] = 0.9
    with pytest.raises(RecipeError, match=r"test_fraction \+ val_fraction must be < 1"):
        parse_recipe(data)
    data = _recipe_data("digits_network_trimming.yaml")
    data["pruning"][2]["target_sparsity"] = 0.4
    with pytest.raises(RecipeError, match=r"successive stages must increase it; got \[0\.3, 0\.51, 0\.4, 0\.7599\]"):
        parse_recipe(data)
    data = _recipe_data("digits_lottery_ticket.yaml")
    data["pruning"].append(data["pruning"][0])
    with pytest.raises(RecipeError, match="lottery_ticket trains from the initial weights in every round"):
        parse_recipe(data)


def test_a_tiny_digits_recipe_runs_end_to_end(tmp_path):
    """digits_lottery_ticket.yaml with tiny settings (a small MLP, one epoch, two rounds), through the CLI."""
    data = _recipe_data("digits_lottery_ticket.yaml")
    data["model"]["widths"] = [32, 16]
    data["train"]["epochs"] = 2
    data["pruning"][0]["rounds"] = 2
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    assert apply.main([str(path), "--run-dir", str(run_dir), "--allow-outside-cwd"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    stage = report["pruning_stages"][0]
    assert [r["round"] for r in stage["rounds"]] == [0, 1, 2]
    assert all(r["random_accuracy"] is not None for r in stage["rounds"][1:])
    # the dense model evaluated before pruning is the rounds' dense round 0
    assert report["metrics"]["before"]["accuracy"] == stage["rounds"][0]["ticket_accuracy"]
    # the saved model is the last round's winning ticket: same accuracy, same share of weights
    assert report["metrics"]["after"]["accuracy"] == stage["rounds"][-1]["ticket_accuracy"]
    assert stage["weights_remaining_in_pruned_layers"] == pytest.approx(stage["rounds"][-1]["remaining_fraction"])

    model = load_digits_model(run_dir / "model")
    assert accuracy_on_test(model, load_digits_split(0, 0.2, 0.2)) == report["metrics"]["after"]["accuracy"]
    assert float((model[1].weight != 0).float().mean()) == pytest.approx(0.64, abs=0.01)  # two rounds of 20%
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["pruning"][0]["rounds"] == 2
    # an existing run directory is never overwritten
    assert apply.main([str(path), "--run-dir", str(run_dir), "--allow-outside-cwd"]) == 2


def test_a_tiny_slimming_recipe_saves_a_smaller_cnn(tmp_path):
    data = _recipe_data("digits_network_slimming.yaml")
    data["model"]["widths"] = [8, 8, 8]
    data["train"]["epochs"] = 1
    data["pruning"][0]["retrain"]["epochs"] = 1
    data["pruning"][0]["pruning_scope"] = "local"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert apply.main([str(path), "--run-dir", str(tmp_path / "run"), "--allow-outside-cwd"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["parameters"]["after"]["widths"] == [4, 4, 4]  # 50% of each layer (pruning_scope: local)
    assert report["pruning_stages"][0]["max_abs_logit_difference_slimmed_vs_masked"] < 1e-4


def test_a_tiny_trimming_recipe_prunes_the_same_fraction_of_what_remains_at_each_stage(tmp_path):
    """Cumulative targets 0.5, 0.75: each stage removes half of the neurons that remain, as the paper iterates."""
    data = _recipe_data("digits_network_trimming.yaml")
    data["model"]["widths"] = [32, 16]
    data["train"]["epochs"] = 1
    data["pruning"] = [{**data["pruning"][0], "target_sparsity": sparsity, "retrain": {"epochs": 1}}
                       for sparsity in (0.5, 0.75)]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert apply.main([str(path), "--run-dir", str(tmp_path / "run"), "--allow-outside-cwd"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [stage["fraction_of_remaining"] for stage in report["pruning_stages"]] == [0.5, 0.5]
    assert [stage["widths"] for stage in report["pruning_stages"]] == [[16, 8], [8, 4]]
    assert report["parameters"]["before"]["widths"] == [32, 16] and report["parameters"]["after"]["widths"] == [8, 4]
