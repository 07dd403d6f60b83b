"""The shared life cycle of INC criteria whose scores come from what forward hooks saw during training."""

from __future__ import annotations

import contextlib

from neural_compressor.compression.pruner.criteria import PruningCriterion
from torch import Tensor

from .config_checks import PruningConfigError


class HookFedCriterion(PruningCriterion):
    """An INC criterion fed by forward hooks: statistics are counted from construction until the optimizer step
    after ``end_step`` (INC's last pruning step), when ``remove_hooks()`` (the subclass's) runs; garbage
    collection removes them too. ``seen`` says what the hooks collect, for the error at ``end_step`` 0, when
    nothing can have been seen yet."""

    pruning_type: str

    def __init__(self, modules, config, pattern, seen: str):
        super().__init__(modules, config, pattern)
        if config["end_step"] < 1:
            raise PruningConfigError(
                f"pruning_type {self.pruning_type!r} scores by the {seen} of earlier steps, and nothing has been seen "
                f"at step 0: set end_step >= 1 (got end_step {config['end_step']})"
            )
        self._optimizer_steps = 0
        self._end_step = config["end_step"]

    def set_score(self, name: str, score: Tensor) -> None:
        """Stores a score in the weight's layout, reduced by the pattern (blocks, channels) as INC's criteria do."""
        if hasattr(self.pattern, "reduce_score"):
            score = self.pattern.reduce_score(score, name)
        self.scores[name] = score

    def remove_hooks(self) -> None:
        raise NotImplementedError

    def on_before_optimizer_step(self) -> None:
        # INC calls this once per optimizer step; the last pruning step happens at step end_step.
        self._optimizer_steps += 1
        if self._optimizer_steps > self._end_step:
            self.remove_hooks()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn torch down already
            self.remove_hooks()
