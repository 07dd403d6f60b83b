"""width_multiple of mask_search: FFN widths in multiples of m, searched over blocks of m ranked neurons (brute force
over every such mask on tiny inputs), kept through rearrangement and tuning, and chosen from synthetic staircase
latency tables with known answers."""

import itertools
import math

import pytest
import torch

import inc_plugins
from inc_plugins.algorithms.mask_search import search_masks_under_latency, search_masks_under_unit_costs
from inc_plugins.algorithms.neuron_blocks import (
    neuron_blocks,
    search_blocks_under_latency,
    search_blocks_under_unit_costs,
)
from inc_plugins.perf.latency_table import LatencyTable
from inc_plugins.perf.width_choice import choose_width_multiple
from inc_plugins.plugin_settings import PruningConfigError
from inc_plugins.post_training import KwonSettings, current_machine, prune_post_training
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier

N_LAYERS, N_HEADS, N_NEURONS, MULTIPLE = 2, 2, 6, 2
PER_HEAD, PER_NEURON = 5.0, 1.0


def block_granular_masks():
    """Every (head bits, neuron bits) whose per-layer neuron count is a multiple of MULTIPLE: not only prefixes."""
    layer_sets = [bits for bits in itertools.product((0, 1), repeat=N_NEURONS) if sum(bits) % MULTIPLE == 0]
    heads = torch.tensor(list(itertools.product((0, 1), repeat=N_LAYERS * N_HEADS)), dtype=torch.float64)
    neurons = torch.tensor([sum(layers, ()) for layers in itertools.product(layer_sets, repeat=N_LAYERS)],
                           dtype=torch.float64)
    return heads, neurons


HEAD_MASKS, NEURON_MASKS = block_granular_masks()


def random_importance(seed, integers=False):
    generator = torch.Generator().manual_seed(seed)
    if integers:  # small integers: many ties between units and between blocks
        return (torch.randint(0, 3, (N_LAYERS, N_HEADS), generator=generator).double(),
                torch.randint(0, 3, (N_LAYERS, N_NEURONS), generator=generator).double())
    return torch.rand(N_LAYERS, N_HEADS, generator=generator) * 6, torch.rand(N_LAYERS, N_NEURONS, generator=generator)


@pytest.mark.parametrize("seed", range(12))
def test_block_search_is_optimal_over_every_mask_with_multiple_widths(seed):
    head_importance, neuron_importance = random_importance(seed, integers=seed % 2 == 1)
    dense = N_LAYERS * (N_HEADS * PER_HEAD + N_NEURONS * PER_NEURON)
    head_value = HEAD_MASKS @ head_importance.flatten().double()
    neuron_value = NEURON_MASKS @ neuron_importance.flatten().double()
    head_cost, neuron_cost = HEAD_MASKS.sum(1) * PER_HEAD, NEURON_MASKS.sum(1) * PER_NEURON
    for fraction in (0.0, 0.13, 0.4, 0.55, 0.8, 1.0):
        budget = fraction * dense
        head_mask, neuron_mask = search_blocks_under_unit_costs(head_importance, neuron_importance, budget, PER_HEAD,
                                                                PER_NEURON, MULTIPLE)
        assert (neuron_mask.sum(1) % MULTIPLE == 0).all()
        assert head_mask.sum() * PER_HEAD + neuron_mask.sum() * PER_NEURON <= budget
        fits = (head_cost[:, None] + neuron_cost[None, :]) <= budget
        best = (head_value[:, None] + neuron_value[None, :])[fits].max()
        found = head_importance.double()[head_mask].sum() + neuron_importance.double()[neuron_mask].sum()
        assert float(found) == pytest.approx(float(best), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_a_multiple_of_one_gives_the_unit_searches_masks(seed):
    head_importance, neuron_importance = random_importance(seed, integers=seed % 2 == 0)
    for budget in (3.0, 11.5, 20.0):
        assert all(torch.equal(a, b) for a, b in zip(
            search_blocks_under_unit_costs(head_importance, neuron_importance, budget, PER_HEAD, PER_NEURON, 1),
            search_masks_under_unit_costs(head_importance, neuron_importance, budget, PER_HEAD, PER_NEURON)))
    head_lut, neuron_lut = torch.tensor([0.5, 2.0, 2.5]), torch.tensor([0.0, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    for budget in (2.0, 4.0, 7.0):
        assert all(torch.equal(a, b) for a, b in zip(
            search_blocks_under_latency(head_importance, neuron_importance, budget, head_lut, neuron_lut, 1),
            search_masks_under_latency(head_importance, neuron_importance, budget, head_lut, neuron_lut)))


def test_latency_search_over_blocks_fits_the_table_at_multiple_widths():
    head_importance, neuron_importance = random_importance(3)
    head_lut = torch.tensor([0.5, 2.0, 2.5])
    neuron_lut = torch.tensor([0.0, 1.0, 1.0, 1.6, 1.6, 2.2, 2.2])  # a staircase of 2: odd widths cost the even above
    for budget in (1.5, 4.0, 6.3, 9.4):
        head_mask, neuron_mask = search_blocks_under_latency(head_importance, neuron_importance, budget, head_lut,
                                                             neuron_lut, 2)
        assert (neuron_mask.sum(1) % 2 == 0).all()
        assert float(head_lut[head_mask.sum(1)].sum() + neuron_lut[neuron_mask.sum(1)].sum()) <= budget


def test_blocks_are_consecutive_importance_ranks_with_non_increasing_sums():
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 2.0, 0.0]])
    blocks = neuron_blocks(importance, 2)
    assert blocks.members.tolist() == [[[1, 2], [3, 0]], [[2, 0], [1, 3]]]
    assert torch.allclose(blocks.importance, torch.tensor([[1.4, 0.4], [3.0, 1.0]], dtype=torch.float64))
    assert blocks.neuron_mask(torch.tensor([[True, False], [False, False]])).tolist() == [
        [False, True, True, False], [False, False, False, False]]


