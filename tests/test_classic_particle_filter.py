"""Particle-filter structured pruning: patterns, the search, determinism, and the one-shot `particle_filter` type."""

import pytest
import torch
from neural_compressor.compression.pruner.pruners.base import PRUNERS
from torch import nn

import inc_plugins
from inc_plugins.algorithms.particle_filter import (
    ParticleFilterSettings,
    StructuredPattern,
    importance_weights,
    particle_filter_search,
    systematic_resample,
)
from inc_plugins.execution.misclassification import misclassification_rate
from inc_plugins.execution.particle_filter_search import particle_filter_prune
from inc_plugins.inc.particle_filter import ParticleFilterPruner, ParticleFilterPruning
from tests.fixtures.calibration_data import image_batches
from tests.fixtures.tiny_models import tiny_cnn

IMAGES = image_batches(n_batches=2, batch_size=8)
QUICK = {"num_particles": 3, "iterations": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**entry):
    return inc_plugins.pruning_config(pruning_configs=[entry])


# --- patterns ------------------------------------------------------------------------------------------------


def test_channel_and_kernel_patterns_zero_whole_structures():
    generator = torch.Generator().manual_seed(0)
    channel = StructuredPattern((6, 4, 3, 3), "channel", 0.5)
    mask = channel.mask(channel.random_state(generator))
    per_filter = mask.flatten(1)
    assert (per_filter.all(1) | ~per_filter.any(1)).all()  # each filter all kept or all pruned
    assert int((~per_filter.any(1)).sum()) == 3

    kernel = StructuredPattern((6, 4, 3, 3), "kernel", 0.25)
    mask = kernel.mask(kernel.random_state(generator))
    per_kernel = mask.flatten(2)
    assert (per_kernel.all(2) | ~per_kernel.any(2)).all()  # each 3x3 kernel all kept or all zero
    assert int((~per_kernel.any(2)).sum()) == int(0.25 * 24)


def test_intra_kernel_pattern_has_the_stride():
    pattern = StructuredPattern((5, 6, 3, 3), "intra_kernel", 0.4, stride=2)
    assert pattern.num_pruned == round(0.4 / 0.5 * 6)  # input channels given the strided pattern
    state = pattern.random_state(torch.Generator().manual_seed(1))
    mask = pattern.mask(state)
    for channel, offset in enumerate(state.tolist()):
        kernels = mask[:, channel].flatten(1)  # [out, 9]
        assert (kernels == kernels[0]).all()  # shared by all kernels reading this input channel
        if offset < 0:
            assert kernels.all()
        else:
            assert kernels[0].nonzero().flatten().tolist() == list(range(offset, 9, 2))
    # a 1-D state of offsets: perturbing keeps the count of strided channels
    moved = pattern.perturb(state, 0.5, torch.Generator().manual_seed(2))
    assert int((moved >= 0).sum()) == pattern.num_pruned
    with pytest.raises(ValueError, match="larger stride"):
        StructuredPattern((5, 6, 3, 3), "intra_kernel", 0.6, stride=2)
    with pytest.raises(ValueError, match="more than one weight"):
        StructuredPattern((5, 6, 1, 1), "intra_kernel", 0.3, stride=2)


