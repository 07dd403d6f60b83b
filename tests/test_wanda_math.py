"""Wanda scores, accumulator and masks against brute force, closed forms and INC 3.7.1's prune_wanda."""

import copy
import itertools
import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inc_plugins.algorithms.dsnot import InputFeatureMoments
from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms import wanda as wanda_module
from inc_plugins.algorithms.global_ranking import GlobalRanking
from inc_plugins.algorithms.wanda import (
    InputFeatureNorms,
    global_masks,
    per_layer_mask,
    per_output_mask,
    rows_mask,
    variant_mask,
    wanda_scores,
)


def _random_scores(rows, cols, seed):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- brute-force references, written with plain Python sorting (key = (score, index): lower index first) ---


def _brute_per_output(scores, sparsity):
    keep = np.ones(scores.shape, dtype=bool)
    num_pruned = int(scores.shape[1] * sparsity)
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:num_pruned]:
            keep[i, j] = False
    return keep


def _brute_lowest_overall(values, num_pruned):
    keep = [True] * len(values)
    for k in sorted(range(len(values)), key=lambda k: (values[k], k))[:num_pruned]:
        keep[k] = False
    return keep


def _brute_nm(scores, n, m):
    """Enumerate every choice of n pruned positions per group; the smallest pruned sum wins (first on ties)."""
    keep = np.ones(scores.shape, dtype=bool)
    for i, row in enumerate(scores.tolist()):
        for start in range(0, len(row), m):
            group = row[start : start + m]
            best = min(itertools.combinations(range(m), n), key=lambda pruned: sum(group[p] for p in pruned))
            for p in best:
                keep[i, start + p] = False
    return keep


def _brute_variant(scores, alpha):
    """Per row in float64: prune the ascending prefix whose running sum stays <= alpha * row sum."""
    keep = np.ones(scores.shape, dtype=bool)
    for i, row in enumerate(scores.double().tolist()):
        budget, running = alpha * sum(row), 0.0
        for j in sorted(range(len(row)), key=lambda j: row[j]):
            running += row[j]
            if running > budget:
                break
            keep[i, j] = False
    return keep


# --- accumulator and scores ---


def test_accumulator_is_squared_norm_over_all_tokens_divided_by_samples():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(samples, 4, 6, generator=generator) * 3 for samples in (5, 1, 12)]  # [samples, tokens, j]
    norms = InputFeatureNorms()
    for batch in batches:
        norms.update(batch.to(torch.bfloat16).reshape(-1, 6), num_samples=batch.shape[0])
    every_token = torch.cat([batch.to(torch.bfloat16).reshape(-1, 6) for batch in batches]).double()
    assert norms.num_samples == 18
    assert norms.squared_norms.dtype == torch.float32
    torch.testing.assert_close(norms.squared_norms.double(), every_token.square().sum(dim=0) / 18, rtol=1e-6, atol=0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_accumulator_is_bit_identical_to_inc_statistic(batch_size):
    from neural_compressor.compression.pruner.wanda.wrapper import WrappedGPT

    generator = torch.Generator().manual_seed(1)
    # Uneven magnitudes make float32 rounding depend on the order of operations.
    batches = [torch.randn(batch_size, 7, 5, generator=generator) * 10.0 ** (i - 2) for i in range(5)]
    inc = WrappedGPT(torch.nn.Linear(5, 4))
    ours = InputFeatureNorms()
    for batch in batches:
        inc.add_batch(batch, None)
        ours.update(batch.reshape(-1, 5), num_samples=batch.shape[0])
    assert torch.equal(ours.squared_norms, inc.scaler_row)


def test_accumulator_errors():
    norms = InputFeatureNorms()
    with pytest.raises(RuntimeError, match="no activations"):
        norms.squared_norms
    norms.update(torch.ones(2, 3), num_samples=1)
    with pytest.raises(ValueError, match="3"):
        norms.update(torch.ones(2, 4), num_samples=1)
    with pytest.raises(ValueError, match=r"\[tokens, in_features\]"):
        norms.update(torch.ones(2, 3, 1), num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        norms.update(torch.ones(2, 3), num_samples=0)


def test_wanda_scores_closed_form():
    weight = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]], dtype=torch.bfloat16)
    scores = wanda_scores(weight, torch.tensor([4.0, 9.0, 0.0]))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[2.0, 6.0, 0.0], [6.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"\[in_features\] = \[3\]"):
        wanda_scores(weight, torch.ones(2))


