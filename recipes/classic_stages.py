"""The classic pruning methods as whole procedures on the digits networks: each pruning decision goes through INC
(``inc_plugins.prepare_pruning`` with a ``WeightPruningConfig``, or INC's training callbacks), and the training
around it (sparsity training, fine-tuning, lottery rounds, retraining) is driven here.

- ``network_slimming``: Liu et al. 2017. Sparsity training with the ``bn_l1`` INC regularizer (L1 on the
  BatchNorm scales) through INC's training callbacks; ``network_slimming`` one-shot (global ranking of ``|gamma|``);
  physical removal (``slim_cnn_channels``); fine-tuning of the smaller network.
- ``network_trimming``: Hu et al. 2016. Repeatedly: ``network_trimming`` one-shot (APoZ on validation images)
  prunes a fraction of the remaining channels/neurons, they are removed physically, and the smaller network is
  fine-tuned from its surviving weights (the pre-pruning weights are the initialisation); the random control prunes
  the same counts at random, in the same run (``inc_plugins.execution.trimming_iterations``).
- ``lottery_ticket``: Frankle and Carbin 2019. ``run_lottery_rounds`` with each round's weights chosen by INC's
  ``magnitude`` pruner (``inc_magnitude_round``), rewinding to the initial weights or to step k, and the random
  re-initialisation control with the same masks in the same run.
- ``particle_filter``: Anwar et al. 2017. ``particle_filter`` one-shot (patterns scored by the misclassification
  rate on validation images), then retraining with the pattern held (channel patterns: physically removed).

Every function takes its seeds explicitly; the same arguments give the same result on one machine.
"""

from __future__ import annotations

import copy
import functools
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

import inc_plugins
from inc_plugins.algorithms.particle_filter import StructuredPattern
from inc_plugins.execution.held_masks import enforce_masks
from inc_plugins.execution.lottery_rounds import run_lottery_rounds
from inc_plugins.execution.trimming_iterations import Pruned, TrimmingIteration, random_keep, run_trimming_iterations
from inc_plugins.finite_checks import check_outputs, check_trained_weights, check_training_loss
from inc_plugins.inc.lottery_ticket import inc_magnitude_round
from inc_plugins.models.cnn_structure import conv_bn_pairs
from inc_plugins.models.surgery_cnn import slim_cnn_channels, slim_mlp_neurons

from .digits import DigitsSplit, labelled_batches
from .vision_models import DigitsCNN, DigitsMLP, build_digits_model, macs_per_image

logging.getLogger("neural_compressor").setLevel(logging.WARNING)


