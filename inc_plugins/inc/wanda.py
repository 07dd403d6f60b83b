"""Wanda (Sun et al. 2023, arXiv:2306.11695) as the one-shot INC pruning type "wanda".

The math lives in ``inc_plugins.algorithms.wanda`` / ``nm_mask``; the block walk in ``execution.calibration``.

``PRUNINGS["wanda_pruning"]`` -> ``WandaPruning``, routed by ``inc_plugins.prepare_pruning`` for
``pruning_type="wanda"``: the paper's sequential calibration, at construction (like INC's ``SparseGPTPruning``).
The first block's inputs are captured; for each block, hooks on its selected layers accumulate the squared input
feature norms over every calibration batch, the block is pruned, and its outputs, recomputed with the pruned
weights, become the next block's inputs. Peak memory is the model plus one block's activations for the
calibration set. The config keys are ``WandaSettings``' fields: ``pattern`` ``"1x1"`` (unstructured) or
``"N:M"`` (INC's convention: N of every M weights *pruned*, along the input dimension), ``comparison_group`` and
``use_variant`` (in a ``pruning_configs`` entry or given globally: ``prepare_pruning`` copies global plugin keys
into the entries, which INC alone would not).

A ``"global"`` comparison group ranks every layer's scores together, which needs all of them before any layer is
pruned, so it calibrates twice: one pass over the *dense* model fixes how many weights each layer loses; the
sequential pass then chooses *which* ones, per layer, from statistics of the already-pruned earlier blocks. The
total is exactly ``int(total * sparsity)``. The calibration batches are materialised in a list for the two passes.
``layer_sparsity="owl"`` (OWL, Yin et al. 2024; math in ``algorithms.owl``) takes the same two passes: the dense
pass measures each block's share of outlier scores and sets the blocks' sparsities (outlier-rich blocks pruned
less), with per-layer counts that add up to exactly ``int(total * sparsity)``; the sequential pass prunes each
layer to its count, per output row (the first rows one more when the count does not divide) or per layer.
``dsnot`` runs DSnoT (``algorithms.dsnot``) on each layer's per-output or N:M mask, from input statistics the hooks
also collect (per-feature sums and pooled variances): INC's ``prune_wanda(dsnot=True)``, which ``pruning_type="wanda"``
lacked (INC's own N:M with dsnot ends unstructured; here the swaps stay within the groups of M). ``update_weights``
then re-fits each row's kept weights by least squares on the layer's calibration inputs (``algorithms.weight_update``:
SparseGPT's objective, solved for the fixed mask); the hooks also accumulate each layer's X^T X
(``algorithms.input_gram``), once per distinct input tensor (a block's query, key and value projections share one)
and block call.

Layer selection follows INC: ``op_names`` / ``excluded_op_names`` are regexes searched in module names,
``pruning_op_types`` are substrings of class names; the model family's task heads (``lm_head``, ``classifier``,
...) are excluded by exact name. ``pruning_scope``, the step schedule and the per-op sparsity bounds are INC
training-loop settings and are ignored here. Selected layers outside the model's blocks (e.g. BERT's pooler) get
no calibrated statistics in the block walk: they stay dense, are left out of the pruner, and a warning names them.

``PRUNERS["pt_wanda"]`` -> ``WandaPruner``: the INC pruner of one config entry (``.modules``, ``.masks`` in each
weight's own layout, ``.pattern`` from INC's ``get_pattern``), which collects the input statistics with hooks and
prunes its layers one block at a time. For training-aware pruning with Wanda's scores see
``wanda_score_criterion`` (pruning type "wanda_score"). The plugins' SparseGPT (``inc.sparse_gpt``) subclasses both
to run on the same walk and hooks.

The walk merges batch-1 windows into block calls of up to ``calibration.MERGE_TOKENS`` tokens; the hooks still update
the running statistics batch by batch (``_CurrentCall``), so they are those of unmerged calls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from inc_plugins.algorithms.dsnot import InputFeatureMoments, dsnot_keep_mask, dsnot_nm_keep_mask
from inc_plugins.algorithms.exact_fraction import fraction_pruning_exactly
from inc_plugins.algorithms.global_ranking import GlobalRanking
from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms.owl import block_sizes, outlier_ratio, owl_sparsities, pruned_counts, row_counts
from inc_plugins.algorithms.wanda import (
    InputFeatureNorms,
    per_layer_mask,
    per_output_mask,
    rows_mask,
    variant_mask,
    wanda_scores,
)
from inc_plugins.algorithms.input_gram import InputGram
from inc_plugins.algorithms.weight_update import refit_kept_weights
from inc_plugins.execution.calibration import MERGE_TOKENS, run_block, sequential_blocks, split_batches
from inc_plugins.execution.distributed import (
    GatherLog,
    combined_across_ranks,
    gathered_in_rank_order,
    rank,
    rank_shard,
    world_size,
)
from inc_plugins.execution.streamed_model import block_stream, resident_block, write_block
from inc_plugins.progress import progress
from inc_plugins.finite_checks import NonFiniteError, check_tensor
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.layer_views import apply_matrix_mask, input_rows, input_samples, weight_matrix

from .calibrated_sparsity import ScoredMaskSettings
from .config_checks import PruningConfigError
from .one_shot_base import OneShotPruner, OneShotPruning

__all__ = ["NonFiniteActivationError", "WandaPruner", "WandaPruning", "WandaSettings", "layer_input",
           "matrix_to_weight_layout", "nm_column_order"]

logger = logging.getLogger(__name__)


# --- settings ------------------------------------------------------------------------------------------------


class WandaSettings(ScoredMaskSettings):
    """The keys of a ``pruning_type="wanda"`` config entry."""

    method: ClassVar[str] = "Wanda"

    comparison_group: Literal["per_output", "per_layer", "global"] = Field("per_output", description=(
        "which weights are ranked together: each output row (the paper's choice), each layer, or all selected "
        "layers at once"))
    use_variant: bool = Field(False, description=(
        "the paper's Wanda variant (a cumulative-score threshold per row); only with per_output and '1x1'"))
    update_weights: bool = Field(False, description=(
        "after the mask is chosen, re-fit each output row's kept weights by least squares on the layer's calibration "
        "inputs (SparseGPT's objective, solved for the fixed mask); any pattern and option"))

    @property
    def ranks_globally(self) -> bool:
        return self.comparison_group == "global"

    @model_validator(mode="after")
    def _consistent(self) -> WandaSettings:
        nm, group = self.nm, self.comparison_group
        if self.use_variant and (group != "per_output" or nm is not None):
            raise ValueError(
                f"use_variant works only with comparison_group 'per_output' and pattern '1x1', "
                f"got comparison_group {group!r} and pattern {self.pattern!r}"
            )
        if self.layer_sparsity == "owl" and (group == "global" or self.use_variant):
            raise ValueError(
                f"layer_sparsity 'owl' sets each block's sparsity itself, so it works with pattern '1x1' and "
                f"comparison_group 'per_output' or 'per_layer' without use_variant, got pattern {self.pattern!r}, "
                f"comparison_group {group!r}, use_variant {self.use_variant}"
            )
        if self.dsnot and (group != "per_output" or self.use_variant):
            raise ValueError(
                f"dsnot swaps weights within each row of Wanda's per-output mask, so it works with comparison_group "
                f"'per_output' and no use_variant, got comparison_group {group!r}, use_variant {self.use_variant}"
            )
        if nm is not None and group != "per_output":
            raise ValueError(
                f"pattern {self.pattern!r} fixes N of every M weights of each row, so comparison_group must be "
                f"'per_output', got {group!r}"
            )
        return self


# --- layouts -------------------------------------------------------------------------------------------------


def matrix_to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` tensor (scores or mask, ``weight_matrix``'s layout) in the module weight's own layout."""
    if isinstance(module, Conv1D):
        return matrix.T
    return matrix.reshape(module.weight.shape)


