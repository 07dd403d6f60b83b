"""Lottery tickets (Frankle and Carbin 2019, arXiv:1803.03635): iterative magnitude pruning with rewinding.

The procedure: initialise ``theta_0``; train; prune ``p%`` of the *remaining* weights with the smallest
magnitude (per layer, or globally for deep networks as in the paper's Section 4); reset the surviving weights to
``theta_0`` (the "winning ticket"); repeat. The control re-initialises the ticket randomly with the same mask.
Later work (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewinds to
``theta_k``, the weights after ``k`` training steps, instead of ``theta_0``; ``rewind_to="step:k"`` does that.

Design:

- **Masks live outside the weights**: ``{layer name: bool tensor shaped like layer.weight}`` (True = kept).
  While a masked model trains, ``enforce_masks`` multiplies each masked weight by its mask before every forward
  pass (a forward pre-hook), and the driver also applies the masks after each optimizer step, so whatever the
  optimizer does to pruned entries (momentum, weight decay) never reaches a forward pass or the result.
- **Which weights**: the ``weight`` of every Linear and Conv1d/2d/3d layer by default (biases and BatchNorm are
  not pruned, as in the paper). The paper prunes output layers at half the rate of the others in its
  per-layer experiments: pass ``layer_fractions={"classifier": p / 2}`` for that.
- **Rewinding** (``rewind``) loads a saved state dict (every parameter and buffer, so BatchNorm statistics
  rewind too) and applies the masks: kept weights equal the saved ones exactly, pruned weights are zero.
- **Random re-initialisation** (``random_reinit``) calls each module's ``reset_parameters()`` under a seed, then
  applies the masks: the same initialisation distribution as torch's defaults for those modules. A model
  built with a custom initialisation should pass ``init_fn`` (or use ``control_init="make_model"`` in the driver,
  which draws a fresh model from ``make_model`` with another seed).
- **Counting**: a round prunes ``round(p * remaining)`` weights per layer (``scope="layer"``) or across the
  selected layers (``scope="global"``). Ties in magnitude go to the lower flat index first.

Not reproduced: the paper's learning-rate schedules, early-stopping iteration as a metric, and its multiple
trials per point; the driver runs one trial per round and reports the caller's ``eval_fn``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Masks = dict[str, Tensor]
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """{name: layer} whose ``weight`` IMP prunes: every Linear/ConvNd, or exactly ``names`` (must be such layers)."""
    if names is None:
        layers = {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)}
    else:
        layers = {}
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, PRUNABLE_TYPES):
                raise TypeError(f"{name!r} is a {type(module).__name__}; IMP prunes Linear and Conv layers")
            layers[name] = module
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    return layers


def dense_masks(layers: Mapping[str, nn.Module]) -> Masks:
    return {name: torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device)
            for name, layer in layers.items()}


def remaining_fraction(masks: Mapping[str, Tensor]) -> float:
    """Fraction of the masked weights that are kept."""
    kept = sum(int(mask.sum()) for mask in masks.values())
    return kept / sum(mask.numel() for mask in masks.values())


def _lowest_kept(scores: Tensor, keep: Tensor, count: int) -> Tensor:
    """Flat indices of the ``count`` lowest scores among kept entries (ties: lower index first)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    flat = scores.detach().flatten().double().cpu().masked_fill(~keep.flatten().cpu(), float("inf"))
    return torch.sort(flat, stable=True).indices[:count]


def _check_fraction(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


def magnitude_prune_round(
    layers: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    fraction: float,
    scope: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
) -> Masks:
    """New masks that additionally prune ``fraction`` of the *remaining* weights by magnitude ``|w|``.

    ``scope="layer"``: each layer prunes ``round(f * remaining_in_layer)``, with ``f`` from ``layer_fractions``
    (default ``fraction``). ``scope="global"``: ``round(fraction * remaining_in_all_layers)`` ranked together.
    Already-pruned weights stay pruned. ``masks`` are not modified.
    """
    _check_fraction(fraction, "prune fraction")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if layer_fractions and scope != "layer":
        raise ValueError("layer_fractions sets per-layer rates, which only apply with scope='layer'")
    unknown = sorted(set(layer_fractions or {}) - set(layers))
    if unknown:
        raise ValueError(f"layer_fractions names layers that are not pruned: {unknown}")
    new = {name: mask.bool().clone(memory_format=torch.contiguous_format) for name, mask in masks.items()}
    if scope == "layer":
        for name, layer in layers.items():
            rate = (layer_fractions or {}).get(name, fraction)
            _check_fraction(rate, f"prune fraction of {name!r}")
            keep = new[name]
            count = round(rate * int(keep.sum()))
            flat = keep.view(-1)
            flat[_lowest_kept(layer.weight.abs(), keep, count).to(flat.device)] = False
        return new

    names = list(layers)
    scores = torch.cat([layers[name].weight.detach().abs().flatten().double().cpu() for name in names])
    keep_all = torch.cat([new[name].flatten().cpu() for name in names])
    count = round(fraction * int(keep_all.sum()))
    pruned = torch.zeros_like(keep_all)
    pruned[_lowest_kept(scores, keep_all, count)] = True
    offset = 0
    for name in names:
        size = new[name].numel()
        new[name].view(-1)[pruned[offset:offset + size].to(new[name].device)] = False
        offset += size
    return new


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights in place."""
    for name, layer in layers.items():
        layer.weight.mul_(masks[name].to(layer.weight.device, layer.weight.dtype))


@contextmanager
def enforce_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, every forward pass of a masked layer first zeroes its pruned weights."""

    def hook_for(name: str):
        def hook(module: nn.Module, args) -> None:
            with torch.no_grad():
                module.weight.mul_(masks[name].to(module.weight.device, module.weight.dtype))

        return hook

    apply_masks(layers, masks)
    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        apply_masks(layers, masks)


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
    e.g. ``inc_plugins.inc.classic.inc_magnitude_round``), rewinds, trains and evaluates the ticket, and (if
    ``control``) trains the same mask from a random re-initialisation: ``control_init="reset_parameters"``
    (``random_reinit``) or ``"make_model"`` (a fresh ``make_model()`` under another seed). Training is seeded per
    round, so a run is deterministic if ``train_fn`` draws randomness from torch's global RNG; the caller's RNG
    state is restored afterwards.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    _check_fraction(prune_fraction, "prune_fraction")
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
