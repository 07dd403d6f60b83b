"""Recipes with Kwon et al.'s mask_search: its keys in the schema, slimming, the MACs report, the shipped recipe."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import inc_plugins
import inc_plugins.post_training.pipeline as kwon_pipeline
from inc_plugins.inc.one_shot import TYPE_CONFIG_KEYS
from recipes import apply, finetune_cache
from recipes.schema import PLUGIN_KEYS, PruningStage, RecipeError, load_recipe, parse_recipe


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    """Runs write under the working directory unless told otherwise: work in tmp_path."""
    monkeypatch.chdir(tmp_path)


def mask_search_recipe(model_dir, out_dir, slim=True, **stage):
    return {
        "name": "tiny-kwon",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"max_length": 16, "dev_size": 32, "max_train_samples": 48},
        "finetune": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3},
        "pruning": [{"pruning_type": "mask_search", "target_sparsity": 0.4, "calibration_samples": 40,
                     "batch_size": 8, **stage}],
        "slim": slim,
        "evaluation": {"batch_size": 16},
        "output": {"dir": str(out_dir)},
    }


def test_mask_search_with_slim_meets_the_budget_and_saves_a_loadable_slimmed_model(workspace, monkeypatch):
    tmp_path, model_dir = workspace
    slimmed, fisher_sequences = [], []
    real_slim, real_gradients = inc_plugins.slim, kwon_pipeline.collect_mask_gradients

    def keep_slimmed(model, result):
        slimmed.append(real_slim(model, result))
        return slimmed[-1]

    def count_fisher_sequences(model, batches, *args, **kwargs):
        fisher_sequences.append(sum(len(batch["labels"]) for batch in batches))
        return real_gradients(model, batches, *args, **kwargs)

    monkeypatch.setattr(inc_plugins, "slim", keep_slimmed)
    monkeypatch.setattr(kwon_pipeline, "collect_mask_gradients", count_fisher_sequences)

    run_dir = apply.run(parse_recipe(mask_search_recipe(model_dir, tmp_path / "runs")))
    report = json.loads((run_dir / "report.json").read_text())

    stage = report["pruning_stages"][0]
    assert stage["calibration_samples"] == 40 and fisher_sequences == [40]  # the Fisher sees every sample drawn
    assert stage["mask_search"]["fisher_gradient_vectors"] == 5  # 40 samples in batches of 8
    macs, searched = report["macs"], stage["mask_search"]
    assert macs["seq_len"] == searched["seq_len"] and macs["before"] == searched["dense_cost"]
    assert macs["after"] <= 0.6 * macs["before"] and macs["after"] == searched["cost"] <= searched["budget"]
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]
    assert report["model"]["slimmed"] is True
    assert "import inc_plugins; model = AutoModelForSequenceClassification.from_pretrained(" in report["model"]["load"]
    assert report["model"]["slimming_check"]["max_abs_logit_difference_on_a_dev_batch"] < 1e-4
    assert "slim" in report["stage_seconds"]
    summary = (run_dir / "summary.md").read_text()
    # a slimmed model has no zero weights: the summary says so instead of a column of zero sparsities
    assert "No weight is zero" in summary and "Per-layer sparsity over" not in summary
    assert searched["step_checks"]  # what the step checks decided is in the summary, with its counts
    for check in searched["step_checks"]:
        assert check["kept"] == (check["agreement_with"] > check["agreement_without"])
        assert (f"{check['step']} {'kept' if check['kept'] else 'dropped'} ({check['agreement_without']} -> "
                f"{check['agreement_with']} of {check['positions']})") in summary

    # the plain loader, as the report says, gives the in-memory slimmed model's logits
    loaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    batch = {"input_ids": torch.randint(5, 128, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, slimmed[0](**batch).logits)
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters"]["after"]["total"]


def test_mask_search_keys_reach_the_inc_config_entry_only_when_set(tmp_path):
    recipe = parse_recipe(mask_search_recipe(tmp_path, tmp_path, tune=False, seq_len=20, constraint="flops"))
    settings = recipe.pruning[0].inc_settings()
    assert {k: settings[k] for k in ("tune", "seq_len", "constraint")} == {"tune": False, "seq_len": 20, "constraint": "flops"}
    assert not {"rearrange", "damp", "num_samples", "comparison_group"} & set(settings)


def test_the_stage_takes_the_plugins_keys_from_their_settings_models():
    # seed is the stage's own key (it draws the calibration samples), handed to particle_filter's search too
    assert set(PLUGIN_KEYS) | {"seed"} == set(inc_plugins.inc.one_shot.PLUGIN_CONFIG_KEYS)
    for pruning_type, keys in TYPE_CONFIG_KEYS.items():
        settings_model = inc_plugins.plugin_settings_model(pruning_type)
        for key in keys - {"seed"}:
            readers = ", ".join(t for t, others in TYPE_CONFIG_KEYS.items() if key in others)  # a key types share
            assert PruningStage.model_fields[key].description == (
                f"{readers}: {settings_model.model_fields[key].description}")


def test_calibration_samples_default_to_the_papers_2048_for_mask_search(tmp_path):
    data = mask_search_recipe(tmp_path, tmp_path)
    del data["pruning"][0]["calibration_samples"]
    assert parse_recipe(data).pruning[0].calibration_samples == 2048
    data["pruning"][0].update(pruning_type="wanda", pattern="1x1")
    data["slim"] = False
    assert parse_recipe(data).pruning[0].calibration_samples == 128


def test_wanda_keys_pass_through():
    data = {"name": "w", "model": {"asset": "minilm-l6"},
            "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5,
                         "comparison_group": "per_layer", "use_variant": False}]}
    settings = parse_recipe(data).pruning[0].inc_settings()
    assert settings["comparison_group"] == "per_layer" and settings["use_variant"] is False


@pytest.mark.parametrize(("change", "message"), [
    ({"pruning_type": "wanda", "pattern": "1x1", "tune": False}, r"'tune' only apply to pruning_type 'mask_search'"),
    ({"comparison_group": "global"}, r"'comparison_group' only apply to pruning_type 'wanda'"),
    ({"constraint": "latncy"}, r"pruning\.0\.constraint.*'flops' or 'latency'"),
    ({"constraint": "latency"}, r"needs latency_table"),
    ({"num_samples": 64}, r"num_samples 64 is more than calibration_samples 40"),
    ({"tnue": False}, r"unknown key 'pruning\.0\.tnue'\. Did you mean 'tune'\?"),
    ({"width_multiple": 0}, r"'pruning\.0\.width_multiple': Value error, width_multiple must be an int in \[1, 65536\] "
                            r"that divides the FFN width, or 'auto' \(with a latency_table\) \(got 0\)$"),
    ({"width_multiple": "auto"}, r"width_multiple 'auto' needs latency_table"),
])
def test_bad_mask_search_settings_are_refused_before_loading(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(mask_search_recipe(tmp_path, tmp_path, slim=False, **change))


def test_slim_without_a_mask_search_stage_is_refused(tmp_path):
    data = mask_search_recipe(tmp_path, tmp_path)
    data["pruning"][0] = {"pruning_type": "magnitude", "target_sparsity": 0.5, "training_steps": 2}
    with pytest.raises(RecipeError, match="slim: true removes the attention heads and FFN neurons"):
        parse_recipe(data)


def test_shipped_mask_search_recipe_reuses_the_sentiment_finetune():
    kwon, sentiment = load_recipe("minilm_mask_search.yaml"), load_recipe("minilm_sentiment.yaml")
    assert (kwon.model, kwon.data, kwon.finetune) == (sentiment.model, sentiment.data, sentiment.finetune)
    stage = kwon.pruning[0]
    assert (stage.pruning_type, stage.target_sparsity, stage.constraint) == ("mask_search", 0.4, "flops")
    assert stage.rearrange and stage.tune and stage.calibration_samples == 2048 and stage.seq_len is None
    assert kwon.slim is True
    # the same model, data and fine-tune settings hash to the same fine-tune cache entry
    assert finetune_cache.finetune_key(kwon.model, kwon.data, kwon.finetune) == finetune_cache.finetune_key(
        sentiment.model, sentiment.data, sentiment.finetune)
