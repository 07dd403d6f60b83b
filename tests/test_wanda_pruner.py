"""Wanda through INC: the `pt_wanda` pruner, the one-shot `wanda` flow and the training-aware `wanda_score` criterion."""

import copy
import logging

import pytest
import torch
from neural_compressor.compression.pruner import prepare_pruning as inc_prepare_pruning
from neural_compressor.compression.pruner.criteria import CRITERIA
from neural_compressor.compression.pruner.patterns import get_pattern
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.pruners.base import PRUNERS
from neural_compressor.compression.pruner.pruning import PRUNINGS
from neural_compressor.compression.pruner.utils import get_sparsity_ratio, parse_to_prune, process_config
from torch import nn
from transformers.pytorch_utils import Conv1D

import inc_plugins
from inc_plugins.algorithms.wanda import InputFeatureNorms, global_masks, per_output_mask, wanda_scores
from inc_plugins.finite_checks import NonFiniteError
from inc_plugins.inc.wanda import WandaPruner, WandaPruning
from inc_plugins.inc.wanda_score_criterion import WandaScoreCriterion
from inc_plugins.models.architectures import UnsupportedModelError
from inc_plugins.models.layer_views import apply_matrix_mask, input_rows, input_samples, weight_matrix
from tests.fixtures.calibration_data import image_batches, token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_cnn, tiny_gpt2_lm, tiny_llama_lm, tiny_opt_lm

TOKENS = token_batches(n_batches=2, batch_size=2, seq_len=8)
IMAGES = image_batches(n_batches=2, batch_size=4)

