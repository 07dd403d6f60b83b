"""DSnoT (inc_plugins.algorithms.dsnot) and the dsnot option of Wanda and one-shot magnitude: the same masks as INC
3.7.1's prune_wanda(dsnot=True) (unstructured) and its DSnoT's N:M branch, statistics as the reference computes them,
and the swaps' bookkeeping."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import inc_plugins
from inc_plugins.algorithms.dsnot import InputFeatureMoments, dsnot_keep_mask, dsnot_nm_keep_mask
from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms.wanda import InputFeatureNorms, per_output_mask, wanda_scores
from inc_plugins.perf.synthetic import seeded_model
from tests.fixtures.tiny_models import tiny_llama_lm
from tests.test_wanda_math import _statistics_and_inc_masks, _TinyModel


def test_moments_are_a_per_sample_sum_and_a_token_weighted_pool_of_batch_variances():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 3, generator=generator), torch.randn(4, 3, generator=generator)
    moments = InputFeatureMoments()
    moments.update(first, num_samples=2)
    moments.update(second, num_samples=1)
    torch.testing.assert_close(moments.sums, (first.sum(0) + second.sum(0)) / 3)
    pooled = (first.var(0, unbiased=False) * 6 + second.var(0, unbiased=False) * 4) / 10
    torch.testing.assert_close(moments.variance, pooled)


def test_swaps_keep_every_rows_count_and_leave_settled_rows_alone():
    generator = torch.Generator().manual_seed(3)
    weight, inputs = torch.randn(12, 20, generator=generator), torch.randn(40, 20, generator=generator) + 0.3
    norms, moments = InputFeatureNorms(), InputFeatureMoments()
    norms.update(inputs, 4)
    moments.update(inputs, 4)
    scores = wanda_scores(weight, norms.squared_norms)
    wanda = per_output_mask(scores, 0.5)
    keep = dsnot_keep_mask(weight, scores, moments, 0.5)
    assert torch.equal(keep.sum(dim=1), wanda.sum(dim=1))  # swaps, never a change of count
    lost = ((weight * moments.sums) * ~wanda).sum(dim=1)
    settled = lost.abs() <= 0.1
    assert torch.equal(keep[settled], wanda[settled])
    assert not torch.equal(keep, wanda)  # some rows moved


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_masks_equal_incs_prune_wanda_with_dsnot(sparsity):
    torch.manual_seed(21)
    model = _TinyModel(width=512, hidden=512)  # rows as wide as a small LLM's: INC's DSnoT fails on narrow ones
    inputs = torch.randn(6, 5, 512) + 0.5  # a mean away from 0: the expected outputs DSnoT restores are not ~0
    statistics, inc = _statistics_and_inc_masks(model, inputs, sparsity_ratio=sparsity, dsnot=True)
    for name, (norms, moments) in statistics.items():
        weight = getattr(model.layers[0], name).weight.detach()
        ours = dsnot_keep_mask(weight, wanda_scores(weight, norms.squared_norms), moments, sparsity)
        assert torch.equal(ours, inc[name]), name
        assert not torch.equal(ours, per_output_mask(wanda_scores(weight, norms.squared_norms), sparsity))


def wide_llama():
    """A one-block synthetic Llama with rows as wide as a small LLM's (INC's DSnoT fails on the tiny fixture's)."""
    config = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return seeded_model(0, lambda: LlamaForCausalLM(config))


def test_the_registered_type_agrees_with_incs_prune_wanda_on_a_llama():
    from neural_compressor.compression.pruner.wanda.prune import prune_wanda

    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    ours = wide_llama()
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5,
                                                          "dsnot": True, "op_names": ["model.layers"]}])
    inc_plugins.prepare_pruning(ours, config, dataloader=[{"input_ids": w[None]} for w in windows])
    theirs = wide_llama()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows), batch_size=1)
    prune_wanda(theirs, loader, sparsity_ratio=0.5, dsnot=True, nsamples=len(windows))
    agree = total = 0
    for module, other in zip(ours.model.layers.modules(), theirs.model.layers.modules()):
        if isinstance(module, torch.nn.Linear):
            agree += int(((module.weight != 0) == (other.weight != 0)).sum())
            total += module.weight.numel()
    assert agree / total >= 0.999
    uniform = wide_llama()
    inc_plugins.prepare_pruning(uniform, inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "wanda", "target_sparsity": 0.5, "op_names": ["model.layers"]}]),
        dataloader=[{"input_ids": w[None]} for w in windows])
    assert any(not torch.equal(a.weight != 0, b.weight != 0)
               for a, b in zip(ours.model.layers.modules(), uniform.model.layers.modules())
               if isinstance(a, torch.nn.Linear))  # DSnoT changed masks


