"""``pruning_type="lottery_ticket"`` inside a plain training loop driven by INC's own callbacks (its forward hook and
its wrapped ``optimizer.step``): INC's schedule prunes, and after each pruning step the kept weights are the rewind
weights (the initial ones, those of a later step, or the seeded random re-initialisation of the control).

Synthetic: a three-layer MLP on a random linear teacher's labels.
"""

import pytest
import torch
from neural_compressor import WeightPruningConfig
from torch import nn

import inc_plugins

STEPS, START, END, FREQUENCY, TARGET = 12, 2, 8, 2, 0.75


class _MLP(nn.Module):
    """(INC leaves a model's last layer, its head, out of pruning)"""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    return x, (x @ torch.randn(8, 4, generator=generator)).argmax(dim=1)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: getattr(model, name).weight.detach().clone() for name in ("fc1", "fc2")}


def _train(rewind_step=0, reinit=False, seed=0):
    """Trains STEPS steps; returns the weights before training, those before each step, and for each step that
    ended a round, the weights and masks right after its rewind (before that step's optimizer update)."""
    torch.manual_seed(1)
    model = _MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    config = WeightPruningConfig(pruning_type="lottery_ticket", target_sparsity=TARGET, pattern="1x1",
                                 op_names=["fc1", "fc2"], start_step=START, end_step=END, pruning_frequency=FREQUENCY,
                                 rewind_step=rewind_step, lottery_reinit=reinit, lottery_seed=seed)
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    (pruner,) = pruning.pruners
    x, y = _data()
    before_step, after_round = [], {}
    for step in range(STEPS):
        before_step.append(_weights(model))
        rounds = pruner.rounds
        loss = nn.functional.cross_entropy(model(x), y)  # INC's forward hook: on_step_begin (prune, rewind)
        if pruner.rounds > rounds:
            after_round[step] = (_weights(model), {name: mask.clone() for name, mask in pruner.masks.items()})
        loss.backward()
        optimizer.step()  # INC's wrapped step: on_before/on_after_optimizer_step
        optimizer.zero_grad()
    inc_plugins.complete_pruning(model, optimizer)
    return model, pruner, before_step, after_round


def _sparsity(masks) -> float:
    return sum(int((~mask.bool()).sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())


@pytest.mark.parametrize("rewind_step", [0, START])
def test_each_round_rewinds_the_kept_weights(rewind_step):
    model, pruner, before_step, after_round = _train(rewind_step=rewind_step)
    rewind = before_step[rewind_step]  # (no optimizer step between the step's start and the rewind point)
    assert len(after_round) == 3 and set(after_round) <= set(range(START, END + 1, FREQUENCY))
    sparsities = [_sparsity(masks) for _, masks in after_round.values()]
    assert sparsities == sorted(sparsities) and len(set(sparsities)) == len(sparsities)  # each round prunes more
    assert abs(_sparsity(pruner.masks) - TARGET) < 0.02
    for step, (weights, masks) in after_round.items():
        for name, weight in weights.items():
            kept = masks[name].bool()
            assert torch.equal(weight[kept], rewind[name][kept]), (step, name)
            assert bool((weight[~kept] == 0).all())
            assert not torch.equal(before_step[step][name], rewind[name])  # trained since: the check can fail
    final = _weights(model)
    assert all(bool((final[name][~pruner.masks[name].bool()] == 0).all()) for name in final)


def test_the_random_reinit_control_rewinds_to_seeded_draws_of_the_same_scale():
    _, _, before_step, after_round = _train(reinit=True, seed=3)
    _, _, _, again = _train(reinit=True, seed=3)
    _, _, _, other_seed = _train(reinit=True, seed=4)
    first = min(after_round)
    weights, masks = after_round[first]
    for name, weight in weights.items():
        kept = masks[name].bool()
        assert not torch.equal(weight[kept], before_step[0][name][kept])
        assert torch.equal(weight, again[first][0][name])  # seeded: the same draws
        assert not torch.equal(weight, other_seed[min(other_seed)][0][name])
        assert 0.7 < float(weight[kept].std() / before_step[0][name].std()) < 1.3


def test_bad_lottery_settings_are_refused():
    with pytest.raises(inc_plugins.PruningConfigError, match="rewind_step 5 is after start_step 2"):
        inc_plugins.prepare_pruning(_MLP(), WeightPruningConfig(
            pruning_type="lottery_ticket", pattern="1x1", target_sparsity=0.5, op_names=["fc1"], start_step=2,
            end_step=4, rewind_step=5), optimizer=torch.optim.SGD(_MLP().parameters(), lr=0.1))
    with pytest.raises(inc_plugins.PruningConfigError, match="has no config key 'rewind_steps'. Did you mean "
                                                               "'rewind_step'"):
        inc_plugins.prepare_pruning(_MLP(), WeightPruningConfig(
            pruning_type="lottery_ticket", pattern="1x1", target_sparsity=0.5, op_names=["fc1"], rewind_steps=1),
            optimizer=torch.optim.SGD(_MLP().parameters(), lr=0.1))
