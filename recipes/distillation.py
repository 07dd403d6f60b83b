"""Knowledge distillation for the retraining after pruning (Hinton et al. 2015): the pruned model learns the outputs
the model had before the pruning stage, softened at a temperature, instead of the labels. After deep structured
pruning the labels alone let a small model overfit a training set its dense form already fitted; the dense model's
soft outputs carry what it learned about every example, wrong classes included."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


def distillation_loss(teacher: nn.Module, temperature: float) -> Callable[[nn.Module, dict], torch.Tensor]:
    """The loss of a student on one batch: KL(teacher || student) of the logits divided by `temperature`, times its
    square (so the gradients keep their size as the temperature changes), averaged over the rows of the logits (one
    per example for a classifier, one per token for a language model). `teacher` runs without gradients, in eval
    mode; the batch's labels are not read."""
    teacher.eval().requires_grad_(False)

    def loss_of(student: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
        with torch.no_grad():
            target = F.log_softmax(teacher(**inputs).logits.float() / temperature, dim=-1)
        logits = student(**inputs).logits.float()
        log_probs = F.log_softmax(logits / temperature, dim=-1)
        return F.kl_div(log_probs.flatten(0, -2), target.flatten(0, -2), log_target=True,
                        reduction="batchmean") * temperature ** 2

    return loss_of