FIXTURES = {
    # builder, calibration batches, names of the layers Wanda prunes by default, task head
    "llama": (tiny_llama_lm, TOKENS, [
        f"model.layers.{i}.{name}" for i in range(2) for name in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")], "lm_head"),
    "bert": (tiny_bert_classifier, TOKENS, [
        f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")], "classifier"),
    "opt": (tiny_opt_lm, TOKENS, [
        f"model.decoder.layers.{i}.{name}" for i in range(2) for name in
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")], "lm_head"),
    "gpt2": (tiny_gpt2_lm, TOKENS, [
        f"transformer.h.{i}.{name}" for i in range(2) for name in
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")], "lm_head"),
    "cnn": (tiny_cnn, IMAGES, ["features.0.0", "features.1.0", "features.2.0"], "classifier"),
}


def wanda(model, batches, **entry):
    config = inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": "1x1", **entry}]
    )
    return inc_plugins.prepare_pruning(model, config, dataloader=batches)


def zeros_per_row(module):
    return (weight_matrix(module) == 0).sum(dim=1)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = Records()
    logger = logging.getLogger("inc_plugins.inc.wanda")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# --- registration --------------------------------------------------------------------------------------------


def test_classes_are_registered_in_inc():
    assert PRUNERS["pt_wanda"] is WandaPruner
    assert PRUNINGS["wanda_pruning"] is WandaPruning
    assert CRITERIA["wanda_score"] is WandaScoreCriterion
    assert "wanda" not in CRITERIA  # else INC's get_pruner would send "wanda" to pt_basic
    assert inc_plugins.is_one_shot("wanda") and not inc_plugins.is_one_shot("wanda_score")
    assert {"wanda", "wanda_score"} <= set(inc_plugins.known_pruning_types())
    (info,) = process_config(inc_plugins.pruning_config(pruning_type="wanda", target_sparsity=0.5, pattern="1x1"))
    linear = nn.Linear(4, 4)
    assert isinstance(get_pruner(info, {"x": linear}), WandaPruner)


# --- every fixture, every selected layer ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FIXTURES)
def test_prunes_every_selected_layer_per_output_and_keeps_heads_dense(family, warnings_logged):
    build, batches, expected_layers, head = FIXTURES[family]
    model = build()
    head_before = model.get_submodule(head).weight.detach().clone()
    pruning = wanda(model, batches)

    assert isinstance(pruning, WandaPruning)
    (pruner,) = pruning.pruners
    assert list(pruner.modules) == expected_layers
    for name, module in pruner.modules.items():
        in_features = weight_matrix(module).shape[1]
        assert (zeros_per_row(module) == int(in_features * 0.5)).all(), name
        assert pruner.masks[name].shape == module.weight.shape
        assert torch.equal(pruner.masks[name], module.weight != 0), name
    assert torch.equal(model.get_submodule(head).weight, head_before)  # OPT's tied head has a zero padding row
    if family == "bert":  # the pooler is selected by default but lies outside the blocks
        assert (model.bert.pooler.dense.weight != 0).all()
        assert any("bert.pooler.dense" in message and "dense" in message for message in warnings_logged)
    else:
        assert warnings_logged == []


def test_pruned_model_still_runs():
    model = tiny_llama_lm()
    wanda(model, TOKENS)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=TOKENS[0]["input_ids"]).logits).all()


# --- sequential calibration ----------------------------------------------------------------------------------


def layer_input_norms(model, batches, names):
    """Reference statistics from full forward passes of `model` (no block replay), one accumulator per layer."""
    norms = {name: InputFeatureNorms() for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: norms[name].update(
                input_rows(module, args[0]), input_samples(module, args[0])
            )
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**{key: value for key, value in batch.items() if key != "labels"}, use_cache=False)
    for handle in handles:
        handle.remove()
    return norms


def reference_masks(model, batches, names, sparsity=0.5):
    norms = layer_input_norms(model, batches, names)
    return {
        name: per_output_mask(wanda_scores(weight_matrix(model.get_submodule(name)), norms[name].squared_norms), sparsity)
        for name in names
    }


def test_block_masks_come_from_sequentially_recomputed_inputs():
    block0 = FIXTURES["llama"][2][:7]
    block1 = FIXTURES["llama"][2][7:]
    pruning = wanda(tiny_llama_lm(), TOKENS)
    masks = pruning.pruners[0].masks

    dense = tiny_llama_lm()
    expected0 = reference_masks(dense, TOKENS, block0)
    for name in block0:
        assert torch.equal(masks[name], expected0[name]), name

    dense_stats_masks1 = reference_masks(dense, TOKENS, block1)
    block0_pruned = tiny_llama_lm()
    for name in block0:
        apply_matrix_mask(block0_pruned.get_submodule(name), expected0[name])
    expected1 = reference_masks(block0_pruned, TOKENS, block1)
    for name in block1:
        assert torch.equal(masks[name], expected1[name]), name
    # the dense model's block-1 statistics would have given other masks
    assert any(not torch.equal(masks[name], dense_stats_masks1[name]) for name in block1)


# --- N:M -----------------------------------------------------------------------------------------------------


def nm_groups(module, mask):
    """The mask as [out, in / M groups, M] along the input dimension, in INC's N:M order for convolutions."""
    if isinstance(module, nn.Conv2d):
        return mask.permute(0, 2, 3, 1).reshape(mask.shape[0], -1)
    if isinstance(module, Conv1D):
        return mask.T
    return mask


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "cnn"])
def test_nm_keeps_exactly_m_minus_n_in_every_group_of_m_inputs(family, pattern):
    build, batches, _, _ = FIXTURES[family]
    n, m = (int(v) for v in pattern.split(":"))
    excluded = ["features\\.0\\."] if family == "cnn" else []  # its first conv has 9 inputs
    model = build()
    pruning = wanda(model, batches, pattern=pattern, target_sparsity=n / m, excluded_op_names=excluded)

    (pruner,) = pruning.pruners
    assert len(pruner.modules) == (2 if family == "cnn" else len(FIXTURES[family][2]))
    for name, module in pruner.modules.items():
        assert torch.equal(pruner.masks[name], module.weight != 0), name
        groups = nm_groups(module, pruner.masks[name])
        groups = groups.reshape(groups.shape[0], -1, m)
        assert (groups.sum(dim=-1) == m - n).all(), name
    if family != "gpt2":  # INC's N:M pattern reads Conv1D weights [in, out] as if they were [out, in]
        assert pruner.pattern.get_sparsity_ratio(pruner.masks) == pytest.approx(n / m)


# --- layer selection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"op_names": ["attention"], "excluded_op_names": ["output"]},
        {"op_names": ["intermediate", "layer\\.1\\.attention\\.self"], "excluded_op_names": ["key"]},
    ],
)
def test_op_names_select_layers_as_inc_does(selection):
    model = tiny_bert_classifier()
    pruning = wanda(model, TOKENS, **copy.deepcopy(selection))

    (info,) = process_config(inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": "1x1", **copy.deepcopy(selection)}]
    ))
    inc_selection = [name for name in parse_to_prune(info, tiny_bert_classifier()) if ".encoder.layer." in name]
    assert list(pruning.pruners[0].modules) == inc_selection
    assert inc_selection  # the cases select something
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in inc_selection:
            assert (module.weight != 0).all(), name


