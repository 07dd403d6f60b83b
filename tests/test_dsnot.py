"""DSnoT (inc_plugins.algorithms.dsnot) and Wanda's dsnot option: the same masks as INC 3.7.1's
prune_wanda(dsnot=True), statistics as the reference computes them, and the swaps' bookkeeping."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import inc_plugins
from inc_plugins.algorithms.dsnot import InputFeatureMoments, dsnot_keep_mask
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


def test_dsnot_with_a_pattern_it_cannot_serve_is_refused():
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5,
                                                          "pattern": "2:4", "dsnot": True}])
    with pytest.raises(inc_plugins.PruningConfigError, match="dsnot swaps weights within each row"):
        inc_plugins.prepare_pruning(tiny_llama_lm(), config, dataloader=[{"input_ids": torch.zeros(1, 8).long()}])
