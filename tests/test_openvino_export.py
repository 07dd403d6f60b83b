"""OpenVINO IR export (inc_plugins.deploy): the IR computes what the PyTorch model computes, dense and slimmed (layers
of different sizes), at any batch and sequence length; the precision hint travels in the IR; bad input is refused
with one line and nothing is overwritten."""

import pytest
import torch
from torch import nn

from inc_plugins.deploy import (ComparedModel, OpenVINOExportError, RecordedOutputs, Tolerance, compare_outputs,
                                export_openvino, load_openvino, stored_precision)
from inc_plugins.deploy.openvino_export import IR_FILE
from inc_plugins.models.surgery_transformers import slim_model
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm

EXAMPLE = token_batches(1, batch_size=2, seq_len=8, seed=1)[0]
# shapes unlike the example's: the IR keeps batch and sequence length free
CHECK_BATCHES = [token_batches(1, batch_size=b, seq_len=s, seed=10 + b)[0] for b, s in ((3, 11), (1, 5), (4, 23))]


def _slimmed_bert():
    """Layer 0 keeps 3 of 4 heads and 40 of 64 FFN neurons, layer 1 keeps 2 heads and 52 neurons."""
    model = tiny_bert_classifier()
    head_mask, neuron_mask = torch.ones(2, 4), torch.ones(2, 64)
    head_mask[0, 1], head_mask[1, :2] = 0, 0
    neuron_mask[0, :24], neuron_mask[1, 5:17] = 0, 0
    return slim_model(model, head_mask, neuron_mask)


def _slimmed_llama():
    """Layer 0 keeps key/value group 0 (query heads 0, 1) and 33 of 64 neurons; layer 1 keeps every head, 60 neurons."""
    model = tiny_llama_lm()
    head_mask, neuron_mask = torch.ones(2, 4), torch.ones(2, 64)
    head_mask[0, 2:] = 0
    neuron_mask[0, 1::2], neuron_mask[0, 0] = 0, 1
    neuron_mask[1, :4] = 0
    return slim_model(model, head_mask, neuron_mask)


def _pruned_bert():
    """Dense shapes, half of layer 0's FFN input weights zeroed (the smaller half by magnitude)."""
    model = tiny_bert_classifier()
    with torch.no_grad():
        weight = model.bert.encoder.layer[0].intermediate.dense.weight
        weight[weight.abs() < weight.abs().median()] = 0
    return model


MODELS = {"bert": _pruned_bert, "bert-slimmed": _slimmed_bert, "llama": tiny_llama_lm, "llama-slimmed": _slimmed_llama}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, its fp32 IR directory), each exported once for the module (an export takes seconds)."""
    done = {}

    def get(name):
        if name not in done:
            model = MODELS[name]()
            done[name] = model, export_openvino(model, EXAMPLE, tmp_path_factory.mktemp(name) / "ir")
        return done[name]

    return get


def _constant_shapes(directory):
    import openvino as ov

    model = ov.Core().read_model(directory / IR_FILE)
    return {tuple(op.get_output_shape(0)) for op in model.get_ops() if op.get_type_name() == "Constant"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ir_round_trip_matches_pytorch_at_shapes_unlike_the_example(name, exported, one_thread):
    model, directory = exported(name)
    assert sorted(p.name for p in directory.iterdir()) == ["openvino_model.bin", "openvino_model.xml"]
    ir = load_openvino(directory)
    assert ir.precision == "f32"
    for batch in CHECK_BATCHES:
        with torch.no_grad():
            expected = model(**batch).logits
        got = ir(**batch).logits
        assert got.shape == expected.shape and got.dtype == torch.float32
        # float32 on both sides: only the order of additions differs
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item()), name
    if name.endswith("slimmed"):  # the IR holds the per-layer sizes of the slimmed weights
        kept = model.config.inc_slimmed["intermediate_size"]
        assert kept[0] != kept[1] and {(kept[0], 32), (kept[1], 32)} <= _constant_shapes(directory)


def test_pruned_zeros_and_every_weight_are_stored_exactly(exported):
    """fp32 IR weights are not compressed to fp16: a constant equals the pruned PyTorch weight bit for bit."""
    import openvino as ov

    model, directory = exported("bert")
    weight = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    assert (weight == 0).float().mean().item() > 0.49  # pruned before the export
    constants = [op.get_data() for op in ov.Core().read_model(directory / IR_FILE).get_ops()
                 if op.get_type_name() == "Constant" and tuple(op.get_output_shape(0)) == tuple(weight.shape)]
    assert any(torch.equal(torch.from_numpy(c.copy()), weight) for c in constants)


def test_precision_hint_is_stored_in_the_ir_and_can_be_overridden_at_load(exported, tmp_path, one_thread):
    model, fp32 = exported("bert")
    export_openvino(model, EXAMPLE, tmp_path / "bf16", precision="bf16")
    assert stored_precision(fp32) == "f32" and stored_precision(tmp_path / "bf16") == "bf16"
    # OpenVINO runs bf16 by default where the CPU has it: the stored f32 hint must win over that default
    assert load_openvino(fp32).precision == "f32"
    assert load_openvino(tmp_path / "bf16", precision="fp32").precision == "f32"
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert load_openvino(tmp_path / "bf16").precision == "bf16"


def test_compare_outputs_reports_the_logit_difference_and_metric_agreement(exported, one_thread):
    model, directory = exported("llama")
    compared = ComparedModel(load_openvino(directory), model)
    for batch in CHECK_BATCHES:
        compared(**batch)
    close = compare_outputs(compared, {"perplexity": 100.0, "windows": 3}, {"perplexity": 100.05, "windows": 3},
                            Tolerance(relative_logits=1e-5, metric=1e-3))
    assert close.within_tolerance and close.batches == 3 and 0 < close.max_abs_diff <= 1e-5 * close.reference_max_abs
    assert close.metrics == {"perplexity": {"pytorch": 100.0, "candidate": 100.05, "difference": pytest.approx(0.05),
                                            "relative": True}}
    far = compare_outputs(compared, {"accuracy": 0.90}, {"accuracy": 0.88}, Tolerance(relative_logits=0.0, metric=0.01))
    assert not far.within_tolerance and len(far.failures) == 2
    assert "accuracy 0.8800 vs PyTorch 0.9000" in far.failures[1]


class CountingModel(nn.Module):
    """`model`, counting its calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **inputs):
        self.calls += 1
        return self.model(**inputs)