@dataclass(frozen=True)
class TrainSettings:
    """Adam (or SGD with momentum 0.9, as network slimming trains) with a cosine-decayed learning rate over
    ``epochs`` passes of shuffled mini-batches."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    def make_optimizer(self, parameters) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.learning_rate, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def steps(self, train_size: int) -> int:
        return self.epochs * -(-train_size // self.batch_size)


# ----------------------------------------------------------------------------------------------- train, evaluate


def train_digits(
    model: nn.Module,
    split: DigitsSplit,
    settings: TrainSettings,
    after_step: Callable[[int], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Trains ``model`` in place on the training images; returns the last epoch's mean loss.

    ``after_step(step)`` runs after every optimizer step (steps counted from 1). Shuffling draws from a generator
    seeded by ``settings.seed``, so training is deterministic and leaves torch's global RNG alone. A non-finite
    loss (checked every step) or weight (checked after every epoch) raises NonFiniteError naming the step.
    """
    images, labels = split.train_images, split.train_labels
    optimizer = optimizer or settings.make_optimizer(model.parameters())
    total = settings.steps(len(labels))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    step, losses = 0, []
    for epoch in range(1, settings.epochs + 1):
        losses = []
        during = f"training (epoch {epoch} of {settings.epochs})"
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            losses.append(loss.item())
            check_training_loss(model, losses[-1], step + 1, during)  # before the update spreads NaN to every weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if after_step is not None:
                after_step(step)
        check_trained_weights(model, step, during)
    model.eval()
    return statistics.fmean(losses)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` classified as ``labels``; NonFiniteError when the logits hold NaN or Inf (argmax would
    rank them silently, and a NaN model scores chance accuracy)."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch, start in enumerate(range(0, len(labels), batch_size)):
        logits = model(images[start:start + batch_size])
        check_outputs(model, logits, "logits", batch=batch)
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def accuracy_on_test(model: nn.Module, split: DigitsSplit) -> float:
    return accuracy(model, split.test_images, split.test_labels)


def hidden_widths(model: nn.Module) -> list[int]:
    return list(model.widths())


def _config(**entry) -> object:
    return inc_plugins.pruning_config(pruning_configs=[entry])


# ---------------------------------------------------------------------------------------------- network slimming


def sparsity_train(model: DigitsCNN, split: DigitsSplit, settings: TrainSettings, l1: float) -> float:
    """Trains with ``l1 * sum |gamma|`` on the BatchNorm scales after the convolutions (network slimming's sparsity
    training) through INC's training callbacks: the ``bn_l1`` regulariser on a ``magnitude`` entry with target 0,
    which prunes nothing. ``l1 = 0`` trains plainly. Returns the last epoch's mean loss."""
    if l1 < 0:
        raise ValueError(f"the L1 coefficient must be >= 0, got {l1}")
    if l1 == 0:
        return train_digits(model, split, settings)
    optimizer = settings.make_optimizer(model.parameters())
    pruning = inc_plugins.prepare_pruning(
        model,
        _config(pruning_type="magnitude", target_sparsity=0.0, pattern="1xchannel", pruning_op_types=["Conv"],
                reg_type="bn_l1", parameters={"reg_coeff": l1}),
        optimizer=optimizer,
    )
    pruning.on_train_begin()
    loss = train_digits(model, split, settings, optimizer=optimizer)
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)
    return loss


@dataclass(frozen=True)
class SlimmedCNN:
    masked: DigitsCNN  # the pruned channels zeroed, the original sizes
    slimmed: DigitsCNN  # the pruned channels removed
    keep: dict[str, Tensor]  # {BN name: keep mask}
    max_abs_difference: float  # slimmed vs masked logits on the test images


@torch.no_grad()
def slim_by_bn_scales(model: DigitsCNN, fraction: float, split: DigitsSplit, scope: str = "global") -> SlimmedCNN:
    """INC's ``network_slimming`` one-shot on a copy of ``model`` (the ``fraction`` of channels with the smallest
    ``|gamma|`` across all layers with ``scope="global"``, the paper's choice, or in each layer with ``"local"``),
    then physical removal; checks the two give the same logits."""
    masked = copy.deepcopy(model).eval()
    pruning = inc_plugins.prepare_pruning(
        masked, _config(pruning_type="network_slimming", target_sparsity=fraction, pattern="1xchannel",
                        pruning_scope=scope, pruning_op_types=["Conv"]))
    slimmed = inc_plugins.slim(masked, pruning.result).eval()
    difference = (slimmed(split.test_images) - masked(split.test_images)).abs().max().item()
    return SlimmedCNN(masked, slimmed, dict(pruning.result.keep), difference)


def bn_scale_summary(model: nn.Module) -> dict:
    """How concentrated the BN scales are: the fraction of |gamma| below 1e-2 and 1e-1 (after sparsity training,
    many channels sit near 0)."""
    scales = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    return {"channels": len(scales), "below_0.01": float((scales < 1e-2).float().mean()),
            "below_0.1": float((scales < 1e-1).float().mean())}


# ---------------------------------------------------------------------------------------------- network trimming


@dataclass(frozen=True)
class TrimmingStep:
    iteration: int
    widths: list[int]
    remaining_fraction: float  # of the hidden channels/neurons
    accuracy_pruned: float  # before fine-tuning
    accuracy_finetuned: float
    parameters: int
    macs_per_image: int
    mean_apoz_pruned: float | None  # the APoZ of the channels pruned in this step (random control: None)


def _slim_kept(model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """The physically smaller model: CNN channels through their BatchNorm, MLP neurons directly."""
    if isinstance(model, DigitsMLP):
        return slim_mlp_neurons(model, keep)
    pairs = conv_bn_pairs(model)
    return slim_cnn_channels(model, {pairs[name]: mask for name, mask in keep.items()})


def trim_once(model: nn.Module, fraction: float, split: DigitsSplit, scope: str = "local",
              threshold: float | None = None, batch_size: int = 256):
    """INC's ``network_trimming`` one-shot on a copy of ``model``: APoZ measured on the validation images, the
    ``fraction`` of channels with the highest APoZ pruned (per layer with ``scope="local"``, the paper's
    layer-by-layer choice). Returns (physically slimmed model, {layer: keep mask}, {layer: APoZ})."""
    masked = copy.deepcopy(model).eval()
    entry = dict(pruning_type="network_trimming", target_sparsity=fraction, pattern="1xchannel", pruning_scope=scope)
    if threshold is not None:
        entry["apoz_threshold"] = threshold
    pruning = inc_plugins.prepare_pruning(masked, _config(**entry),
                                          dataloader=labelled_batches(split.val_images, split.val_labels, batch_size))
    return _slim_kept(masked, pruning.result.keep), dict(pruning.result.keep), dict(pruning.result.apoz)


def _hidden_layers(model: nn.Module) -> dict[str, int]:
    """{layer trimming prunes: its width}, in the model's order: the hidden Linears of the MLP (not the output
    layer), the convolutions (through their BatchNorm) of the CNN."""
    if isinstance(model, DigitsMLP):
        layers = {name: m.out_features for name, m in model.named_children() if isinstance(m, nn.Linear)}
        layers.pop(list(layers)[-1])
        return layers
    return {name: model.get_submodule(name).out_channels for name in conv_bn_pairs(model)}


@dataclass(frozen=True)
class TrimmingChains:
    """``iterative_trimming``'s two chains: the steps and final (physically smaller) network of the APoZ chain and
    of the random control."""

    apoz: list[TrimmingStep]
    random: list[TrimmingStep]
    apoz_model: nn.Module
    random_model: nn.Module


def iterative_trimming(model: nn.Module, split: DigitsSplit, fraction: float, iterations: int,
                       finetune: TrainSettings, threshold: float | None = None) -> TrimmingChains:
    """Network trimming's loop (``inc_plugins.execution.trimming_iterations``): prune ``fraction`` of the remaining
    channels of every hidden layer by APoZ (``trim_once``, per iteration: a fraction of what remains), remove them,
    fine-tune the smaller network from its surviving weights (seed ``finetune.seed + iteration``), repeat
    ``iterations`` times. The random control removes the same number of channels per layer at random (one generator
    seeded ``finetune.seed + 7`` for all its iterations), same fine-tuning: the baseline APoZ must beat. ``model``
    is not modified."""
    dense_width = sum(hidden_widths(model))

    def prune(current: nn.Module, step_fraction: float, _previous) -> Pruned:
        slimmed, keep, apoz = trim_once(current, step_fraction, split, threshold=threshold)
        return Pruned(slimmed, keep, apoz)

    def prune_randomly(current: nn.Module, counts: dict[str, int], generator: torch.Generator, _previous) -> Pruned:
        layers = _hidden_layers(current)
        if set(layers) != set(counts):
            raise RuntimeError(f"the APoZ step pruned layers {sorted(counts)}, the random control has {sorted(layers)}")
        keep = random_keep({name: torch.ones(width, dtype=torch.bool) for name, width in layers.items()}, counts,
                           generator)
        return Pruned(_slim_kept(current, keep), keep)

    def measure(trimmed: nn.Module) -> dict:
        return {"widths": hidden_widths(trimmed), "parameters": sum(p.numel() for p in trimmed.parameters()),
                "macs_per_image": macs_per_image(trimmed)}

    def fine_tune(trimmed: nn.Module, iteration: int, _label: str) -> None:
        train_digits(trimmed, split, replace(finetune, seed=finetune.seed + iteration))

    generator = torch.Generator().manual_seed(finetune.seed + 7)
    chains = run_trimming_iterations(
        model, [fraction] * iterations, prune, prune_randomly, generator_for=lambda _iteration: generator,
        evaluate=lambda trimmed, _label: accuracy_on_test(trimmed, split), finetune=fine_tune, measure=measure)

    def step(row: TrimmingIteration) -> TrimmingStep:
        mean_apoz = None
        if row.apoz is not None:
            pruned_apoz = torch.cat([row.apoz[name][~row.keep[name]] for name in row.keep])
            mean_apoz = float(pruned_apoz.mean()) if len(pruned_apoz) else None
        widths = row.measures["widths"]
        return TrimmingStep(row.iteration, widths, sum(widths) / dense_width, row.accuracy_pruned,
                            row.accuracy_finetuned, row.measures["parameters"], row.measures["macs_per_image"],
                            mean_apoz)

    return TrimmingChains([step(row) for row in chains["apoz"].rows], [step(row) for row in chains["random"].rows],
                          chains["apoz"].model, chains["random"].model)


# ----------------------------------------------------------------------------------------------- lottery tickets


def lottery_tickets(architecture: str, split: DigitsSplit, train: TrainSettings, rounds: int,
                    prune_fraction: float, rewind_to: str = "init", seed: int = 0, scope: str = "layer",
                    output_layer_rate: float | None = None, widths: Sequence[int] | None = None):
    """Iterative magnitude pruning with rewinding on a digits network, the control in the same run.

    Each round INC's ``magnitude`` pruner (``inc_magnitude_round``) prunes ``prune_fraction`` of the remaining
    weights of every Linear/Conv layer (``scope="layer"``; ``output_layer_rate`` for the classifier, the paper
    uses half the rate) or across them (``"global"``). Returns ``run_lottery_rounds``'s rounds."""
    model_seed = seed

    def make_model() -> nn.Module:
        nonlocal model_seed
        model = build_digits_model(architecture, widths, seed=model_seed)
        model_seed += 1  # the control's fresh models differ from the ticket's
        return model

    def train_fn(model: nn.Module, after_step: Callable[[int], None]) -> None:
        train_digits(model, split, replace(train, seed=train.seed + seed), after_step)

    probe = build_digits_model(architecture, widths)
    head = "classifier" if isinstance(probe, DigitsCNN) else str(len(probe) - 1)
    rates = {head: output_layer_rate} if output_layer_rate is not None else None
    prune_round = functools.partial(inc_magnitude_round, scope=scope, layer_fractions=rates)
    return run_lottery_rounds(make_model, train_fn, lambda m: accuracy_on_test(m, split), rounds=rounds,
                              prune_fraction=prune_fraction, rewind_to=rewind_to, seed=seed, scope=scope,
                              control=True, control_init="reset_parameters", prune_round=prune_round)


# ----------------------------------------------------------------------------------------------- particle filter


@dataclass(frozen=True)
class ParticleFilterOutcome:
    model: nn.Module  # retrained (channel patterns: physically slimmed)
    masks: dict[str, Tensor]  # {conv name: keep mask of the weight}, the pattern held during retraining
    sparsity: float  # of the pruned convolutions' weights
    accuracy_pruned: float
    accuracy_retrained: float
    search_seconds: float
    evaluations: int


PATTERN_OF = {"channel": "1xchannel", "kernel": "1x1", "intra_kernel": "1x1"}
# The first convolution reads one input channel: kernel and intra-kernel patterns there would be all-or-nothing.
PF_EXCLUDED = [r"^features\.0\.0$"]


def _retrain_with_masks(model: DigitsCNN, masks: Mapping[str, Tensor], split: DigitsSplit,
                        settings: TrainSettings, granularity: str) -> nn.Module:
    """Retrains with the pattern held (channel patterns: removed physically first, so BatchNorm cannot revive
    them). Returns the retrained model."""
    if granularity == "channel":
        model = _slim_kept(model, {name: mask.flatten(1).any(dim=1) for name, mask in masks.items()})
        train_digits(model, split, settings)
        return model
    layers = {name: model.get_submodule(name) for name in masks}
    with enforce_masks(layers, masks):
        train_digits(model, split, settings)
    return model


def _pattern_sparsity(masks: Mapping[str, Tensor]) -> float:
    return 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def particle_filter_pruning(model: DigitsCNN, split: DigitsSplit, granularity: str, sparsity: float,
                            retrain: TrainSettings, num_particles: int = 16, iterations: int = 6,
                            stride: int = 2, seed: int = 0, batch_size: int = 512) -> ParticleFilterOutcome:
    """INC's ``particle_filter`` one-shot on a copy of ``model`` (convolutions 2 and 3), then retraining."""
    pruned = copy.deepcopy(model).eval()
    entry = dict(pruning_type="particle_filter", target_sparsity=sparsity, pattern=PATTERN_OF[granularity],
                 granularity=granularity, pruning_op_types=["Conv"], excluded_op_names=PF_EXCLUDED,
                 num_particles=num_particles, iterations=iterations, stride=stride, seed=seed)
    start = time.perf_counter()
    pruning = inc_plugins.prepare_pruning(pruned, _config(**entry),
                                          dataloader=labelled_batches(split.val_images, split.val_labels, batch_size))
    seconds = time.perf_counter() - start
    masks = {name: result.mask.bool() for name, result in pruning.result.searches.items()}
    accuracy_pruned = accuracy_on_test(pruned, split)
    retrained = _retrain_with_masks(pruned, masks, split, retrain, granularity)
    return ParticleFilterOutcome(retrained, masks, _pattern_sparsity(masks), accuracy_pruned,
                                 accuracy_on_test(retrained, split), seconds,
                                 sum(r.evaluations for r in pruning.result.searches.values()))


@torch.no_grad()
def random_pattern_pruning(model: DigitsCNN, split: DigitsSplit, granularity: str, sparsity: float,
                           retrain: TrainSettings, stride: int = 2, seed: int = 0) -> ParticleFilterOutcome:
    """The control: one random pattern per layer of the same granularity and size as the particle filter's,
    the same retraining."""
    pruned = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(pruned)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name in [name for name in pairs if name != "features.0.0"]:  # the convolutions PF_EXCLUDED leaves
        conv = pruned.get_submodule(name)
        pattern = StructuredPattern(conv.weight.shape, granularity, sparsity, stride)
        masks[name] = pattern.mask(pattern.random_state(generator))
        conv.weight.mul_(masks[name])
        if granularity == "channel":  # silence the BatchNorm shift too, as the particle filter does
            bn = pruned.get_submodule(pairs[name])
            kept = masks[name].flatten(1).any(dim=1).float()
            bn.weight.mul_(kept)
            bn.bias.mul_(kept)
    accuracy_pruned = accuracy_on_test(pruned, split)
    with torch.enable_grad():
        retrained = _retrain_with_masks(pruned, masks, split, retrain, granularity)
    return ParticleFilterOutcome(retrained, masks, _pattern_sparsity(masks), accuracy_pruned,
                                 accuracy_on_test(retrained, split), 0.0, 0)