def test_two_config_entries_get_one_pruner_each():
    model = tiny_llama_lm()
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": "2:4", "op_names": ["mlp"]},
        {"pruning_type": "wanda", "target_sparsity": 0.25, "pattern": "1x1", "op_names": ["self_attn"]},
    ])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=TOKENS)
    mlp, attention = pruning.pruners
    assert len(mlp.modules) == 6 and all("mlp" in name for name in mlp.modules)
    assert len(attention.modules) == 8 and all("self_attn" in name for name in attention.modules)
    for name, module in attention.modules.items():
        assert (zeros_per_row(module) == int(weight_matrix(module).shape[1] * 0.25)).all(), name


# --- comparison groups and the variant -----------------------------------------------------------------------


def test_per_layer_prunes_the_target_count_of_every_layer():
    model = tiny_llama_lm()
    (pruner,) = wanda(model, TOKENS, comparison_group="per_layer", target_sparsity=0.3).pruners
    for name, module in pruner.modules.items():
        assert int((module.weight == 0).sum()) == int(module.weight.numel() * 0.3), name
    rows_differ = any(len(set(zeros_per_row(m).tolist())) > 1 for m in pruner.modules.values())
    assert rows_differ  # a per-layer ranking, not a per-row one


def test_global_allocates_counts_from_the_dense_ranking_and_reaches_the_total():
    names = FIXTURES["llama"][2]
    model = tiny_llama_lm()
    (pruner,) = wanda(model, TOKENS, comparison_group="global", target_sparsity=0.4).pruners

    total = sum(module.weight.numel() for module in pruner.modules.values())
    zeros = {name: int((module.weight == 0).sum()) for name, module in pruner.modules.items()}
    assert sum(zeros.values()) == int(total * 0.4)
    dense = tiny_llama_lm()
    norms = layer_input_norms(dense, TOKENS, names)
    dense_scores = {n: wanda_scores(weight_matrix(dense.get_submodule(n)), norms[n].squared_norms) for n in names}
    allocated = {name: int((~mask).sum()) for name, mask in global_masks(dense_scores, 0.4).items()}
    assert zeros == allocated
    assert len(set(zeros.values())) > 1


def test_variant_reaches_the_target_in_every_layer():
    model = tiny_bert_classifier()
    (pruner,) = wanda(model, TOKENS, use_variant=True, excluded_op_names=["pooler"]).pruners
    assert set(pruner.alphas) == set(pruner.modules)
    for name, module in pruner.modules.items():
        assert abs((module.weight == 0).float().mean().item() - 0.5) <= 0.001, name
        assert torch.equal(pruner.masks[name], module.weight != 0)


# --- INC's report --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["1x1", "2:4"])
def test_inc_sparsity_report_runs_and_is_right(pattern):
    model = tiny_llama_lm()
    pruning = wanda(model, TOKENS, pattern=pattern)
    report = get_sparsity_ratio(pruning.pruners, model)
    elementwise, _, blockwise = report
    # INC's report divides by the Linear layers of `model.model` (every block layer here)
    assert elementwise == pytest.approx(0.5) and blockwise == pytest.approx(0.5)
    assert pruning.report == pytest.approx(report)  # the report logged at the end of pruning
    pruning.on_train_end()  # INC's end-of-training callbacks and report


# --- bad input -----------------------------------------------------------------------------------------------


def test_nm_layer_whose_inputs_are_not_a_multiple_of_m_is_named():
    with pytest.raises(inc_plugins.PruningConfigError, match=r"'features\.0\.0'.*\[out, in\] = \[8, 9\]"):
        wanda(tiny_cnn(), IMAGES, pattern="2:4")


def test_empty_dataloader():
    with pytest.raises(ValueError, match="yielded no batches"):
        wanda(tiny_llama_lm(), [])


