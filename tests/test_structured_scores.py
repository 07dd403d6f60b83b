"""The structured pruners' math on tiny tensors, against loops and closed forms: channel statistics, FLAP's fluctuation
scores, standardisation and bias compensation, Wanda-sp's and structured magnitude's channel scores, and the two
FLOPs-target selections (global by score, uniform per block)."""

import itertools
import math

import pytest
import torch

from inc_plugins.algorithms.channel_moments import ChannelMoments
from inc_plugins.algorithms.flap import bias_compensation, fluctuation_scores, standardized, unit_scores
from inc_plugins.algorithms.structured_magnitude import column_norms
from inc_plugins.algorithms.unit_selection import global_selection, unit_sums, uniform_selection
from inc_plugins.algorithms.wanda_sp import wanda_sp_channel_scores


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_channel_moments_match_loops_over_tokens_whatever_the_batching():
    tokens = _random(23, 5, seed=1) * 3 + 1
    moments = ChannelMoments()
    for start, stop in ((0, 1), (1, 8), (8, 8), (8, 23)):  # a one-token batch and an empty one among them
        moments.update(tokens[start:stop].float())
    parts = [ChannelMoments(), ChannelMoments()]
    parts[0].update(tokens[:11].float())
    parts[1].update(tokens[11:].float())
    merged = ChannelMoments.combined(parts)
    x = tokens.float().double()
    for j in range(5):
        column = [float(x[t, j]) for t in range(23)]
        mean = sum(column) / 23
        variance = sum((value - mean) ** 2 for value in column) / 22
        squares = sum(value * value for value in column)
        for statistic in (moments, merged):
            assert statistic.num_tokens == 23
            assert statistic.mean[j].item() == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert statistic.variance[j].item() == pytest.approx(variance, rel=1e-12)
            assert statistic.squared_norms[j].item() == pytest.approx(squares, rel=1e-12)


def test_channel_moments_refuse_a_change_of_width_and_reading_before_data():
    moments = ChannelMoments()
    with pytest.raises(RuntimeError, match="no activations"):
        moments.mean
    moments.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="3 channels but .* 4|4 channels but earlier batches had 3"):
        moments.update(torch.ones(2, 4))


def test_fluctuation_scores_are_variance_times_squared_column_norm():
    weight, variance = _random(4, 6, seed=2), _random(6, seed=3).abs()
    scores = fluctuation_scores(weight, variance)
    for j in range(6):
        expected = float(variance[j]) * sum(float(weight[i, j]) ** 2 for i in range(4))
        assert scores[j].item() == pytest.approx(expected, rel=1e-12)


def test_standardized_and_unit_scores_match_loops():
    scores = _random(2, 6, seed=4)
    z = standardized(scores)
    for row in range(2):
        values = [float(v) for v in scores[row]]
        mean = sum(values) / 6
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
        for j in range(6):
            assert z[row, j].item() == pytest.approx((values[j] - mean) / std, rel=1e-12)
    units = unit_scores(z, 3)
    assert units.shape == (2, 2)
    for row, unit in itertools.product(range(2), range(2)):
        assert units[row, unit].item() == pytest.approx(sum(float(z[row, unit * 3 + k]) for k in range(3)) / 3)
    assert torch.equal(standardized(torch.full((5,), 2.0)), torch.zeros(5))  # no spread: every channel alike


def test_unit_sums_add_consecutive_channels():
    scores = _random(12, seed=5)
    sums = unit_sums(scores, 4)
    assert [round(float(v), 12) for v in sums] == [round(sum(float(scores[u * 4 + k]) for k in range(4)), 12)
                                                   for u in range(3)]
    with pytest.raises(ValueError, match="12 channels cannot be split into units of 5"):
        unit_sums(scores, 5)


def test_wanda_sp_scores_sum_the_columns_wanda_scores():
    weight, tokens = _random(3, 5, seed=6), _random(7, 5, seed=7)
    squared_norms = (tokens ** 2).sum(dim=0)
    scores = wanda_sp_channel_scores(weight.float(), squared_norms)
    for j in range(5):
        norm = math.sqrt(sum(float(tokens[t, j]) ** 2 for t in range(7)))
        assert scores[j].item() == pytest.approx(sum(abs(float(weight[i, j])) * norm for i in range(3)), rel=1e-5)


def test_structured_magnitude_scores_are_column_l2_norms():
    weight = _random(3, 4, seed=8)
    norms = column_norms(weight)
    for j in range(4):
        assert norms[j].item() == pytest.approx(math.sqrt(sum(float(weight[i, j]) ** 2 for i in range(3))), rel=1e-6)


