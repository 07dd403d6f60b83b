"""The digits data, networks and procedures the classic methods are shown on (recipes/digits.py, vision_models.py,
classic_stages.py): the split, physical slimming against masking, MAC counts, and each procedure's INC path on
tiny settings."""

import dataclasses

import pytest
import torch
from torch import nn

from inc_plugins.algorithms.apoz import channels_to_prune
from inc_plugins.algorithms.bn_slimming import batchnorm_scales
from inc_plugins.algorithms.channel_selection import prune_lowest_channels
from inc_plugins.execution.apoz_monitor import APoZMonitor
from inc_plugins.models.cnn_structure import batchnorm_layers
from inc_plugins.models.surgery_cnn import slim_mlp_neurons
from benchmarks.studies.measures import interleaved_latency
from recipes import classic_stages as cs
from recipes.digits import labelled_batches, load_digits_split
from recipes.vision_models import DigitsCNN, build_digits_model, load_digits_model, macs_per_image, save_digits_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = load_digits_split(seed=0, test_fraction=0.2, val_fraction=0.2)
ONE_EPOCH = cs.TrainSettings(epochs=1, batch_size=64, learning_rate=2e-3)


def test_split_is_stratified_disjoint_and_seeded():
    assert SPLIT.sizes() == {"train": 1079, "val": 359, "test": 359}
    assert SPLIT.train_images.shape[1:] == (1, 8, 8) and 0 <= SPLIT.train_images.min() and SPLIT.train_images.max() <= 1
    for labels in (SPLIT.val_labels, SPLIT.test_labels):
        assert set(torch.bincount(labels, minlength=10).tolist()) <= {35, 36, 37}  # 20% of every class (~180 each)
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    assert not rows(SPLIT.test_images) & rows(SPLIT.val_images) - rows(SPLIT.train_images)  # no image moves parts
    again = load_digits_split(seed=0, test_fraction=0.2, val_fraction=0.2)
    assert torch.equal(again.test_labels, SPLIT.test_labels) and torch.equal(again.train_images, SPLIT.train_images)
    other = load_digits_split(seed=1, test_fraction=0.2, val_fraction=0.2)
    assert not torch.equal(other.test_images, SPLIT.test_images)
    with pytest.raises(ValueError, match="leave no training images"):
        load_digits_split(test_fraction=0.5, val_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction must be a number in"):
        load_digits_split(test_fraction=1.5)


def test_macs_match_a_hand_count():
    cnn = build_digits_model("digits_cnn", [4, 6, 8])
    # conv1 8x8: 1*9 per output, conv2 8x8: 4*9, conv3 4x4 after pooling: 6*9, classifier 8*10
    assert macs_per_image(cnn) == 4 * 64 * 9 + 6 * 64 * 4 * 9 + 8 * 16 * 6 * 9 + 8 * 10
    assert macs_per_image(build_digits_model("digits_mlp", [5, 3])) == 64 * 5 + 5 * 3 + 3 * 10
    with pytest.raises(ValueError, match="takes 3 layer widths"):
        build_digits_model("digits_cnn", [4, 6])
    with pytest.raises(ValueError, match="unknown digits architecture"):
        build_digits_model("resnet")


@torch.no_grad()
def test_slimmed_mlp_equals_the_masked_mlp():
    model = build_digits_model("digits_mlp", [12, 7], seed=3).eval()
    keep = {"1": torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
            "3": torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)}
    masked = build_digits_model("digits_mlp", [12, 7], seed=3).eval()
    for name, mask in keep.items():
        masked.get_submodule(name).weight[~mask] = 0
        masked.get_submodule(name).bias[~mask] = 0
    slimmed = slim_mlp_neurons(masked, keep)
    assert slimmed.widths() == [8, 5] and model.widths() == [12, 7]
    assert torch.allclose(slimmed(SPLIT.test_images), masked(SPLIT.test_images), atol=1e-6)
    with pytest.raises(ValueError, match="not a hidden Linear"):
        slim_mlp_neurons(masked, {"5": torch.ones(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="removes every neuron"):
        slim_mlp_neurons(masked, {"1": torch.zeros(12, dtype=torch.bool)})


def test_saved_slimmed_model_loads_with_its_sizes(tmp_path):
    model = build_digits_model("digits_cnn", [4, 6, 8], seed=1)
    cs.train_digits(model, SPLIT, ONE_EPOCH)
    result = cs.slim_by_bn_scales(model, 0.5, SPLIT, scope="local")
    save_digits_model(result.slimmed, tmp_path / "m")
    loaded = load_digits_model(tmp_path / "m")
    assert isinstance(loaded, DigitsCNN) and loaded.widths() == [2, 3, 4]
    with torch.no_grad():
        assert torch.equal(loaded(SPLIT.test_images), result.slimmed.eval()(SPLIT.test_images))


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = (build_digits_model("digits_mlp", [16, 8], seed=2) for _ in range(2))
    for model in (first, second):
        cs.train_digits(model, SPLIT, cs.TrainSettings(epochs=3, learning_rate=1e-2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert cs.accuracy_on_test(first, SPLIT) > 0.5
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        cs.TrainSettings(optimizer="lbfgs")


# --- the procedures, through INC ---------------------------------------------------------------------------------


def test_sparsity_training_through_inc_shrinks_the_bn_scales_by_the_l1_step():
    """With lr and l1 set so the L1 push dominates, INC's bn_l1 regulariser drives every |gamma| down: one SGD step
    without momentum moves gamma by lr * (dL/dgamma + l1 * sign(gamma))."""
    settings = cs.TrainSettings(epochs=1, batch_size=2000, learning_rate=0.1, optimizer="sgd")
    plain, penalised = (build_digits_model("digits_cnn", [4, 6, 8], seed=0) for _ in range(2))
    cs.sparsity_train(plain, SPLIT, settings, 0.0)
    cs.sparsity_train(penalised, SPLIT, settings, 0.5)
    plain_scales = batchnorm_scales(batchnorm_layers(plain))
    for name, scale in batchnorm_scales(batchnorm_layers(penalised)).items():
        # one step (a single batch holds the whole training set): the same loss gradient, plus lr * l1 * sign
        assert torch.allclose(plain_scales[name] - scale, torch.full_like(scale, 0.1 * 0.5), atol=1e-5)


def test_network_slimming_keeps_the_smallest_scales_out_and_the_outputs_equal():
    model = build_digits_model("digits_cnn", [8, 12, 16], seed=0)
    cs.train_digits(model, SPLIT, ONE_EPOCH)
    result = cs.slim_by_bn_scales(model, 0.4, SPLIT, scope="global")
    expected = prune_lowest_channels(batchnorm_scales(batchnorm_layers(model)), 0.4, "global")
    assert {name: mask.tolist() for name, mask in result.keep.items()} == \
        {name: mask.tolist() for name, mask in expected.items()}
    assert result.slimmed.widths() == [int(mask.sum()) for mask in expected.values()]
    assert result.max_abs_difference < 1e-4
    assert model.widths() == [8, 12, 16]  # the original is untouched


@pytest.mark.parametrize("architecture, widths", [("digits_mlp", [24, 12]), ("digits_cnn", [6, 8, 10])])
def test_trim_once_prunes_the_highest_apoz_and_removes_them(architecture, widths):
    model = build_digits_model(architecture, widths, seed=0)
    cs.train_digits(model, SPLIT, ONE_EPOCH)
    model.eval()
    targets = ({"1": model[1], "3": model[3]} if architecture == "digits_mlp" else
               {name: model.get_submodule(name) for name in ("features.0.0", "features.1.0", "features.3.0")})
    with APoZMonitor(model, targets) as monitor, torch.no_grad():
        for images, _ in labelled_batches(SPLIT.val_images, SPLIT.val_labels, 256):
            model(images)
    expected = channels_to_prune(monitor.apoz(), 0.25, "local")
    slimmed, keep, apoz = cs.trim_once(model, 0.25, SPLIT)
    assert {n: m.tolist() for n, m in keep.items()} == {n: m.tolist() for n, m in expected.items()}
    assert slimmed.widths() == [int(m.sum()) for m in expected.values()]
    assert all(torch.allclose(apoz[n], monitor.apoz()[n]) for n in apoz)


def test_iterative_trimming_shrinks_every_iteration_and_has_a_random_control():
    model = build_digits_model("digits_mlp", [40, 20], seed=0)
    cs.train_digits(model, SPLIT, ONE_EPOCH)
    chains = cs.iterative_trimming(model, SPLIT, 0.5, 2, ONE_EPOCH)
    steps = chains.apoz
    assert chains.apoz_model.widths() == [10, 5]
    assert [s.widths for s in steps] == [[20, 10], [10, 5]]
    assert steps[-1].remaining_fraction == pytest.approx(15 / 60)
    assert all(s.mean_apoz_pruned is not None for s in steps)
    control = chains.random
    assert [s.widths for s in control] == [[20, 10], [10, 5]] and control[0].mean_apoz_pruned is None
    assert chains.random_model.widths() == [10, 5]
    assert model.widths() == [40, 20]


def test_lottery_rounds_through_inc_record_ticket_and_control():
    rounds = cs.lottery_tickets("digits_mlp", SPLIT, ONE_EPOCH, rounds=2, prune_fraction=0.5, widths=[16, 8],
                                output_layer_rate=0.25)
    assert [r.round for r in rounds] == [0, 1, 2] and rounds[0].random_accuracy is None
    masks = rounds[2].masks
    # per layer: 25% of each hidden layer's weights left, 0.75^2 of the output layer's
    assert masks["1"].float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert masks["5"].float().mean().item() == pytest.approx(0.5625, abs=0.02)
    assert all(r.random_accuracy is not None for r in rounds[1:])


@pytest.mark.parametrize("granularity", ["channel", "kernel", "intra_kernel"])
def test_particle_filter_then_retraining_holds_the_pattern(granularity):
    model = build_digits_model("digits_cnn", [4, 6, 8], seed=0)
    cs.train_digits(model, SPLIT, ONE_EPOCH)
    outcome = cs.particle_filter_pruning(model, SPLIT, granularity, 0.5, ONE_EPOCH, num_particles=3, iterations=1)
    assert set(outcome.masks) == {"features.1.0", "features.3.0"}  # the first convolution stays dense
    assert outcome.sparsity == pytest.approx(0.5, abs=0.12)
    if granularity == "channel":
        assert outcome.model.widths() == [4, 3, 4]  # removed physically
    else:
        for name, mask in outcome.masks.items():
            assert torch.equal(outcome.model.get_submodule(name).weight != 0, mask)  # held through retraining
    control = cs.random_pattern_pruning(model, SPLIT, granularity, 0.5, ONE_EPOCH)
    assert control.sparsity == pytest.approx(outcome.sparsity, abs=0.12)


def test_interleaved_latency_reports_every_model():
    models = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}
    timed = interleaved_latency(models, torch.zeros(3, 4), repeats=4, warmup=1)
    assert set(timed) == {"a", "b"} and all(t["q1_s"] <= t["median_s"] <= t["q3_s"] for t in timed.values())


def test_train_settings_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ONE_EPOCH.epochs = 2
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        cs.TrainSettings(epochs=0)
