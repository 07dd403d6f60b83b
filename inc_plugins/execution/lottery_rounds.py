"""Lottery-ticket rounds (Frankle and Carbin 2019, arXiv:1803.03635): iterative magnitude pruning with rewinding,
driven around the caller's training and evaluation.

The procedure: initialise ``theta_0``; train; prune ``p%`` of the *remaining* weights with the smallest
magnitude (``inc_plugins.algorithms.lottery_ticket.magnitude_prune_round``); reset the surviving weights to
``theta_0`` (the "winning ticket"); repeat. The control re-initialises the ticket randomly with the same mask.
Later work (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewinds to
``theta_k``, the weights after ``k`` training steps, instead of ``theta_0``; ``rewind_to="step:k"`` does that.

Design:

- **Masks live outside the weights** (``{layer name: bool tensor shaped like layer.weight}``, True = kept).
  While a masked model trains, ``enforce_masks`` (``held_masks``) multiplies each masked weight by its mask
  before every forward pass, and the driver also applies the masks after each optimizer step, so whatever the
  optimizer does to pruned entries (momentum, weight decay) never reaches a forward pass or the result.
- **Which weights**: the ``weight`` of every Linear and Conv1d/2d/3d layer by default
  (``inc_plugins.models.cnn_structure.prunable_layers``; biases and BatchNorm are not pruned, as in the paper).
- **Rewinding** (``rewind``) loads a saved state dict (every parameter and buffer, so BatchNorm statistics
  rewind too) and applies the masks: kept weights equal the saved ones exactly, pruned weights are zero.
- **Random re-initialisation** (``random_reinit``) calls each module's ``reset_parameters()`` under a seed, then
  applies the masks: the same initialisation distribution as torch's defaults for those modules. A model
  built with a custom initialisation should pass ``init_fn`` (or use ``control_init="make_model"`` in the driver,
  which draws a fresh model from ``make_model`` with another seed).

Not reproduced: the paper's learning-rate schedules, early-stopping iteration as a metric, and its multiple
trials per point; the driver runs one trial per round and reports the caller's ``eval_fn``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.lottery_ticket import (
    Masks,
    apply_masks,
    check_prune_fraction,
    dense_masks,
    magnitude_prune_round,
    remaining_fraction,
)
from inc_plugins.models.cnn_structure import prunable_layers

from .held_masks import enforce_masks


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (``theta_0`` or ``theta_k``)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@torch.no_grad()
def rewind(
    model: nn.Module, saved: Mapping[str, Tensor], layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor]
) -> None:
    """Load ``saved`` into ``model`` and apply ``masks``: kept weights equal the saved ones, pruned ones are 0."""
    model.load_state_dict(saved)
    apply_masks(layers, masks)


@torch.no_grad()
def random_reinit(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    seed: int,
    init_fn: Callable[[nn.Module], None] | None = None,
) -> None:
    """Re-draw every parameter from its initialisation distribution under ``seed``, then apply ``masks``.

    Default: each module's ``reset_parameters()`` (torch's default initialisation; BatchNorm resets its
    statistics too). ``init_fn(model)`` replaces it for models with a custom initialisation. The caller's RNG
    state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_fn is not None:
            init_fn(model)
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    apply_masks(layers, masks)


# --- the driver ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LotteryRound:
    """One round: ``remaining_fraction`` of the pruned layers' weights after pruning, the rewound ticket's
    accuracy after training, and the randomly re-initialised control's (None for round 0, the dense model)."""

    round: int
    remaining_fraction: float
    ticket_accuracy: float
    random_accuracy: float | None
    masks: Masks


TrainFn = Callable[[nn.Module, Callable[[int], None]], None]
PruneRound = Callable[[Mapping[str, nn.Module], Mapping[str, Tensor], float], Masks]

_REWIND = re.compile(r"^(init|step:(\d+))$")


def _rewind_step(rewind_to: str) -> int | None:
    match = _REWIND.match(str(rewind_to))
    if match is None:
        raise ValueError(f"rewind_to must be 'init' or 'step:k' (k >= 1 optimizer steps), got {rewind_to!r}")
    if match.group(2) is None:
        return None
    step = int(match.group(2))
    if step < 1:
        raise ValueError(f"rewind_to {rewind_to!r}: k must be >= 1 (use 'init' for the initial weights)")
    return step


