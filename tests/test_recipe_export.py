"""The recipe's `export:` stage: the run writes the final (slimmed) model as OpenVINO IR, checks it against the
PyTorch model on the evaluation data, and records the check in report.json and summary.md."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from inc_plugins.deploy import load_openvino, stored_precision
from recipes import apply
from recipes.schema import RecipeError, parse_recipe
from tests.test_recipe_mask_search import mask_search_recipe
from tests.test_recipe_tasks import llm_recipe, tiny_lm  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_slimmed_classifier_is_exported_and_checked_on_the_dev_set(workspace):
    tmp_path, model_dir = workspace
    recipe = {**mask_search_recipe(model_dir, tmp_path / "runs"), "export": {"format": "openvino"}}
    run_dir = apply.run(parse_recipe(recipe))
    report = json.loads((run_dir / "report.json").read_text())

    export = report["export"]
    assert export["directory"] == "openvino" and export["precision"] == "fp32" and export["runs_at"] == "f32"
    assert set(export["bytes"]) == {"openvino_model.xml", "openvino_model.bin"}
    check = export["check"]
    assert check["within_tolerance"] and check["failures"] == []
    assert check["batches"] == 2  # the 32 dev examples in batches of 16
    assert 0 < check["max_abs_diff"] <= 1e-4 * check["reference_max_abs"]
    # the IR's metric is measured, not copied: the same predictions give the PyTorch model's accuracy
    assert check["metrics"]["accuracy"]["pytorch"] == report["metrics"]["after"]["accuracy"]
    assert check["metrics"]["accuracy"]["candidate"] == pytest.approx(report["metrics"]["after"]["accuracy"], abs=1e-9)
    assert "export" in report["stage_seconds"] and "export" in report["completed_stages"]

    # the IR computes what the saved slimmed model computes, at a shape the run never used
    ir, model = load_openvino(run_dir / "openvino"), AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    batch = {"input_ids": torch.randint(5, 128, (5, 13)), "attention_mask": torch.ones(5, 13, dtype=torch.long),
             "token_type_ids": torch.zeros(5, 13, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(ir(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-4)
    summary = (run_dir / "summary.md").read_text()
    assert "## OpenVINO IR" in summary and f"{run_dir}/openvino/openvino_model.xml" in summary
    assert '"INFERENCE_PRECISION_HINT": "f32"' in export["load"]


def test_causal_lm_export_in_bf16_records_perplexity_of_both(tiny_lm):  # noqa: F811
    model_dir, calibration, evaluation = tiny_lm
    recipe = {**llm_recipe(model_dir, calibration, evaluation), "export": {"precision": "bf16"}}
    run_dir = apply.run(parse_recipe(recipe))
    report = json.loads((run_dir / "report.json").read_text())
    check = report["export"]["check"]
    assert stored_precision(run_dir / "openvino") == "bf16"
    perplexity = check["metrics"]["perplexity"]
    assert perplexity["pytorch"] == report["metrics"]["after"]["perplexity"] and perplexity["relative"] is True
    assert check["within_tolerance"] and check["batches"] == 2  # 3 windows in batches of 2
    assert set(report["export"]["input_names"]) == {"input_ids", "attention_mask"}


def test_an_ir_outside_its_tolerance_fails_the_run_and_keeps_the_ir_to_look_at(tiny_lm):  # noqa: F811
    model_dir, calibration, evaluation = tiny_lm
    recipe = {**llm_recipe(model_dir, calibration, evaluation), "output": {"dir": "runs"},
              "export": {"max_relative_logit_diff": 0.0, "metric_tolerance": 0.0}}
    with pytest.raises(RecipeError, match=r"stage 'export' failed: the OpenVINO IR \(fp32\) does not compute what "
                                          r"the PyTorch model computes: max logit difference"):
        apply.run(parse_recipe(recipe))
    failed = [path for path in (model_dir.parent / "runs").iterdir() if path.name.endswith(".failed")]
    assert len(failed) == 1 and (failed[0] / "openvino" / "openvino_model.xml").is_file()


@pytest.mark.parametrize("export, message", [
    ({"format": "onnx"}, r"'export\.format': Input should be 'openvino' \(got 'onnx'\)"),
    ({"precision": "int8"}, r"'export\.precision': Input should be 'fp32' or 'bf16' \(got 'int8'\)"),
    ({"precison": "bf16"}, r"unknown key 'export\.precison'\. Did you mean 'precision'\?"),
])
def test_bad_export_settings_are_refused_before_loading(tmp_path, export, message):
    recipe = {**mask_search_recipe(tmp_path / "missing-model", tmp_path / "runs"), "export": export}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_a_streamed_causal_lm_cannot_export(tmp_path):
    recipe = {"name": "r", "task": "causal_lm", "model": {"path": str(tmp_path)}, "execution": {"mode": "streaming"},
              "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}], "export": {}}
    with pytest.raises(RecipeError, match="execution.mode 'streaming' never holds the whole model.*export"):
        parse_recipe(recipe)
