"""Wanda (Sun et al. 2023, arXiv:2306.11695) plugged into INC 3.7.1's pruning registries.

Three thin adapters around ``inc_plugins.algorithms.wanda`` / ``nm_mask`` (where the math lives):

``PRUNERS["pt_wanda"]`` -> ``WandaPruner``
    An INC pruner (``.modules``, ``.masks`` in each weight's own layout, ``.pattern`` from INC's ``get_pattern``)
    that collects input statistics with hooks and prunes its layers one block at a time. Patterns: ``"1x1"``
    (unstructured) and ``"N:M"`` (INC's convention: N of every M weights *pruned*, along the input dimension).

``PRUNINGS["wanda_pruning"]`` -> ``WandaPruning``, routed by ``inc_plugins.prepare_pruning`` for
``pruning_type="wanda"``
    One-shot, at construction (like INC's ``SparseGPTPruning``): the paper's sequential calibration. The first
    block's inputs are captured; for each block, hooks on its selected layers accumulate the squared input
    feature norms over every calibration batch, the block is pruned, and its outputs, recomputed with the
    pruned weights, become the next block's inputs. Peak memory is the model plus one block's activations for
    the calibration set. Extra keys, in a ``pruning_configs`` entry or given globally (``prepare_pruning`` copies
    global plugin keys into the entries, which INC alone would not):

    - ``comparison_group``: ``"per_output"`` (default, the paper's choice: every output row prunes
      ``int(in_features * sparsity)`` weights), ``"per_layer"`` (``int(numel * sparsity)`` per layer) or
      ``"global"`` (``int(total * sparsity)`` across all the config's layers). A global ranking needs every
      layer's scores before any layer is pruned, so ``"global"`` calibrates twice: one pass over the *dense*
      model ranks all scores together and fixes how many weights each layer loses; the sequential pass then
      chooses *which* ones, per layer, from statistics of the already-pruned earlier blocks. The total is
      exactly ``int(total * sparsity)``. The calibration batches are materialised in a list for the two passes.
    - ``use_variant`` (bool, default False): the paper's Wanda variant (cumulative-score threshold per row),
      only with ``per_output`` and ``"1x1"``.

    Layer selection follows INC: ``op_names`` / ``excluded_op_names`` are regexes searched in module names,
    ``pruning_op_types`` are substrings of class names. Unlike INC's ``parse_to_prune``, the model family's task
    heads (``lm_head``, ``classifier``, ...) are excluded by exact name, never used as regexes, and nothing is
    written into the excluded list. ``pruning_scope``, the step schedule and the per-op sparsity bounds are
    INC training-loop settings and are ignored here. Selected layers outside the model's blocks (e.g. BERT's
    pooler) get no calibrated statistics in the block walk: they stay dense, are left out of the pruner, and a
    warning names them.

``CRITERIA["wanda_score"]`` -> ``WandaScoreCriterion``
    For INC's training-aware flow (``prepare_pruning(..., optimizer=...)`` with ``pruning_type="wanda_score"``,
    any NxM / N:M pattern and INC's schedulers): score = ``|W| * sqrt(mean of x_j^2)`` over every input row
    seen by forward hooks since pruning started, reduced by the pattern like INC's ``MagnitudeCriterion``.
    Its name must not be ``"wanda"``: INC's ``get_pruner`` sends any pruning type found in ``CRITERIA`` to
    ``pt_basic``, so ``pruning_type="wanda"`` would never reach ``pt_wanda``. Names containing "gpt",
    "retrain", "block", "free" or "progressive" are also dispatched specially by INC.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from neural_compressor.compression.pruner.criteria import register_criterion
from neural_compressor.compression.pruner.patterns import get_pattern
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.pruners.base import PytorchBasePruner, register_pruner
from neural_compressor.compression.pruner.pruning import BasePruning
from neural_compressor.compression.pruner.utils import get_sparsity_ratio
from torch import nn
from transformers.pytorch_utils import Conv1D

from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms.wanda import (
    InputFeatureNorms,
    global_masks,
    per_layer_mask,
    per_output_mask,
    variant_mask,
    wanda_scores,
)
from inc_plugins.calibration import run_block, sequential_blocks
from inc_plugins.finite_checks import NonFiniteError, check_tensor
from inc_plugins.models.architectures import ArchitectureAdapter, adapter_for
from inc_plugins.models.layer_views import apply_matrix_mask, input_rows, input_samples, weight_matrix

from .config_checks import PruningConfigError
from .hook_fed_criterion import HookFedCriterion
from .layer_selection import select_layers
from .one_shot import register_one_shot_pruning

logger = logging.getLogger(__name__)

COMPARISON_GROUPS = ("per_output", "per_layer", "global")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


# --- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WandaSettings:
    """What one config entry asks Wanda for. ``nm`` is (N pruned, M) for an N:M pattern, None for 1x1."""

    sparsity: float
    comparison_group: str
    use_variant: bool
    nm: tuple[int, int] | None


def wanda_settings(info: Mapping[str, Any]) -> WandaSettings:
    """Validate an INC-processed config entry; raise PruningConfigError naming the key, value and what is allowed."""
    pattern = info["pattern"]
    name = str(pattern).split("_")[-1]
    nm_match = _NM_PATTERN.match(name)
    if name != "1x1" and nm_match is None:
        raise PruningConfigError(
            f"pattern {pattern!r}: Wanda supports '1x1' (unstructured) and 'N:M' (N of every M weights pruned, "
            f"e.g. '2:4'). For block patterns such as '4x1', train with pruning_type 'wanda_score'"
        )
    nm = (int(nm_match.group(1)), int(nm_match.group(2))) if nm_match else None
    if nm is not None and not 0 < nm[0] < nm[1]:
        raise PruningConfigError(f"pattern {pattern!r}: N:M prunes N of every M weights, so it needs 0 < N < M")

    group = info.get("comparison_group") if info.get("comparison_group") is not None else "per_output"
    if group not in COMPARISON_GROUPS:
        raise PruningConfigError(f"comparison_group {group!r} is not one of {', '.join(map(repr, COMPARISON_GROUPS))}")
    use_variant = info.get("use_variant") if info.get("use_variant") is not None else False
    if not isinstance(use_variant, bool):
        raise PruningConfigError(f"use_variant must be true or false, got {use_variant!r}")
    if use_variant and (group != "per_output" or nm is not None):
        raise PruningConfigError(
            f"use_variant works only with comparison_group 'per_output' and pattern '1x1', "
            f"got comparison_group {group!r} and pattern {pattern!r}"
        )

    sparsity = info["target_sparsity"]
    if nm is not None:
        if group != "per_output":
            raise PruningConfigError(
                f"pattern {pattern!r} fixes N of every M weights of each row, so comparison_group must be "
                f"'per_output', got {group!r}"
            )
        if not math.isclose(sparsity, nm[0] / nm[1], abs_tol=1e-9):
            raise PruningConfigError(
                f"pattern {pattern!r} prunes exactly {nm[0]} of every {nm[1]} weights (sparsity {nm[0] / nm[1]:g}); "
                f"set target_sparsity to {nm[0] / nm[1]:g}, got {sparsity!r}"
            )
    return WandaSettings(float(sparsity), group, use_variant, nm)


# --- layouts -------------------------------------------------------------------------------------------------


def _matrix_to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` tensor (scores or mask, ``weight_matrix``'s layout) in the module weight's own layout."""
    if isinstance(module, Conv1D):
        return matrix.T
    return matrix.reshape(module.weight.shape)


