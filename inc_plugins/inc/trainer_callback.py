"""INC's training-aware pruning inside a Hugging Face ``Trainer``: ``PruningCallback``.

    config = inc_plugins.pruning_config(pruning_type="snip_momentum", target_sparsity=0.5, pattern="4x1",
                                        start_step=0, end_step=800)
    Trainer(model, args, train_dataset=train, callbacks=[inc_plugins.PruningCallback(config)]).train()

optimum-intel's ``INCTrainer`` did this until it was removed; this is a callback instead of a Trainer subclass, so it
goes with any Trainer (``Seq2SeqTrainer``, TRL's trainers, a user's own subclass).

What it does, at the Trainer's events:

* train begin: ``inc_plugins.prepare_pruning(model, config, optimizer=<the Trainer's optimizer>)`` and INC's
  ``on_train_begin``. INC rewrites ``optimizer.step`` so that each update is bracketed by its
  ``on_before_optimizer_step`` / ``on_after_optimizer_step`` (the masks are applied around the update).
* INC calls ``on_step_begin`` (where its pruners update their masks) from a forward pre-hook, on *every* forward
  pass. Its step counter advances in ``on_step_end``, so the schedule still counts optimizer steps, but an evaluation
  between two steps would run that hook and apply the next step's pruning to a model not yet trained for it (the
  test shows it). The callback removes the hook and calls ``on_step_begin`` once per optimizer step, at the
  Trainer's step begin: an evaluation sees the model as trained so far.
* step end: ``on_step_end``. Train end: ``on_train_end``, then ``complete_pruning`` detaches INC's hooks and restores
  ``optimizer.step`` and ``torch.save``; the pruned weights stay, and ``.pruning`` keeps INC's pruning object(s).

Training-aware types only (INC's ``magnitude``, ``snip_momentum``, ..., and the plugins' criteria such as
``wanda_score`` and ``apoz``): one-shot types (``wanda``, ``mask_search``, ...) prune from calibration data before
any training and are refused with that advice.
"""

from __future__ import annotations

from typing import Any

from neural_compressor import WeightPruningConfig
from transformers import TrainerCallback

from .config_checks import PruningConfigError
from .entry import prepare_pruning, settings_per_pruner
from .lifecycle import complete_pruning
from .one_shot import is_one_shot

__all__ = ["PruningCallback"]


class PruningCallback(TrainerCallback):
    """Drives INC's training-aware pruning from ``Trainer.train()`` (see the module docstring)."""

    def __init__(self, config: WeightPruningConfig):
        if not isinstance(config, WeightPruningConfig):
            raise PruningConfigError(f"PruningCallback takes a neural_compressor.WeightPruningConfig, got "
                                     f"{type(config).__name__}")
        one_shot = sorted({entry["pruning_type"] for entry in settings_per_pruner(config)
                           if is_one_shot(entry["pruning_type"])})
        if one_shot:
            raise PruningConfigError(
                f"pruning types {one_shot} prune one-shot from calibration data: call inc_plugins.prepare_pruning("
                f"model, config, dataloader=...) before training, not a Trainer callback")
        self.config = config
        self.pruning: Any = None  # INC's pruning object (a list when the config starts several flows)
        self._model = self._optimizer = None

    @property
    def _prunings(self) -> list:
        return self.pruning if isinstance(self.pruning, list) else [self.pruning]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("PruningCallback needs the Trainer's model and optimizer at train begin")
        self.pruning = prepare_pruning(model, self.config, optimizer=optimizer)
        # INC's new optimizer.step calls the one it replaced, which the Trainer's LR scheduler had wrapped to count
        # its calls: say so, or the scheduler warns that the step was overridden behind its back
        step = getattr(optimizer.step, "__func__", None)
        if step is not None:
            step._wrapped_by_lr_sched = True
        handle = model.__dict__.pop("inc_hook_handle", None)  # the schedule advances per optimizer step instead
        if handle is not None:
            handle.remove()
        self._model, self._optimizer = model, optimizer
        for pruning in self._prunings:
            pruning.on_train_begin()

    def on_step_begin(self, args, state, control, **kwargs):
        for pruning in self._prunings:
            pruning.on_step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        for pruning in self._prunings:
            pruning.on_step_end()

    def on_train_end(self, args, state, control, **kwargs):
        for pruning in self._prunings:
            pruning.on_train_end()
        complete_pruning(self._model, self._optimizer)
        self._model = self._optimizer = None
