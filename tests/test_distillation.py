"""Knowledge distillation for the retraining after pruning (`recipes.distillation`, the `distillation_temperature`
key of a pruning stage): the loss against its closed form, and retraining on it (the recipe stage's wiring:
test_recipe_finetune_after_pruning.py)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from recipes.distillation import distillation_loss
from recipes.pruning_stage import finetune_holding_zeros


class FixedLogits(nn.Module):
    """Synthetic: returns the logits it holds, whatever the inputs (labels in the batch must not be read)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def brute_force_kl(teacher_logits, student_logits, temperature) -> float:
    """sum_c p_t(c) (log p_t(c) - log p_s(c)) per row at the temperature, averaged over rows, times T^2."""
    rows_t = torch.as_tensor(teacher_logits, dtype=torch.float64).reshape(-1, len(teacher_logits[0][0]))
    rows_s = torch.as_tensor(student_logits, dtype=torch.float64).reshape(rows_t.shape)
    total = 0.0
    for t, s in zip(rows_t, rows_s):
        zt = sum(math.exp(v / temperature) for v in t.tolist())
        zs = sum(math.exp(v / temperature) for v in s.tolist())
        for a, b in zip(t.tolist(), s.tolist()):
            pt = math.exp(a / temperature) / zt
            total += pt * (math.log(pt) - math.log(math.exp(b / temperature) / zs))
    return total / len(rows_t) * temperature ** 2


BATCH = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "labels": torch.zeros(2, dtype=torch.long)}


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_the_loss_is_the_kl_divergence_of_softened_logits_per_row(temperature):
    # [batch 2, positions 2, classes 3]: a language model's shape; every (example, position) row counts once
    teacher = [[[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], [[1.0, -2.0, 0.5], [0.3, 0.2, 0.1]]]
    student = [[[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]], [[-0.5, 2.0, 0.0], [0.0, 0.0, 0.0]]]
    loss = distillation_loss(FixedLogits(teacher), temperature)(FixedLogits(student), BATCH)
    assert loss.item() == pytest.approx(brute_force_kl(teacher, student, temperature), rel=1e-5)


def test_a_student_that_matches_its_teacher_has_zero_loss_and_zero_gradient():
    logits = [[[1.5, -0.5], [0.2, 0.1]]]
    student = FixedLogits(logits)
    loss = distillation_loss(FixedLogits(logits), 2.0)(student, BATCH)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert student.logits.grad.abs().max().item() < 1e-6


def test_the_teacher_gets_no_gradient_and_stays_in_eval_mode():
    teacher = FixedLogits([[[1.0, 0.0]]]).train()
    loss = distillation_loss(teacher, 1.0)(FixedLogits([[[0.0, 1.0]]]), BATCH)
    loss.backward()
    assert teacher.logits.grad is None and not teacher.training


class SyntheticClassifier(nn.Module):
    """Synthetic: mean token embedding -> linear, 3 classes."""

    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(32, 16), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.embedding(input_ids).mean(dim=1)))


def test_distilled_retraining_brings_the_pruned_model_back_to_the_teacher_and_holds_its_zeros():
    torch.manual_seed(0)
    teacher = SyntheticClassifier()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.weight[:, ::2] = 0  # "pruned": half of the head's input columns
    pruned_zeros = student.head.weight == 0
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 32, (8, 5), generator=generator),
                "attention_mask": torch.ones(8, 5, dtype=torch.long),
                "labels": torch.randint(0, 3, (8,), generator=generator)} for _ in range(4)]
    loss_of = distillation_loss(copy.deepcopy(teacher), 2.0)

    def divergence() -> float:
        with torch.no_grad():
            return sum(loss_of(student, batch).item() for batch in batches)

    before = divergence()
    report = finetune_holding_zeros(student, batches, 40, 1e-2, seed=0, loss_of=loss_of)
    assert divergence() < 0.2 * before
    assert torch.equal(student.head.weight == 0, pruned_zeros) and report["zeros_held"] == int(pruned_zeros.sum())