def nm_column_order(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` matrix's columns in the order N:M groups run along: ``matrix[:, nm_column_order(module)]``.

    Linear / Conv1D: ``weight_matrix``'s order. Conv2d: INC's N:M layout ``[out, kh, kw, in_channels]``, so a
    group of M spans input channels at one kernel position (as INC's own N:M pattern and sparse conv kernels
    group them), not ``weight_matrix``'s channel-major order.
    """
    columns = torch.arange(weight_matrix(module).shape[1], device=module.weight.device)
    if isinstance(module, nn.Conv2d):
        _, in_channels, kh, kw = module.weight.shape
        return columns.reshape(in_channels, kh, kw).permute(1, 2, 0).flatten()
    return columns


def _nm_view(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    return matrix[:, nm_column_order(module)]


def _from_nm_view(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    return matrix[:, torch.argsort(nm_column_order(module))]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a layer call, as a forward pre-hook with kwargs sees it."""
    return args[0] if args else kwargs["input"]


# --- the pruner ----------------------------------------------------------------------------------------------


class _SharedInputGram:
    """The last input's X^T X products (``InputGram.batch_products``), for the next layer that reads the very same
    tensor from the same state (its pruner adds products the same way: per batch or per call).

    A Llama block's query, key and value projections read one tensor, as do its gate and up projections: the products
    are computed once per block call for each (SparseGPT's: one per calibration batch the call merges, so up to
    ``MERGE_TOKENS`` / window length matrices of [in, in] are held; Wanda's refit: one). Holding the tensor keeps its
    ``id`` from being reused meanwhile, and its version counter tells if it was changed in place since. Convolutions
    unfold their input their own way, so they never share. Torch products, not SciPy's: SciPy's BLAS threads,
    busy-waiting between such small calls, slowed every torch operation beside them several-fold on 2 cores.
    """

    def __init__(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._num_samples = -1
        self._products: list[torch.Tensor] = []

    def batch_products(self, module: nn.Module, x: torch.Tensor, gram: InputGram,
                       batches: list[tuple[torch.Tensor, int]], symmetric: bool = False) -> list[torch.Tensor]:
        if (isinstance(module, nn.Conv2d) or x is not self._input or x._version != self._version
                or gram.num_samples != self._num_samples):
            shareable = not isinstance(module, nn.Conv2d)
            self._input, self._version = (x, x._version) if shareable else (None, -1)
            self._num_samples = gram.num_samples if shareable else -1
            self._products = gram.batch_products(batches, symmetric)
        return self._products


class _CurrentCall:
    """The calibration batches the block call in progress merges (``BlockInput.batch_sizes``), set by the walk.

    Wanda's norms, DSnoT's moments and SparseGPT's X^T X are running statistics that the references update batch by
    batch (DSnoT pools per-batch variances): the hooks update them per batch of a merged call, so they are those of
    unmerged calls, bit for bit. (Wanda's refit reads X^T X alone, which it sums per call.)
    """

    batch_sizes: tuple[int, ...] = ()


class NonFiniteActivationError(NonFiniteError):
    """A layer received NaN or Inf inputs during calibration (Wanda's or the plugins' SparseGPT's, which runs on this
    walk): the ``NonFiniteError`` the layer hooks raise."""


def _packed(keep: torch.Tensor) -> tuple[bytes, tuple[int, ...]]:
    return np.packbits(keep.cpu().numpy().reshape(-1)).tobytes(), tuple(keep.shape)


def _unpacked(bits: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=count).astype(bool)).reshape(shape)


class WandaPruner(OneShotPruner):
    """INC pruner for Wanda's one-shot pruning of ``modules`` ({name: Linear | Conv1D | Conv2d}).

    ``WandaPruning`` drives it block by block: ``collect_statistics(names)`` while the block runs on the
    calibration inputs, then ``prune(names)``. ``masks[name]`` is bool in the weight's own layout (True = keep),
    like INC's masks, so INC's ``mask_weights`` and ``get_sparsity_ratio`` work on it.
    """

    settings: WandaSettings

    def _init(self) -> None:
        super()._init()
        self.feature_norms: dict[str, InputFeatureNorms] = {}
        self.feature_moments: dict[str, InputFeatureMoments] = {}  # for dsnot
        self.input_grams: dict[str, InputGram] = {}  # for update_weights
        self.pruned_counts: dict[str, int] | None = None  # per layer, for comparison_group "global" and OWL
        self.global_ranking: GlobalRanking | None = None  # comparison_group "global": the dense scores' ranking
        self.block_sparsity: dict[int, float] = {}  # OWL: each block's sparsity, by block index
        self.outlier_ratios: dict[int, float] = {}  # OWL: each block's share of outlier scores in the dense model
        self.alphas: dict[str, float] = {}  # per layer, for use_variant
        self._shared_keeps: dict[str, torch.Tensor] = {}  # keep masks other ranks computed (``share_masks``)
        self.pruned_layers: set[str] = set()

    @property
    def collects_moments(self) -> bool:
        """Whether the hooks also collect the per-feature sums and variances DSnoT reads."""
        return self.settings.dsnot

    @property
    def collects_gram(self) -> bool:
        """Whether the hooks also sum each layer's X^T X (the least-squares update reads it)."""
        return self.settings.update_weights

    gram_per_batch = False  # the refit needs X^T X, not INC's rounding of it: one product per merged block call

    @contextlib.contextmanager
    def collect_statistics(self, names: Iterable[str], block_index: int | None = None,
                           scores_only: bool = False, call: _CurrentCall | None = None) -> Iterator[None]:
        """Within the block, forward hooks on ``names`` add each input to ``feature_norms[name]`` and, unless
        ``scores_only`` (a dense pass needs the scores alone), to the statistics dsnot and update_weights read.
        ``call`` tells the hooks which batches a merged block call holds (None: every call is one batch).

        Raises NonFiniteActivationError naming the layer if an input holds NaN or Inf.
        """
        handles = []
        shared = _SharedInputGram()
        try:
            for name in names:
                # across processes, each batch is kept so that the combined norms are one process's bits
                norms = self.feature_norms.setdefault(name, InputFeatureNorms(keep_batches=world_size() > 1))
                moments = (self.feature_moments.setdefault(name, InputFeatureMoments())
                           if self.collects_moments and not scores_only else None)
                gram = (self.input_grams.setdefault(name, InputGram())
                        if self.collects_gram and not scores_only else None)
                handles.append(
                    self.modules[name].register_forward_pre_hook(
                        self._accumulate(name, norms, moments, gram, self.gram_per_batch, shared,
                                         call or _CurrentCall(), f"{self.settings.method} calibration", block_index),
                        with_kwargs=True,
                    )
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _accumulate(name: str, norms: InputFeatureNorms, moments: InputFeatureMoments | None,
                    gram: InputGram | None, gram_per_batch: bool, shared: _SharedInputGram, call: _CurrentCall,
                    during: str, block_index: int | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs)
            rows = input_rows(module, x)
            where = f", block {block_index}" if block_index is not None else ""
            check_tensor(rows, name, "input activation", f"{during}{where}", error=NonFiniteActivationError)
            call_samples = input_samples(module, x)
            batches = split_batches(rows, call_samples, call.batch_sizes)
            for batch_rows, samples in batches:
                norms.update(batch_rows, samples)
                if moments is not None:
                    moments.update(batch_rows, samples)
            if gram is not None:
                # SparseGPT keeps INC's arithmetic batch by batch; Wanda's refit adds the whole call at once
                gram_batches = batches if gram_per_batch else [(rows, call_samples)]
                gram.add(shared.batch_products(module, x, gram, gram_batches, symmetric=not gram_per_batch),
                         gram_batches)

        return hook

    def scores(self, name: str) -> torch.Tensor:
        """Wanda scores of one layer, ``[out_features, in_features]`` float32 (``weight_matrix``'s layout)."""
        if self.feature_norms[name].num_samples == 0:
            raise ValueError(
                f"layer {name!r} received no input while its block ran on the calibration data (the block never "
                f"calls it): exclude it with excluded_op_names"
            )
        return wanda_scores(weight_matrix(self.modules[name]), self.feature_norms[name].squared_norms)

    def _per_output_keep(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """The keep mask from ``scores`` ranked within each output row: N of every M inputs pruned, or the layer's count
        fixed by a dense pass spread over its rows (the first rows one more), or target_sparsity of each row."""
        settings = self.settings
        module = self.modules[name]
        if settings.nm is not None:
            return _from_nm_view(module, nm_mask(_nm_view(module, scores), *settings.nm))
        if self.pruned_counts is not None:
            return rows_mask(scores, row_counts(self.pruned_counts[name], *scores.shape))
        return per_output_mask(scores, settings.target_sparsity)

    def _keep_matrix(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        if settings.comparison_group != "per_output":  # per layer, or global (a per-layer count from the dense pass)
            if self.pruned_counts is None:
                return per_layer_mask(scores, settings.target_sparsity)
            count = self.pruned_counts[name]
            if count >= scores.numel():
                return torch.zeros_like(scores, dtype=torch.bool)
            return per_layer_mask(scores, fraction_pruning_exactly(count, scores.numel()))
        if settings.dsnot:  # (uniform: the settings refuse the rest)
            return self._dsnot_keep(name, scores, scores)
        if settings.use_variant:
            try:
                keep, self.alphas[name] = variant_mask(scores, settings.target_sparsity)
            except ValueError as error:
                raise ValueError(f"layer {name!r}: {error}") from error
            return keep
        return self._per_output_keep(name, scores)

    def _dsnot_keep(self, name: str, initial_scores: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """DSnoT's mask (``algorithms.dsnot``) from the per-output mask of ``initial_scores`` (Wanda's or |W|), the
        kept weights offered for pruning by Wanda's ``scores``; N:M groups in INC's column order."""
        settings, module = self.settings, self.modules[name]
        weight, moments = weight_matrix(module).detach(), self.feature_moments[name]
        if settings.nm is None:
            return dsnot_keep_mask(weight, scores, moments, settings.target_sparsity, initial_scores=initial_scores)
        order = nm_column_order(module)
        keep = dsnot_nm_keep_mask(weight[:, order], initial_scores[:, order], moments.reordered(order), *settings.nm)
        return _from_nm_view(module, keep)

    def _record_mask(self, name: str, keep: torch.Tensor) -> None:
        """Store the layer's mask (``keep`` ``[out, in]``) in its weight's own layout, as INC's masks are."""
        module = self.modules[name]
        self.masks[name] = matrix_to_weight_layout(module, keep).to(module.weight.device).contiguous()
        self.mask_sparsity[name] = float((~keep).sum()) / keep.numel()
        self.pruned_layers.add(name)

    def combine_across_ranks(self, names: Iterable[str], log: GatherLog, block_index: int) -> None:
        """Replace each layer's statistics by those of every rank's calibration shard (``execution.distributed``):
        the same on every rank, so every rank derives the same masks."""
        for name in names:
            for statistics in (self.feature_norms, self.feature_moments, self.input_grams):
                if name in statistics:
                    statistics[name] = combined_across_ranks(statistics[name], log, block_index)

    def drop_masks(self, names: Iterable[str]) -> None:
        """Keep only the shapes of these layers' masks (meta tensors) and their ``mask_sparsity``: a streamed model's
        masks are in its written weights, and a 7B model's bool masks alone would take 6.5 GB."""
        for name in names:
            self.masks[name] = torch.empty_like(self.masks[name], device="meta")

    # whether a layer's keep mask is a function of statistics every rank holds, so ranks can split the ranking work
    # (SparseGPT's is not: it solves the weights as it prunes)
    shares_mask_work: ClassVar[bool] = True

    def _keep(self, name: str) -> torch.Tensor:
        """The layer's keep mask ``[out, in]`` from its statistics."""
        return self._keep_matrix(name, self.scores(name))

    def share_masks(self, names: list[str], log: GatherLog, block_index: int) -> None:
        """Across ranks, each rank ranks its ``rank_shard`` of ``names`` and every rank receives all their keep masks
        (8 to a byte; the same bits as ranking them itself), which ``prune`` then takes: the ranks split the sorting
        instead of each repeating it."""
        if world_size() == 1 or not self.shares_mask_work:
            return
        own = {name: _packed(self._keep(name)) + (self.alphas.get(name),) for name in rank_shard(names)}
        log.add(block_index, sum(len(bits) for bits, _, _ in own.values()))
        for part in gathered_in_rank_order(own):
            for name, (bits, shape, alpha) in part.items():
                self._shared_keeps[name] = _unpacked(bits, shape)
                if alpha is not None:
                    self.alphas[name] = alpha

    def _keep_for_pruning(self, name: str) -> torch.Tensor:
        shared = self._shared_keeps.pop(name, None)
        return shared if shared is not None else self._keep(name)

    def prune(self, names: Iterable[str]) -> None:
        """Compute the masks of ``names`` from their statistics (or take those ``share_masks`` received), zero the
        pruned weights, store the masks."""
        if self.settings.needs_dense_pass and self.pruned_counts is None:
            raise RuntimeError("comparison_group 'global' and layer_sparsity 'owl' need pruned_counts from a dense "
                               "pass before prune()")
        for name in names:
            module = self.modules[name]
            keep = self._keep_for_pruning(name)
            if self.settings.update_weights:
                self._refit(name, keep)
            apply_matrix_mask(module, keep)
            self._record_mask(name, keep)
            del self.feature_norms[name]  # the statistics of a pruned layer are never read again
            self.feature_moments.pop(name, None)
            self.input_grams.pop(name, None)

    def _refit(self, name: str, keep: torch.Tensor) -> None:
        """Write the least-squares refit of the layer's kept weights (``algorithms.weight_update``) into it."""
        module = self.modules[name]
        refit = refit_kept_weights(weight_matrix(module), keep, self.input_grams[name].matrix)
        with torch.no_grad():
            module.weight.copy_(matrix_to_weight_layout(module, refit.weight))
        logger.debug("Wanda update_weights: %s output error %.4g -> %.4g (%d iterations)", name,
                     refit.masked_error, refit.refit_error, refit.iterations)

    def on_train_begin(self, dataloader=None) -> None:
        if not self.pruned:
            raise RuntimeError(
                "pt_wanda prunes one-shot from calibration data and has no training-loop schedule: call "
                "inc_plugins.prepare_pruning(model, config, dataloader=...) with pruning_type 'wanda', or use "
                "pruning_type 'wanda_score' for training-aware pruning with Wanda's scores"
            )


# --- the one-shot flow ---------------------------------------------------------------------------------------


class WandaPruning(OneShotPruning):
    """One-shot Wanda over every ``pruning_type="wanda"`` config entry; prunes at construction.

    ``pruners[i]`` is the ``WandaPruner`` of config entry ``i``. ``loss_func`` is unused.
    """

    pruner_class = WandaPruner
    streams = True
    combines_across_ranks = True

    def inspect_model(self, model: nn.Module, infos: Sequence[Mapping[str, Any]]) -> None:
        _, self._blocks = adapter_for(model).blocks(model)  # UnsupportedModelError for families without blocks
        self.gather_log = GatherLog()  # bytes of statistics gathered from the other ranks, per block
        self._block_of = {id(module): index for index, block in enumerate(self._blocks) for module in block.modules()}

    def layers_to_prune(self, index: int, info: Mapping[str, Any], settings: WandaSettings,
                        selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The selected layers inside the model's blocks; layers with no ``[out, in]`` view (only Linear, Conv1D
        and Conv2d with groups=1 have one), or whose inputs an N:M pattern cannot group, are refused."""
        unsupported = []
        for name, module in selected.items():
            try:
                weight_matrix(module)
            except (TypeError, ValueError) as error:
                unsupported.append(f"{name!r} ({error})")
        if unsupported:
            raise PruningConfigError(
                f"{self.settings_model.method} cannot prune {', '.join(unsupported)}; exclude them with "
                f"excluded_op_names"
            )
        outside = [name for name, module in selected.items() if id(module) not in self._block_of]
        inside = {name: module for name, module in selected.items() if id(module) in self._block_of}
        if outside:
            logger.warning(
                "%s calibrates layers block by block, so these selected layers outside the model's blocks "
                "stay dense: %s (exclude them with excluded_op_names to silence this warning)",
                self.settings_model.method, outside,
            )
        if not inside:
            raise PruningConfigError(
                f"config entry {index} selects only layers outside the model's blocks ({outside}): "
                f"{self.settings_model.method} has no calibrated statistics for them"
            )
        if settings.nm is not None:
            m = settings.nm[1]
            for name, module in inside.items():
                out_features, in_features = weight_matrix(module).shape
                if in_features % m:
                    raise PruningConfigError(
                        f"pattern {settings.pattern!r} groups every {m} input weights, but layer {name!r} "
                        f"({type(module).__name__}, [out, in] = [{out_features}, {in_features}], weight shape "
                        f"{list(module.weight.shape)}) has {in_features} inputs, not a multiple of {m}: "
                        f"exclude it with excluded_op_names"
                    )
        return inside

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
        call = _CurrentCall()
        method = self.settings_model.method
        stream = block_stream(self._model)
        if stream is not None:
            stream.final_pass = prune  # a resumed run's pruned blocks load from the output in the pruning pass
        walk = sequential_blocks(self._model, batches, self._blocks, f"{method} calibration", merge_tokens=MERGE_TOKENS)
        with contextlib.closing(walk):
            on_rank = f" (rank {rank()} of {world_size()})" if world_size() > 1 else ""
            for index, block, inputs in progress(walk, desc=f"{method} {'pruning' if prune else 'dense pass'}{on_rank}",
                                                 unit="block", total=last + 1):
                layers = by_block.get(index, [])
                if layers and prune and self._resumed(index, layers):
                    logger.info("%s: block %d pruned by the run resumed", method, index)
                elif layers:
                    with contextlib.ExitStack() as hooks:
                        for pruner, names in layers:
                            hooks.enter_context(pruner.collect_statistics(names, index, not prune, call))
                        for block_input in inputs:
                            call.batch_sizes = block_input.batch_sizes
                            run_block(block, block_input)
                    if world_size() > 1:
                        for pruner, names in layers:
                            pruner.combine_across_ranks(names, self.gather_log, index)
                    if prune:
                        for pruner, names in layers:
                            pruner.share_masks(names, self.gather_log, index)
                            pruner.prune(names)
                        self._block_pruned(index, layers)
                    else:
                        self._block_measured(index, layers)
                    logger.info("%s: block %d %s", method, index, "pruned" if prune else "calibrated (dense pass)")
                if index == last:
                    break  # later blocks hold no selected layer: no need to recompute their inputs

    def _block_pruned(self, index: int, layers: Sequence[tuple[WandaPruner, list[str]]]) -> None:
        """Block ``index`` is final: a streamed model writes it to the output and drops its masks."""
        write_block(self._model, index, {name: pruner.mask_sparsity[name] for pruner, names in layers for name in names})
        if block_stream(self._model) is not None:
            for pruner, names in layers:
                pruner.drop_masks(names)

    def _resumed(self, index: int, layers: Sequence[tuple[WandaPruner, list[str]]]) -> bool:
        """Whether a resumed streamed run pruned block ``index`` already; if so its layers take the recorded
        sparsity (their weights, loaded from the output, carry the walk on)."""
        stream = block_stream(self._model)
        if stream is None or index not in stream.resumed:
            return False
        for pruner, names in layers:
            for name in names:
                pruner.mask_sparsity[name] = stream.resumed[index][name]
                pruner.pruned_layers.add(name)
            pruner.drop_masks(names)
        return True

    @staticmethod
    def _block_measured(index: int, layers: Sequence[tuple[WandaPruner, list[str]]]) -> None:
        """Dense pass, while block ``index``'s weights are held (a streamed model releases them next): OWL's outlier
        ratio of the block's scores, and the first pass of a global ranking."""
        for pruner, names in layers:
            if pruner.settings.layer_sparsity == "owl":
                pruner.outlier_ratios[index] = outlier_ratio([pruner.scores(name) for name in names],
                                                             pruner.settings.owl_m)
            if pruner.settings.ranks_globally:
                if pruner.global_ranking is None:
                    pruner.global_ranking = GlobalRanking(pruner.settings.target_sparsity)
                for name in names:
                    pruner.global_ranking.add_coarse(name, pruner.scores(name))

    def _allocate_global(self, pruners: Sequence[WandaPruner]) -> None:
        """Per-layer pruned counts from one global ranking of the dense model's scores (``algorithms.global_ranking``:
        ``global_masks``'s counts, one layer's scores at a time). Its second pass reads each block's weights once
        more: a streamed model loads them from the source again."""
        if not pruners:
            return
        for index, layers in sorted(self._layers_by_block(pruners).items()):
            with resident_block(self._model, index):
                for pruner, names in layers:
                    for name in names:
                        pruner.global_ranking.add_fine(name, pruner.scores(name))
        for pruner in pruners:
            pruner.pruned_counts = pruner.global_ranking.pruned_counts(list(pruner.modules))
            pruner.feature_norms.clear()  # the sequential pass collects its own statistics

    def _allocate_owl(self, pruners: Sequence[WandaPruner]) -> None:
        """Per-layer pruned counts from each block's outlier ratio in the dense model's scores (``algorithms.owl``)."""
        for pruner in pruners:
            settings = pruner.settings
            block_of = {name: self._block_of[id(module)] for name, module in pruner.modules.items()}
            layer_sizes = {name: module.weight.numel() for name, module in pruner.modules.items()}
            sizes = block_sizes(layer_sizes, block_of)
            blocks = list(sizes)
            ratios = [pruner.outlier_ratios[b] for b in blocks]  # (measured by the dense pass)
            try:
                sparsity = dict(zip(blocks, owl_sparsities(ratios, list(sizes.values()), settings.target_sparsity,
                                                           settings.owl_lambda)))
            except ValueError as error:
                raise PruningConfigError(str(error)) from error
            pruner.pruned_counts = pruned_counts(layer_sizes, block_of, sparsity, settings.target_sparsity)
            pruner.block_sparsity = sparsity
            logger.info("%s OWL: block outlier ratios %s -> sparsities %s", self.settings_model.method,
                        [round(r, 4) for r in ratios], [round(sparsity[b], 4) for b in blocks])
            pruner.feature_norms.clear()  # the sequential pass collects its own statistics

    def prune(self, dataloader, loss_func) -> None:
        dense_pass = [p for p in self.pruners if p.settings.needs_dense_pass]
        # Two passes read the data twice: a one-shot iterator would be empty the second time.
        batches = list(dataloader) if dense_pass else dataloader
        if dense_pass:
            self._walk(batches, dense_pass, prune=False)
            self._allocate_global([p for p in dense_pass if p.settings.ranks_globally])
            self._allocate_owl([p for p in dense_pass if p.settings.layer_sparsity == "owl"])
        self._walk(batches, self.pruners, prune=True)
