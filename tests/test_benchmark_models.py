"""The benchmark's pruned model variants: what each pruning leaves, and the on-disk cache keyed by content."""

import dataclasses

import pytest
import torch
from torch import nn

from benchmarks.suites import pruned_models
from benchmarks.suites.pruned_models import dense_task, pruned_variant


def _encoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in f".{name}"]


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("model.layers.")]


@pytest.fixture
def cached_task(tmp_path, monkeypatch, one_thread):
    """The tiny task with caching on, in a private cache directory."""
    monkeypatch.setenv("INC_PLUGINS_CACHE", str(tmp_path))
    return dataclasses.replace(dense_task("tiny"), cache_pruned=True)


def test_wanda_variants_zero_half_the_encoder_weights_in_their_patterns(one_thread):
    task = dense_task("tiny")
    unstructured, info = pruned_variant(task, "wanda50")
    assert info["block_linear_zero_fraction"] == 0.5
    two_four, _ = pruned_variant(task, "wanda2:4")
    for linear in _encoder_linears(two_four):
        groups = linear.weight.reshape(linear.out_features, -1, 4)
        assert ((groups == 0).sum(dim=-1) >= 2).all()
    # dense shapes: unstructured sparsity does not change what a dense kernel computes on
    assert [m.weight.shape for m in _encoder_linears(unstructured)] == [m.weight.shape for m in _encoder_linears(task.model)]


def test_decoder_variants_prune_the_llama_blocks_and_slim_by_key_value_group(one_thread):
    task = dense_task("tiny-llama")
    assert task.model.config.use_cache is False  # timed as one full forward pass: no KV cache built
    unstructured, info = pruned_variant(task, "wanda50")
    assert info["block_linear_zero_fraction"] == 0.5
    assert all(m.weight.ne(0).all() for m in _decoder_linears(task.model))  # the dense model is left alone
    two_four, _ = pruned_variant(task, "wanda2:4")
    for linear in _decoder_linears(two_four):
        assert ((linear.weight.reshape(linear.out_features, -1, 4) == 0).sum(dim=-1) >= 2).all()
    slim, info = pruned_variant(task, "slim40")
    assert info["parameters"] < sum(p.numel() for p in task.model.parameters())
    config = task.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in slim.model.layers:  # whole key/value groups go: a group's query heads go with it
        kv_rows, q_rows = layer.self_attn.k_proj.out_features, layer.self_attn.q_proj.out_features
        assert kv_rows % head_dim == 0
        assert q_rows == kv_rows * config.num_attention_heads // config.num_key_value_heads
    inputs = task.calibration[0]
    with torch.no_grad():
        logits = slim(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert logits.shape == (*inputs["input_ids"].shape, config.vocab_size)


def test_slimmed_variant_is_smaller_and_cached_by_content(cached_task):
    slim, info = pruned_variant(cached_task, "slim40")
    cache = pruned_models.cache_dir()
    assert [p.name for p in cache.iterdir()] == [info["cache"].rsplit("/", 1)[1]]
    assert info["parameters"] < sum(p.numel() for p in cached_task.model.parameters())

    again, again_info = pruned_variant(cached_task, "slim40")  # loaded from the cache this time
    assert again_info["cache"] == info["cache"]
    inputs = cached_task.calibration[0]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                                   slim(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits)

    changed = dataclasses.replace(cached_task, model=dense_task("tiny").model)
    with torch.no_grad():
        changed.model.classifier.weight.add_(1.0)
    _, changed_info = pruned_variant(changed, "slim40")
    assert changed_info["cache"] != info["cache"]


def test_unknown_variant_or_scale_names_the_choices():
    with pytest.raises(ValueError, match="unknown variant 'wanda60'.*dense, slim40, wanda50, wanda2:4"):
        pruned_variant(dense_task("tiny"), "wanda60")
    with pytest.raises(ValueError, match="unknown model scale 'huge'.*tiny, tiny-llama, minilm, smollm2"):
        dense_task("huge")


def test_sparse_gpt_needs_and_gets_calibration_batches_of_one_length(one_thread):
    from benchmarks.suites.pruned_models import padded_to, prune
    from benchmarks.suites.test_pruning_cost import pruner_config
    from tests.fixtures.calibration_data import token_batches
    from tests.fixtures.tiny_models import tiny_bert_classifier

    mixed = token_batches(1, 4, 20, labels="classification", seed=0) + token_batches(1, 4, 24, labels="classification", seed=1)
    with pytest.raises(RuntimeError, match="size of tensor"):  # INC 3.7.1 replays one batch's mask on the others
        prune(tiny_bert_classifier(), pruner_config("sparse_gpt", "bert.encoder.layer"), mixed)
    padded = [padded_to(batch, 24, pad_token_id=0) for batch in mixed]
    assert padded[0]["attention_mask"][:, 20:].eq(0).all() and padded[0]["labels"] is mixed[0]["labels"]
    model, _ = prune(tiny_bert_classifier(), pruner_config("sparse_gpt", "bert.encoder.layer"), padded)
    assert sum(int((m.weight == 0).sum()) for m in _encoder_linears(model)) > 0
    with pytest.raises(ValueError, match="more than the length 16"):
        padded_to(mixed[1], 16, pad_token_id=0)