# --- masks against brute force ---


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_per_output_matches_brute_force_and_keeps_same_count_per_row(sparsity):
    scores = _random_scores(7, 10, seed=2)
    keep = per_output_mask(scores, sparsity)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    np.testing.assert_array_equal(keep.numpy(), _brute_per_output(scores, sparsity))
    assert (keep.sum(dim=1) == 10 - int(10 * sparsity)).all()


def test_per_output_rounds_pruned_count_like_the_reference():
    # 100 * 0.29 == 28.999999999999996 in floating point: the reference's int() prunes 28, not 29.
    keep = per_output_mask(_random_scores(3, 100, seed=3), 0.29)
    assert (keep.logical_not().sum(dim=1) == 28).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 8),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75]),
    data=st.data(),
)
def test_per_output_and_per_layer_match_brute_force_with_many_ties(rows, cols, sparsity, data):
    values = data.draw(st.lists(st.integers(0, 3), min_size=rows * cols, max_size=rows * cols))
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    np.testing.assert_array_equal(per_output_mask(scores, sparsity).numpy(), _brute_per_output(scores, sparsity))
    expected_layer = _brute_lowest_overall(values, int(rows * cols * sparsity))
    assert per_layer_mask(scores, sparsity).flatten().tolist() == expected_layer


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_per_layer_matches_brute_force_and_overall_count(sparsity):
    scores = _random_scores(5, 6, seed=4)
    keep = per_layer_mask(scores, sparsity)
    assert keep.flatten().tolist() == _brute_lowest_overall(scores.flatten().tolist(), int(30 * sparsity))
    assert keep.logical_not().sum().item() == int(30 * sparsity)


def test_global_keeps_the_top_scores_across_layers():
    scores = {
        "a": _random_scores(3, 4, seed=5),
        "b": _random_scores(2, 6, seed=6) + 0.5,
        "c": _random_scores(4, 2, seed=7),
    }
    masks = global_masks(scores, 0.5)
    assert list(masks) == ["a", "b", "c"]
    assert all(masks[name].shape == scores[name].shape for name in scores)
    flat = [value for name in scores for value in scores[name].flatten().tolist()]
    assert [bit for name in masks for bit in masks[name].flatten().tolist()] == _brute_lowest_overall(flat, 16)
    kept = torch.cat([scores[name][masks[name]] for name in scores])
    pruned = torch.cat([scores[name][~masks[name]] for name in scores])
    assert kept.numel() == 16 and kept.min() > pruned.max()
    # Layers are not pruned evenly: "b" is shifted up, so it keeps more than half.
    assert masks["b"].float().mean() > 0.5


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (3, 4)])
def test_nm_matches_enumeration_and_keeps_m_minus_n_per_group(n, m):
    scores = _random_scores(5, 2 * m, seed=8)
    keep = nm_mask(scores, n, m)
    np.testing.assert_array_equal(keep.numpy(), _brute_nm(scores, n, m))
    assert (keep.reshape(5, 2, m).sum(dim=2) == m - n).all()


@pytest.mark.parametrize(("seed", "sparsity"), [(9, 0.3), (10, 0.5), (11, 0.6)])
def test_variant_reaches_target_and_prunes_cumulative_prefix(seed, sparsity):
    scores = _random_scores(16, 40, seed=seed) ** 2
    keep, alpha = variant_mask(scores, sparsity)
    assert abs(keep.logical_not().float().mean().item() - sparsity) <= 0.001
    assert 0.0 < alpha < 0.8
    np.testing.assert_array_equal(keep.numpy(), _brute_variant(scores, alpha))
    # Rows are pruned unevenly (that is the variant's point), unlike per_output.
    assert len(set(keep.sum(dim=1).tolist())) > 1


