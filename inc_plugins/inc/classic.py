"""Classic pruning methods plugged into INC 3.7.1: network trimming, network slimming, lottery tickets and
particle-filter structured pruning. The math lives in ``inc_plugins.algorithms`` (``apoz``, ``bn_slimming``,
``lottery_ticket``, ``particle_filter``); this module only adapts it to INC's registries and configs.

What is registered (names avoid the substrings INC dispatches on: "gpt", "retrain", "block", "free",
"progressive"):

One-shot types, routed by ``inc_plugins.prepare_pruning(model, config, dataloader=...)`` (which requires a
``dataloader`` for every one-shot type). Each builds one INC pruner per config entry (``PRUNERS["pt_<type>"]``,
with ``.modules``, ``.masks`` in the weights' layout and ``.pattern``), so INC's ``get_sparsity_ratio`` report
works, and the result is logged and kept in ``.report``. Layer selection follows INC (``op_names`` /
``excluded_op_names`` regexes searched in module names, ``pruning_op_types`` substrings of class names);
task heads (``classifier``, ``lm_head``, ...; for models no adapter knows, the last Linear, as INC does) are
excluded by exact name. ``target_sparsity`` is the fraction of *channels* removed; ``pruning_scope``
``"global"`` (INC's default) ranks channels across the entry's layers, ``"local"`` per layer; at least one
channel per layer is always kept. About ``"1xchannel"``: for a Linear weight ``[out, in]`` INC's block is one
output row; for a Conv2d INC reshapes the weight to ``[out, kh * kw * in]`` and a block is ``[1, in]``, one
kernel position of one output filter. The one-shot types zero whole filters, which INC's report counts as all
of that filter's blocks, so its block-wise sparsity equals the fraction of filters removed.

``network_trimming`` (Hu et al. 2016; ``pattern: "1xchannel"``, which in INC is a layer's output
    channels/neurons; extra key ``apoz_threshold``): runs the calibration batches, measures each selected
    layer's APoZ at the activation that follows it (``algorithms.apoz``), and prunes the channels with the
    highest APoZ: the layer's output filters/rows and bias entries are zeroed, and so are the scale and shift
    of a BatchNorm between the layer and its activation, so a pruned channel outputs exactly zero. The paper
    alternates pruning and fine-tuning; one call is one pruning step (the recipe iterates). ``apoz_threshold``:
    outputs with ``|x| <= t`` count as zero; needed for smooth activations (GELU, SiLU: an extension of the
    paper), 0 by default for ReLU-like ones. Select layers that are followed by an activation (CNN convs; for
    BERT-like FFNs ``op_names: ["intermediate.dense"]``); others are an error naming them. ``token`` batches
    with an ``attention_mask`` count only real tokens. Results: ``.apoz``, ``.keep`` ({layer: keep mask}),
    ``.sites`` (where each layer's APoZ was read).

``network_slimming`` (Liu et al. 2017; ``pattern: "1xchannel"``): ranks the channels of the BatchNorm
    layers that directly follow the selected convolutions by ``|gamma|`` and prunes the smallest, by masking:
    the conv filters (and bias) and the BN's ``gamma`` and ``beta`` are zeroed. ``.keep`` is {BN name: keep
    mask}; ``.slim()`` (or ``slim_cnn_channels(model, pruning.keep)``) returns the physically smaller CNN.
    Selected layers without a following BN are skipped with a warning; none at all is an error. The dataloader
    is not read (the entry point requires one). Sparsity training is separate (below).

``particle_filter`` (Anwar et al. 2017): searches structured masks of each selected Conv2d, one layer at a time,
    scoring candidates by the misclassification rate on the given **labelled** batches (``(inputs, labels)``
    pairs or dicts with ``labels``). ``pattern: "1xchannel"`` means ``granularity: "channel"`` (output feature
    maps; a following BN channel is silenced too); ``pattern: "1x1"`` with ``granularity: "kernel"`` (whole
    kh x kw kernels) or ``"intra_kernel"`` (strided kernel positions, ``stride`` key). Extra keys
    ``num_particles`` (16), ``iterations`` (6), ``weighting`` (``"linear"``: 1 - error, or ``"exp"``),
    ``temperature`` (0.05), ``mutation_rate`` (0.1), ``stride`` (2), ``seed`` (0), ``keep_best`` (true:
    elitism). Results: ``.results`` ({layer: SearchResult}). Non-Conv2d selected layers are skipped with a
    warning. Cost: about ``num_particles * (iterations + 1)`` evaluations of the batches per layer (fewer when
    particles repeat: each distinct pattern is evaluated once).

Training-aware pieces for INC's ``prepare_pruning(model, config, optimizer=...)`` flow (put their keys in the
``pruning_configs`` entry: INC does not copy unknown global keys into entries):

``CRITERIA["apoz"]`` (``pruning_type: "apoz"``, ``pattern: "1xchannel"``, ``end_step >= 1``, optional
    ``apoz_threshold``): score = 1 - APoZ of each output channel, accumulated over every forward pass since the
    pruner was built (training steps, not a separate calibration set), so INC's schedulers prune the channels
    with the highest APoZ gradually. On a Conv2d the score is the same for all of a filter's ``[1, in]``
    blocks, so INC's threshold prunes whole filters (it may overshoot the target by part of a filter's tie).
    INC masks only the layers' weights (a BatchNorm after a pruned conv keeps its shift). Scores are empty
    (INC skips that pruning step) until a forward pass has been seen; ``criterion.remove_hooks()`` stops the
    counting early (it stops by itself after ``end_step``).
``REGS["bn_l1"]`` (``reg_type: "bn_l1"``, ``parameters: {"reg_coeff": lambda}``; INC 3.7.1 overwrites a bare
    ``reg_coeff`` key with the default of ``parameters``): network slimming's sparsity training. Before
    every optimizer step it adds ``lambda * sign(gamma)`` to the gradients of the BatchNorm layers that
    directly follow the entry's selected layers (the paper's reference code does exactly this). Use it with
    any training-aware type, e.g. ``{"pruning_type": "magnitude", "target_sparsity": 0.0, "pattern":
    "1xchannel", "pruning_op_types": ["Conv"], "reg_type": "bn_l1", "parameters": {"reg_coeff": 1e-4}}``
    for sparsity training without pruning, then ``network_slimming`` one-shot. A training loop outside INC can instead add
    ``algorithms.bn_slimming.bn_l1_penalty(model, lambda)`` to its loss.

Both need the model, which INC never gives a criterion or a regularizer: they find it at the first forward pass
after they are built (a global module pre-hook that adopts the first called module containing all their layers,
then removes itself), and then hook that model's modules.

Lottery tickets have no INC pruning type: rewinding needs the weights saved before training and a driver
around the caller's training, which INC's step callbacks do not own. ``run_lottery_rounds`` in
``algorithms.lottery_ticket`` is the project API; ``inc_magnitude_round`` lets INC's own ``magnitude`` pruner
choose each round's weights (``prune_round=inc_magnitude_round`` or
``functools.partial(inc_magnitude_round, scope="layer", layer_fractions={"classifier": p / 2})``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from neural_compressor.compression.pruner.criteria import register_criterion
from neural_compressor.compression.pruner.patterns import get_pattern
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.pruners.base import PytorchBasePruner, register_pruner
from neural_compressor.compression.pruner.pruning import BasePruning
from neural_compressor.compression.pruner.regs import BaseReg, register_reg
from neural_compressor.compression.pruner.utils import get_sparsity_ratio, process_config
from torch import Tensor, nn

from inc_plugins.algorithms.apoz import APoZMonitor, channels_to_prune
from inc_plugins.algorithms.bn_slimming import (
    add_bn_l1_subgradient_,
    conv_bn_pairs,
    mask_bn_channels,
    prune_lowest_channels,
    slim_cnn_channels,
)
from inc_plugins.algorithms.lottery_ticket import Masks, apply_masks
from inc_plugins.algorithms.particle_filter import (
    GRANULARITIES,
    ParticleFilterSettings,
    SearchResult,
    particle_filter_prune,
    split_labelled_batch,
)
from inc_plugins.finite_checks import NonFiniteError, check_batch, check_parameters, check_tensor
from inc_plugins.models.architectures import UnsupportedModelError, adapter_for

from .config import pruning_config
from .config_checks import PruningConfigError
from .hook_fed_criterion import HookFedCriterion
from .layer_selection import EXAMPLE_NAMES, select_layers
from .one_shot import register_one_shot_pruning

logger = logging.getLogger(__name__)

__all__ = [
    "NetworkTrimmingPruning",
    "NetworkSlimmingPruning",
    "ParticleFilterPruning",
    "APoZCriterion",
    "BNL1Regularizer",
    "inc_magnitude_round",
    "slim_cnn_channels",
]

_CHANNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- shared helpers ------------------------------------------------------------------------------------------


def _pattern_name(info: Mapping[str, Any]) -> str:
    return str(info["pattern"]).split("_")[-1]


def _require_pattern(info: Mapping[str, Any], pruning_type: str, allowed: str, why: str) -> None:
    if _pattern_name(info) != allowed:
        raise PruningConfigError(
            f"pruning_type {pruning_type!r} {why}: set pattern {allowed!r} (got {info['pattern']!r})"
        )


def _apoz_threshold(info: Mapping[str, Any]) -> float | None:
    value = info.get("apoz_threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PruningConfigError(f"apoz_threshold must be a number >= 0, got {value!r}")
    return float(value)


def _scope(info: Mapping[str, Any]) -> str:
    scope = info.get("pruning_scope") or "global"
    if scope not in ("global", "local"):
        raise PruningConfigError(f"pruning_scope must be 'global' or 'local', got {scope!r}")
    return scope


def _head_names(model: nn.Module) -> list[str]:
    """Task heads to keep dense: the adapter's, or (models no adapter knows) the last Linear, as INC does."""
    try:
        return adapter_for(model).head_names(model)
    except UnsupportedModelError:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        return linears[-1:]


