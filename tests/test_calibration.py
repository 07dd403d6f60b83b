"""Sequential block-by-block calibration, and the synthetic calibration batches it is tested on."""

import gc
import weakref

import pytest
import torch
import transformers
from torch import nn

from inc_plugins.execution.activation_spill import ActivationSpill
from inc_plugins.execution.calibration import (
    BlockInput,
    capture_block_inputs,
    first_output,
    merged_inputs,
    run_block,
    sequential_blocks,
    split_batches,
)
from inc_plugins.models.architectures import adapter_for
from tests.fixtures.calibration_data import PAD_TOKEN_ID, image_batches, token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_cnn, tiny_gpt2_lm, tiny_llama_lm, tiny_opt_lm


def tiny_mpnet_classifier() -> nn.Module:
    """Synthetic MPNet: its layers return tuples and take a relative position bias."""
    config = transformers.MPNetConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.MPNetForSequenceClassification(config).eval()


def call_model(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    return model(batch[0])


def input_of(module_name: str):
    """Reference: the input of `module_name` (the final norm or pooling) in a full forward pass."""

    def reference(model: nn.Module, batch) -> torch.Tensor:
        seen = []
        handle = model.get_submodule(module_name).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        with torch.no_grad():
            call_model(model, batch)
        handle.remove()
        return seen[0]

    return reference


def last_hidden_state(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[-1]


def tokens(labels=None):
    return token_batches(n_batches=3, batch_size=4, seq_len=12, seed=1, labels=labels)


# name: (build, batches, reference final hidden states)
FAMILIES = {
    "bert": (tiny_bert_classifier, lambda: tokens("classification"), last_hidden_state),
    "mpnet": (tiny_mpnet_classifier, tokens, last_hidden_state),
    "llama": (tiny_llama_lm, lambda: tokens("lm"), input_of("model.norm")),
    "opt": (tiny_opt_lm, tokens, input_of("model.decoder.final_layer_norm")),
    "gpt2": (tiny_gpt2_lm, tokens, input_of("transformer.ln_f")),
    "cnn": (tiny_cnn, lambda: image_batches(3, 5, seed=1), input_of("pool")),
}


def reference_block_inputs(model: nn.Module, blocks, batches) -> list[list[torch.Tensor]]:
    """[block][batch] hidden states entering each block in full forward passes."""
    seen = [[] for _ in blocks]
    handles = [
        block.register_forward_pre_hook(
            lambda _, args, kwargs, i=i: seen[i].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        for batch in batches:
            call_model(model, batch)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", FAMILIES)
def test_sequential_walk_reproduces_the_full_forward_pass(name):
    build, make_batches, final_hidden = FAMILIES[name]
    model, batches = build(), make_batches()
    _, blocks = adapter_for(model).blocks(model)
    expected_inputs = reference_block_inputs(model, blocks, batches)

    walked = []
    for index, block, inputs in sequential_blocks(model, batches):
        walked.append(index)
        assert block is blocks[index]
        for got, expected in zip(inputs, expected_inputs[index], strict=True):
            torch.testing.assert_close(got.hidden_states, expected)
        if index == len(blocks) - 1:
            outputs = [run_block(block, block_input) for block_input in inputs]
    assert walked == list(range(len(blocks)))
    for got, batch in zip(outputs, batches, strict=True):
        torch.testing.assert_close(got, final_hidden(model, batch))


def unpadded_windows(n_batches: int, seq_len: int = 12, seed: int = 2) -> list[tuple[torch.Tensor]]:
    """Synthetic batch-1 token windows without padding, as a causal-LM recipe calibrates."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 100, (1, seq_len), generator=generator),) for _ in range(n_batches)]


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2", "bert"])
def test_merged_calls_reproduce_the_unmerged_walk(name):
    build = FAMILIES[name][0]
    model, batches = build(), unpadded_windows(5)
    _, blocks = adapter_for(model).blocks(model)
    expected = reference_block_inputs(model, blocks, batches)
    for index, block, inputs in sequential_blocks(model, batches, merge_tokens=24):
        assert [x.batch_sizes for x in inputs] == [(1, 1), (1, 1), ()], "two windows of 12 tokens per call"
        torch.testing.assert_close(torch.cat([x.hidden_states for x in inputs]), torch.cat(expected[index]))
        if index == len(blocks) - 1:
            got = torch.cat([run_block(block, x) for x in inputs])
    torch.testing.assert_close(got, torch.cat([FAMILIES[name][2](model, (ids,) if name != "bert" else
                                                                 {"input_ids": ids}) for (ids,) in batches]))


def test_batches_with_their_own_padding_masks_are_not_merged():
    model, batches = tiny_llama_lm(), tokens("lm")  # padded: each batch has its own attention mask
    _, _, inputs = next(sequential_blocks(model, batches, merge_tokens=10_000))
    assert len(inputs) == len(batches) and all(x.batch_sizes == () for x in inputs)


def test_merging_stops_at_a_change_of_length_and_at_the_token_budget():
    model = tiny_llama_lm()
    _, blocks = adapter_for(model).blocks(model)
    batches = unpadded_windows(3) + unpadded_windows(2, seq_len=8) + unpadded_windows(1, seq_len=40)
    inputs = merged_inputs(capture_block_inputs(model, blocks, batches), max_tokens=30)
    assert [(x.batch_sizes, x.hidden_states.shape[:2]) for x in inputs] == [
        ((1, 1), (2, 12)), ((), (1, 12)), ((1, 1), (2, 8)), ((), (1, 40))]


def test_split_batches_gives_each_merged_batch_its_rows_and_samples():
    rows = torch.arange(12.0)[:, None]  # 4 samples of 3 tokens, from batches of 1, 2 and 1 samples
    parts = split_batches(rows, 4, (1, 2, 1))
    assert [(p.flatten().tolist(), samples) for p, samples in parts] == [
        ([0, 1, 2], 1), ([3, 4, 5, 6, 7, 8], 2), ([9, 10, 11], 1)]
    # a layer that saw the call's input flattened to 2-D counted one sample: one per batch, as unmerged
    assert [samples for _, samples in split_batches(rows, 1, (1, 2, 1))] == [1, 1, 1]
    assert split_batches(rows, 4, ()) == [(rows, 4)]


def test_padding_masks_reach_the_blocks():
    """Without its padding mask, BERT's unpadded positions would attend to padding and change."""
    model, batches = tiny_bert_classifier(), tokens()
    _, blocks = adapter_for(model).blocks(model)
    captured = capture_block_inputs(model, blocks, batches)
    unmasked = BlockInput(captured[0].hidden_states, (None,) * len(captured[0].args), {})
    masked_out, unmasked_out = run_block(blocks[0], captured[0]), run_block(blocks[0], unmasked)
    real_tokens = batches[0]["attention_mask"].bool()
    assert not torch.allclose(masked_out[real_tokens], unmasked_out[real_tokens])


def test_llama_capture_keeps_rotary_embeddings_and_disables_the_cache():
    model = tiny_llama_lm()
    _, blocks = adapter_for(model).blocks(model)
    captured = capture_block_inputs(model, blocks, tokens("lm"))
    kwargs = captured[0].kwargs
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-1] == sin.shape[-1] == adapter_for(model).head_dim(model)
    assert kwargs["past_key_values"] is None
    assert kwargs["use_cache"] is False


@pytest.mark.parametrize("as_batch", [lambda ids: ids, lambda ids: (ids,), lambda ids: {"input_ids": ids}],
                         ids=["tensor", "tuple", "dict"])
def test_replaying_a_decoder_block_is_idempotent_for_every_batch_kind(as_batch):
    """A captured KV cache would make each replay attend to the keys of the previous one."""
    model = tiny_llama_lm()
    _, blocks = adapter_for(model).blocks(model)
    (captured,) = capture_block_inputs(model, blocks, [as_batch(tokens(None)[0]["input_ids"])])
    assert captured.kwargs.get("past_key_values") is None
    first = run_block(blocks[0], captured)
    assert torch.equal(run_block(blocks[0], captured), first)


def test_pruning_a_block_changes_the_next_blocks_inputs():
    """Block 1 must see block 0's outputs with block 0's pruned weights, as the pruned full model does."""
    model, batches = tiny_llama_lm(), tokens()
    down_proj = adapter_for(model).layout.ffn_out
    seen_by_block_1 = []
    for index, block, inputs in sequential_blocks(model, batches):
        if index == 0:
            before = [run_block(block, block_input) for block_input in inputs]
            with torch.no_grad():
                block.get_submodule(down_proj).weight[:, ::2] = 0
        if index == 1:
            seen_by_block_1 = [block_input.hidden_states.clone() for block_input in inputs]
    _, blocks = adapter_for(model).blocks(model)
    expected = reference_block_inputs(model, blocks, batches)[1]
    for got, want, unpruned in zip(seen_by_block_1, expected, before, strict=True):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, unpruned)


def test_earlier_blocks_activations_are_released():
    model = tiny_opt_lm()
    alive = []
    for index, _, inputs in sequential_blocks(model, tokens()):
        gc.collect()
        assert not any(ref() is not None for ref in alive), f"block {index - 1}'s inputs are still held"
        alive = [weakref.ref(block_input.hidden_states) for block_input in inputs]


def test_train_mode_is_restored_and_dropout_is_off_during_the_walk():
    model, batches = tiny_bert_classifier(), tokens()
    expected = last_hidden_state(model, batches[0])
    model.train()
    for index, block, inputs in sequential_blocks(model, batches):
        assert not block.training
        if index == 1:
            torch.testing.assert_close(run_block(block, inputs[0]), expected)
    assert model.training


def test_cnn_batches_may_be_tuples_or_bare_tensors():
    model, batches = tiny_cnn(), image_batches(2, 3)
    blocks = model.features
    from_tuples = capture_block_inputs(model, blocks, batches)
    from_tensors = capture_block_inputs(model, blocks, [images for images, _ in batches])
    for a, b, (images, _) in zip(from_tuples, from_tensors, batches, strict=True):
        assert torch.equal(a.hidden_states, images)
        assert torch.equal(b.hidden_states, images)


def test_unknown_batch_types_are_refused():
    model = tiny_cnn()
    with pytest.raises(TypeError, match="got str"):
        capture_block_inputs(model, model.features, ["not a batch"])


@pytest.mark.parametrize("batches", [[], iter(())], ids=["empty-list", "exhausted-iterator"])
def test_no_batches_is_a_clear_error(batches):
    model = tiny_llama_lm()
    with pytest.raises(ValueError, match="yielded no batches"):
        next(sequential_blocks(model, batches))


def test_blocks_the_model_never_calls_are_an_error():
    model, stranger = tiny_bert_classifier(), tiny_bert_classifier(seed=1)
    _, foreign_blocks = adapter_for(stranger).blocks(stranger)
    with pytest.raises(ValueError, match="without calling blocks"):
        capture_block_inputs(model, foreign_blocks, tokens())


def test_first_output_accepts_tensors_and_tuples():
    hidden = torch.zeros(2, 3)
    assert first_output(hidden) is hidden
    assert first_output((hidden, None)) is hidden


@pytest.mark.parametrize("labels", [None, "classification", "lm"])
def test_token_batches_are_seeded_padded_and_labelled(labels):
    batches = token_batches(2, 4, 10, vocab_size=50, seed=3, labels=labels, num_labels=3)
    again = token_batches(2, 4, 10, vocab_size=50, seed=3, labels=labels, num_labels=3)
    other = token_batches(2, 4, 10, vocab_size=50, seed=4, labels=labels, num_labels=3)
    assert len(batches) == 2
    assert all(torch.equal(a[key], b[key]) for a, b in zip(batches, again) for key in a)
    assert not torch.equal(batches[0]["input_ids"], other[0]["input_ids"])
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (4, 10)
        assert (mask == 0).any(), "some rows must be padded"
        assert (mask.sum(dim=1) == 10).any(), "some rows must be full"
        assert torch.equal(mask, mask.cummin(dim=1).values), "padding sits at the end of a row"
        assert (ids[mask == 0] == PAD_TOKEN_ID).all()
        assert ((ids[mask == 1] > 0) & (ids[mask == 1] < 50)).all()
        if labels is None:
            assert "labels" not in batch
        elif labels == "classification":
            assert batch["labels"].shape == (4,)
            assert ((batch["labels"] >= 0) & (batch["labels"] < 3)).all()
        else:
            assert torch.equal(batch["labels"], ids.masked_fill(mask == 0, -100))


def test_token_batches_reject_unknown_label_kinds():
    with pytest.raises(ValueError, match="'regression'"):
        token_batches(1, 2, 4, labels="regression")


def test_image_batches_have_digit_shapes_and_are_seeded():
    batches = image_batches(2, 6, seed=2, num_classes=4)
    again = image_batches(2, 6, seed=2, num_classes=4)
    assert len(batches) == 2
    for (images, labels), (images_again, labels_again) in zip(batches, again):
        assert images.shape == (6, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (6,) and labels.dtype == torch.int64
        assert ((labels >= 0) & (labels < 4)).all()
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)


def test_activation_spill_keeps_inputs_in_memory_up_to_the_allowance_then_moves_them_all(tmp_path):
    """Three 2 KB inputs and an allowance of 5 KB: two stay in memory, the third moves all three to the file;
    reads give the tensors back, writes replace them in place, close removes the file."""
    tensors = [torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    inputs = [BlockInput(tensor.clone(), (), {}) for tensor in tensors]
    spill = ActivationSpill(tmp_path / "activations.spill", allowance=5 * 1024)
    spill.hold(inputs[0])
    spill.hold(inputs[1])
    assert spill.spilled_bytes == 0 and inputs[0].hidden_states is inputs[0].hidden_states  # the same tensor object
    spill.hold(inputs[2])
    assert spill.spilled_bytes == 3 * tensors[0].numel() * 4
    assert (tmp_path / "activations.spill").stat().st_size == spill.spilled_bytes
    for block_input, tensor in zip(inputs, tensors):
        assert torch.equal(block_input.hidden_states, tensor)
    inputs[1].hidden_states = tensors[1] * 2
    assert torch.equal(inputs[1].hidden_states, tensors[1] * 2) and torch.equal(inputs[2].hidden_states, tensors[2])
    with pytest.raises(ValueError, match=r"cannot be replaced by one of shape \[4, 8\]"):
        inputs[0].hidden_states = tensors[0][:, :, 0]
    spill.close()
    assert not (tmp_path / "activations.spill").exists()