def test_nan_images_are_named_as_calibration_data():
    images = [(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(NonFiniteError, match=r"calibration batch 0 .*128 NaN.*check the calibration data"):
        wanda(tiny_cnn(), images)


def test_inf_weight_inside_a_block_names_the_layer_that_holds_it():
    model = tiny_llama_lm()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"weight of layer 'model\.layers\.0\.mlp\.up_proj' holds 0 NaN and 1 Inf"):
        wanda(model, TOKENS)
    assert all(not hook for hook in (m._forward_pre_hooks for m in model.modules()))  # hooks are removed


def test_a_selected_layer_its_block_never_calls_is_named():
    model = tiny_llama_lm()
    model.model.layers[1].unused = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.unused' received no input"):
        wanda(model, TOKENS)


def test_op_names_matching_nothing_are_listed_with_example_names():
    with pytest.raises(inc_plugins.PruningConfigError, match=r"\['attn_typo'\].*'model\.layers\.0\.self_attn\.q_proj'"):
        wanda(tiny_llama_lm(), TOKENS, op_names=["mlp", "attn_typo"])


def test_heads_are_excluded_even_when_named():
    with pytest.raises(inc_plugins.PruningConfigError, match="task head"):
        wanda(tiny_llama_lm(), TOKENS, op_names=["lm_head"])


def test_unsupported_model_family():
    with pytest.raises(UnsupportedModelError, match="not supported"):
        wanda(nn.Sequential(nn.Linear(4, 4)), [torch.zeros(1, 4)])


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"pattern": "4x1"}, r"Wanda supports '1x1' \(unstructured\) and 'N:M'"),
        ({"pattern": "mha"}, r"Wanda supports '1x1' \(unstructured\) and 'N:M'"),
        ({"comparison_group": "per_row"}, r"comparison_group 'per_row' is not one of 'per_output', 'per_layer', 'global'"),
        ({"use_variant": "yes"}, r"use_variant must be true or false"),
        ({"use_variant": True, "comparison_group": "global"}, r"use_variant works only with comparison_group 'per_output'"),
        ({"use_variant": True, "pattern": "2:4"}, r"use_variant works only with .* pattern '1x1'"),
        ({"pattern": "2:4", "comparison_group": "per_layer"}, r"comparison_group must be 'per_output'"),
        ({"pattern": "2:4", "target_sparsity": 0.3}, r"set target_sparsity to 0\.5"),
    ],
)
def test_bad_settings(entry, message):
    with pytest.raises(inc_plugins.PruningConfigError, match=message):
        wanda(tiny_llama_lm(), TOKENS, **entry)


def test_pt_wanda_refuses_inc_training_loop():
    model = tiny_llama_lm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # fresh lists: WeightPruningConfig's defaults may carry settings leaked by earlier tests (an INC bug)
    config = inc_plugins.pruning_config(pruning_type="wanda", pattern="1x1", target_sparsity=0.5)
    pruning = inc_prepare_pruning(model, config, optimizer=optimizer)  # INC's own entry: the training-loop flow
    assert [type(p) for p in pruning.pruners] == [WandaPruner]
    try:
        with pytest.raises(RuntimeError, match="prunes one-shot.*wanda_score"):
            pruning.on_train_begin()
    finally:
        inc_plugins.complete_pruning(model, optimizer)


# --- the training-aware criterion ----------------------------------------------------------------------------


def test_wanda_score_in_inc_training_loop_reaches_target_and_removes_its_hooks():
    torch.manual_seed(0)
    model = tiny_bert_classifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = inc_plugins.pruning_config(
        pruning_type="wanda_score", target_sparsity=0.5, pattern="4x1", op_names=["encoder"], start_step=0,
        end_step=4, pruning_frequency=2, pruning_scope="local",
    )
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    assert isinstance(pruning.pruners[0].criterion, WandaScoreCriterion)
    batches = token_batches(3, 4, 12, labels="classification")
    pruning.on_train_begin()
    for step in range(6):
        model(**batches[step % 3]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruning.on_step_end()
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)

    modules = pruning.pruners[0].modules
    assert len(modules) == 12
    for name, module in modules.items():
        assert abs((module.weight == 0).float().mean().item() - 0.5) < 0.02, name
        assert not module._forward_pre_hooks, name
    assert (model.classifier.weight != 0).all()