def _model_inputs(batch) -> tuple[tuple, dict]:
    if isinstance(batch, Mapping):
        return (), {key: value for key, value in batch.items() if key != "labels"}
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    if isinstance(batch, Tensor):
        return (batch,), {}
    raise TypeError(
        f"calibration batches must be dicts, (inputs, labels) tuples/lists or tensors, got {type(batch).__name__}"
    )


def _to(value, device):
    return value.to(device) if isinstance(value, Tensor) else value


def _report(pruners, model):
    """INC's sparsity report (INC logs it); None if INC's report divides by zero for these layers."""
    try:
        return get_sparsity_ratio(pruners, model)
    except ZeroDivisionError:
        logger.warning("INC's sparsity report cannot be computed for these layers and this pattern")
        return None


def _rows_mask(module: nn.Module, keep: Tensor) -> Tensor:
    """A per-output-channel keep mask [C] expanded to the weight's layout (bool)."""
    shape = module.weight.shape
    return keep.to(module.weight.device).bool().reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


@torch.no_grad()
def _zero_output_channels(module: nn.Module, keep: Tensor) -> Tensor:
    mask = _rows_mask(module, keep)
    module.weight.mul_(mask)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(keep.to(module.bias.device, module.bias.dtype))
    return mask


class _RootFinder:
    """Finds the model around ``targets`` at its first forward pass: a global module forward pre-hook adopts the
    first called module that contains every target (the outermost module of that forward), calls
    ``on_found(model)`` and removes itself. ``on_found`` is held weakly when it is a bound method."""

    def __init__(self, targets: Iterable[nn.Module], on_found: Callable[[nn.Module], None]):
        self._target_ids = {id(module) for module in targets}
        self._rejected: set[int] = set()
        self._callback = weakref.WeakMethod(on_found) if hasattr(on_found, "__self__") else (lambda: on_found)
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args) -> None:
        if self._handle is None or id(module) in self._rejected:
            return
        callback = self._callback()
        if callback is None:  # the owner is gone
            self.remove()
            return
        if self._target_ids <= {id(m) for m in module.modules()}:
            self.remove()
            callback(module)
        else:
            self._rejected.add(id(module))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.remove()


