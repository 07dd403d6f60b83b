"""The plugins' own SparseGPT (``algorithms.sparse_gpt``) for ``pruning_type="sparse_gpt"``, on Wanda's block walk.

INC 3.7.1 ships SparseGPT as a one-shot type of its own, and ``inc_plugins.prepare_pruning`` keeps running INC's
driver for a ``sparse_gpt`` entry as it stands. An entry that sets a key only this implementation reads
(``layer_sparsity``, ``owl_m``, ``owl_lambda``: OWL's outlier-weighted block sparsities) runs here instead. With the
same calibration batches both give the same weights bit for bit (the Hessian and the column sweep use the reference's
float32 arithmetic: ``algorithms.input_gram``, ``algorithms.sparse_gpt``); tests/test_sparse_gpt.py checks it on
tiny Llama and OPT models, docs/results/llm_wanda_sparsegpt.md on SmolLM2-135M.

What differs from INC's driver, besides OWL: it runs on the block walk of ``execution.calibration`` (every family
``models.architectures`` knows, batch-1 windows merged into longer block calls, NaN checks naming the layer),
sums X^T X once per distinct layer input (a block's query, key and value projections share one), handles Conv2d
layers (INC's Hessian hook cannot), and fills each pruner's ``masks`` like the other plugin types.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import ClassVar

import torch

from inc_plugins.algorithms.sparse_gpt import sparse_gpt_prune
from inc_plugins.models.layer_views import weight_matrix

from .calibrated_sparsity import CalibratedSparsitySettings
from .wanda import WandaPruner, WandaPruning, matrix_to_weight_layout, nm_column_order

__all__ = ["SparseGPTSettings", "PluginSparseGPTPruner", "PluginSparseGPTPruning"]

logger = logging.getLogger(__name__)


class SparseGPTSettings(CalibratedSparsitySettings):
    """The keys of a ``pruning_type="sparse_gpt"`` config entry run by the plugins (see the module docstring)."""

    method: ClassVar[str] = "SparseGPT"


class PluginSparseGPTPruner(WandaPruner):
    """INC pruner of one ``sparse_gpt`` config entry: Wanda's hooks collect each layer's X^T X (and the input norms
    OWL's dense pass reads); ``prune`` runs SparseGPT on each layer."""

    settings: SparseGPTSettings

    collects_moments = False  # (WandaPruner's properties, fixed here)
    collects_gram = True
    gram_per_batch = True  # INC's add_batch arithmetic, so the masks are INC's even on exact ties
    shares_mask_work = False  # the solve chooses the mask as it updates the weights: every rank runs it

    def prune(self, names: Iterable[str]) -> None:
        settings = self.settings
        if settings.needs_dense_pass and self.pruned_counts is None:
            raise RuntimeError("layer_sparsity 'owl' needs pruned_counts from a dense pass before prune()")
        for name in names:
            module = self.modules[name]
            order = nm_column_order(module)  # N:M groups run along INC's input order (Conv2d: kernel position first)
            gram = self.input_grams[name].matrix[order][:, order]
            if self.pruned_counts is not None:
                target = {"pruned_count": self.pruned_counts[name]}
            elif settings.nm is not None:
                target = {"nm": settings.nm}
            else:
                target = {"sparsity": settings.target_sparsity}
            result = sparse_gpt_prune(weight_matrix(module)[:, order], gram, **target)
            restore = torch.argsort(order)
            weight, keep = result.weight[:, restore], result.keep[:, restore]
            with torch.no_grad():
                module.weight.copy_(matrix_to_weight_layout(module, weight))
            self._record_mask(name, keep)
            logger.debug("SparseGPT: %s pruned to %.4f", name, 1 - float(keep.float().mean()))
            del self.feature_norms[name], self.input_grams[name]  # never read again


class PluginSparseGPTPruning(WandaPruning):
    """One-shot SparseGPT over every ``sparse_gpt`` config entry routed to the plugins; prunes at construction (Wanda's
    flow: OWL's dense pass if asked, then the sequential pass)."""

    pruner_class = PluginSparseGPTPruner
