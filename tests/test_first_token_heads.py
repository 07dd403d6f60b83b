"""The first-token shortcut (inc_plugins.models.first_token_heads): a sequence classifier that reads only the first
token of its last block runs that block's FFN on the first position alone, with the same logits, losses and mask
gradients, and only where the head reads one token."""

import pytest
import torch

from inc_plugins.models import first_token_heads
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.first_token_heads import first_token_last_ffn, reads_first_token_only
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.post_training import collect_mask_gradients, tune_mask_scales
from inc_plugins.post_training.teacher_targets import TeacherTargets
from tests.fixtures.calibration_data import token_batches, varied_lengths
from tests.fixtures.tiny_models import (tiny_bert_classifier, tiny_distilbert_classifier, tiny_llama_lm,
                                        tiny_mpnet_classifier, tiny_roberta_classifier)

CLASSIFIERS = [tiny_bert_classifier, tiny_distilbert_classifier, tiny_mpnet_classifier, tiny_roberta_classifier]


def padded_batches():
    batches = varied_lengths(token_batches(2, 4, 10, labels="classification"))
    for batch in batches:  # RoBERTa counts positions from its padding id (1): keep it out of the ids
        batch["input_ids"] = batch["input_ids"].clamp(min=2)
    return batches


def last_ffn_positions(model):
    """Hook recording how many positions each call of the last block's FFN output projection saw."""
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    seen = []
    handle = blocks[-1].get_submodule(adapter.layout.ffn_out).register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("build", CLASSIFIERS)
def test_logits_are_the_full_models_and_the_last_ffn_sees_one_position(build):
    model = build().double()
    batch = padded_batches()[0]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    assert reads_first_token_only(model)
    seen, handle = last_ffn_positions(model)
    with torch.no_grad():
        full = model(**inputs).logits
        with first_token_last_ffn(model) as on:
            short = model(**inputs).logits
    handle.remove()
    assert on
    assert seen == [inputs["input_ids"].shape[1], 1]  # the shortcut skipped the work at the other positions
    torch.testing.assert_close(short, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build", CLASSIFIERS)
def test_fisher_pass_gradients_equal_those_without_the_shortcut(build, monkeypatch):
    model = build().double()
    batches = padded_batches()
    seen, handle = last_ffn_positions(model)
    short = collect_mask_gradients(model, batches)
    assert 1 in seen
    monkeypatch.setattr(first_token_heads, "reads_first_token_only", lambda model: False)
    seen.clear()
    full = collect_mask_gradients(model, batches)
    handle.remove()
    assert 1 not in seen
    assert full.head.abs().sum() > 0 and full.neuron.abs().sum() > 0
    torch.testing.assert_close(short.head, full.head, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(short.neuron, full.neuron, rtol=1e-8, atol=1e-12)


def test_models_that_read_every_position_run_as_they_are():
    model = tiny_llama_lm()
    assert not reads_first_token_only(model)
    seen, handle = last_ffn_positions(model)
    batch = token_batches(1, 2, 6, labels="lm")[0]
    with torch.no_grad(), first_token_last_ffn(model) as on:
        model(input_ids=batch["input_ids"])
    handle.remove()
    assert not on and seen == [6]


def test_first_token_targets_refuse_a_fit_of_every_position():
    model = tiny_bert_classifier()
    batches = padded_batches()
    structure = mask_structure(model)
    targets = TeacherTargets(model, structure, batches)  # as the Fisher pass records them: first token only
    ones = torch.ones(structure.n_layers, structure.n_head_units), torch.ones(structure.n_layers, structure.n_neurons)
    with pytest.raises(ValueError, match="first token only"):
        tune_mask_scales(model, *ones, batches, teacher_targets=targets, first_token_only_last_ffn=False)