class _StructurePruner(PytorchBasePruner):
    """INC pruner shell of a one-shot plugin type: ``.modules``, ``.masks`` (set by the pruning class) and
    ``.pattern`` (from INC's ``get_pattern``), so INC's report works. It has no training-loop schedule."""

    pruning_type = ""

    def _init(self) -> None:
        self.pattern = get_pattern(self.config, self.modules)
        self.pruned = False

    def on_train_begin(self, dataloader=None) -> None:
        if not self.pruned:
            raise RuntimeError(
                f"pt_{self.pruning_type} prunes one-shot: call inc_plugins.prepare_pruning(model, config, "
                f"dataloader=...) with pruning_type {self.pruning_type!r}"
            )


@register_pruner("pt_network_trimming")
class NetworkTrimmingPruner(_StructurePruner):
    pruning_type = "network_trimming"


@register_pruner("pt_network_slimming")
class NetworkSlimmingPruner(_StructurePruner):
    pruning_type = "network_slimming"


@register_pruner("pt_particle_filter")
class ParticleFilterPruner(_StructurePruner):
    pruning_type = "particle_filter"


class _OneShotClassic(BasePruning):
    """Shared shape of the one-shot classes: check settings, select layers, build INC pruners, prune, report."""

    pruning_type = ""

    def __init__(self, config, model: nn.Module, dataloader=None, loss_func=None, device=None):
        self._heads = _head_names(model)
        super().__init__(config, model)
        original = next(model.parameters()).device
        target = torch.device(device) if device is not None else original
        if target != original:
            model.to(target)
        try:
            self._prune(dataloader)
        finally:
            if target != original:
                model.to(original)
                for pruner in self.pruners:
                    for name, module in pruner.modules.items():
                        pruner.masks[name] = pruner.masks[name].to(module.weight.device)
        for pruner in self.pruners:
            pruner.pruned = True
        self.report = _report(self.pruners, model)

    # subclasses: check settings, narrow the selected layers, prune
    def _check(self, info) -> None:
        raise NotImplementedError

    def _layers(self, index: int, info, selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return selected

    def _prune(self, dataloader) -> None:
        raise NotImplementedError

    def _generate_pruners(self):
        pruners, owner = [], {}
        for index, info in enumerate(self.pruners_info):
            self._check(info)
            layers = self._layers(index, info, select_layers(info, self._model, self._heads))
            for name in layers:
                if name in owner:
                    raise PruningConfigError(
                        f"layer {name!r} is selected by both config entries {owner[name]} and {index}: "
                        f"narrow their op_names / excluded_op_names"
                    )
                owner[name] = index
            pruner = get_pruner(info, layers)
            info["modules"] = list(layers)
            info["len_of_modules"] = len(layers)
            logger.info("%s config entry %d prunes %d layers: %s", self.pruning_type, index, len(layers), list(layers))
            pruners.append(pruner)
        return pruners

    def on_train_begin(self, dataloader=None):
        logger.info("%s pruning is done at construction; on_train_begin() has nothing to do", self.pruning_type)


# --- network trimming (APoZ) ---------------------------------------------------------------------------------


@register_one_shot_pruning("network_trimming", config_keys=("apoz_threshold",), default_pattern="1xchannel")
class NetworkTrimmingPruning(_OneShotClassic):
    """One-shot network trimming: prune the output channels/neurons with the highest APoZ (see the module doc).

    Built by ``inc_plugins.prepare_pruning`` as ``NetworkTrimmingPruning(infos, model, dataloader, loss_func,
    device)``; prunes at construction. ``apoz``: {layer: APoZ [C]}; ``keep``: {layer: keep mask [C]};
    ``sites``: {layer: ActivationSite}.
    """

    pruning_type = "network_trimming"

    def _check(self, info) -> None:
        _require_pattern(info, self.pruning_type, "1xchannel", "removes whole output channels/neurons")
        _apoz_threshold(info)
        _scope(info)

    def _layers(self, index, info, selected):
        unsupported = [f"{n!r} ({type(m).__name__})" for n, m in selected.items() if not isinstance(m, _CHANNEL_LAYERS)]
        if unsupported:
            raise PruningConfigError(
                f"network_trimming scores output channels of Linear and Conv1d/2d/3d layers; config entry {index} "
                f"also selects {', '.join(unsupported)}: exclude them with excluded_op_names"
            )
        return selected

    @torch.no_grad()
    def _prune(self, dataloader) -> None:
        model = self._model
        monitors = [APoZMonitor(model, pruner.modules, _apoz_threshold(info))
                    for pruner, info in zip(self.pruners, self.pruners_info)]
        device = next(model.parameters()).device
        check_parameters(model, "network_trimming")
        was_training = model.training
        model.eval()
        seen = 0
        try:
            with contextlib.ExitStack() as stack:
                for monitor in monitors:
                    stack.enter_context(monitor)
                for batch in dataloader:
                    check_batch(batch, seen, "network_trimming")
                    args, kwargs = _model_inputs(batch)
                    valid = kwargs.get("attention_mask")
                    for monitor in monitors:
                        monitor.valid_positions = valid
                    model(*(_to(a, device) for a in args), **{k: _to(v, device) for k, v in kwargs.items()})
                    seen += 1
        except NonFiniteError:
            raise
        except ValueError as error:
            raise PruningConfigError(str(error)) from error
        finally:
            model.train(was_training)
        if seen == 0:
            raise PruningConfigError("network_trimming measures APoZ on calibration batches: the dataloader is empty")

        self.apoz, self.keep, self.sites = {}, {}, {}
        for pruner, info, monitor in zip(self.pruners, self.pruners_info, monitors):
            try:
                apoz = monitor.apoz()
                keep = channels_to_prune(apoz, float(info["target_sparsity"]), _scope(info))
            except ValueError as error:
                raise PruningConfigError(f"network_trimming: {error}") from error
            for name, module in pruner.modules.items():
                pruner.masks[name] = _zero_output_channels(module, keep[name])
                for bn_name in monitor.sites[name].batchnorms:
                    bn = model.get_submodule(bn_name)
                    bn.weight.mul_(keep[name].to(bn.weight.device, bn.weight.dtype))
                    if bn.bias is not None:
                        bn.bias.mul_(keep[name].to(bn.bias.device, bn.bias.dtype))
            self.apoz.update(apoz)
            self.keep.update(keep)
            self.sites.update(monitor.sites)
            logger.info(
                "network_trimming: pruned %s channels",
                {name: int((~mask).sum()) for name, mask in keep.items()},
            )


@register_criterion("apoz")
class APoZCriterion(HookFedCriterion):
    """INC criterion for training-aware pruning: score = 1 - APoZ per output channel (``pattern "1xchannel"``).

    Activations are counted at each layer's following activation (``algorithms.apoz.APoZMonitor``) in every
    forward pass from the first one after construction until the optimizer step after ``end_step``; then the
    hooks are removed (``remove_hooks()`` removes them earlier).
    """

    pruning_type = "apoz"

    def __init__(self, modules, config, pattern):
        super().__init__(modules, config, pattern, seen="activations")
        _require_pattern(config, "apoz", "1xchannel", "scores output channels/neurons")
        unsupported = [f"{n!r} ({type(m).__name__})" for n, m in modules.items() if not isinstance(m, _CHANNEL_LAYERS)]
        if unsupported:
            raise PruningConfigError(
                f"pruning_type 'apoz' scores Linear and Conv layers; exclude {', '.join(unsupported)}"
            )
        self.threshold = _apoz_threshold(config)
        self.monitor: APoZMonitor | None = None
        self._finder = _RootFinder(modules.values(), self._attach)

    def _attach(self, model: nn.Module) -> None:
        self.monitor = APoZMonitor(model, self.modules, self.threshold).attach()

    def on_step_begin(self) -> None:
        self.scores = {}
        if self.monitor is None:
            logger.info("apoz: no forward pass seen yet; this pruning step is skipped")
            return
        unseen = self.monitor.unseen()
        if len(unseen) == len(self.modules):
            logger.info("apoz: no activations counted yet; this pruning step is skipped")
            return
        try:
            apoz = self.monitor.apoz()  # raises, naming the layers that never reach an activation
        except ValueError as error:
            raise PruningConfigError(f"apoz: {error}") from error
        with torch.no_grad():
            for name, module in self.modules.items():
                keep_score = (1.0 - apoz[name]).to(module.weight.device, module.weight.dtype)
                self.set_score(name, keep_score.reshape(-1, *([1] * (module.weight.dim() - 1))).expand_as(module.weight))

    def remove_hooks(self) -> None:
        self._finder.remove()
        if self.monitor is not None:
            self.monitor.detach()


# --- network slimming ----------------------------------------------------------------------------------------


@register_one_shot_pruning("network_slimming", needs_data=False, default_pattern="1xchannel")
class NetworkSlimmingPruning(_OneShotClassic):
    """One-shot network slimming: mask the channels with the smallest BatchNorm ``|gamma|`` (see the module doc).

    ``keep``: {BN name: keep mask [C]}; ``batchnorm_of``: {conv name: BN name}; ``slim()``: the physically
    smaller model (a copy).
    """

    pruning_type = "network_slimming"

    def _check(self, info) -> None:
        _require_pattern(info, self.pruning_type, "1xchannel", "removes whole output channels")
        _scope(info)

    def _layers(self, index, info, selected):
        pairs = conv_bn_pairs(self._model)
        with_bn = {name: module for name, module in selected.items() if name in pairs}
        without = [name for name in selected if name not in pairs]
        if not with_bn:
            raise PruningConfigError(
                f"network_slimming ranks channels by the scale of the BatchNorm that follows each convolution, and "
                f"none of the layers selected by config entry {index} "
                f"({', '.join(map(repr, list(selected)[:EXAMPLE_NAMES]))}) is directly followed by a BatchNorm layer"
            )
        if without:
            logger.warning("network_slimming: these selected layers have no BatchNorm after them, so stay dense: %s",
                           without)
        self.batchnorm_of = {**getattr(self, "batchnorm_of", {}), **{name: pairs[name] for name in with_bn}}
        return with_bn

    def _prune(self, dataloader) -> None:
        self.keep = {}
        for name in self.batchnorm_of.values():  # what the ranking reads, then the rest of the model
            check_tensor(self._model.get_submodule(name).weight.detach(), name, "BatchNorm scale (gamma)",
                         "network_slimming", "check the model file and the sparsity training that produced it")
        check_parameters(self._model, "network_slimming")
        for pruner, info in zip(self.pruners, self.pruners_info):
            scales = {self.batchnorm_of[name]: self._model.get_submodule(self.batchnorm_of[name]).weight.detach().abs()
                      for name in pruner.modules}
            try:
                keep = prune_lowest_channels(scales, float(info["target_sparsity"]), _scope(info))
            except ValueError as error:
                raise PruningConfigError(f"network_slimming: {error}") from error
            masks = mask_bn_channels(self._model, keep)
            for name in pruner.modules:
                pruner.masks[name] = masks[name]
            self.keep.update(keep)
            logger.info("network_slimming: pruned %s channels", {n: int((~m).sum()) for n, m in keep.items()})

    def slim(self) -> nn.Module:
        """A physically smaller copy of the pruned model (``slim_cnn_channels``)."""
        return slim_cnn_channels(self._model, self.keep)


@register_reg("bn_l1")
class BNL1Regularizer(BaseReg):
    """INC regularizer ``reg_type: "bn_l1"``: adds ``reg_coeff * sign(gamma)`` to the gradient of every BatchNorm
    scale that directly follows one of the pruner's layers, before each optimizer step (network slimming's
    sparsity training)."""

    def __init__(self, config, modules, pattern, coeff):
        super().__init__(config, modules, pattern)
        if coeff is None or float(coeff) <= 0:
            raise PruningConfigError(
                f"reg_type 'bn_l1' needs reg_coeff > 0 (the L1 weight lambda), got {coeff!r}. INC 3.7.1 reads it from "
                f"the entry's `parameters: {{'reg_coeff': ...}}` and overwrites a bare `reg_coeff` key with its default"
            )
        self.coeff = float(coeff)
        self.batchnorms: dict[str, nn.Module] | None = None
        self._finder = _RootFinder(modules.values(), self._attach)

    def _attach(self, model: nn.Module) -> None:
        names = {id(module): name for name, module in model.named_modules()}
        pairs = conv_bn_pairs(model)
        layer_names = [names[id(module)] for module in self.modules.values()]
        self.batchnorms = {pairs[n]: model.get_submodule(pairs[n]) for n in layer_names if n in pairs}

    def on_before_optimizer_step(self) -> None:
        if self.batchnorms is None:
            raise RuntimeError("reg_type 'bn_l1' has not seen a forward pass of the model before the optimizer step")
        if not self.batchnorms:
            raise PruningConfigError(
                "reg_type 'bn_l1' penalises the BatchNorm scales after the selected layers, and no selected layer "
                "is directly followed by a BatchNorm layer: select the convolutions (e.g. pruning_op_types ['Conv'])"
            )
        add_bn_l1_subgradient_(self.batchnorms.values(), self.coeff)

    def __del__(self):
        with contextlib.suppress(Exception):
            self._finder.remove()


# --- particle filter -----------------------------------------------------------------------------------------

_PF_KEYS = (
    "granularity", "num_particles", "iterations", "weighting", "temperature", "mutation_rate", "stride", "seed",
    "keep_best",
)


def particle_filter_settings(info: Mapping[str, Any]) -> tuple[str, ParticleFilterSettings]:
    """(granularity, settings) of a config entry; PruningConfigError names the bad key."""
    pattern = _pattern_name(info)
    granularity = info.get("granularity")
    if granularity is None:
        if pattern != "1xchannel":
            raise PruningConfigError(
                f"particle_filter with pattern {info['pattern']!r}: set granularity to 'kernel' or 'intra_kernel' "
                f"(with pattern '1x1'), or use pattern '1xchannel' for channel-wise pruning"
            )
        granularity = "channel"
    if granularity not in GRANULARITIES:
        raise PruningConfigError(f"granularity {granularity!r} is not one of {', '.join(map(repr, GRANULARITIES))}")
    expected = "1xchannel" if granularity == "channel" else "1x1"
    if pattern != expected:
        raise PruningConfigError(
            f"particle_filter granularity {granularity!r} goes with pattern {expected!r}, got {info['pattern']!r}"
        )
    values = {key: info.get(key) for key in _PF_KEYS[1:] if info.get(key) is not None}
    for key in ("num_particles", "iterations", "stride", "seed"):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise PruningConfigError(f"{key} must be an integer, got {values[key]!r}")
    if "keep_best" in values and not isinstance(values["keep_best"], bool):
        raise PruningConfigError(f"keep_best must be true or false, got {values['keep_best']!r}")
    try:
        return granularity, ParticleFilterSettings(**values)
    except (ValueError, TypeError) as error:
        raise PruningConfigError(f"particle_filter: {error}") from error


# the default granularity is "channel"; "kernel" / "intra_kernel" need pattern "1x1" set explicitly
@register_one_shot_pruning("particle_filter", config_keys=_PF_KEYS, default_pattern="1xchannel")
class ParticleFilterPruning(_OneShotClassic):
    """One-shot particle-filter structured pruning of Conv2d layers (see the module doc).

    Needs labelled batches. ``results``: {layer: SearchResult} with the chosen mask, its error and the trace.
    """

    pruning_type = "particle_filter"

    def _check(self, info) -> None:
        particle_filter_settings(info)

    def _layers(self, index, info, selected):
        convs = {name: m for name, m in selected.items() if isinstance(m, nn.Conv2d) and m.groups == 1}
        others = [name for name in selected if name not in convs]
        if not convs:
            raise PruningConfigError(
                f"particle_filter prunes Conv2d layers (groups=1); config entry {index} selects none of them: "
                f"{others[:EXAMPLE_NAMES]}"
            )
        if others:
            logger.warning("particle_filter prunes Conv2d layers only; these selected layers stay dense: %s", others)
        return convs

    def _prune(self, dataloader) -> None:
        batches = list(dataloader)
        if not batches:
            raise PruningConfigError("particle_filter scores masks on labelled batches: the dataloader is empty")
        try:
            for batch in batches:
                split_labelled_batch(batch)
        except ValueError as error:
            raise PruningConfigError(f"particle_filter scores masks by misclassification rate: {error}") from error
        pairs = conv_bn_pairs(self._model)
        self.results: dict[str, SearchResult] = {}
        for pruner, info in zip(self.pruners, self.pruners_info):
            granularity, settings = particle_filter_settings(info)
            companions = {name: self._model.get_submodule(pairs[name]) for name in pruner.modules if name in pairs}
            results = particle_filter_prune(
                self._model, pruner.modules, batches, float(info["target_sparsity"]), granularity, settings, companions
            )
            for name, result in results.items():
                pruner.masks[name] = result.mask.to(pruner.modules[name].weight.device)
                logger.info("particle_filter: %s sparsity %.3f, error %.4f after %d evaluations",
                            name, result.sparsity, result.error, result.evaluations)
            self.results.update(results)


# --- lottery tickets through INC's magnitude pruner ---------------------------------------------------------


def _ratio_pruning_exactly(count: int, total: int) -> float:
    """A ratio r < 1 with ``int(total * r) == count`` (``count / total`` can round one short)."""
    ratio = count / total
    while int(total * ratio) < count:
        ratio = math.nextafter(ratio, 1.0)
    return ratio


def _inc_magnitude_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor], count: int, scope: str) -> Masks:
    total = sum(layer.weight.numel() for layer in layers.values())
    config = pruning_config(
        pruning_type="magnitude", pattern="1x1", target_sparsity=_ratio_pruning_exactly(count, total),
        pruning_scope=scope, start_step=0, end_step=0, max_sparsity_ratio_per_op=0.9999,
    )
    (info,) = process_config(config)
    pruner = get_pruner(info, dict(layers))
    pruner.on_step_begin(0)  # INC's magnitude criterion and NxM pattern choose the masks (and zero the weights)
    return {name: pruner.masks[name].bool().clone(memory_format=torch.contiguous_format) for name in layers}