def _train_masked(model, layers, masks, train_fn: TrainFn, on_step: Callable[[int], None] | None = None) -> None:
    def after_step(step: int) -> None:
        apply_masks(layers, masks)
        if on_step is not None:
            on_step(step)

    with enforce_masks(layers, masks):
        train_fn(model, after_step)


def run_lottery_rounds(
    make_model: Callable[[], nn.Module],
    train_fn: TrainFn,
    eval_fn: Callable[[nn.Module], float],
    rounds: int,
    prune_fraction: float,
    rewind_to: str = "init",
    seed: int = 0,
    scope: str = "global",
    layer_names: Sequence[str] | None = None,
    layer_fractions: Mapping[str, float] | None = None,
    control: bool = True,
    control_init: str = "reset_parameters",
    prune_round: PruneRound | None = None,
) -> list[LotteryRound]:
    """Iterative magnitude pruning with rewinding; returns ``rounds + 1`` entries (round 0 is the dense model).

    ``make_model()`` builds the network (called under ``torch.manual_seed(seed)``); ``train_fn(model,
    after_step)`` trains it in place and must call ``after_step(step)`` after every optimizer step (steps
    counted from 1: the masks are re-applied there, and ``rewind_to="step:k"`` saves ``theta_k`` of the dense
    run at step k); ``eval_fn(model) -> accuracy``. Each round prunes ``prune_fraction`` of the remaining weights
    of the trained previous ticket (``magnitude_prune_round``, or ``prune_round(layers, masks, fraction)``,
    e.g. ``inc_plugins.inc.lottery_ticket.inc_magnitude_round``), rewinds, trains and evaluates the ticket, and (if
    ``control``) trains the same mask from a random re-initialisation: ``control_init="reset_parameters"``
    (``random_reinit``) or ``"make_model"`` (a fresh ``make_model()`` under another seed). Training is seeded per
    round, so a run is deterministic if ``train_fn`` draws randomness from torch's global RNG; the caller's RNG
    state is restored afterwards.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    check_prune_fraction(prune_fraction, "prune_fraction")
    if prune_fraction == 0:
        raise ValueError("prune_fraction 0 prunes nothing; give the fraction of remaining weights pruned per round")
    if control_init not in ("reset_parameters", "make_model"):
        raise ValueError(f"control_init must be 'reset_parameters' or 'make_model', got {control_init!r}")
    rewind_step = _rewind_step(rewind_to)

    def prune(layers, masks):
        if prune_round is not None:
            return prune_round(layers, masks, prune_fraction)
        return magnitude_prune_round(layers, masks, prune_fraction, scope, layer_fractions)

    results: list[LotteryRound] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
        layers = prunable_layers(model, layer_names)
        masks = dense_masks(layers)
        rewind_state = snapshot(model)
        saved_at: dict[int, dict[str, Tensor]] = {}

        def save_rewind_point(step: int) -> None:
            if rewind_step is not None and step == rewind_step:
                saved_at[step] = snapshot(model)

        torch.manual_seed(seed + 1)
        _train_masked(model, layers, masks, train_fn, save_rewind_point)
        if rewind_step is not None:
            if rewind_step not in saved_at:
                raise ValueError(
                    f"rewind_to {rewind_to!r}: train_fn never reported step {rewind_step} through after_step(step) "
                    f"(it must call after_step after every optimizer step)"
                )
            rewind_state = saved_at[rewind_step]
        results.append(LotteryRound(0, 1.0, float(eval_fn(model)), None, copy.deepcopy(masks)))

        for round_index in range(1, rounds + 1):
            masks = prune(layers, masks)  # from the trained weights of the previous round's ticket
            rewind(model, rewind_state, layers, masks)
            torch.manual_seed(seed + 1 + round_index)
            _train_masked(model, layers, masks, train_fn)
            ticket_accuracy = float(eval_fn(model))

            random_accuracy = None
            if control:
                torch.manual_seed(seed + 10_000 + round_index)
                control_model = make_model()
                control_layers = prunable_layers(control_model, list(layers))
                if control_init == "reset_parameters":
                    random_reinit(control_model, control_layers, masks, seed=seed + 20_000 + round_index)
                else:
                    apply_masks(control_layers, masks)
                torch.manual_seed(seed + 1 + round_index)
                _train_masked(control_model, control_layers, masks, train_fn)
                random_accuracy = float(eval_fn(control_model))
            remaining = remaining_fraction(masks)
            results.append(LotteryRound(round_index, remaining, ticket_accuracy, random_accuracy, copy.deepcopy(masks)))
    return results
