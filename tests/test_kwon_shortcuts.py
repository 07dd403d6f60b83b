"""The mask search's shortcuts give the same numbers: calibration sequences regrouped by length for mask tuning
(inc_plugins.post_training.data.rebatch_by_length), split into length-sorted groups for the Fisher pass, and the
dense teacher's tuning targets recorded by the Fisher pass (inc_plugins.post_training.teacher_targets), student passes
on slimmed block copies, FFN fits that replay the attention fits' contexts, and token sums in chunks."""

import torch

import pytest

from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.post_training import collect_mask_gradients, tune_mask_scales
from inc_plugins.post_training import mask_tuning, teacher_targets
from inc_plugins.post_training.teacher_targets import TeacherTargets
from inc_plugins.post_training.data import rebatch_by_length, token_mask
from tests.fixtures.calibration_data import token_batches, varied_lengths
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm


def rows_of(batches, flags):
    """{(real tokens of one sequence, its label, its flag)} over every sequence."""
    found = []
    for batch, flag in zip(batches, flags):
        mask = token_mask(batch)
        for row in range(mask.shape[0]):
            found.append((tuple(batch["input_ids"][row][mask[row]].tolist()), tuple(batch["labels"][row][mask[row]].tolist()),
                          bool(flag[row])))
    return sorted(found)


def test_same_sequences_and_flags_in_batches_of_similar_length_with_less_padding():
    batches = token_batches(4, 5, 12, labels="lm")
    for batch, cut in zip(batches, (3, 12, 5, 9)):  # sequences of many lengths, right-padded
        batch["attention_mask"][::2, cut:] = 0
        batch["labels"][::2, cut:] = -100
    flags = [torch.arange(5) % 3 == 0 for _ in batches]
    regrouped, moved = rebatch_by_length(batches, flags)
    assert rows_of(regrouped, moved) == rows_of(batches, flags)
    assert [len(b["input_ids"]) for b in regrouped] == [5, 5, 5, 5]
    padded = lambda bs: sum(b["attention_mask"].numel() for b in bs)  # noqa: E731
    assert padded(regrouped) < padded(batches)
    lengths = [token_mask(b).sum(dim=1) for b in regrouped]
    assert all(int(x.max()) == b["input_ids"].shape[1] for x, b in zip(lengths, regrouped))  # no extra padding
    assert all(((b["labels"] == -100) | token_mask(b)).all() for b in regrouped)  # padding labels are ignored


def test_left_padded_batches_are_left_as_they_are():
    batches = token_batches(2, 4, 8, labels="classification")
    batches[0]["attention_mask"][1, :3] = 0  # left padding: moving it would move positions
    flags = [torch.zeros(4, dtype=torch.bool) for _ in batches]
    regrouped, moved = rebatch_by_length(batches, flags)
    assert all(a is b for a, b in zip(regrouped, batches)) and len(regrouped) == 2


def test_fisher_gradients_of_length_sorted_groups_equal_the_whole_batch_gradients():
    model = tiny_bert_classifier().double()
    batches = token_batches(2, 20, 16, labels="classification")
    for batch in batches:
        for row in range(20):
            batch["attention_mask"][row, 2 + (7 * row) % 14:] = 0  # lengths 2..15, right-padded
    grouped = collect_mask_gradients(model, batches)
    def mean_cross_entropy(outputs, batch):  # the model's own loss, given as a loss_func: batches run as given
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])

    whole = collect_mask_gradients(model, batches, loss_func=mean_cross_entropy)
    assert grouped.head.shape == whole.head.shape == (2, 2, 4)  # one vector per batch, as before
    torch.testing.assert_close(grouped.head, whole.head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grouped.neuron, whole.neuron, rtol=1e-5, atol=1e-7)
    per_sample = collect_mask_gradients(model, batches, per_sample=True)
    assert per_sample.head.shape[0] == 40


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_tuning_on_targets_recorded_by_the_fisher_pass_equals_tuning_with_teacher_passes(build, labels):
    model = build().double()
    batches = varied_lengths(token_batches(3, 6, 12, labels=labels))  # 18 samples: 2 held out
    structure = mask_structure(model)
    generator = torch.Generator().manual_seed(0)
    keep_heads = (torch.rand(structure.n_layers, structure.n_head_units, generator=generator) > 0.3).float()
    keep_neurons = (torch.rand(structure.n_layers, structure.n_neurons, generator=generator) > 0.4).float()
    keep_heads[:, 0] = 1
    recorded = TeacherTargets(model, structure, batches)
    collect_mask_gradients(model, batches, structure=structure, recorders=[recorded])
    assert all(t.abs().sum() > 0 for t in recorded.attention + recorded.ffn)  # every block recorded
    with_passes = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5)
    with_recorded = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5, teacher_targets=recorded)
    assert [(e.layer, e.part, e.accepted) for e in with_recorded.log] == \
           [(e.layer, e.part, e.accepted) for e in with_passes.log]
    torch.testing.assert_close(with_recorded.unit_head_mask, with_passes.unit_head_mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_recorded.neuron_mask, with_passes.neuron_mask, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="without teacher masks"):
        tune_mask_scales(model, keep_heads, keep_neurons, batches, teacher_targets=recorded,
                         teacher_head_mask=keep_heads)
    with pytest.raises(ValueError, match="real tokens differ"):
        tune_mask_scales(model, keep_heads, keep_neurons, batches[1:] + batches[:1], teacher_targets=recorded)