def _nm_view(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` matrix with input features in the order N:M groups run along.

    Linear / Conv1D: ``weight_matrix``'s order. Conv2d: INC's N:M layout ``[out, kh, kw, in_channels]``, so a
    group of M spans input channels at one kernel position (as INC's own N:M pattern and sparse conv kernels
    group them), not ``weight_matrix``'s channel-major order.
    """
    if isinstance(module, nn.Conv2d):
        return matrix.reshape(module.weight.shape).permute(0, 2, 3, 1).reshape(matrix.shape[0], -1)
    return matrix


def _from_nm_view(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        out, in_channels, kh, kw = module.weight.shape
        return matrix.reshape(out, kh, kw, in_channels).permute(0, 3, 1, 2).reshape(out, -1)
    return matrix


def _fraction_pruning_exactly(count: int, numel: int) -> float:
    """A sparsity s < 1 with ``int(numel * s) == count`` (``count / numel`` can round one short)."""
    sparsity = count / numel
    while int(numel * sparsity) < count:
        sparsity = math.nextafter(sparsity, 1.0)
    return sparsity


# --- the pruner ----------------------------------------------------------------------------------------------


class NonFiniteActivationError(NonFiniteError):
    """A layer received NaN or Inf inputs during Wanda calibration: the ``NonFiniteError`` the layer hooks raise."""


def _hook_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


@register_pruner("pt_wanda")
class WandaPruner(PytorchBasePruner):
    """INC pruner for Wanda's one-shot pruning of ``modules`` ({name: Linear | Conv1D | Conv2d}).

    Built by INC's ``get_pruner`` for ``pruning_type="wanda"``. ``WandaPruning`` drives it block by block:
    ``collect_statistics(names)`` while the block runs on the calibration inputs, then ``prune(names)``.
    ``masks[name]`` is bool in the weight's own layout (True = keep), like INC's masks, so INC's ``mask_weights``
    and ``get_sparsity_ratio`` work on it.
    """

    def _init(self) -> None:
        self.settings = wanda_settings(self.config)
        self.pattern = get_pattern(self.config, self.modules)
        self.feature_norms: dict[str, InputFeatureNorms] = {}
        self.pruned_counts: dict[str, int] | None = None  # per layer, for comparison_group "global"
        self.alphas: dict[str, float] = {}  # per layer, for use_variant
        self.pruned: set[str] = set()
        if self.settings.nm is not None:
            m = self.settings.nm[1]
            for name, module in self.modules.items():
                out_features, in_features = weight_matrix(module).shape
                if in_features % m:
                    raise PruningConfigError(
                        f"pattern {self.config['pattern']!r} groups every {m} input weights, but layer {name!r} "
                        f"({type(module).__name__}, [out, in] = [{out_features}, {in_features}], weight shape "
                        f"{list(module.weight.shape)}) has {in_features} inputs, not a multiple of {m}: "
                        f"exclude it with excluded_op_names"
                    )

    @contextlib.contextmanager
    def collect_statistics(self, names: Iterable[str], block_index: int | None = None) -> Iterator[None]:
        """Within the block, forward hooks on ``names`` add each input to ``feature_norms[name]``.

        Raises NonFiniteActivationError naming the layer if an input holds NaN or Inf.
        """
        handles = []
        try:
            for name in names:
                norms = self.feature_norms.setdefault(name, InputFeatureNorms())
                handles.append(
                    self.modules[name].register_forward_pre_hook(
                        self._accumulate(name, norms, block_index), with_kwargs=True
                    )
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _accumulate(name: str, norms: InputFeatureNorms, block_index: int | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _hook_input(args, kwargs)
            rows = input_rows(module, x)
            where = f", block {block_index}" if block_index is not None else ""
            check_tensor(rows, name, "input activation", f"Wanda calibration{where}", error=NonFiniteActivationError)
            norms.update(rows, input_samples(module, x))

        return hook

    def scores(self, name: str) -> torch.Tensor:
        """Wanda scores of one layer, ``[out_features, in_features]`` float32 (``weight_matrix``'s layout)."""
        if self.feature_norms[name].num_samples == 0:
            raise ValueError(
                f"layer {name!r} received no input while its block ran on the calibration data (the block never "
                f"calls it): exclude it with excluded_op_names"
            )
        return wanda_scores(weight_matrix(self.modules[name]), self.feature_norms[name].squared_norms)

    def _keep_matrix(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        module = self.modules[name]
        if settings.nm is not None:
            return _from_nm_view(module, nm_mask(_nm_view(module, scores), *settings.nm))
        if settings.comparison_group == "per_layer":
            return per_layer_mask(scores, settings.sparsity)
        if settings.comparison_group == "global":
            count = self.pruned_counts[name]
            if count >= scores.numel():
                return torch.zeros_like(scores, dtype=torch.bool)
            return per_layer_mask(scores, _fraction_pruning_exactly(count, scores.numel()))
        if settings.use_variant:
            try:
                keep, self.alphas[name] = variant_mask(scores, settings.sparsity)
            except ValueError as error:
                raise ValueError(f"layer {name!r}: {error}") from error
            return keep
        return per_output_mask(scores, settings.sparsity)

    def prune(self, names: Iterable[str]) -> None:
        """Compute the masks of ``names`` from their statistics, zero the pruned weights, store the masks."""
        if self.settings.comparison_group == "global" and self.pruned_counts is None:
            raise RuntimeError("comparison_group 'global' needs pruned_counts from a dense pass before prune()")
        for name in names:
            module = self.modules[name]
            keep = self._keep_matrix(name, self.scores(name))
            apply_matrix_mask(module, keep)
            self.masks[name] = _matrix_to_weight_layout(module, keep).to(module.weight.device).contiguous()
            self.pruned.add(name)
            del self.feature_norms[name]  # the statistics of a pruned layer are never read again

    def on_train_begin(self, dataloader=None) -> None:
        if not self.pruned:
            raise RuntimeError(
                "pt_wanda prunes one-shot from calibration data and has no training-loop schedule: call "
                "inc_plugins.prepare_pruning(model, config, dataloader=...) with pruning_type 'wanda', or use "
                "pruning_type 'wanda_score' for training-aware pruning with Wanda's scores"
            )


# --- layer selection -----------------------------------------------------------------------------------------


def select_wanda_layers(info: Mapping[str, Any], model: nn.Module, head_names: Sequence[str]) -> dict[str, nn.Module]:
    """``layer_selection.select_layers``, refusing layers with no ``[out, in]`` view (only Linear, Conv1D and
    Conv2d with groups=1 have one)."""
    kept = select_layers(info, model, head_names)
    unsupported = []
    for name, module in kept.items():
        try:
            weight_matrix(module)
        except (TypeError, ValueError) as error:
            unsupported.append(f"{name!r} ({error})")
    if unsupported:
        raise PruningConfigError(
            f"Wanda cannot prune {', '.join(unsupported)}; exclude them with excluded_op_names"
        )
    return kept


# --- the one-shot flow ---------------------------------------------------------------------------------------


@register_one_shot_pruning("wanda", config_keys=("comparison_group", "use_variant"), default_pattern="1x1")
class WandaPruning(BasePruning):
    """One-shot Wanda over every ``pruning_type="wanda"`` config entry; prunes at construction.

    Built by ``inc_plugins.prepare_pruning`` as ``WandaPruning(pruner_infos, model, dataloader, loss_func, device)``.
    ``pruners[i]`` is the ``WandaPruner`` of ``pruner_infos[i]``. ``device``: when given and different from
    the model's, the model is moved there for calibration and moved back afterwards. ``loss_func`` is unused.
    """

    def __init__(self, config, model: nn.Module, dataloader=None, loss_func=None, device=None):
        if dataloader is None:
            raise PruningConfigError("Wanda prunes one-shot from calibration data: pass dataloader=")
        self._adapter: ArchitectureAdapter = adapter_for(model)
        _, self._blocks = self._adapter.blocks(model)
        self._block_of = {id(module): index for index, block in enumerate(self._blocks) for module in block.modules()}
        super().__init__(config, model)
        self._dataloader = dataloader
        self._prune(dataloader, device)
        self.report = self._report()

    def _generate_pruners(self) -> list[WandaPruner]:
        pruners = []
        owner: dict[str, int] = {}
        heads = self._adapter.head_names(self._model)
        for index, info in enumerate(self.pruners_info):
            wanda_settings(info)  # before get_pruner: INC would send an "mha" pattern to its own MHA pruner
            selected = select_wanda_layers(info, self._model, heads)
            outside = [name for name, module in selected.items() if id(module) not in self._block_of]
            inside = {name: module for name, module in selected.items() if id(module) in self._block_of}
            if outside:
                logger.warning(
                    "Wanda calibrates layers block by block, so these selected layers outside the model's blocks "
                    "stay dense: %s (exclude them with excluded_op_names to silence this warning)",
                    outside,
                )
            if not inside:
                raise PruningConfigError(
                    f"config entry {index} selects only layers outside the model's blocks ({outside}): "
                    f"Wanda has no calibrated statistics for them"
                )
            for name in inside:
                if name in owner:
                    raise PruningConfigError(
                        f"layer {name!r} is selected by both config entries {owner[name]} and {index}: "
                        f"narrow their op_names / excluded_op_names"
                    )
                owner[name] = index
            pruner = get_pruner(info, inside)
            if not isinstance(pruner, WandaPruner):  # pragma: no cover - registry misconfiguration
                raise RuntimeError(f"INC built {type(pruner).__name__} for pruning_type 'wanda', expected WandaPruner")
            info["modules"] = list(inside)
            info["len_of_modules"] = len(inside)
            logger.info("Wanda config entry %d prunes %d layers: %s", index, len(inside), list(inside))
            pruners.append(pruner)
        return pruners

    def _layers_by_block(self, pruners: Sequence[WandaPruner]) -> dict[int, list[tuple[WandaPruner, list[str]]]]:
        by_block: dict[int, list[tuple[WandaPruner, list[str]]]] = {}
        for pruner in pruners:
            names_by_block: dict[int, list[str]] = {}
            for name, module in pruner.modules.items():
                names_by_block.setdefault(self._block_of[id(module)], []).append(name)
            for index, names in names_by_block.items():
                by_block.setdefault(index, []).append((pruner, names))
        return by_block

    def _walk(self, batches, pruners: Sequence[WandaPruner], prune: bool) -> None:
        """One sequential pass: statistics of ``pruners``' layers block by block, pruning each block if ``prune``."""
        by_block = self._layers_by_block(pruners)
        last = max(by_block)
        with contextlib.closing(sequential_blocks(self._model, batches, self._blocks, "Wanda calibration")) as walk:
            for index, block, inputs in walk:
                layers = by_block.get(index, [])
                if layers:
                    with contextlib.ExitStack() as hooks:
                        for pruner, names in layers:
                            hooks.enter_context(pruner.collect_statistics(names, index))
                        for block_input in inputs:
                            run_block(block, block_input)
                    if prune:
                        for pruner, names in layers:
                            pruner.prune(names)
                    logger.info("Wanda: block %d %s", index, "pruned" if prune else "calibrated (dense pass)")
                if index == last:
                    break  # later blocks hold no selected layer: no need to recompute their inputs

    def _allocate_global(self, pruners: Sequence[WandaPruner]) -> None:
        """Per-layer pruned counts from one global ranking of the dense model's scores."""
        for pruner in pruners:
            scores = {name: pruner.scores(name) for name in pruner.modules}
            masks = global_masks(scores, pruner.settings.sparsity)
            pruner.pruned_counts = {name: int((~mask).sum()) for name, mask in masks.items()}
            pruner.feature_norms.clear()  # the sequential pass collects its own statistics

    def _prune(self, dataloader, device) -> None:
        global_pruners = [p for p in self.pruners if p.settings.comparison_group == "global"]
        # Two passes read the data twice: a one-shot iterator would be empty the second time.
        batches = list(dataloader) if global_pruners else dataloader
        original_device = next(self._model.parameters()).device
        target = torch.device(device) if device is not None else original_device
        if target != original_device:
            logger.info("Wanda: moving the model to %s for calibration", target)
            self._model.to(target)
        try:
            if global_pruners:
                self._walk(batches, global_pruners, prune=False)
                self._allocate_global(global_pruners)
            self._walk(batches, self.pruners, prune=True)
        finally:
            if target != original_device:
                self._model.to(original_device)
                for pruner in self.pruners:
                    for name, module in pruner.modules.items():
                        pruner.masks[name] = pruner.masks[name].to(module.weight.device)

    def _report(self):
        """INC's usual sparsity report (logged by INC); None if INC's N:M report divides by zero, which it does
        when no layer's stored weight has a multiple of M columns (e.g. GPT-2 Conv1D layers, stored [in, out])."""
        try:
            return get_sparsity_ratio(self.pruners, self._model)
        except ZeroDivisionError:
            logger.warning("INC's sparsity report cannot be computed for these layers and this pattern")
            return None

    def on_train_begin(self, dataloader=None):
        logger.info("Wanda pruning is done at construction; on_train_begin() has nothing to do")


# --- the training-aware criterion ----------------------------------------------------------------------------


@register_criterion("wanda_score")
class WandaScoreCriterion(HookFedCriterion):
    """INC criterion: ``|W| * sqrt(mean of x_j^2)``, reduced by the pattern, for INC's training-aware pruners.

    Forward pre-hooks on the modules accumulate every input they see (training and evaluation passes alike)
    from construction until the optimizer step after ``end_step``, when they remove themselves; batches with
    NaN or Inf inputs are skipped with a warning. ``remove_hooks()`` removes them earlier. Scores stay empty
    (so INC skips that pruning step) until every module has seen at least one input.
    """

    pruning_type = "wanda_score"

    def __init__(self, modules, config, pattern):
        super().__init__(modules, config, pattern, seen="layer inputs")
        self.feature_norms = {name: InputFeatureNorms() for name in modules}
        self._handles = [
            module.register_forward_pre_hook(self._hook(weakref.ref(self), name), with_kwargs=True)
            for name, module in modules.items()
        ]

    @staticmethod
    def _hook(criterion_ref, name: str):
        warned = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            criterion = criterion_ref()
            if criterion is None:  # the pruning run is gone: stop paying for statistics
                return
            x = _hook_input(args, kwargs)
            rows = input_rows(module, x)
            if not torch.isfinite(rows).all():
                if not warned:
                    logger.warning("wanda_score: skipping a batch with NaN or Inf inputs to %r", name)
                    warned.append(True)
                return
            criterion.feature_norms[name].update(rows, input_samples(module, x))

        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_step_begin(self) -> None:
        missing = [name for name, norms in self.feature_norms.items() if norms.num_samples == 0]
        if missing:
            # Normal at a pruning step 0; a layer that never runs while the others do deserves a warning.
            log = logger.info if len(missing) == len(self.feature_norms) else logger.warning
            log("wanda_score: no inputs seen yet by %s; this pruning step is skipped", missing)
            self.scores = {}
            return
        with torch.no_grad():
            for name, module in self.modules.items():
                matrix = wanda_scores(weight_matrix(module), self.feature_norms[name].squared_norms)
                self.set_score(name, _matrix_to_weight_layout(module, matrix))
