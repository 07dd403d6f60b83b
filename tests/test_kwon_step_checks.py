"""The step checks of the Kwon pipeline: dense predictions recorded by the Fisher pass, the least-sure samples, the
agreement count against brute force, and the pipeline keeping a step only when its check says so.
Tiny synthetic models and token batches: these check the mechanics, not what the checks buy (see
docs/results/kwon_minilm.md for that, on the fine-tuned MiniLM)."""

import logging

import pytest
import torch

from inc_plugins.models.structure_masks import apply_structure_masks, mask_structure
from inc_plugins.post_training import KwonSettings, collect_mask_gradients, prune_post_training
from inc_plugins.post_training.data import token_mask
from inc_plugins.post_training.step_checks import DensePredictions, StepChecker
from tests.fixtures.calibration_data import token_batches, varied_lengths
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm


def brute_force_predictions(model, batches, head_mask=None, neuron_mask=None):
    """Per sample, (top-1 at each of its positions, its smallest top-1 minus top-2 margin), one sample at a time."""
    out = []
    with torch.no_grad(), apply_structure_masks(model, head_mask, neuron_mask):
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = model(**inputs).logits
            for row in range(logits.shape[0]):
                positions = logits[row : row + 1] if logits.dim() == 2 else logits[row][token_mask(batch)[row]]
                top2 = positions.topk(2, dim=-1).values
                out.append((positions.argmax(dim=-1), float((top2[:, 0] - top2[:, 1]).min())))
    return out


def case(build, labels):
    model = build().eval()
    batches = varied_lengths(token_batches(3, 6, 12, labels=labels))
    return model, batches, mask_structure(model)


def recorded_predictions(model, batches, structure):
    predictions = DensePredictions(model, sum(b["input_ids"].shape[0] for b in batches))
    collect_mask_gradients(model, batches, structure=structure, recorders=[predictions])
    return predictions


def random_masks(structure, seed, keep=0.6):
    generator = torch.Generator().manual_seed(seed)
    heads = (torch.rand(structure.n_layers, structure.n_head_units, generator=generator) < keep).float()
    neurons = torch.rand(structure.n_layers, structure.n_neurons, generator=generator) < keep
    return heads, neurons.float() * (0.5 + torch.rand(neurons.shape, generator=generator))  # scaled, like tuning's


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_the_fisher_pass_records_the_dense_predictions_and_margins_of_every_sample(build, labels):
    model, batches, structure = case(build, labels)
    predictions = recorded_predictions(model, batches, structure)
    expected = brute_force_predictions(model, batches)
    assert predictions.complete and len(predictions.top1) == len(expected) == 18
    for (top1, margin), recorded, recorded_margin in zip(expected, predictions.top1, predictions.margin):
        assert torch.equal(recorded, top1)
        assert recorded_margin.item() == pytest.approx(margin, abs=1e-4)
    if labels == "lm":  # one prediction per real token
        assert sum(t.numel() for t in predictions.top1) == sum(int(b["attention_mask"].sum()) for b in batches)


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_agreement_counts_the_least_sure_samples_predictions_that_the_masked_model_repeats(build, labels):
    model, batches, structure = case(build, labels)
    predictions = recorded_predictions(model, batches, structure)
    checker = StepChecker(model, predictions, batches, samples=7)
    dense = brute_force_predictions(model, batches)
    least_sure = sorted(range(len(dense)), key=lambda i: dense[i][1])[:7]
    assert sorted(checker.sample_ids.tolist()) == sorted(least_sure)
    assert checker.positions == sum(dense[i][0].numel() for i in least_sure)
    ones = (torch.ones(structure.n_layers, structure.n_head_units), torch.ones(structure.n_layers, structure.n_neurons))
    assert checker.agreement(*ones) == checker.positions  # the dense model agrees with itself
    for seed in range(3):
        masks = random_masks(structure, seed)
        masked = brute_force_predictions(model, batches, *masks)
        expected = sum(int((masked[i][0] == dense[i][0]).sum()) for i in least_sure)
        assert checker.agreement(*masks) == expected
    assert checker.agreement(*random_masks(structure, 0)) == checker.agreement(*random_masks(structure, 0))


def test_a_step_is_kept_only_when_it_strictly_raises_the_agreement():
    model, batches, structure = case(tiny_llama_lm, "lm")  # 128-token vocabulary: predictions that can change
    checker = StepChecker(model, recorded_predictions(model, batches, structure), batches)
    ones = (torch.ones(structure.n_layers, structure.n_head_units), torch.ones(structure.n_layers, structure.n_neurons))
    pruned = (torch.zeros_like(ones[0]), torch.zeros_like(ones[1]))  # no head, no neuron left
    positions = sum(int(b["attention_mask"].sum()) for b in batches)  # every sample: fewer than CHECK_SAMPLES
    assert checker.agreement(*pruned) < checker.positions == positions
    towards_dense = checker.check("back to dense", pruned, ones)
    assert towards_dense.kept and towards_dense.agreement_with == positions
    away = checker.check("to nothing", ones, pruned)
    assert not away.kept and away.agreement_without == positions
    assert not checker.check("no change", ones, ones).kept  # a tie keeps the model without the step


def masks_of(result):
    return result.unit_head_mask, result.neuron_mask


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_the_pipeline_goes_on_with_the_masks_each_check_decided(build, labels):
    model, batches, structure = case(build, labels)
    settings = dict(target_sparsity=0.5, damp=0.5)
    gradients = prune_post_training(model, batches, KwonSettings(**settings, rearrange=False, tune=False)).gradients
    search = prune_post_training(model, batches, KwonSettings(**settings, rearrange=False, tune=False),
                                 gradients=gradients)
    rearranged = prune_post_training(model, batches, KwonSettings(**settings, tune=False, check_steps=False),
                                     gradients=gradients)
    checked = prune_post_training(model, batches, KwonSettings(**settings), gradients=gradients)
    assert not search.step_checks and not rearranged.step_checks  # nothing to check / checks off
    steps = {check.step: check for check in checked.step_checks}
    assert steps and set(steps) <= {"rearrangement", "tuning"}
    if "rearrangement" not in steps:  # not checked because it changed nothing
        assert all(torch.equal(a, b) for a, b in zip(masks_of(search), masks_of(rearranged)))
    rearrange = "rearrangement" not in steps or steps["rearrangement"].kept
    before_tuning = masks_of(rearranged if rearrange else search)
    tuned = masks_of(prune_post_training(model, batches, KwonSettings(**settings, rearrange=rearrange,
                                                                      check_steps=False), gradients=gradients))
    if "tuning" not in steps:  # every fit kept scales of 1: nothing to check
        assert all(torch.equal(a, b) for a, b in zip(tuned, before_tuning))
    expected = tuned if "tuning" in steps and steps["tuning"].kept else before_tuning
    for got, want in zip(masks_of(checked), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert checked.tuning is not None  # the tuning log is reported whichever way its check went
    assert checked.phase_seconds["check"] > 0


def test_a_model_without_logits_keeps_its_steps_unchecked(caplog):
    model, batches, _ = case(tiny_bert_classifier, "classification")
    # the model's outputs become a dict without logits: the Fisher pass can score it, a check cannot read it
    handle = model.register_forward_hook(lambda _module, _args, output: {"scores": output.logits})
    try:
        with caplog.at_level(logging.WARNING):
            result = prune_post_training(model, batches, KwonSettings(0.5, tune=False),
                                         loss_func=lambda outputs, batch: outputs["scores"].pow(2).mean())
    finally:
        handle.remove()
    assert result.step_checks == ()
    assert "no logits" in caplog.text