def test_bias_compensation_keeps_the_output_on_the_calibration_mean():
    """Closed form: with the removed columns zeroed and b' = b + W[:, removed] @ mean, the layer's output on the
    calibration mean is the dense layer's."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4).double()
    tokens = _random(30, 6, seed=9) + 2
    moments = ChannelMoments()
    moments.update(tokens)
    removed = torch.tensor([True, False, True, True, False, False])
    dense_output = layer(moments.mean)
    with torch.no_grad():
        compensation = bias_compensation(layer.weight, moments.mean, removed)
        for i in range(4):  # the loop form of W[:, removed] @ mean
            assert compensation[i].item() == pytest.approx(
                sum(float(layer.weight[i, j]) * float(moments.mean[j]) for j in range(6) if removed[j]), rel=1e-12)
        layer.bias += compensation
        layer.weight[:, removed] = 0
    assert torch.allclose(layer(moments.mean), dense_output, rtol=0, atol=1e-12)
    assert not torch.allclose(layer(tokens[0]), torch.nn.Linear(6, 4).double()(tokens[0]))  # (not a trivial layer)


def _brute_force_global(head_scores, neuron_scores, head_cost, neuron_cost, target):
    """The definition, unit by unit: in increasing score (ties: heads, then neurons, each by flat index), remove while
    the removed MACs are below the target, skipping a block's last head unit or last neuron."""
    units = [(float(head_scores[l, u]), 0, l * head_scores.shape[1] + u, "head", l, u)
             for l in range(head_scores.shape[0]) for u in range(head_scores.shape[1])]
    units += [(float(neuron_scores[l, n]), 1, l * neuron_scores.shape[1] + n, "neuron", l, n)
              for l in range(neuron_scores.shape[0]) for n in range(neuron_scores.shape[1])]
    heads = torch.ones_like(head_scores, dtype=torch.bool)
    neurons = torch.ones_like(neuron_scores, dtype=torch.bool)
    removed = 0
    for _, _, _, kind, layer, index in sorted(units):
        if removed >= target:
            break
        keep = heads if kind == "head" else neurons
        if keep[layer].sum() == 1:
            continue
        keep[layer, index] = False
        removed += head_cost if kind == "head" else neuron_cost
    return heads, neurons, removed


@pytest.mark.parametrize("seed", range(6))
def test_global_selection_meets_the_target_with_the_shortest_prefix(seed):
    heads, neurons = _random(3, 2, seed=seed), _random(3, 5, seed=seed + 100)
    if seed == 0:
        neurons[1, 2] = neurons[0, 4] = heads[2, 0]  # ties across kinds and blocks
    head_cost, neuron_cost = 7, 2
    dense = 3 * (2 * head_cost + 5 * neuron_cost)
    for sparsity in (0.0, 0.1, 0.35, 0.6):
        target = sparsity * dense
        chosen = global_selection(heads, neurons, head_cost, neuron_cost, target)
        expected = _brute_force_global(heads, neurons, head_cost, neuron_cost, target)
        assert torch.equal(chosen.head_keep, expected[0]) and torch.equal(chosen.neuron_keep, expected[1])
        removed = int((~chosen.head_keep).sum()) * head_cost + int((~chosen.neuron_keep).sum()) * neuron_cost
        assert chosen.removed_cost == removed == expected[2] >= target
        costs = [head_cost] * int((~chosen.head_keep).sum()) + [neuron_cost] * int((~chosen.neuron_keep).sum())
        if costs:  # the shortest prefix: without its last unit it would fall short
            last = max(torch.cat([heads[~chosen.head_keep], neurons[~chosen.neuron_keep]]).tolist())
            last_cost = head_cost if last in heads[~chosen.head_keep].tolist() else neuron_cost
            assert removed - last_cost < target
        assert (chosen.head_keep.sum(dim=1) >= 1).all() and (chosen.neuron_keep.sum(dim=1) >= 1).all()


def test_global_selection_keeps_each_blocks_last_unit_and_refuses_an_unreachable_target():
    heads = torch.tensor([[0.0, 0.1], [5.0, 6.0]])  # head units cost 4 MACs
    neurons = torch.tensor([[-9.0, -8.0, -7.0], [9.0, 9.0, 9.0]])  # neurons cost 1
    # in score order: -9 and -8 go (2), -7 is block 0's last neuron, 0.0 goes (6), 0.1 is block 0's last head unit,
    # 5.0 goes (10 >= 7)
    chosen = global_selection(heads, neurons, 4, 1, 7)
    assert chosen.neuron_keep.tolist() == [[False, False, True], [True, True, True]]
    assert chosen.head_keep.tolist() == [[False, True], [False, True]] and chosen.removed_cost == 10
    assert global_selection(heads, neurons, 4, 1, 12).removed_cost == 12  # all but the last units: 2 x (4 + 2)
    with pytest.raises(ValueError, match="keeps one head unit and one neuron: at most 12 can go"):
        global_selection(heads, neurons, 4, 1, 13)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.7])
def test_uniform_selection_removes_the_same_share_of_every_block(sparsity):
    heads, neurons = _random(3, 4, seed=11), _random(3, 10, seed=12)
    head_cost, neuron_cost = 9, 2
    chosen = uniform_selection(heads, neurons, head_cost, neuron_cost, sparsity)
    block = 4 * head_cost + 10 * neuron_cost
    # the reference's truncated share of heads, one more while 9 of 10 neurons cannot make up the rest; then the fewest
    # neurons that bring the block to its share, by counting up
    removed_heads = int(sparsity * 4)
    while removed_heads * head_cost + 9 * neuron_cost < sparsity * block:
        removed_heads += 1
    removed_neurons = next(n for n in range(11) if removed_heads * head_cost + n * neuron_cost >= sparsity * block)
    assert removed_heads == {0.0: 0, 0.2: 0, 0.5: 2, 0.7: 3}[sparsity]  # (0.7: 2 heads + 9 neurons fall short)
    for layer in range(3):
        assert int((~chosen.head_keep[layer]).sum()) == removed_heads
        assert int((~chosen.neuron_keep[layer]).sum()) == removed_neurons
        # the removed ones are the block's lowest
        for keep, scores in ((chosen.head_keep[layer], heads[layer]), (chosen.neuron_keep[layer], neurons[layer])):
            if (~keep).any() and keep.any():
                assert scores[~keep].max() < scores[keep].min()
    assert chosen.removed_cost == 3 * (removed_heads * head_cost + removed_neurons * neuron_cost) >= sparsity * 3 * block


def test_uniform_selection_refuses_a_share_the_last_units_cannot_give():
    with pytest.raises(ValueError, match="lower target_sparsity"):
        uniform_selection(torch.zeros(2, 1), torch.zeros(2, 3), 10, 1, 0.9)