@pytest.mark.parametrize("multiple", [0, 4, 7, True])
def test_a_multiple_that_does_not_divide_the_width_is_refused(multiple):
    with pytest.raises(ValueError, match=r"width_multiple=.* must be an int >= 1 that divides the FFN width 6 "
                                         r"\(e\.g\. 1, 2\)"):
        neuron_blocks(torch.ones(2, 6), multiple)


# --- choosing the multiple from a table measured at every width ----------------------------------------------------


def synthetic_table(latency, widths=range(0, 1537), n_neurons=1536, raw=None):
    """A synthetic table: ``latency(w)`` seconds for w FFN neurons, timed at ``widths``."""
    values = [0.0] + [latency(w) for w in range(1, n_neurons + 1)]
    return LatencyTable([0.1, 0.2], values, {}, {}, [], list(widths),
                        [raw(w) if w else 0.0 for w in widths] if raw else [])


def staircase(step, fixed=1e-4, per_neuron=1e-6):
    return lambda w: fixed + per_neuron * step * math.ceil(w / step)


NARROW, WHOLE = range(32, 300), range(0, 1537)


@pytest.mark.parametrize(("latency", "widths", "expected"), [
    (lambda w: 1e-4 + 1e-6 * w, WHOLE, 1),  # linear: no width is cheaper than the line through its neighbours
    (lambda w: 1e-4 + 1e-6 * w, NARROW, 1),
    (staircase(64), WHOLE, 64),
    (staircase(64), NARROW, 64),
    (staircase(16), NARROW, 16),             # 32 and 64 are multiples of 16, but no better than it
    (staircase(8), NARROW, 8),
    (staircase(8), WHOLE, 1),                # half a step of 8 is under 1% of most of these widths' latency
    (staircase(64, fixed=1e-2), NARROW, 1),  # a step worth under 1% of the latency does not pay
])
def test_auto_picks_the_step_of_synthetic_staircase_tables(latency, widths, expected):
    assert choose_width_multiple(synthetic_table(latency, widths)).multiple == expected


def test_auto_reads_the_medians_before_the_nondecreasing_fit():
    # timed: every width off a multiple of 32 is 20% slower than the next multiple; the fitted table is a line
    raw = lambda w: (1e-4 + 1e-6 * w) * (1.0 if w % 32 == 0 else 1.2)  # noqa: E731
    table = synthetic_table(lambda w: 1e-4 + 1e-6 * w, widths=range(16, 240), raw=raw)
    choice = choose_width_multiple(table)
    assert choice.multiple == 32 and choice.widths == (16, 239)
    assert choose_width_multiple(synthetic_table(lambda w: 1e-4 + 1e-6 * w, widths=range(16, 240))).multiple == 1


