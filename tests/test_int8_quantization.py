"""Static int8 post-training quantization after pruning (inc_plugins.deploy: NNCF on the OpenVINO IR, INC 3.7.1 on
the PyTorch model): pruned zeros stay zero in the int8 weights read back from each result, accuracy on a synthetic
separable task stays within tolerance, and missing calibration data is refused."""

import json
import random

import openvino as ov
import pytest
import torch

from inc_plugins.deploy import convert_to_openvino
from inc_plugins.deploy.int8_inc import quantize_pytorch_int8_inc
from inc_plugins.deploy.int8_nncf import calibration_items, quantize_ir_int8
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.deploy.pruned_zeros import zeros_kept_in_ir, zeros_kept_in_quantized_torch
from recipes import apply
from recipes.schema import RecipeError, parse_recipe
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier
from tests.fixtures.tiny_tokenizer import WORDS
from tests.test_recipe_tasks import llm_recipe, tiny_lm, write_csv  # noqa: F401  (tiny_lm: a fixture)

CALIBRATION = token_batches(4, 4, 16, seed=3)


def _pruned_bert():
    """Every encoder Linear with its smaller half (by magnitude) of weights zeroed."""
    model = tiny_bert_classifier()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}":
                weight = module.weight
                weight[weight.abs() <= weight.abs().median()] = 0
    return model


def _zeros(model):
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_nncf_int8_ir_keeps_every_pruned_zero():
    model = _pruned_bert()
    quantized = quantize_ir_int8(convert_to_openvino(model, token_batches(1, 2, 8)[0]), CALIBRATION)
    zeros = zeros_kept_in_ir(model, quantized)
    # 2 layers x (query, key, value, attention output, FFN in, FFN out): each found as an int8 constant
    assert zeros["layers"] == 12 and zeros["layers_int8"] == 12
    assert zeros["all_kept"] and zeros["zeros"] == zeros["zeros_kept"] == _zeros(model) > 0


def test_the_zeros_check_sees_a_zero_that_was_lost():
    model = _pruned_bert()
    quantized = quantize_ir_int8(convert_to_openvino(model, token_batches(1, 2, 8)[0]), CALIBRATION)
    with torch.no_grad():  # one more zero in the PyTorch model than the IR has
        weight = model.bert.encoder.layer[1].output.dense.weight
        weight.view(-1)[(weight.view(-1) != 0).nonzero()[0]] = 0
    zeros = zeros_kept_in_ir(model, quantized)
    assert not zeros["all_kept"] and zeros["layers_losing_zeros"] == ["bert.encoder.layer.1.output.dense"]
    assert zeros["zeros_kept"] == zeros["zeros"] - 1


def test_inc_int8_keeps_every_pruned_zero_and_leaves_the_model_alone():
    model = _pruned_bert()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    quantized = quantize_pytorch_int8_inc(model, CALIBRATION)
    zeros = zeros_kept_in_quantized_torch(model, quantized)
    assert zeros["layers"] == 12 and zeros["layers_int8"] == 12
    assert zeros["all_kept"] and zeros["zeros"] == zeros["zeros_kept"] == _zeros(model)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("empty", ["heads", "neurons"])
