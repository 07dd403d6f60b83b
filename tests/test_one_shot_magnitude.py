"""One-shot magnitude pruning: per-row |W| against brute force, N:M groups (INC's order for convolutions), and OWL's
block sparsities from Wanda's outlier scores, with the total exact."""

import pytest
import torch

import inc_plugins
from inc_plugins.models.layer_views import weight_matrix
from tests.fixtures.tiny_models import tiny_llama_lm
from tests.test_sparse_gpt import windows
from tests.test_wanda_pruner import FIXTURES, nm_groups


def magnitude(model, batches=None, **entry):
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "one_shot_magnitude", "target_sparsity": 0.5, "op_names": ["layers"], **entry}])
    return inc_plugins.prepare_pruning(model, config, dataloader=batches)


def test_uniform_prunes_each_rows_smallest_weights_without_data():
    dense, model = tiny_llama_lm(), tiny_llama_lm()
    (pruner,) = magnitude(model, target_sparsity=0.25).pruners
    assert len(pruner.modules) == 14
    for name, module in pruner.modules.items():
        weights = weight_matrix(dense.get_submodule(name)).detach()
        count = int(weights.shape[1] * 0.25)
        smallest = torch.argsort(weights.abs(), dim=1, stable=True)[:, :count]
        expected = torch.ones_like(weights, dtype=torch.bool).scatter_(1, smallest, False)
        assert torch.equal(pruner.masks[name], expected), name
        assert torch.equal(weight_matrix(module), weights * expected), name


@pytest.mark.parametrize("family", ["llama", "cnn"])
def test_nm_prunes_n_of_every_m_inputs(family):
    build, batches, names, _ = FIXTURES[family]
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "one_shot_magnitude", "target_sparsity": 0.5, "pattern": "2:4",
         "excluded_op_names": ["features\\.0\\."]}])  # the CNN's first conv has 9 inputs
    (pruner,) = inc_plugins.prepare_pruning(build(), config).pruners
    assert len(pruner.modules) == (2 if family == "cnn" else len(names))
    for name, module in pruner.modules.items():
        groups = nm_groups(module, pruner.masks[name])
        assert (groups.reshape(groups.shape[0], -1, 4).sum(dim=-1) == 2).all(), name


def test_owl_takes_wandas_outlier_ratios_and_meets_the_target_exactly():
    (pruner,) = magnitude(tiny_llama_lm(), windows(), layer_sparsity="owl", owl_m=2.0, owl_lambda=0.1).pruners
    (wanda,) = inc_plugins.prepare_pruning(tiny_llama_lm(), inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "wanda", "target_sparsity": 0.5, "op_names": ["layers"], "layer_sparsity": "owl",
         "owl_m": 2.0, "owl_lambda": 0.1}]), dataloader=windows()).pruners
    assert pruner.outlier_ratios == wanda.outlier_ratios and pruner.block_sparsity == wanda.block_sparsity
    total = sum(mask.numel() for mask in pruner.masks.values())
    assert sum(int((~mask).sum()) for mask in pruner.masks.values()) == int(total * 0.5)
    for block in (0, 1):
        masks = [mask for name, mask in pruner.masks.items() if f"layers.{block}." in name]
        realised = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
        assert realised == pytest.approx(pruner.block_sparsity[block], abs=1e-3)


def test_owl_without_data_is_refused():
    with pytest.raises(inc_plugins.PruningConfigError, match="need calibration data: pass dataloader="):
        magnitude(tiny_llama_lm(), layer_sparsity="owl")