def test_weighting_and_resampling():
    errors = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(importance_weights(errors, "linear", 1.0), torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    sharp = importance_weights(errors, "exp", 0.05)
    assert sharp[0] > 0.99
    indices = systematic_resample(torch.tensor([0.0, 1.0, 0.0]), torch.Generator().manual_seed(0))
    assert indices.tolist() == [1, 1, 1]


# --- the search ----------------------------------------------------------------------------------------------


def one_useless_channel_problem(classes=6):
    """A 1x1 conv copies input channel c to output channel c < classes; the last output channel copies
    channel 0 again but the classifier ignores it. Each example's label is its brightest channel, so pruning any
    useful channel misclassifies its class, and pruning the useless one costs nothing."""
    conv = nn.Conv2d(classes, classes + 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(classes):
            conv.weight[c, c] = 1.0
        conv.weight[classes, 0] = 1.0
    classifier = nn.Linear(classes + 1, classes, bias=False)
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.weight[:, :classes] = torch.eye(classes)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier).eval()
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat(4)
    images = 0.1 * torch.rand(len(labels), classes, 4, 4, generator=generator)
    images[torch.arange(len(labels)), labels] += 1.0
    return model, [(images, labels)]


def test_search_prunes_the_useless_channel():
    model, batches = one_useless_channel_problem(classes=12)
    assert misclassification_rate(model, batches) == 0.0
    settings = ParticleFilterSettings(num_particles=3, iterations=4, seed=0)
    (result,) = particle_filter_prune(model, {"0": model[0]}, batches, 1 / 13, "channel", settings).values()
    kept = result.mask.flatten(1).any(1)
    assert kept.tolist() == [True] * 12 + [False]
    assert result.error == 0.0
    best_per_generation = [best for best, _ in result.history]
    assert best_per_generation[0] > 0.0  # not found by the random start: found by the search
    assert best_per_generation == sorted(best_per_generation, reverse=True)  # elitism: never lost again
    assert (model[0].weight[12] == 0).all() and misclassification_rate(model, batches) == 0.0


def test_search_is_deterministic_with_a_seed():
    def run(seed):
        model, batches = one_useless_channel_problem()
        pattern = StructuredPattern(model[0].weight.shape, "kernel", 0.3)
        original = model[0].weight.detach().clone()

        def error(mask):
            with torch.no_grad():
                model[0].weight.copy_(original * mask)
            return misclassification_rate(model, batches)

        return particle_filter_search(error, pattern, ParticleFilterSettings(num_particles=4, iterations=3, seed=seed),
                                      torch.Generator().manual_seed(seed))

    first, second = run(7), run(7)
    assert torch.equal(first.state, second.state) and first.history == second.history
    assert first.error == min(best for best, _ in first.history)


# --- INC: one-shot particle_filter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, granularity, sparsity",
    [("1xchannel", None, 0.25), ("1x1", "kernel", 0.3), ("1x1", "intra_kernel", 0.4)],
)
def test_particle_filter_through_inc_on_tiny_cnn(pattern, granularity, sparsity):
    model = tiny_cnn()
    entry = {"pruning_type": "particle_filter", "target_sparsity": sparsity, "pattern": pattern, **QUICK}
    if granularity:
        entry["granularity"] = granularity
    pruning = inc_plugins.prepare_pruning(model, config(**entry), dataloader=IMAGES)
    assert isinstance(pruning, ParticleFilterPruning) and PRUNERS["pt_particle_filter"] is ParticleFilterPruner
    assert pruning.report is not None
    (pruner,) = pruning.pruners
    assert list(pruner.modules) == ["features.0.0", "features.1.0", "features.2.0"]
    for name, module in pruner.modules.items():
        assert torch.equal(pruner.masks[name], pruning.result.searches[name].mask)
        assert (module.weight[~pruner.masks[name]] == 0).all()
        if granularity is None:
            pruned = ~pruner.masks[name].flatten(1).any(1)
            assert int(pruned.sum()) == int(0.25 * module.out_channels)
            bn = model.get_submodule(name[:-1] + "1")
            assert (bn.weight[pruned] == 0).all() and (bn.bias[pruned] == 0).all()


def test_particle_filter_errors():
    unlabelled = [images for images, _ in IMAGES]
    with pytest.raises(inc_plugins.PruningConfigError, match="labelled"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="particle_filter", target_sparsity=0.25, pattern="1xchannel", **QUICK),
            dataloader=unlabelled,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="set granularity"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="particle_filter", target_sparsity=0.25, pattern="1x1"), dataloader=IMAGES
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="goes with pattern '1x1'"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="particle_filter", target_sparsity=0.25, pattern="1xchannel",
                               granularity="kernel"), dataloader=IMAGES
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="weighting"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="particle_filter", target_sparsity=0.25, pattern="1xchannel",
                               weighting="softmax"), dataloader=IMAGES
        )


def test_particle_filter_through_inc_is_deterministic():
    def masks(seed):
        model = tiny_cnn()
        pruning = inc_plugins.prepare_pruning(
            model, config(pruning_type="particle_filter", target_sparsity=0.3, pattern="1x1", granularity="kernel",
                          seed=seed, **QUICK),
            dataloader=IMAGES,
        )
        return pruning.pruners[0].masks

    first, second = masks(seed=4), masks(seed=4)
    assert all(torch.equal(first[name], second[name]) for name in first)