def test_variant_sparsity_zero_keeps_everything():
    keep, alpha = variant_mask(_random_scores(3, 4, seed=12), 0.0)
    assert keep.all() and alpha == 0.0


def test_variant_raises_when_target_is_unreachable():
    # Equal scores: any alpha prunes a whole row or nothing, so 0.5 is out of reach.
    with pytest.raises(ValueError, match="could not reach sparsity 0.5"):
        variant_mask(torch.ones(4, 8), 0.5)


# --- ties: documented rule, lower index pruned first (stable sort), N:M as INC's topk; variant prunes all ties ---


def test_ties_prune_lower_index_first():
    equal = torch.ones(2, 4)
    assert per_output_mask(equal, 0.5).tolist() == [[False, False, True, True]] * 2
    assert per_layer_mask(equal, 0.5).tolist() == [[False, False, False, False], [True, True, True, True]]
    masks = global_masks({"first": torch.ones(1, 2), "second": torch.ones(1, 2)}, 0.5)
    assert masks["first"].tolist() == [[False, False]] and masks["second"].tolist() == [[True, True]]


def test_variant_prunes_every_score_tied_with_its_threshold():
    # Row sum 10, alpha 0.4: the prefix with running sum <= 4 is [1, 2]; its last score 2 is the threshold and
    # the other 2 goes too, so 3 of 4 are pruned (a prefix-only rule would prune 2).
    keep, alpha = variant_mask(torch.tensor([[1.0, 2.0, 2.0, 5.0]]), 0.75)
    assert alpha == 0.4
    assert keep.tolist() == [[False, False, False, True]]


def test_variant_prefix_includes_a_running_sum_equal_to_the_budget():
    # Row sum 10, alpha 0.4: budget 4 equals the running sum 1 + 3, so both are pruned (<=, not <).
    keep, alpha = variant_mask(torch.tensor([[1.0, 3.0, 6.0]]), 2 / 3)
    assert alpha == 0.4
    assert keep.tolist() == [[False, False, True]]


def test_variant_row_with_empty_prefix_keeps_everything():
    # At alpha 0.2 the first row's budget 0.8 is below its smallest score; the reference would index -1 there.
    keep, alpha = variant_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 100.0]]), 0.375)
    assert alpha == 0.2
    assert keep.tolist() == [[True, True, True, True], [False, False, False, True]]


# --- bad input ---


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, True, "0.5"])
@pytest.mark.parametrize(
    "make_mask",
    [
        lambda s: per_output_mask(torch.ones(2, 4), s),
        lambda s: per_layer_mask(torch.ones(2, 4), s),
        lambda s: global_masks({"a": torch.ones(2, 4)}, s),
        lambda s: variant_mask(torch.ones(2, 4), s),
    ],
)
def test_sparsity_outside_unit_interval_raises(make_mask, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        make_mask(sparsity)


def test_nm_rejects_bad_shapes_and_patterns():
    with pytest.raises(ValueError, match=r"multiple of 4.*shape \[3, 10\]"):
        nm_mask(torch.ones(3, 10), 2, 4)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.ones(3, 8), 4, 4)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.ones(3, 8), 0, 4)
    with pytest.raises(ValueError, match="integer"):
        nm_mask(torch.ones(3, 8), 2.0, 4)


def test_global_rejects_empty_mapping():
    with pytest.raises(ValueError, match="at least one layer"):
        global_masks({}, 0.5)


# --- equality with INC 3.7.1's prune_wanda on a tiny one-block model ---