def test_nncf_int8_of_a_slimmed_model_with_a_layer_that_kept_no_head_or_no_neuron(empty):
    """Deep structured pruning can empty a layer (MiniLM at 70%: layer 4 kept no head; width multiples of 32 and 64:
    a layer kept no neuron): slimming leaves Linears of width 0 there. The IR computes them without a matrix product
    of width 0 (which OpenVINO's CPU plugin cannot build, and on which NNCF's bias correction fails): it compiles,
    its int8 form too, and both match the PyTorch model."""
    model = tiny_bert_classifier()
    head_mask, neuron_mask = torch.ones(2, 4), torch.ones(2, 64)
    if empty == "heads":
        head_mask[1] = 0
    else:
        neuron_mask[1] = 0
    slimmed = slim_model(model, head_mask, neuron_mask).eval()
    converted = convert_to_openvino(slimmed, token_batches(1, 2, 8)[0])
    assert not [op.get_friendly_name() for op in converted.get_ordered_ops()
                if any(dim.is_static and dim.get_length() == 0 for port in op.inputs() + op.outputs()
                       for dim in port.get_partial_shape()) and op.get_type_name() == "MatMul"]
    batch = token_batches(1, 3, 12, seed=5)[0]
    with torch.no_grad():
        expected = slimmed(**batch).logits
    feed = {name: tensor.numpy() for name, tensor in batch.items()}
    core = ov.Core()
    float_ir = torch.from_numpy(core.compile_model(converted, "CPU")(feed)[0])
    assert (float_ir - expected).abs().max() < 1e-3
    int8 = torch.from_numpy(core.compile_model(quantize_ir_int8(converted, CALIBRATION), "CPU")(feed)[0])
    assert (int8 - expected).abs().max() < 0.05 * expected.abs().max() + 1e-3


def test_openvino_conversion_gives_the_width_0_linears_their_own_forward_back():
    """The conversion computes a width-0 Linear without a matrix product only while it traces: afterwards the
    Linear runs its class's forward again, or the forward its instance held before (a user's wrapper)."""
    head_mask, neuron_mask = torch.ones(2, 4), torch.ones(2, 64)
    head_mask[1], neuron_mask[0] = 0, 0
    slimmed = slim_model(tiny_bert_classifier(), head_mask, neuron_mask).eval()
    empty = [m for m in slimmed.modules() if isinstance(m, torch.nn.Linear) and 0 in (m.in_features, m.out_features)]
    assert len(empty) == 3  # layer 0's FFN ([0, hidden] and [hidden, 0]), layer 1's attention output ([hidden, 0])
    wrapped = empty[0]
    calls = []
    wrapped.forward = lambda inputs, own=wrapped.forward: calls.append(1) or own(inputs)
    own_forward = wrapped.forward
    convert_to_openvino(slimmed, token_batches(1, 2, 8)[0])
    assert wrapped.forward is own_forward and all("forward" not in m.__dict__ for m in empty[1:])
    with torch.no_grad():
        slimmed(**token_batches(1, 1, 4)[0])
    assert calls == [1]


def test_nncf_calibrates_one_sample_at_a_time_without_padding():
    batch = token_batches(1, 4, 10, seed=1)[0]
    items = calibration_items([batch])
    assert len(items) == 4
    for row, item in enumerate(items):
        length = int(batch["attention_mask"][row].sum())
        assert item["input_ids"].shape == (1, length) and (item["attention_mask"] == 1).all()


def test_quantize_without_calibration_data_is_refused():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="int8 quantization needs calibration data: got no samples"):
        quantize_ir_int8(convert_to_openvino(model, token_batches(1, 2, 8)[0]), [])
    with pytest.raises(ValueError, match="int8 quantization needs calibration data: got no batches"):
        quantize_pytorch_int8_inc(model, [])


POSITIVE, NEGATIVE = ["good", "great", "best", "fun", "love"], ["bad", "dull", "worst", "boring", "hate"]