def test_dsnot_with_a_comparison_group_it_cannot_serve_is_refused():
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5,
                                                          "comparison_group": "per_layer", "dsnot": True}])
    with pytest.raises(inc_plugins.PruningConfigError, match="dsnot swaps weights within each row"):
        inc_plugins.prepare_pruning(tiny_llama_lm(), config, dataloader=[{"input_ids": torch.zeros(1, 8).long()}])

def _wide_layer_statistics(seed: int, out_features: int = 64, in_features: int = 512):
    """A Linear with rows as wide as a small LLM's, INC's WrappedGPT and our accumulators fed the same batches."""
    from neural_compressor.compression.pruner.wanda.wrapper import WrappedGPT

    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    wrapped, norms, moments = WrappedGPT(layer), InputFeatureNorms(), InputFeatureMoments()
    for _ in range(3):
        batch = torch.randn(2, 16, in_features, generator=generator) + 0.5  # a mean away from 0, as above
        wrapped.add_batch(batch, None)
        norms.update(batch.reshape(-1, in_features), num_samples=2)
        moments.update(batch.reshape(-1, in_features), num_samples=2)
    return layer.weight.detach(), wrapped, norms, moments


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_swaps_equal_incs_dsnot_nm_branch(n, m):
    from neural_compressor.compression.pruner.dsnot import DSnoT

    weight, wrapped, norms, moments = _wide_layer_statistics(seed=n + m)
    scores = wanda_scores(weight, norms.squared_norms)
    inc_pruned = DSnoT(scores.clone(), n / m, wrapped, prune_n=n, prune_m=m)
    ours = dsnot_nm_keep_mask(weight, scores, moments, n, m)
    assert torch.equal(ours, ~inc_pruned)
    assert torch.equal(ours.reshape(64, -1, m).sum(dim=2), torch.full((64, 512 // m), m - n))  # N:M holds
    assert not torch.equal(ours, nm_mask(scores, n, m))  # swaps happened


def test_nm_swaps_keep_each_rows_sign_bring_the_expected_outputs_back_and_leave_settled_rows_alone():
    weight, _, norms, moments = _wide_layer_statistics(seed=1)
    scores = wanda_scores(weight, norms.squared_norms)
    start, keep = nm_mask(scores, 2, 4), dsnot_nm_keep_mask(weight, scores, moments, 2, 4)
    expected = weight * moments.sums
    lost_before, lost_after = ((expected * ~start).sum(dim=1), (expected * ~keep).sum(dim=1))
    settled = lost_before.abs() <= 0.1
    assert torch.equal(keep[settled], start[settled])
    moved = (keep != start).any(dim=1)
    assert moved.any()
    # A swap may not shrink |e| (the group's lowest-scored kept weight goes, whatever it adds), but never flips its
    # sign, and over the layer the expected outputs come back
    assert bool((torch.sign(lost_after[moved]) == torch.sign(lost_before[moved])).all())
    assert float(lost_after.abs().sum()) < 0.5 * float(lost_before.abs().sum())


def test_a_magnitude_start_is_swapped_from_the_magnitude_mask():
    weight, _, norms, moments = _wide_layer_statistics(seed=2)
    scores, magnitude = wanda_scores(weight, norms.squared_norms), weight.abs()
    start = per_output_mask(magnitude, 0.5)
    keep = dsnot_keep_mask(weight, scores, moments, 0.5, initial_scores=magnitude)
    assert torch.equal(keep.sum(dim=1), start.sum(dim=1))
    settled = ((weight * moments.sums) * ~start).sum(dim=1).abs() <= 0.1
    assert torch.equal(keep[settled], start[settled])
    assert not torch.equal(keep, start)
    assert not torch.equal(keep, dsnot_keep_mask(weight, scores, moments, 0.5))  # another start, another mask
    assert torch.equal(dsnot_keep_mask(weight, scores, moments, 0.5, initial_scores=scores),
                       dsnot_keep_mask(weight, scores, moments, 0.5))


def _pruned_masks(model):
    return {name: module.weight != 0 for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("pruning_type", ["wanda", "one_shot_magnitude"])
def test_the_registered_types_keep_2_of_4_with_dsnot(pruning_type):
    windows = [{"input_ids": w[None]}
               for w in torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))]
    masks = {}
    for dsnot in (False, True):
        model = wide_llama()
        inc_plugins.prepare_pruning(model, inc_plugins.pruning_config(pruning_configs=[
            {"pruning_type": pruning_type, "target_sparsity": 0.5, "pattern": "2:4", "dsnot": dsnot,
             "op_names": ["model.layers"]}]), dataloader=windows)
        masks[dsnot] = _pruned_masks(model)
    for name, keep in masks[True].items():
        groups = keep.reshape(keep.shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), name
    assert any(not torch.equal(masks[True][name], masks[False][name]) for name in masks[True])


def test_magnitude_with_dsnot_swaps_the_magnitude_masks_rows_and_needs_data():
    windows = [{"input_ids": w[None]}
               for w in torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(6))]
    config = {"pruning_type": "one_shot_magnitude", "target_sparsity": 0.5, "op_names": ["model.layers"]}
    plain, swapped = wide_llama(), wide_llama()
    inc_plugins.prepare_pruning(plain, inc_plugins.pruning_config(pruning_configs=[config]))
    inc_plugins.prepare_pruning(swapped, inc_plugins.pruning_config(pruning_configs=[{**config, "dsnot": True}]),
                                dataloader=windows)
    plain_masks, swapped_masks = _pruned_masks(plain), _pruned_masks(swapped)
    for name, keep in swapped_masks.items():
        assert torch.equal(keep.sum(dim=1), plain_masks[name].sum(dim=1)), name  # swaps within rows
    assert any(not torch.equal(swapped_masks[name], plain_masks[name]) for name in plain_masks)
    with pytest.raises(inc_plugins.PruningConfigError, match="need calibration data"):
        inc_plugins.prepare_pruning(wide_llama(),
                                    inc_plugins.pruning_config(pruning_configs=[{**config, "dsnot": True}]))


def _one_cycle_by_hand(weight, scores, moments, start, n_m=None, threshold=0.1):
    """DSnoT's first cycle, row by row in plain Python: the swap each unsettled row makes from ``start`` (keep)."""
    expected = weight * moments.sums
    keep = start.clone()
    for row in range(weight.shape[0]):
        pruned = ~start[row]
        error = float(expected[row][pruned].sum())
        if abs(error) <= threshold:
            continue
        lost = torch.where(pruned, expected[row], torch.zeros(())) / moments.variance
        order = torch.sort(lost, stable=True).indices
        grow = int(order[-1] if error > 0 else order[0])  # the largest lost output when e > 0, else the smallest
        if not pruned[grow]:
            continue
        if n_m is None:  # the kept weight of lowest score among those whose output has the sign that cuts e
            candidates = [j for j in range(weight.shape[1]) if start[row, j]
                          and (expected[row, j] < 0 if error >= 0 else expected[row, j] > 0)]
            shrink = min(candidates, key=lambda j: float(scores[row, j]))
        else:  # the kept weight of lowest score in the grown weight's group, if the sign of e survives the swap
            m = n_m[1]
            group = [j for j in range(grow - grow % m, grow - grow % m + m) if start[row, j]]
            shrink = min(group, key=lambda j: float(scores[row, j]))
            after = error + float(expected[row, shrink]) - float(expected[row, grow])
            if (after > 0) != (error > 0):
                continue
        keep[row, grow], keep[row, shrink] = True, False
    return keep


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_the_first_cycle_makes_the_swap_the_rules_choose_by_hand(n_m):
    weight, _, norms, moments = _wide_layer_statistics(seed=9, out_features=16, in_features=32)
    scores = wanda_scores(weight, norms.squared_norms)
    if n_m is None:
        start, ours = per_output_mask(scores, 0.5), dsnot_keep_mask(weight, scores, moments, 0.5, max_cycles=1)
    else:
        start, ours = nm_mask(scores, *n_m), dsnot_nm_keep_mask(weight, scores, moments, *n_m, max_cycles=1)
    by_hand = _one_cycle_by_hand(weight, scores, moments, start, n_m)
    assert torch.equal(ours, by_hand)
    assert int((ours != start).any(dim=1).sum()) >= 4  # rows really swapped
