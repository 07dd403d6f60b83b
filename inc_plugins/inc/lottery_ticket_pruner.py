"""Lottery tickets as an INC training-aware pruning type: ``pruning_type="lottery_ticket"``.

Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; late rewinding: Frankle et al. 2020) inside the
caller's own training loop, driven by INC's callbacks:

    pruning = inc_plugins.prepare_pruning(model, WeightPruningConfig(pruning_type="lottery_ticket", pattern="1x1",
                                          target_sparsity=0.8, start_step=100, end_step=400, pruning_frequency=100),
                                          optimizer=optimizer)
    # the loop calls pruning.on_step_begin(step), on_before_optimizer_step(), on_after_optimizer_step() as for any
    # INC training-aware type (or trains with callbacks=[inc_plugins.PruningCallback(config)] in a Trainer)

Each pruning step of INC's schedule that prunes more weights is a round: INC's magnitude criterion and pattern prune to
the schedule's sparsity, then the kept weights return to the weights of step ``rewind_step`` (0: the initial weights) and training
goes on from there; the training between two pruning steps is the round's retraining. After ``end_step`` the last
round trains the ticket. ``lottery_reinit: true`` is the paper's control: the kept weights return instead to a random
re-initialisation (each layer drawn from a normal distribution with its rewind weights' mean and standard deviation,
seeded by ``lottery_seed``), which should train worse than the ticket.

Differences from the paper's procedure: the optimizer's state (momentum, Adam moments) is the caller's and carries
over a rewind; each round trains ``pruning_frequency`` steps rather than to convergence. The project's own driver
(``execution.lottery_rounds``, the ``lottery_ticket`` recipe stage) resets both.
"""

from __future__ import annotations

from typing import Annotated

import torch
from neural_compressor.compression.pruner.pruners.basic import PytorchBasicPruner
from pydantic import Field

from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError

__all__ = ["LotteryTicketPruner", "LotteryTicketSettings"]


class LotteryTicketSettings(PluginSettings):
    """The keys of a ``pruning_type="lottery_ticket"`` config entry beyond INC's schedule keys."""

    rewind_step: Annotated[int, Field(ge=0, le=10_000_000)] = Field(0, description=(
        "the training step whose weights the kept weights return to after each pruning step: 0, the initial "
        "weights (Frankle & Carbin 2019); k > 0, late rewinding (Frankle et al. 2020); at most start_step"))
    lottery_reinit: bool = Field(False, description=(
        "the control: return the kept weights to a random re-initialisation (per layer, normal with the rewind "
        "weights' mean and std) instead of the rewind weights"))
    lottery_seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = Field(0, description="seeds lottery_reinit's draws")


class LotteryTicketPruner(PytorchBasicPruner):
    """INC pruner of one ``lottery_ticket`` entry: INC's basic pruner with the magnitude criterion, plus the rewind.

    ``rewind_weights``: {layer name: the weights the kept ones return to}, taken at the first step at or after
    ``rewind_step`` (None before); ``rounds``: the pruning steps that pruned more weights, each followed by a rewind
    (INC's schedule may prune nothing at its first pruning step).
    """

    def __init__(self, config, modules):
        self.lottery = LotteryTicketSettings.from_config(config)
        config["criterion_type"] = "magnitude"  # INC's own criterion ranks the weights
        super().__init__(config, modules)
        if self.lottery.rewind_step > self.start_step:
            raise PruningConfigError(f"rewind_step {self.lottery.rewind_step} is after start_step {self.start_step}: "
                                     f"the weights to rewind to must exist before the first pruning step")
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self.rounds = 0

    def _rewind_point(self) -> dict[str, torch.Tensor]:
        weights = {name: module.weight.detach().clone() for name, module in self.modules.items()}
        if not self.lottery.lottery_reinit:
            return weights
        generator = torch.Generator().manual_seed(self.lottery.lottery_seed)
        return {name: (torch.randn(weight.shape, generator=generator) * weight.float().std() + weight.float().mean())
                .to(weight.dtype).to(weight.device) for name, weight in weights.items()}

    def update_masks(self, local_step):
        if self.rewind_weights is None and self.global_step >= self.lottery.rewind_step:
            self.rewind_weights = self._rewind_point()
        sparsity_before = self.current_sparsity_ratio
        super().update_masks(local_step)
        if self.current_sparsity_ratio > sparsity_before:  # INC pruned more this step: rewind what it kept
            with torch.no_grad():
                for name, module in self.modules.items():
                    module.weight.copy_(self.rewind_weights[name])
            self.mask_weights()
            self.rounds += 1
