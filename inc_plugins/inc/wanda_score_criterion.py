"""Wanda's scores for INC's training-aware pruners: the criterion "wanda_score".

``CRITERIA["wanda_score"]`` -> ``WandaScoreCriterion``, for ``prepare_pruning(..., optimizer=...)`` with
``pruning_type="wanda_score"``, any NxM / N:M pattern and INC's schedulers: score = ``|W| * sqrt(mean of x_j^2)``
over every input row seen by forward hooks since pruning started, reduced by the pattern like INC's
``MagnitudeCriterion``.

Its name must not be ``"wanda"``: INC's ``get_pruner`` sends any pruning type found in ``CRITERIA`` to
``pt_basic``, so ``pruning_type="wanda"`` would never reach the one-shot ``wanda`` type. Names containing "gpt",
"retrain", "block", "free" or "progressive" are also dispatched specially by INC.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from inc_plugins.algorithms.wanda import InputFeatureNorms, wanda_scores
from inc_plugins.models.layer_views import input_rows, input_samples, weight_matrix

from .hook_fed_criterion import HookFedCriterion
from .wanda import layer_input, matrix_to_weight_layout

__all__ = ["WandaScoreCriterion"]

logger = logging.getLogger(__name__)


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
            x = layer_input(args, kwargs)
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
                self.set_score(name, matrix_to_weight_layout(module, matrix))