class _Block(torch.nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, hidden)
        self.fc2 = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _TinyModel(torch.nn.Module):
    """The least prune_wanda needs: a config with use_cache and a ModuleList of blocks (one, of these widths)."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.config = types.SimpleNamespace(use_cache=False)
        self.layers = torch.nn.ModuleList([_Block(width, hidden)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _statistics_and_inc_masks(model, inputs, **inc_kwargs):
    """Per Linear of the block, our accumulators on its inputs ({name: (InputFeatureNorms, InputFeatureMoments)}),
    and the zeros INC's prune_wanda(**inc_kwargs) leaves in a copy ({name: mask})."""
    from neural_compressor.compression.pruner.wanda.prune import prune_wanda

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=2
    )
    block = model.layers[0]
    statistics = {name: (InputFeatureNorms(), InputFeatureMoments()) for name in ("fc1", "fc2")}

    def record(args, name):
        rows = args[0].reshape(-1, args[0].shape[-1])
        for accumulator in statistics[name]:
            accumulator.update(rows, num_samples=args[0].shape[0])

    hooks = [getattr(block, name).register_forward_hook(lambda module, args, output, name=name: record(args, name))
             for name in statistics]
    with torch.no_grad():
        for batch, _ in loader:
            model(batch)
    for hook in hooks:
        hook.remove()
    pruned = copy.deepcopy(model)
    prune_wanda(pruned, loader, **inc_kwargs)
    return statistics, {name: getattr(pruned.layers[0], name).weight != 0 for name in statistics}


def _our_masks_and_inc_masks(model, inputs, make_mask, **inc_kwargs):
    """Our masks from our accumulator on the block's Linear inputs, and the zeros INC leaves in a copy."""
    statistics, inc = _statistics_and_inc_masks(model, inputs, **inc_kwargs)
    block = model.layers[0]
    ours = {name: make_mask(wanda_scores(getattr(block, name).weight, norms.squared_norms))
            for name, (norms, _) in statistics.items()}
    return ours, inc


@pytest.mark.parametrize(
    ("make_mask", "inc_kwargs"),
    [
        (lambda s: per_output_mask(s, 0.5), dict(sparsity_ratio=0.5)),
        (lambda s: per_output_mask(s, 0.3), dict(sparsity_ratio=0.3)),
        (lambda s: nm_mask(s, 2, 4), dict(sparsity_ratio=0.5, prune_n=2, prune_m=4)),
        (lambda s: nm_mask(s, 1, 4), dict(sparsity_ratio=0.25, prune_n=1, prune_m=4)),
        (lambda s: variant_mask(s, 0.5)[0], dict(sparsity_ratio=0.5, use_variant=True)),
    ],
    ids=["per_output_0.5", "per_output_0.3", "nm_2:4", "nm_1:4", "variant_0.5"],
)
def test_masks_equal_inc_prune_wanda(make_mask, inc_kwargs):
    torch.manual_seed(13)
    model = _TinyModel()
    ours, inc = _our_masks_and_inc_masks(model, torch.randn(6, 5, 8), make_mask, **inc_kwargs)
    for name in ours:
        assert torch.equal(ours[name], inc[name]), name


def test_nm_ties_break_like_inc():
    torch.manual_seed(15)
    model = _TinyModel()
    with torch.no_grad():
        # Two magnitudes, no zeros (INC's mask is read back as weight != 0), inputs of +-1: many exact ties.
        signs = torch.randint(0, 2, (16, 8)) * 2 - 1
        model.layers[0].fc1.weight.copy_(torch.randint(1, 3, (16, 8)) * signs / 4)
    inputs = torch.randint(0, 2, (6, 5, 8)).float() * 2 - 1
    ours, inc = _our_masks_and_inc_masks(
        model, inputs, lambda s: nm_mask(s, 2, 4), sparsity_ratio=0.5, prune_n=2, prune_m=4
    )
    assert torch.equal(ours["fc1"], inc["fc1"])
    # The ties decide the mask here: the lower-index-first rule of the other comparison groups gives another one.
    scores = model.layers[0].fc1.weight.detach().abs().reshape(16, 2, 4)
    lower_index_first = torch.ones_like(scores, dtype=torch.bool)
    lower_index_first.scatter_(2, torch.sort(scores, dim=2, stable=True).indices[..., :2], False)
    assert not torch.equal(lower_index_first.reshape(16, 8), inc["fc1"])


