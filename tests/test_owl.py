"""OWL (outlier-weighted layer-wise sparsity, inc_plugins.algorithms.owl) and Wanda's layer_sparsity "owl": the
ratios and sparsities against hand computations and the paper's formula, counts that add up exactly, and the
registered wanda type pruning the outlier-rich block less."""

import numpy as np
import pytest
import torch

from inc_plugins.algorithms.owl import apportion, outlier_ratio, owl_sparsities, pruned_counts, row_counts
from inc_plugins.algorithms.wanda import rows_mask, wanda_scores
from inc_plugins.inc.config_checks import PruningConfigError
from inc_plugins.models.layer_views import weight_matrix
from tests.fixtures.tiny_models import tiny_llama_lm
from tests.test_wanda_pruner import FIXTURES, TOKENS, layer_input_norms, wanda


def test_outlier_ratio_by_hand():
    # mean 2.8; above 2 x 2.8 = 5.6: only the 10, one score of five
    assert outlier_ratio([torch.tensor([[1.0, 1.0]]), torch.tensor([1.0, 1.0, 10.0])], m=2) == pytest.approx(0.2)
    assert outlier_ratio([torch.tensor([1.0, 1.0, 10.0])], m=5) == 0.0  # 10 is not above 5 x 4


def test_sparsities_by_hand_and_weighted_by_block_size():
    # spread [0, 0.2, 0.1] (2 * lambda * min-max), mean 0.1: the richest block is pruned least
    assert owl_sparsities([0.1, 0.3, 0.2], [1, 1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5])
    # a first block three times as large: weighted mean spread (0 * 3 + 0.2 + 0.1) / 5 = 0.06
    sparsities = owl_sparsities([0.1, 0.3, 0.2], [3, 1, 1], 0.5, 0.1)
    assert sparsities == pytest.approx([0.56, 0.36, 0.46])
    assert np.average(sparsities, weights=[3, 1, 1]) == pytest.approx(0.5)
    assert owl_sparsities([0.2, 0.2], [5, 7], 0.3, 0.08) == pytest.approx([0.3, 0.3])  # no spread, no change


def test_sparsities_equal_the_papers_formula_for_equal_blocks():
    ratios, target, lam = [0.012, 0.034, 0.021, 0.008, 0.05], 0.7, 0.08
    reference = np.array(ratios) * 100  # the reference works in percent; min-max scaling removes it
    reference = (reference - reference.min()) * (1 / (reference.max() - reference.min()) * lam * 2)
    reference = reference - np.mean(reference) + (1 - target)  # densities
    assert owl_sparsities(ratios, [10] * 5, target, lam) == pytest.approx(list(1 - reference))


def test_a_spread_beyond_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="use a smaller owl_lambda"):
        owl_sparsities([0.0, 1.0], [1, 1], 0.05, 0.1)


def test_counts_add_up_exactly_and_stay_within_one_of_their_quota():
    assert apportion(10, [3.4, 3.3, 3.3], [10, 10, 10]) == [4, 3, 3]
    assert apportion(5, [2.9, 2.9], [2, 10]) == [2, 3]  # a capped entry passes its share on
    sizes = {"a": 300, "b": 200, "c": 123, "d": 77}
    blocks = {"a": 0, "b": 0, "c": 1, "d": 1}
    sparsity = {0: 0.44, 1: 0.65}  # (0.44 * 500 + 0.65 * 200) / 700 = 0.5
    counts = pruned_counts(sizes, blocks, sparsity, 0.5)
    assert sum(counts.values()) == int(700 * 0.5)
    for block, size in ((0, 500), (1, 200)):
        in_block = sum(c for name, c in counts.items() if blocks[name] == block)
        assert abs(in_block - size * sparsity[block]) < 1
    with pytest.raises(ValueError, match="do not average to"):
        pruned_counts(sizes, blocks, {0: 0.3, 1: 0.3}, 0.5)
    rows = row_counts(17, 5, 8)
    assert rows.tolist() == [4, 4, 3, 3, 3] and int(rows.sum()) == 17


def test_rows_mask_prunes_each_rows_lowest_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 6, generator=generator)
    counts = torch.tensor([0, 1, 3, 6])
    keep = rows_mask(scores, counts)
    for row, count in enumerate(counts.tolist()):
        pruned = set(torch.argsort(scores[row])[:count].tolist())
        assert set((~keep[row]).nonzero().flatten().tolist()) == pruned


def test_owl_wanda_prunes_the_outlier_rich_block_less_and_exactly_the_target_in_all():
    names = FIXTURES["llama"][2]
    (pruner,) = wanda(tiny_llama_lm(), TOKENS, layer_sparsity="owl", owl_m=2.0, owl_lambda=0.1,
                      target_sparsity=0.5).pruners
    total = sum(module.weight.numel() for module in pruner.modules.values())
    assert sum(int((module.weight == 0).sum()) for module in pruner.modules.values()) == int(total * 0.5)
    # the outlier ratios of the dense model, from full forward passes
    dense = tiny_llama_lm()
    norms = layer_input_norms(dense, TOKENS, names)
    scores = {n: wanda_scores(weight_matrix(dense.get_submodule(n)), norms[n].squared_norms) for n in names}
    hand = [outlier_ratio([s for n, s in scores.items() if f"layers.{b}." in n], 2.0) for b in (0, 1)]
    assert hand[0] != hand[1]
    assert [pruner.outlier_ratios[b] for b in (0, 1)] == pytest.approx(hand)
    realised = []
    for block in (0, 1):
        modules = [m for n, m in pruner.modules.items() if f"layers.{block}." in n]
        realised.append(sum(int((m.weight == 0).sum()) for m in modules) / sum(m.weight.numel() for m in modules))
    rich, poor = (0, 1) if hand[0] > hand[1] else (1, 0)
    assert realised[rich] == pytest.approx(0.4, abs=1e-3) and realised[poor] == pytest.approx(0.6, abs=1e-3)


def test_owl_without_spread_gives_uniform_wandas_masks():
    (owl,) = wanda(tiny_llama_lm(), TOKENS, layer_sparsity="owl", owl_lambda=0.0).pruners
    (uniform,) = wanda(tiny_llama_lm(), TOKENS).pruners
    for name in uniform.masks:
        assert torch.equal(owl.masks[name], uniform.masks[name]), name


@pytest.mark.parametrize("entry,message", [
    ({"pattern": "2:4"}, r"layer_sparsity 'owl' sets each block's sparsity itself"),
    ({"comparison_group": "global"}, r"layer_sparsity 'owl' sets each block's sparsity itself"),
    ({"owl_lambda": 0.6, "owl_m": 2.0}, r"use a smaller owl_lambda"),
])
def test_owl_settings_that_cannot_work_are_refused(entry, message):
    with pytest.raises((PruningConfigError, ValueError), match=message):
        wanda(tiny_llama_lm(), TOKENS, layer_sparsity="owl", **entry)