def synthetic_separable_rows(n: int, seed: int) -> list[dict]:
    """Synthetic sentiment: four neutral words and one cue word; label 1 when the cue is positive. Separable."""
    rng, neutral = random.Random(seed), [w for w in WORDS if w not in POSITIVE + NEGATIVE + ["not"]]
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.choices(neutral, k=4)
        words.insert(rng.randrange(5), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": int(label)})
    return rows


def test_int8_after_pruning_on_a_synthetic_separable_task_keeps_accuracy_and_zeros(workspace):
    tmp_path, model_dir = workspace
    train = write_csv(tmp_path / "train.csv", synthetic_separable_rows(256, seed=1))
    dev = write_csv(tmp_path / "dev.csv", synthetic_separable_rows(96, seed=2))
    recipe = parse_recipe({
        "name": "synthetic-separable-int8",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"files": {"train": str(train), "dev": str(dev)}, "max_length": 16},
        "finetune": {"epochs": 6, "batch_size": 16, "learning_rate": 3e-3},
        "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["bert.encoder"],
                     "calibration_samples": 32, "batch_size": 16}],
        "evaluation": {"batch_size": 32},
        "benchmark": {"backends": ["openvino-int8-fp32"], "batch_size": 2, "seq_len": 16, "warmup": 1, "rounds": 2},
        "export": {},
        "quantize": {"methods": ["nncf", "inc"], "calibration_samples": 64, "seed": 3},
    })
    run_dir = apply.run(recipe)
    report = json.loads((run_dir / "report.json").read_text())
    pruned_accuracy = report["metrics"]["after"]["accuracy"]
    assert pruned_accuracy >= 0.9  # the task is learnt, so a quantizer that breaks the model shows

    quantize = report["quantize"]
    assert quantize["calibration_samples"] == 64 and quantize["seed"] == 3
    for method in ("nncf", "inc"):
        result = quantize["methods"][method]
        assert result["ran"], result
        zeros = result["pruned_zeros"]
        assert zeros["all_kept"] and zeros["zeros"] > 0 and zeros["layers_int8"] == zeros["layers"] == 12
        accuracy = result["check"]["metrics"]["accuracy"]
        assert accuracy["pytorch"] == pruned_accuracy
        assert abs(accuracy["candidate"] - pruned_accuracy) <= 0.02 and result["check"]["within_tolerance"]
        assert result["check"]["max_abs_diff"] > 0  # int8 does change the logits: the IR's were compared
    assert (run_dir / "openvino_int8" / "openvino_model.xml").is_file() and (run_dir / "openvino").is_dir()
    assert quantize["methods"]["nncf"]["precision"] == "fp32"  # the export's
    summary = (run_dir / "summary.md").read_text()
    assert "## int8 (static post-training quantization)" in summary
    assert "| OpenVINO IR, int8 (NNCF) | dev accuracy |" in summary and "| PyTorch, int8 (INC 3.7.1) | dev accuracy |" in summary
    # the benchmark's int8 backend quantized both models on the quantize stage's samples
    timing = report["benchmark"]["backends"]["openvino-int8-fp32"]
    assert timing["available"] and timing["dense_seconds"] > 0 and timing["pruned_seconds"] > 0
    assert timing["calibrated_on"] == "the quantize stage's 64 calibration samples"
    assert "openvino-int8-fp32: both models quantized to int8, calibrated on the quantize stage's 64" in summary


def test_int8_of_a_pruned_causal_lm_records_perplexity_and_keeps_zeros(tiny_lm):  # noqa: F811
    model_dir, calibration, evaluation = tiny_lm
    recipe = {**llm_recipe(model_dir, calibration, evaluation), "quantize": {"calibration_samples": 8}}
    report = json.loads((apply.run(parse_recipe(recipe)) / "report.json").read_text())
    nncf = report["quantize"]["methods"]["nncf"]
    assert list(report["quantize"]["methods"]) == ["nncf"] and nncf["ran"]
    assert nncf["pruned_zeros"]["all_kept"] and nncf["pruned_zeros"]["layers"] == 14  # 2 layers x 7 projections
    perplexity = nncf["check"]["metrics"]["perplexity"]
    assert perplexity["pytorch"] == report["metrics"]["after"]["perplexity"] and perplexity["candidate"] > 1


@pytest.mark.parametrize("quantize, message", [
    ({"methods": ["nncf", "nncf"]}, "quantize.methods names a method twice"),
    ({"methods": ["ipex"]}, r"'quantize\.methods\.0': Input should be 'nncf' or 'inc' \(got 'ipex'\)"),
    ({"methods": []}, r"'quantize\.methods'"),
    ({"calibration_samples": 0}, r"'quantize\.calibration_samples'"),
])
def test_bad_quantize_settings_are_refused_before_loading(tmp_path, quantize, message):
    recipe = {**llm_recipe(tmp_path, tmp_path / "c.txt", tmp_path / "e.txt"), "quantize": quantize}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)
