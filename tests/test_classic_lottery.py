"""Lottery tickets: IMP rounds, masks outside the weights, rewinding, the random re-init control, the driver and
INC's magnitude pruner as the per-round pruner."""

import functools

import pytest
import torch
from torch import nn

from inc_plugins.algorithms.lottery_ticket import apply_masks, dense_masks, magnitude_prune_round, remaining_fraction
from inc_plugins.execution.held_masks import enforce_masks
from inc_plugins.execution.lottery_rounds import random_reinit, rewind, run_lottery_rounds, snapshot
from inc_plugins.inc.lottery_ticket import inc_magnitude_round
from inc_plugins.models.cnn_structure import prunable_layers
from tests.fixtures.tiny_models import tiny_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3))


def magnitudes(layers, name):
    return layers[name].weight.detach().abs().flatten()


# --- one round -----------------------------------------------------------------------------------------------


def test_each_layer_round_prunes_p_of_the_remaining_smallest_weights():
    model = mlp()
    layers = prunable_layers(model)
    masks = dense_masks(layers)
    for round_index in range(3):
        before = {name: int(mask.sum()) for name, mask in masks.items()}
        new = magnitude_prune_round(layers, masks, 0.2, scope="layer")
        for name, layer in layers.items():
            assert not (new[name] & ~masks[name]).any()  # pruned weights stay pruned
            newly = masks[name] & ~new[name]
            assert int(newly.sum()) == round(0.2 * before[name])
            weights = layer.weight.detach().abs()
            assert weights[newly].max() <= weights[new[name]].min()  # the smallest of the remaining ones
        masks = new
        apply_masks(layers, masks)
    assert remaining_fraction(masks) == pytest.approx(0.8**3, abs=0.01)


def test_global_round_ranks_all_layers_together():
    model = mlp()
    layers = prunable_layers(model)
    masks = magnitude_prune_round(layers, dense_masks(layers), 0.5, scope="global")
    apply_masks(layers, masks)
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.5 * total)
    new = magnitude_prune_round(layers, masks, 0.3, scope="global")
    newly = torch.cat([(masks[n] & ~new[n]).flatten() for n in layers])
    kept = torch.cat([new[n].flatten() for n in layers])
    weights = torch.cat([magnitudes(layers, n) for n in layers])
    assert int(newly.sum()) == round(0.3 * int(torch.cat([m.flatten() for m in masks.values()]).sum()))
    assert weights[newly].max() <= weights[kept].min()


def test_round_arguments_are_checked():
    layers = prunable_layers(mlp())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude_prune_round(layers, dense_masks(layers), 1.0)
    with pytest.raises(ValueError, match="scope='layer'"):
        magnitude_prune_round(layers, dense_masks(layers), 0.2, layer_fractions={"3": 0.1})


# --- masks, rewinding, re-init -------------------------------------------------------------------------------


def train_a_little(model, steps=3, after_step=None, weight_decay=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(step)
    model.eval()


def test_masks_hold_during_training_with_momentum_and_weight_decay():
    model = mlp()
    layers = prunable_layers(model)
    masks = magnitude_prune_round(layers, dense_masks(layers), 0.5, scope="layer")
    seen_nonzero = []
    with enforce_masks(layers, masks):
        handle = layers["0"].register_forward_pre_hook(  # runs after enforce_masks' own pre-hook
            lambda m, a: seen_nonzero.append(bool((m.weight[~masks["0"]] != 0).any()))
        )
        train_a_little(model)
    handle.remove()
    assert seen_nonzero and not any(seen_nonzero)  # every forward used masked weights
    assert all((layers[n].weight[~masks[n]] == 0).all() for n in layers)


def test_rewinding_restores_the_initial_weights_under_the_mask():
    model = mlp()
    layers = prunable_layers(model)
    theta_0 = snapshot(model)
    train_a_little(model)
    masks = magnitude_prune_round(layers, dense_masks(layers), 0.6, scope="global")
    rewind(model, theta_0, layers, masks)
    for name, layer in layers.items():
        saved = theta_0[f"{name}.weight"]
        assert torch.equal(layer.weight[masks[name]], saved[masks[name]])
        assert (layer.weight[~masks[name]] == 0).all()
    state = model.state_dict()
    for key in ("0.bias", "2.weight", "2.running_mean", "3.bias"):  # unpruned tensors rewind exactly too
        assert torch.equal(state[key], theta_0[key])


def test_random_reinit_keeps_the_mask_with_new_weights():
    model = mlp()
    layers = prunable_layers(model)
    theta_0 = snapshot(model)
    masks = magnitude_prune_round(layers, dense_masks(layers), 0.5, scope="layer")
    control = mlp(seed=0)
    control_layers = prunable_layers(control)
    random_reinit(control, control_layers, masks, seed=123)
    for name, layer in control_layers.items():
        assert torch.equal(layer.weight != 0, masks[name])  # same mask (no kept weight re-drawn as exactly 0)
        assert not torch.equal(layer.weight[masks[name]], theta_0[f"{name}.weight"][masks[name]])
        # the same distribution as torch's default init of that layer: |w| <= 1/sqrt(fan_in)
        assert layer.weight.abs().max() <= 1 / layer.weight.shape[1] ** 0.5
    again = mlp(seed=5)
    random_reinit(again, prunable_layers(again), masks, seed=123)
    assert torch.equal(again[0].weight, control[0].weight)  # seeded


# --- the driver ----------------------------------------------------------------------------------------------


def digits_task():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:600], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:600])
    train, test = (x[:400], y[:400]), (x[400:], y[400:])

    def make_model():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def train_fn(model, after_step):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(1, 41):
            index = torch.randint(0, 400, (64,))
            nn.functional.cross_entropy(model(train[0][index]), train[1][index]).backward()
            optimizer.step()
            optimizer.zero_grad()
            after_step(step)

    @torch.no_grad()
    def eval_fn(model):
        return float((model(test[0]).argmax(1) == test[1]).float().mean())

    return make_model, train_fn, eval_fn


