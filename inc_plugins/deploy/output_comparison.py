"""Does a deployed model compute what the PyTorch model computes? The largest logit difference over a data set, and
whether the task's metric agrees within a stated tolerance.

    recorded = RecordedOutputs(model)                 # the PyTorch model, keeping its logits batch by batch
    pytorch_metrics = evaluate(recorded, batches)     # any evaluation that calls model(**inputs).logits
    compared = ComparedModel(ir, recorded)            # runs the IR on every call, returns its outputs
    ir_metrics = evaluate(compared, batches)          # compared with the kept logits (or `model` run again)
    result = compare_outputs(compared, pytorch_metrics, ir_metrics, Tolerance(1e-4, 0.002))

The difference is read against the scale of the logits (`max_abs_diff / reference_max_abs`), so one tolerance fits a
classifier's logits (a few units) and a language model's (tens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# metrics compared by absolute difference (fractions of examples); any other metric (perplexity) by relative difference
ABSOLUTE_METRICS = ("accuracy", "f1")


@dataclass(frozen=True)
class Tolerance:
    relative_logits: float  # max |candidate - reference| over every logit, over max |reference|
    metric: float  # |difference| of accuracy/F1, or |difference| / reference of any other metric (perplexity)


# Per inference precision. float32: only the order of additions differs (measured on MiniLM and SmolLM2: see
# docs/deploy.md), so a wider gap is a conversion bug. bf16 rounds every activation to 8 bits of mantissa: a
# prediction near the decision boundary may flip, so a few examples in a thousand may change. int8 (weights and
# activations) moves logits further; 2 points of accuracy (2% of perplexity) is the usual bar for post-training int8.
DEFAULT_TOLERANCES = {"fp32": Tolerance(relative_logits=1e-4, metric=0.002),
                      "bf16": Tolerance(relative_logits=0.1, metric=0.01),
                      "int8": Tolerance(relative_logits=0.25, metric=0.02)}


@dataclass(frozen=True)
class OutputComparison:
    max_abs_diff: float
    reference_max_abs: float
    relative_diff: float
    batches: int
    metrics: dict  # {metric: {"pytorch", "candidate", "difference", "relative": bool}}
    tolerance: dict
    within_tolerance: bool
    failures: list  # what exceeded its tolerance, in words

    def as_dict(self) -> dict:
        return asdict(self)


# logits kept by RecordedOutputs: all of a classifier's dev set is a few MB; a language model's windows (vocabulary-
# wide logits) are hundreds of MB, past which the reference runs again instead
RECORDED_BYTES = 256 * 2**20


class RecordedOutputs(nn.Module):
    """`model`, keeping the float32 logits of its calls in order (up to `max_bytes`), so the checks of several deployed
    forms over the same batches read the PyTorch model's logits instead of running it once per form."""

    def __init__(self, model: nn.Module, max_bytes: int = RECORDED_BYTES):
        super().__init__()
        self.model, self.max_bytes = model, max_bytes
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input_ids, logits) of each call
        self.bytes = 0
        self.full = False  # once a call's logits do not fit, none after it is kept: the kept calls stay a prefix

    def forward(self, **inputs):
        output = self.model(**inputs)
        logits = output.logits.detach().float()
        self.full = self.full or self.bytes + logits.numel() * logits.element_size() > self.max_bytes
        if not self.full:
            self.recorded.append((inputs["input_ids"].clone(), logits))
            self.bytes += logits.numel() * logits.element_size()
        return output

    def logits_for(self, call: int, inputs: dict) -> torch.Tensor:
        """The logits of the `call`-th call if it was kept and had these token ids; else `model` run on `inputs`."""
        if call < len(self.recorded) and torch.equal(self.recorded[call][0], inputs["input_ids"]):
            return self.recorded[call][1]
        return self.model(**inputs).logits.float()


class ComparedModel(nn.Module):
    """Calls `candidate` and `reference` with the same inputs (a `RecordedOutputs` reference gives its kept logits
    instead of running again); returns the candidate's output and keeps the largest absolute logit difference (and
    the largest reference logit) seen."""

    def __init__(self, candidate: nn.Module, reference: nn.Module):
        super().__init__()
        self.candidate, self.reference = candidate, reference
        self.max_abs_diff, self.reference_max_abs, self.batches = 0.0, 0.0, 0

    @torch.no_grad()
    def forward(self, **inputs):
        output = self.candidate(**inputs)
        if isinstance(self.reference, RecordedOutputs):
            expected = self.reference.logits_for(self.batches, inputs)
        else:
            expected = self.reference(**inputs).logits.float()
        self.max_abs_diff = max(self.max_abs_diff, (output.logits.float() - expected).abs().max().item())
        self.reference_max_abs = max(self.reference_max_abs, expected.abs().max().item())
        self.batches += 1
        return output


def compare_outputs(compared: ComparedModel, pytorch_metrics: dict, candidate_metrics: dict,
                    tolerance: Tolerance) -> OutputComparison:
    """The comparison of a `ComparedModel` run over a data set, with the metrics of both models on it (the numeric
    keys both have, "examples" and "windows" aside)."""
    if compared.batches == 0:
        raise ValueError("the compared model has not run on any batch: evaluate it first")
    relative = compared.max_abs_diff / max(compared.reference_max_abs, 1e-12)
    failures = []
    if relative > tolerance.relative_logits:
        failures.append(f"max logit difference {compared.max_abs_diff:.3g} is {relative:.3g} of the largest logit "
                        f"(tolerance {tolerance.relative_logits:g})")
    metrics = {}
    for name, reference in pytorch_metrics.items():
        if name in ("examples", "windows", "tokens_per_window") or not isinstance(candidate_metrics.get(name), float):
            continue
        candidate, is_relative = candidate_metrics[name], name not in ABSOLUTE_METRICS
        difference = candidate - reference
        measured = abs(difference) / abs(reference) if is_relative else abs(difference)
        metrics[name] = {"pytorch": reference, "candidate": candidate, "difference": difference,
                         "relative": is_relative}
        if measured > tolerance.metric:
            failures.append(f"{name} {candidate:.4f} vs PyTorch {reference:.4f} ({'relative ' if is_relative else ''}"
                            f"difference {measured:.3g}, tolerance {tolerance.metric:g})")
    return OutputComparison(compared.max_abs_diff, compared.reference_max_abs, relative, compared.batches, metrics,
                            asdict(tolerance), not failures, failures)