def test_targets_too_large_for_memory_are_not_recorded(monkeypatch):
    model, batches = tiny_bert_classifier(), token_batches(2, 4, 12, labels="classification")
    structure = mask_structure(model)
    assert TeacherTargets.fits(structure, batches)
    monkeypatch.setattr(teacher_targets, "MAX_BYTES", 1000)
    assert not TeacherTargets.fits(structure, batches)


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_tuning_on_slimmed_blocks_equals_tuning_on_masked_blocks(build, labels, monkeypatch):
    model = build().double()  # float64: the two paths differ only by summation order
    batches = varied_lengths(token_batches(3, 6, 12, labels=labels))
    structure = mask_structure(model)
    generator = torch.Generator().manual_seed(1)
    keep_heads = (torch.rand(structure.n_layers, structure.n_head_units, generator=generator) > 0.4).float()
    keep_neurons = (torch.rand(structure.n_layers, structure.n_neurons, generator=generator) > 0.5).float()
    keep_neurons *= 0.5 + torch.rand(keep_neurons.shape, generator=generator)  # scales other than 1 are folded
    keep_heads[:, 0] = 0.5 + torch.rand(structure.n_layers, generator=generator)
    keep_neurons[0] = 0.0  # a layer without neurons runs the masked block
    slimmed = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5)
    monkeypatch.setattr(mask_tuning, "can_slim", lambda model: False)
    masked = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5)
    assert [(e.layer, e.part, e.accepted) for e in slimmed.log] == [(e.layer, e.part, e.accepted) for e in masked.log]
    assert any(e.accepted for e in slimmed.log)  # some scales moved, so the comparison can fail
    torch.testing.assert_close(slimmed.unit_head_mask, masked.unit_head_mask, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(slimmed.neuron_mask, masked.neuron_mask, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_ffn_fits_replaying_the_attention_contexts_equal_fits_that_rerun_the_attention(build, labels, monkeypatch):
    model = build().double()
    batches = varied_lengths(token_batches(3, 6, 12, labels=labels))
    structure = mask_structure(model)
    generator = torch.Generator().manual_seed(2)
    keep_heads = (torch.rand(structure.n_layers, structure.n_head_units, generator=generator) > 0.4).float()
    keep_neurons = (torch.rand(structure.n_layers, structure.n_neurons, generator=generator) > 0.5).float()
    keep_heads[:, 0] = keep_neurons[:, 0] = 1.0  # every block keeps some of both: every FFN pass can replay
    replays = []
    forward = mask_tuning._ReplayedAttention.forward
    monkeypatch.setattr(mask_tuning._ReplayedAttention, "forward",
                        lambda self, *args, **kwargs: replays.append(self.context.shape) or forward(self, *args, **kwargs))
    replayed = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5)
    assert len(replays) == structure.n_layers * len(batches)  # each block's FFN pass, every (regrouped) batch
    replays.clear()
    monkeypatch.setattr(mask_tuning, "REPLAY_MAX_BYTES", 0)
    monkeypatch.setattr(mask_tuning, "CHUNK_TOKENS", 7)  # and token sums in many chunks instead of one
    rerun = tune_mask_scales(model, keep_heads, keep_neurons, batches, damp=0.5)
    assert not replays
    assert any(e.accepted for e in replayed.log)
    torch.testing.assert_close(replayed.unit_head_mask, rerun.unit_head_mask, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(replayed.neuron_mask, rerun.neuron_mask, rtol=1e-9, atol=1e-9)