def test_run_lottery_rounds_on_digits_is_deterministic():
    make_model, train_fn, eval_fn = digits_task()
    state = torch.random.get_rng_state()
    rounds = run_lottery_rounds(make_model, train_fn, eval_fn, rounds=2, prune_fraction=0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert [r.round for r in rounds] == [0, 1, 2]
    assert rounds[0].remaining_fraction == 1.0 and rounds[0].random_accuracy is None
    assert rounds[1].remaining_fraction == pytest.approx(0.5, abs=1e-3)
    assert rounds[2].remaining_fraction == pytest.approx(0.25, abs=1e-3)
    assert all(0.0 <= r.ticket_accuracy <= 1.0 for r in rounds)
    assert all(0.0 <= r.random_accuracy <= 1.0 for r in rounds[1:])
    assert rounds[0].ticket_accuracy > 0.5  # it learned something
    # the second round's mask lies inside the first's
    for name, mask in rounds[2].masks.items():
        assert not (mask & ~rounds[1].masks[name]).any()
    again = run_lottery_rounds(make_model, train_fn, eval_fn, rounds=2, prune_fraction=0.5, seed=3)
    assert [(r.ticket_accuracy, r.random_accuracy) for r in again] == [(r.ticket_accuracy, r.random_accuracy) for r in rounds]
    assert all(torch.equal(again[2].masks[n], rounds[2].masks[n]) for n in rounds[2].masks)


def test_rewind_to_an_early_step():
    make_model, train_fn, eval_fn = digits_task()
    rounds = run_lottery_rounds(make_model, train_fn, eval_fn, rounds=1, prune_fraction=0.3, rewind_to="step:5",
                                control=False, scope="layer")
    assert rounds[1].random_accuracy is None
    assert rounds[1].remaining_fraction == pytest.approx(0.7, abs=1e-3)

    def silent_train(model, after_step):
        pass

    with pytest.raises(ValueError, match="never reported step 5"):
        run_lottery_rounds(make_model, silent_train, eval_fn, rounds=1, prune_fraction=0.3, rewind_to="step:5")
    with pytest.raises(ValueError, match="'init' or 'step:k'"):
        run_lottery_rounds(make_model, train_fn, eval_fn, rounds=1, prune_fraction=0.3, rewind_to="epoch:1")


# --- INC's magnitude pruner as the round ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_inc_magnitude_round_equals_the_project_round(scope):
    model = tiny_cnn()
    layers = prunable_layers(model, ["features.0.0", "features.1.0", "features.2.0", "classifier"])
    masks = dense_masks(layers)
    for _ in range(2):
        expected = magnitude_prune_round(layers, masks, 0.3, scope=scope)
        got = inc_magnitude_round(layers, masks, 0.3, scope=scope)
        for name in layers:
            assert torch.equal(got[name], expected[name]), name
        masks = got
    rounds = functools.partial(inc_magnitude_round, scope=scope)  # the prune_round hook of run_lottery_rounds
    assert remaining_fraction(rounds(layers, masks, 0.0)) == remaining_fraction(masks)


def test_inc_magnitude_round_takes_per_layer_rates():
    model = tiny_cnn()
    layers = prunable_layers(model, ["features.0.0", "features.1.0", "classifier"])
    masks = dense_masks(layers)
    rates = {"classifier": 0.15}  # the paper's half rate for the output layer
    expected = magnitude_prune_round(layers, masks, 0.3, scope="layer", layer_fractions=rates)
    got = inc_magnitude_round(layers, masks, 0.3, scope="layer", layer_fractions=rates)
    for name in layers:
        assert torch.equal(got[name], expected[name]), name
    assert int((~got["classifier"]).sum()) == round(0.15 * layers["classifier"].weight.numel())
    with pytest.raises(ValueError, match="only apply with scope='layer'"):
        inc_magnitude_round(layers, masks, 0.3, scope="global", layer_fractions=rates)
    with pytest.raises(ValueError, match="not pruned"):
        inc_magnitude_round(layers, masks, 0.3, scope="layer", layer_fractions={"nope": 0.1})
