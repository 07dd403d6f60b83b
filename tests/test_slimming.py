"""Physical slimming: the slimmed model computes what the masked dense model computes, with fewer parameters,
and survives save/load."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from inc_plugins.models.architectures import UnsupportedModelError, adapter_for
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.structure_masks import apply_structure_masks
from inc_plugins.models.surgery_transformers import PrunedAttention, slim_model
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import (tiny_bert_classifier, tiny_distilbert_classifier, tiny_gpt2_lm,
                                       tiny_llama_lm, tiny_mpnet_classifier)


ENCODERS = {
    "bert": tiny_bert_classifier,
    "distilbert": tiny_distilbert_classifier,
    "mpnet": tiny_mpnet_classifier,
}


def _sizes(model):
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    n_neurons = blocks[0].get_submodule(adapter.layout.ffn_out).in_features
    return adapter, len(blocks), adapter.num_heads(model), adapter.num_kv_heads(model), n_neurons


def _apply_masks_with_hooks(model, head_mask, neuron_mask):
    """The masked reference: scale each head's slice of the attention output projection's input and each FFN
    neuron (input of the FFN output projection), exactly as the mask convention defines."""
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    head_dim = adapter.head_dim(model)
    handles = []
    for layer, block in enumerate(blocks):
        head_scale = head_mask[layer].repeat_interleave(head_dim)
        neuron_scale = neuron_mask[layer]

        def scale_heads(module, args, scale=head_scale):
            return (args[0] * scale.to(args[0].dtype),) + args[1:]

        def scale_neurons(module, args, scale=neuron_scale):
            return (args[0] * scale.to(args[0].dtype),) + args[1:]

        handles.append(block.get_submodule(adapter.layout.attention_output).register_forward_pre_hook(scale_heads))
        handles.append(block.get_submodule(adapter.layout.ffn_out).register_forward_pre_hook(scale_neurons))
    return handles


def _encoder_masks(n_layers, n_heads, n_neurons, seed=0):
    """Scales in [0.5, 1.5) (never 1), some units pruned; layer 1 has every head pruned, layer 0 every neuron."""
    generator = torch.Generator().manual_seed(seed)
    head_mask = torch.rand(n_layers, n_heads, generator=generator) + 0.5
    neuron_mask = torch.rand(n_layers, n_neurons, generator=generator) + 0.5
    head_mask[0, 1] = 0.0
    head_mask[1] = 0.0
    neuron_mask[0] = 0.0
    neuron_mask[1, ::3] = 0.0
    return head_mask, neuron_mask


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_slimmed_encoder_equals_masked_model(family):
    model = ENCODERS[family]()
    adapter, n_layers, n_heads, _, n_neurons = _sizes(model)
    head_mask, neuron_mask = _encoder_masks(n_layers, n_heads, n_neurons)
    batch = token_batches(1, batch_size=4, seq_len=9, seed=3)[0]

    dense = _logits(model, batch)
    handles = _apply_masks_with_hooks(model, head_mask, neuron_mask)
    masked = _logits(model, batch)
    for handle in handles:
        handle.remove()
    assert not torch.allclose(masked, dense, atol=1e-4)  # the masks matter

    slim_model(model, head_mask, neuron_mask)
    torch.testing.assert_close(_logits(model, batch), masked, atol=1e-5, rtol=1e-5)

    _, blocks = adapter.blocks(model)
    attention_name = adapter.layout.query.rpartition(".")[0]
    assert isinstance(blocks[1].get_submodule(attention_name), PrunedAttention)
    assert blocks[0].get_submodule(adapter.layout.ffn_out).in_features == 0
    assert model.config.inc_slimmed["heads"] == [[0, 2, 3], []]
    assert model.config.inc_slimmed["intermediate_size"] == [0, n_neurons - len(range(0, n_neurons, 3))]


def test_bert_parameter_count_drops_by_removed_rows_and_columns():
    model = tiny_bert_classifier()
    _, n_layers, n_heads, _, n_neurons = _sizes(model)
    hidden, head_dim = model.config.hidden_size, model.config.hidden_size // n_heads
    head_mask, neuron_mask = _encoder_masks(n_layers, n_heads, n_neurons)
    removed_heads = int((head_mask == 0).sum())
    removed_neurons = int((neuron_mask == 0).sum())
    before = _param_count(model)

    slim_model(model, head_mask, neuron_mask)

    # per head: query/key/value rows with their biases, plus the output projection's columns
    per_head = 3 * head_dim * (hidden + 1) + head_dim * hidden
    # per neuron: an intermediate row with its bias, plus an output column
    per_neuron = (hidden + 1) + hidden
    assert before - _param_count(model) == removed_heads * per_head + removed_neurons * per_neuron


def _llama_masks(model, seed=0):
    """Group masks: layer 0 keeps kv group 0 (query heads 0, 1 with different scales), layer 1 keeps no head."""
    _, n_layers, n_heads, n_kv, n_neurons = _sizes(model)
    group_size = n_heads // n_kv
    generator = torch.Generator().manual_seed(seed)
    groups = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    head_mask = (torch.rand(n_layers, n_heads, generator=generator) + 0.5) * groups.repeat_interleave(group_size, 1)
    neuron_mask = torch.rand(n_layers, n_neurons, generator=generator) + 0.5
    neuron_mask[0, 1::2] = 0.0
    neuron_mask[1, :5] = 0.0
    return head_mask, neuron_mask


def test_slimmed_llama_equals_masked_model_with_padding():
    model = tiny_llama_lm()
    adapter, n_layers, n_heads, n_kv, n_neurons = _sizes(model)
    head_mask, neuron_mask = _llama_masks(model)
    batch = token_batches(1, batch_size=4, seq_len=10, seed=5)[0]
    assert (batch["attention_mask"] == 0).any()

    handles = _apply_masks_with_hooks(model, head_mask, neuron_mask)
    masked = _logits(model, batch)
    for handle in handles:
        handle.remove()
    before = _param_count(model)

    slim_model(model, head_mask, neuron_mask)
    keep = batch["attention_mask"].bool()  # padded positions' logits are not meaningful
    torch.testing.assert_close(_logits(model, batch)[keep], masked[keep], atol=1e-5, rtol=1e-5)

    hidden, head_dim, group_size = model.config.hidden_size, adapter.head_dim(model), n_heads // n_kv
    removed_groups = int((head_mask == 0).sum()) // group_size
    removed_neurons = int((neuron_mask == 0).sum())
    # per group: k/v rows, its query heads' q rows and o_proj columns (no biases); per neuron: gate+up rows, down column
    per_group = 2 * head_dim * hidden + 2 * group_size * head_dim * hidden
    assert before - _param_count(model) == removed_groups * per_group + removed_neurons * 3 * hidden

    _, blocks = adapter.blocks(model)
    assert blocks[0].self_attn.k_proj.out_features == head_dim
    assert blocks[0].self_attn.num_key_value_groups == group_size
    assert isinstance(blocks[1].self_attn, PrunedAttention)


def test_slimmed_llama_generates_what_the_masked_model_generates_with_the_kv_cache():
    model = tiny_llama_lm()
    head_mask, neuron_mask = _llama_masks(model)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    with apply_structure_masks(model, head_mask, neuron_mask):
        masked = model.generate(prompts, **settings)
    dense = model.generate(prompts, **settings)
    slim_model(model, head_mask, neuron_mask)
    slimmed = model.generate(prompts, **settings)
    assert slimmed.shape == (2, 12)
    assert torch.equal(slimmed, masked)  # greedy, token for token, decoding from the cache of the slimmed layers
    assert not torch.equal(masked, dense)  # the masks change what is generated: the comparison can fail


def test_mask_shape_and_values_are_validated():
    model = tiny_bert_classifier()
    _, n_layers, n_heads, _, n_neurons = _sizes(model)
    ones_h, ones_n = torch.ones(n_layers, n_heads), torch.ones(n_layers, n_neurons)
    with pytest.raises(ValueError, match=r"head_mask must have shape \[n_layers, n_heads\] = \[2, 4\]"):
        slim_model(model, torch.ones(n_layers, n_heads + 1), ones_n)
    with pytest.raises(ValueError, match="neuron_mask must have shape"):
        slim_model(model, ones_h, torch.ones(n_neurons))
    with pytest.raises(ValueError, match="non-finite"):
        slim_model(model, ones_h.clone().fill_(float("nan")), ones_n)
    # nothing was changed by the failed calls
    assert model.bert.encoder.layer[0].attention.self.query.out_features == model.config.hidden_size


def test_gqa_mask_that_splits_a_group_is_rejected():
    model = tiny_llama_lm()
    head_mask = torch.ones(2, 4)
    head_mask[1, 2] = 0.0  # query head 2 shares kv head 1 with query head 3
    with pytest.raises(ValueError, match=r"layer 1: key/value group 1 \(query heads \[2, 3\]\) is only partly pruned"):
        slim_model(model, head_mask, torch.ones(2, 64))


def test_unsupported_family_and_double_slimming_are_rejected():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        slim_model(tiny_gpt2_lm(), torch.ones(2, 4), torch.ones(2, 64))
    model = tiny_bert_classifier()
    slim_model(model, torch.ones(2, 4), torch.ones(2, 64))
    with pytest.raises(ValueError, match="already slimmed"):
        slim_model(model, torch.ones(2, 4), torch.ones(2, 64))


@pytest.mark.parametrize(
    "build, masks, auto_class",
    [
        (tiny_bert_classifier, lambda m: _encoder_masks(*_sizes(m)[1:3], _sizes(m)[4]), AutoModelForSequenceClassification),
        (tiny_mpnet_classifier, lambda m: _encoder_masks(*_sizes(m)[1:3], _sizes(m)[4]), AutoModelForSequenceClassification),
        (tiny_llama_lm, _llama_masks, AutoModelForCausalLM),
    ],
    ids=["bert", "mpnet", "llama"],
)
def test_save_load_round_trip_with_plain_from_pretrained(tmp_path, build, masks, auto_class):
    model = build()
    slim_model(model, *masks(model))
    batch = token_batches(1, batch_size=3, seq_len=8, seed=7)[0]
    expected = _logits(model, batch)
    directory = save_slimmed(model, tmp_path / "slim")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim"]  # no staging directory left behind
    assert json.loads((directory / "config.json").read_text())["inc_slimmed"] == model.config.inc_slimmed

    loaded = load_slimmed(directory, attn_implementation=model.config._attn_implementation)
    assert not loaded.training
    assert loaded.config.inc_slimmed == model.config.inc_slimmed
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(_logits(loaded, batch), expected)

    # saving again over an existing directory replaces it atomically
    save_slimmed(loaded, directory)
    reloaded = load_slimmed(directory, model_class=auto_class)  # default attention implementation (sdpa)
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)

    # after `import inc_plugins` the plain loader knows the slimmed model type (models.slimmed_auto)
    assert json.loads((directory / "config.json").read_text())["model_type"].startswith("inc_slimmed_")
    plain = auto_class.from_pretrained(directory, attn_implementation=model.config._attn_implementation).eval()
    assert type(plain).__name__ == f"IncSlimmed{type(model).__name__}"
    assert torch.equal(_logits(plain, batch), expected)


def test_without_the_package_transformers_refuses_a_slimmed_model_by_its_type(tmp_path):
    model = tiny_llama_lm()
    slim_model(model, *_llama_masks(model))
    directory = save_slimmed(model, tmp_path / "slim")
    script = "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True)
    assert done.returncode != 0 and "inc_slimmed_llama" in done.stderr, done.stderr[-2000:]


def test_a_directory_saved_before_the_slimmed_model_type_still_loads(tmp_path):
    """Directories saved by earlier versions name the dense family's type: load_slimmed reads them too."""
    model = tiny_llama_lm()
    slim_model(model, *_llama_masks(model))
    directory = save_slimmed(model, tmp_path / "slim")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    batch = token_batches(1, batch_size=2, seq_len=8, seed=5)[0]
    loaded = load_slimmed(directory, attn_implementation=model.config._attn_implementation)
    assert torch.equal(_logits(loaded, batch), _logits(model.eval(), batch))


def test_save_and_load_reject_dense_models(tmp_path):
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="not slimmed"):
        save_slimmed(model, tmp_path / "dense")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a slimmed model"):
        load_slimmed(tmp_path / "dense")


def test_a_model_loaded_with_from_pretrained_round_trips(tmp_path):
    """transformers 5.5 saves from_pretrained-loaded BERTs with legacy LayerNorm names unless told not to."""
    tiny_bert_classifier().save_pretrained(tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    slim_model(model, *_encoder_masks(*_sizes(model)[1:3], _sizes(model)[4]))
    batch = token_batches(1, batch_size=2, seq_len=8, seed=3)[0]
    loaded = load_slimmed(save_slimmed(model, tmp_path / "slim"))
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)