def inc_magnitude_round(
    layers: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    fraction: float,
    scope: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
) -> Masks:
    """One lottery-ticket round chosen by INC's ``magnitude`` pruner: prune ``fraction`` of the remaining weights.

    INC is given the cumulative target (already pruned + ``round(fraction * remaining)``, per layer for
    ``scope="layer"``, across layers for ``"global"``); the pruned weights are zero (masks are applied first),
    so INC's magnitude ranking keeps them pruned. A drop-in ``prune_round`` for ``run_lottery_rounds``;
    the pruned weights are also zeroed in place (INC's ``mask_weights``). ``layer_fractions`` ({layer: rate},
    ``scope="layer"`` only) overrides the rate of some layers, e.g. the paper's half rate for the output layer.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if layer_fractions and scope != "layer":
        raise ValueError("layer_fractions sets per-layer rates, which only apply with scope='layer'")
    unknown = sorted(set(layer_fractions or {}) - set(layers))
    if unknown:
        raise ValueError(f"layer_fractions names layers that are not pruned: {unknown}")
    for name, rate in {"": fraction, **(layer_fractions or {})}.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"fraction{f' of {name!r}' if name else ''} must be in [0, 1), got {rate!r}")
    apply_masks(layers, masks)
    groups = [dict(layers)] if scope == "global" else [{name: layer} for name, layer in layers.items()]
    new: Masks = {}
    for group in groups:
        rate = (layer_fractions or {}).get(next(iter(group)), fraction) if scope == "layer" else fraction
        pruned = sum(int((~masks[name].bool()).sum()) for name in group)
        remaining = sum(int(masks[name].bool().sum()) for name in group)
        count = pruned + round(rate * remaining)
        if count == pruned:
            new.update({name: masks[name].bool().clone(memory_format=torch.contiguous_format) for name in group})
            continue
        new.update(_inc_magnitude_masks(group, masks, count, "global"))
    return new
