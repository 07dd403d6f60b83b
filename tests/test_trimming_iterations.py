"""The driver of network trimming's iterations (inc_plugins.execution.trimming_iterations) on a tiny MLP whose
neurons are zeroed in place (cumulative fractions, as the MiniLM FFN study prunes): the random chain prunes the same
per-layer counts as the APoZ chain, counts never shrink, earlier prunes stay, and the random chain is seeded."""

import itertools

import pytest
import torch
from torch import nn

from inc_plugins.algorithms.channel_selection import prune_lowest_channels
from inc_plugins.execution.trimming_iterations import Pruned, random_keep, run_trimming_iterations

LAYERS = ("0", "2")  # the hidden Linears of the MLP below
INPUTS = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
FRACTIONS = [0.25, 0.5, 0.75]


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@torch.no_grad()
def zero(model: nn.Module, keep: dict) -> None:
    for name, mask in keep.items():
        model.get_submodule(name).weight[~mask] = 0.0
        model.get_submodule(name).bias[~mask] = 0.0


@torch.no_grad()
def apoz(model: nn.Sequential) -> dict[str, torch.Tensor]:
    hidden = torch.relu(model[0](INPUTS))
    return {"0": (hidden == 0).double().mean(0), "2": (torch.relu(model[2](hidden)) == 0).double().mean(0)}


def prune_by_apoz(model, fraction, previous):
    scores = apoz(model)
    if previous is not None:  # what an earlier iteration pruned goes first (its APoZ is 1 already)
        scores = {name: values + 2 * (~previous[name]) for name, values in scores.items()}
    keep = prune_lowest_channels({name: -values for name, values in scores.items()}, fraction, "local")
    zero(model, keep)
    return Pruned(model, keep, apoz(model))


def prune_randomly(model, counts, generator, previous):
    if previous is None:
        previous = {name: torch.ones(model.get_submodule(name).out_features, dtype=torch.bool) for name in counts}
    keep = random_keep(previous, counts, generator)
    zero(model, keep)
    return Pruned(model, keep)


@torch.no_grad()
def accuracy(model, _label) -> float:
    return float((model(INPUTS).argmax(1) == LABELS).float().mean())


def finetune(model, _iteration, _label) -> None:
    """A few full-batch gradient steps with the zeroed weights held at zero."""
    zeros = [p == 0 for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(INPUTS), LABELS).backward()
        optimizer.step()
        with torch.no_grad():
            for parameter, mask in zip(model.parameters(), zeros):
                parameter[mask] = 0.0


def run(seed: int = 0, finetune_fn=finetune):
    return run_trimming_iterations(tiny_mlp(), FRACTIONS, prune_by_apoz, prune_randomly,
                                   generator_for=lambda i: torch.Generator().manual_seed(seed + i),
                                   evaluate=accuracy, finetune=finetune_fn)


def test_random_chain_prunes_the_apoz_chains_counts_and_counts_never_shrink():
    chains = run()
    apoz_rows, random_rows = chains["apoz"].rows, chains["random"].rows
    assert [r.iteration for r in apoz_rows] == [r.iteration for r in random_rows] == [1, 2, 3]
    assert [r.setting for r in apoz_rows] == FRACTIONS
    for by_apoz, at_random in zip(apoz_rows, random_rows):
        counts = {name: int((~mask).sum()) for name, mask in by_apoz.keep.items()}
        assert counts == {name: int(by_apoz.setting * width) for name, width in (("0", 16), ("2", 12))}
        assert {name: int((~mask).sum()) for name, mask in at_random.keep.items()} == counts
        assert by_apoz.apoz is not None and at_random.apoz is None
        assert 0 <= by_apoz.accuracy_pruned <= 1 and 0 <= at_random.accuracy_finetuned <= 1
    for rows in (apoz_rows, random_rows):
        assert [r.pruned for r in rows] == sorted({r.pruned for r in rows})  # cumulative: strictly more
        for earlier, later in itertools.pairwise(rows):
            for name in LAYERS:
                assert not (later.keep[name] & ~earlier.keep[name]).any()  # what was pruned stays pruned
    for name in LAYERS:  # the final models hold the last masks (fine-tuning kept the zeros)
        for chain in chains.values():
            weight = chain.model.get_submodule(name).weight
            assert torch.equal(weight.abs().sum(1) != 0, chain.rows[-1].keep[name])


def test_random_chain_is_seeded_and_the_dense_model_is_left_alone():
    first, again, other = run(seed=0), run(seed=0), run(seed=5)
    for a, b in zip(first["random"].rows, again["random"].rows):
        assert all(torch.equal(a.keep[name], b.keep[name]) for name in LAYERS)
        assert a.accuracy_finetuned == b.accuracy_finetuned
    assert any(not torch.equal(a.keep[name], b.keep[name])
               for a, b in zip(first["random"].rows, other["random"].rows) for name in LAYERS)
    for a, b in zip(first["apoz"].rows, other["apoz"].rows):  # the seed is the random chain's only
        assert all(torch.equal(a.keep[name], b.keep[name]) for name in LAYERS)
    dense = tiny_mlp()
    chains = run_trimming_iterations(dense, FRACTIONS[:1], prune_by_apoz, prune_randomly,
                                     generator_for=lambda i: torch.Generator().manual_seed(i), evaluate=accuracy)
    assert all(bool((p != 0).all()) for p in dense.parameters())  # each chain pruned a copy
    assert chains["apoz"].model is not dense


def test_calls_in_order_and_without_finetuning():
    calls = []

    def evaluate(model, label):
        calls.append(("evaluate", label))
        return 0.5

    def tune(model, iteration, label):
        calls.append(("finetune", iteration, label))

    run_trimming_iterations(tiny_mlp(), [0.25, 0.5], prune_by_apoz, prune_randomly,
                            generator_for=lambda i: torch.Generator().manual_seed(i), evaluate=evaluate, finetune=tune)
    assert calls[:6] == [("evaluate", "apoz 0.25 pruned"), ("finetune", 1, "apoz 0.25"), ("evaluate", "apoz 0.25"),
                         ("evaluate", "random 0.25 pruned"), ("finetune", 1, "random 0.25"),
                         ("evaluate", "random 0.25")]
    assert calls[7] == ("finetune", 2, "apoz 0.5")
    rows = run(finetune_fn=None)["random"].rows
    assert all(r.accuracy_finetuned is None for r in rows)


def test_a_random_step_with_other_counts_is_an_error():
    def prune_one_more(model, counts, generator, previous):
        return prune_randomly(model, {name: count + 1 for name, count in counts.items()}, generator, previous)

    with pytest.raises(RuntimeError, match="the random step dropped"):
        run_trimming_iterations(tiny_mlp(), [0.25], prune_by_apoz, prune_one_more,
                                generator_for=lambda i: torch.Generator().manual_seed(i), evaluate=accuracy)


def test_random_keep_keeps_earlier_prunes_and_reaches_the_count():
    previous = {"a": torch.tensor([True, False, True, True, False, True, True, True])}
    new = random_keep(previous, {"a": 5}, torch.Generator().manual_seed(3))["a"]
    assert int((~new).sum()) == 5
    assert not new[~previous["a"]].any()  # what the previous iteration pruned stays pruned
    assert torch.equal(random_keep(previous, {"a": 5}, torch.Generator().manual_seed(3))["a"], new)  # seeded
    with pytest.raises(ValueError, match="dropped already"):
        random_keep(previous, {"a": 1}, torch.Generator().manual_seed(3))