@pytest.mark.parametrize("kept_batches", [3, 1])
def test_recorded_logits_compare_as_the_model_run_again_without_running_it(exported, kept_batches, one_thread):
    """The check of a deployed form against logits the evaluation kept gives the comparison that running the PyTorch
    model again gives; past its byte budget the recording keeps a prefix and the later batches run the model."""
    model, directory = exported("llama")
    ir = load_openvino(directory)
    live = ComparedModel(ir, model)
    for batch in CHECK_BATCHES:
        live(**batch)
    counted = CountingModel(model)
    with torch.no_grad():
        sizes = [model(**batch).logits.numel() * 4 for batch in CHECK_BATCHES]
    recorded = RecordedOutputs(counted, max_bytes=sum(sizes[:kept_batches]))
    for batch in CHECK_BATCHES:
        recorded(**batch)
    assert len(recorded.recorded) == kept_batches and counted.calls == len(CHECK_BATCHES)
    replayed = ComparedModel(ir, recorded)
    for batch in CHECK_BATCHES:
        replayed(**batch)
    assert counted.calls == 2 * len(CHECK_BATCHES) - kept_batches  # only the batches not kept ran again
    metrics = {"perplexity": 10.0}
    assert (compare_outputs(replayed, metrics, metrics, Tolerance(1e-5, 1e-3))
            == compare_outputs(live, metrics, metrics, Tolerance(1e-5, 1e-3)))


class SyntheticDataDependentClassifier(nn.Module):
    """Synthetic: its forward branches on a token value, which torch.export cannot trace into one graph."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(128, 4)

    def forward(self, input_ids, attention_mask):
        if input_ids.max() > 64:  # a Python branch on data
            return self.embedding(input_ids).sum(1)
        return self.embedding(input_ids).mean(1)


def test_a_model_the_converter_cannot_trace_gets_one_line_naming_the_step(tmp_path):
    with pytest.raises(OpenVINOExportError) as error:
        export_openvino(SyntheticDataDependentClassifier(), EXAMPLE, tmp_path / "ir")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot export SyntheticDataDependentClassifier to OpenVINO: torch.export.export "
                              "could not trace it (")
    assert not (tmp_path / "ir").exists()


def test_an_existing_export_directory_is_never_overwritten(tmp_path):
    target = tmp_path / "ir"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OpenVINOExportError, match="ir already exists and is not empty; refusing to overwrite it"):
        export_openvino(tiny_bert_classifier(), EXAMPLE, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["ir"]  # no staging directory left behind
    (target / "notes.txt").unlink()  # an empty directory is taken
    export_openvino(tiny_bert_classifier(), EXAMPLE, target)
    assert (target / IR_FILE).is_file()


def test_bad_precision_and_single_row_examples_are_refused_before_converting(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'int4'; choose one of fp32, bf16"):
        export_openvino(tiny_bert_classifier(), EXAMPLE, tmp_path / "a", precision="int4")
    one_row = {name: tensor[:1] for name, tensor in EXAMPLE.items()}
    with pytest.raises(OpenVINOExportError, match=r"at least batch 2 x sequence 2 .*got \(1, 8\)"):
        export_openvino(tiny_bert_classifier(), one_row, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="holds no OpenVINO IR"):
        load_openvino(tmp_path)
    assert not any(tmp_path.iterdir())