def test_a_table_not_measured_at_every_width_is_refused():
    every_64th = synthetic_table(staircase(64), widths=range(0, 1537, 64))
    with pytest.raises(ValueError, match=r"needs a latency table measured at every FFN width of a run of at least 129 "
                                         r"\(`python -m inc_plugins.latency_table measure --neuron-widths 32:288`\); "
                                         r"this one's longest run of consecutive measured widths holds 1"):
        choose_width_multiple(every_64th)


# --- through the pipeline and the settings -------------------------------------------------------------------------


def test_the_pipeline_keeps_multiple_widths_through_rearrangement_and_tuning():
    model, batches = tiny_bert_classifier(), token_batches(3, 4, 12, seed=0, labels="classification")
    searched = prune_post_training(model, batches, KwonSettings(0.45, width_multiple=16, rearrange=False, tune=False))
    full = prune_post_training(model, batches, KwonSettings(0.45, width_multiple=16, check_steps=False))
    assert full.width_multiple == 16 and full.tuning is not None
    kept = (full.neuron_mask != 0).sum(1)
    assert ((kept % 16) == 0).all() and 0 < kept.sum() < 2 * 64
    assert torch.equal(kept, (searched.neuron_mask != 0).sum(1))
    assert not torch.equal(full.neuron_mask != 0, searched.neuron_mask != 0)  # rearrangement moved neurons


def test_the_key_reaches_the_search_through_an_inc_config_entry():
    model, batches = tiny_bert_classifier(), token_batches(2, 4, 12, seed=0, labels="classification")
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "mask_search", "target_sparsity": 0.3, "width_multiple": 32, "tune": False}])
    result = inc_plugins.prepare_pruning(model, config, dataloader=batches).result
    assert result.width_multiple == 32 and ((result.neuron_mask != 0).sum(1) % 32 == 0).all()


def test_auto_reads_the_latency_table_also_under_the_flops_constraint():
    model, batches = tiny_bert_classifier(), token_batches(2, 4, 12, seed=0, labels="classification")
    table = LatencyTable([0.0, 1.0, 1.5, 2.0, 2.5], [0.0] + [staircase(8, fixed=1e-5)(w) for w in range(1, 65)],
                         current_machine("eager"), {}, [], list(range(65)))
    result = prune_post_training(model, batches, KwonSettings(0.4, width_multiple="auto", latency_table=table,
                                                              tune=False))
    assert result.width_multiple == 8 and ((result.neuron_mask != 0).sum(1) % 8 == 0).all()


def test_the_latency_constraint_searches_blocks_within_the_table_budget():
    model, batches = tiny_bert_classifier(), token_batches(2, 4, 12, seed=0, labels="classification")
    table = LatencyTable([0.0, 2.0, 2.5, 3.0, 3.5], [0.0] + [staircase(16, fixed=0.5, per_neuron=0.1)(w)
                                                            for w in range(1, 65)], current_machine("eager"))
    result = prune_post_training(model, batches, KwonSettings(0.5, constraint="latency", latency_table=table,
                                                              width_multiple=16, tune=False))
    kept_heads, kept_neurons = (result.unit_head_mask != 0).sum(1), (result.neuron_mask != 0).sum(1)
    assert result.width_multiple == 16 and (kept_neurons % 16 == 0).all()
    latency = float(table.head_latency[kept_heads].sum() + table.neuron_latency[kept_neurons].sum())
    assert latency == pytest.approx(result.cost) and latency <= 0.5 * 2 * (3.5 + 6.9) + 1e-9


@pytest.mark.parametrize(("value", "message"), [
    (0, r"^width_multiple must be an int in \[1, 65536\] that divides the FFN width, or 'auto' \(with a "
        r"latency_table\)$"),
    ("fast", r"^width_multiple must be an int in "),
    (True, r"^width_multiple must be an int in "),
    ("auto", r"width_multiple 'auto' needs latency_table"),
])
def test_bad_settings_get_one_line_naming_what_is_allowed(value, message):
    with pytest.raises(PruningConfigError, match=message):
        KwonSettings.from_config({"target_sparsity": 0.4, "width_multiple": value})


def test_a_multiple_wider_than_the_ffn_is_refused_before_the_fisher_pass():
    model, batches = tiny_bert_classifier(), token_batches(1, 2, 8, seed=0, labels="classification")
    with pytest.raises(ValueError, match=r"width_multiple=128 must be an int >= 1 that divides the FFN width 64"):
        prune_post_training(model, batches, KwonSettings(0.4, width_multiple=128))