def test_wanda_score_equals_abs_weight_times_input_norm_reduced_by_the_pattern():
    torch.manual_seed(0)
    modules = {"linear": nn.Linear(8, 8), "conv1d": Conv1D(8, 8), "conv": nn.Conv2d(2, 4, 3)}
    (info,) = process_config(inc_plugins.pruning_config(pruning_type="wanda_score", pattern="4x1", end_step=2))
    pattern = get_pattern(info, modules)
    criterion = CRITERIA["wanda_score"](modules, info, pattern)

    criterion.on_step_begin()
    assert criterion.scores == {}  # nothing seen yet: INC skips the step

    token_inputs = [torch.randn(3, 5, 8), torch.randn(2, 8)]
    images = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        for x in token_inputs:
            modules["linear"](x)
            modules["conv1d"](x)
        modules["conv"](images)
    criterion.on_step_begin()

    tokens = torch.cat([x.reshape(-1, 8) for x in token_inputs])
    samples = 3 + 1  # a [3, 5, 8] batch holds 3 sequences; a 2-D [2, 8] input counts as one, as in the reference
    root_norm = (tokens.square().sum(dim=0) / samples).sqrt()
    linear = modules["linear"].weight.abs() * root_norm            # [out, in]
    conv1d = modules["conv1d"].weight.abs() * root_norm[:, None]   # stored [in, out]
    patches = torch.nn.functional.unfold(images, 3).transpose(1, 2).reshape(-1, 18)
    conv = (modules["conv"].weight.abs().reshape(4, 18) * (patches.square().sum(dim=0) / 2).sqrt()).reshape(4, 2, 3, 3)
    expected = {
        # INC's 4x1 blocks: 4 consecutive rows of the stored 2-D weight (convs as [out, kh, kw, in]), mean-reduced
        "linear": linear.reshape(2, 4, 8).mean(dim=1),
        "conv1d": conv1d.reshape(2, 4, 8).mean(dim=1),
        "conv": conv.permute(0, 2, 3, 1).reshape(1, 4, 18).mean(dim=1),
    }
    for name, score in expected.items():
        torch.testing.assert_close(criterion.scores[name], score, msg=name)
    criterion.remove_hooks()
    assert all(not module._forward_pre_hooks for module in modules.values())


def test_wanda_score_needs_steps_to_see_inputs():
    (info,) = process_config(inc_plugins.pruning_config(pruning_type="wanda_score", pattern="4x1", end_step=0))
    modules = {"linear": nn.Linear(8, 8)}
    with pytest.raises(inc_plugins.PruningConfigError, match="end_step >= 1"):
        CRITERIA["wanda_score"](modules, info, get_pattern(info, modules))


# --- merged block calls ----------------------------------------------------------------------------------------


def test_merged_block_calls_keep_the_per_batch_statistics_and_masks(monkeypatch):
    """The walk runs batch-1 windows through each block several at a time; Wanda's norms and DSnoT's pooled
    per-batch variances must still be those of one batch per call (the reference's running statistics)."""
    import inc_plugins.inc.wanda as wanda_module

    generator = torch.Generator().manual_seed(3)
    windows = [(torch.randint(1, 100, (1, 16), generator=generator),) for _ in range(6)]
    statistics = {}
    original_prune = WandaPruner.prune

    def recording(self, names):
        for name in names:
            moments = self.feature_moments[name]
            statistics[name] = (self.feature_norms[name].squared_norms.clone(), moments.sums.clone(),
                                moments.variance.clone(), self.input_grams[name].matrix.clone())
        original_prune(self, names)

    monkeypatch.setattr(WandaPruner, "prune", recording)
    runs = []
    for merge_tokens in (0, wanda_module.MERGE_TOKENS):
        monkeypatch.setattr(wanda_module, "MERGE_TOKENS", merge_tokens)
        model, calls = tiny_llama_lm(), []
        handle = model.model.layers[0].register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
        wanda(model, windows, dsnot=True, update_weights=True)
        handle.remove()
        runs.append((model, dict(statistics), calls))
    (unmerged, alone, unmerged_calls), (merged, together, merged_calls) = runs
    assert unmerged_calls[-1] == 1 and merged_calls[-1] == 6  # the second run really merged the windows
    # block 0 (later blocks read the refitted blocks' outputs, and the refit's iterations stop at a tolerance)
    for name in [name for name in alone if name.startswith("model.layers.0.")]:
        norms, sums, variance, gram = alone[name]
        merged_norms, merged_sums, merged_variance, merged_gram = together[name]
        torch.testing.assert_close(merged_norms, norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(merged_sums, sums, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_variance, variance, rtol=1e-5, atol=0)
        torch.testing.assert_close(merged_gram, gram, rtol=1e-5, atol=1e-5)
        module, merged_module = unmerged.get_submodule(name), merged.get_submodule(name)
        assert torch.equal(weight_matrix(module) != 0, weight_matrix(merged_module) != 0), name