def test_per_output_ties_break_like_inc():
    torch.manual_seed(14)
    model = _TinyModel()
    with torch.no_grad():
        # Few distinct magnitudes and inputs of +-1 (equal statistics for every feature): many exact ties.
        model.layers[0].fc1.weight.copy_(torch.randint(-2, 3, (16, 8)) / 4)
    inputs = torch.randint(0, 2, (6, 5, 8)).float() * 2 - 1
    ours, inc = _our_masks_and_inc_masks(model, inputs, lambda s: per_output_mask(s, 0.5), sparsity_ratio=0.5)
    assert torch.equal(ours["fc1"], inc["fc1"])
    # The ties decide the mask here: breaking them the other way (higher index first) gives another one.
    weight = model.layers[0].fc1.weight.detach().abs()
    assert not torch.equal(per_output_mask(weight.flip(1), 0.5).flip(1), inc["fc1"])


def test_per_row_masks_are_the_same_in_row_chunks(monkeypatch):
    """The per-row masks sort ROW_CHUNK rows at a time (memory); chunks must not change a mask, ties included."""
    scores = torch.randint(0, 5, (7, 12), generator=torch.Generator().manual_seed(0)).float()  # many ties
    counts = torch.tensor([0, 12, 3, 5, 6, 1, 11])
    whole = per_output_mask(scores, 0.5), rows_mask(scores, counts)
    monkeypatch.setattr(wanda_module, "ROW_CHUNK", 2)
    assert torch.equal(per_output_mask(scores, 0.5), whole[0]) and torch.equal(rows_mask(scores, counts), whole[1])


def test_norms_kept_per_batch_combine_to_one_process_bits():
    """Across processes, rank r holds batches r, r + P, ...: replaying their kept batches in turn gives the norms of one
    process that saw every batch, bit for bit (a weighted mean of the ranks' norms only comes close)."""
    batches = [torch.randn(5 + i, 7, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    one = InputFeatureNorms()
    for rows in batches:
        one.update(rows, 2)
    parts = [InputFeatureNorms(keep_batches=True) for _ in range(3)]
    for index, rows in enumerate(batches):
        parts[index % 3].update(rows, 2)
    replayed = InputFeatureNorms.combined(parts)
    assert torch.equal(replayed.squared_norms, one.squared_norms) and replayed.num_samples == one.num_samples == 14
    for part in parts:
        part.batches = None  # without kept batches: the weighted mean, equal up to rounding
    assert torch.allclose(InputFeatureNorms.combined(parts).squared_norms, one.squared_norms, rtol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.001, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("values", ["continuous", "ties"])
def test_global_ranking_gives_global_masks_counts(sparsity, values):
    """Two passes over the layers (in another order than the ranking's) give global_masks's per-layer counts; small
    integers make many ties with the threshold, which go to the earlier layers first."""
    generator = torch.Generator().manual_seed(7)
    shapes = {"a": (3, 40), "b": (17, 5), "c": (1, 1), "d": (8, 64)}
    if values == "ties":
        scores = {name: torch.randint(0, 4, shape, generator=generator).float() for name, shape in shapes.items()}
    else:
        scores = {name: torch.rand(shape, generator=generator) * 10 ** torch.randint(-8, 8, shape, generator=generator)
                  for name, shape in shapes.items()}
    ranking = GlobalRanking(sparsity)
    for name in ["d", "b", "a", "c"]:
        ranking.add_coarse(name, scores[name])
    for name in ["c", "a", "d", "b"]:
        ranking.add_fine(name, scores[name])
    expected = {name: int((~mask).sum()) for name, mask in global_masks(scores, sparsity).items()}
    assert ranking.pruned_counts(list(scores)) == expected


def test_global_ranking_refuses_what_it_cannot_rank():
    ranking = GlobalRanking(0.5)
    with pytest.raises(ValueError, match="scores >= 0 without NaN"):
        ranking.add_coarse("a", torch.tensor([[1.0, -2.0]]))
    ranking.add_coarse("a", torch.ones(2, 2))
    with pytest.raises(ValueError, match="layer 'a' was added twice"):
        ranking.add_coarse("a", torch.ones(2, 2))
    with pytest.raises(ValueError, match="layer 'b' is not the one the first pass saw"):
        ranking.add_fine("b", torch.ones(2, 2))
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        GlobalRanking(1.0)
