"""Architecture adapters and the synthetic tiny-model fixtures they are tested on."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from inc_plugins.models.architectures import UnsupportedModelError, adapter_for
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_cnn, tiny_gpt2_lm, tiny_llama_lm, tiny_opt_lm

BUILDERS = [tiny_bert_classifier, tiny_llama_lm, tiny_opt_lm, tiny_gpt2_lm, tiny_cnn]

_SIZES = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def _encoder(config_class, **overrides) -> nn.Module:
    config = config_class(**{**_SIZES, "max_position_embeddings": 66, **overrides})
    return transformers.AutoModelForSequenceClassification.from_config(config)


def _decoder(config_class) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_config(config_class(**_SIZES, num_key_value_heads=2))


# Three-layer models built here, so block counts differ from the two-layer fixtures.
EXTRA_MODELS = {
    "roberta": lambda: _encoder(transformers.RobertaConfig),
    "xlm-roberta": lambda: _encoder(transformers.XLMRobertaConfig),
    "distilbert": lambda: _encoder(transformers.DistilBertConfig, dim=32, n_layers=3, n_heads=4, hidden_dim=64),
    "mpnet": lambda: _encoder(transformers.MPNetConfig),
    "mistral": lambda: _decoder(transformers.MistralConfig),
    "qwen2": lambda: _decoder(transformers.Qwen2Config),
}

# name: (build, family, blocks name, number of blocks, head names)
CASES = {
    "bert": (tiny_bert_classifier, "bert-like", "bert.encoder.layer", 2, ["classifier"]),
    "llama": (tiny_llama_lm, "llama-like", "model.layers", 2, ["lm_head"]),
    "opt": (tiny_opt_lm, "opt", "model.decoder.layers", 2, ["lm_head"]),
    "gpt2": (tiny_gpt2_lm, "gpt2", "transformer.h", 2, ["lm_head"]),
    "cnn": (tiny_cnn, "cnn", "features", 3, ["classifier"]),
    "roberta": (EXTRA_MODELS["roberta"], "bert-like", "roberta.encoder.layer", 3, ["classifier"]),
    "xlm-roberta": (EXTRA_MODELS["xlm-roberta"], "bert-like", "roberta.encoder.layer", 3, ["classifier"]),
    "distilbert": (
        EXTRA_MODELS["distilbert"], "bert-like", "distilbert.transformer.layer", 3, ["pre_classifier", "classifier"]
    ),
    "mpnet": (EXTRA_MODELS["mpnet"], "bert-like", "mpnet.encoder.layer", 3, ["classifier"]),
    "mistral": (EXTRA_MODELS["mistral"], "llama-like", "model.layers", 3, ["lm_head"]),
    "qwen2": (EXTRA_MODELS["qwen2"], "llama-like", "model.layers", 3, ["lm_head"]),
}

TRANSFORMER_CASES = [name for name in CASES if name != "cnn"]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda build: build.__name__)
def test_fixtures_are_deterministic_per_seed(build):
    first, again, other = build(seed=0).state_dict(), build(seed=0).state_dict(), build(seed=1).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_fixtures_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama_lm(seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda build: build.__name__)
def test_fixtures_are_in_eval_mode(build):
    assert not any(module.training for module in build().modules())


def test_tiny_cnn_maps_digit_sized_images_to_logits():
    assert tiny_cnn(num_classes=7)(torch.rand(5, 1, 8, 8)).shape == (5, 7)


@pytest.mark.parametrize("name", CASES)
def test_adapter_finds_the_blocks_and_heads(name):
    build, family, blocks_name, n_blocks, heads = CASES[name]
    model = build()
    adapter = adapter_for(model)
    found_name, blocks = adapter.blocks(model)
    assert adapter.family == family
    assert found_name == blocks_name
    assert blocks is model.get_submodule(blocks_name)
    assert len(blocks) == n_blocks
    assert adapter.head_names(model) == heads


def test_adapter_on_a_bare_base_model_has_no_prefix_and_no_heads():
    model = tiny_bert_classifier().bert
    adapter = adapter_for(model)
    assert adapter.blocks(model)[0] == "encoder.layer"
    assert adapter.head_names(model) == []


def _out_in_features(module: nn.Module, transposed: bool) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, or of a Conv1D whose weight is [in, out]."""
    out_features, in_features = module.weight.shape
    return (in_features, out_features) if transposed else (out_features, in_features)


@pytest.mark.parametrize("name", TRANSFORMER_CASES)
def test_block_layout_names_projections_of_the_right_shapes(name):
    model = CASES[name][0]()
    adapter = adapter_for(model)
    layout = adapter.layout
    hidden = model.config.hidden_size
    heads, kv_heads, head_dim = adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)
    assert heads * head_dim == hidden
    projection_type = Conv1D if adapter.weights_transposed else nn.Linear

    def shape(block: nn.Module, relative_name: str) -> tuple[int, int]:
        module = block.get_submodule(relative_name)
        assert isinstance(module, projection_type), relative_name
        return _out_in_features(module, adapter.weights_transposed)

    for block in adapter.blocks(model)[1]:
        if layout.fused_qkv:
            assert shape(block, layout.query) == ((heads + 2 * kv_heads) * head_dim, hidden)
        else:
            assert shape(block, layout.query) == (heads * head_dim, hidden)
            assert shape(block, layout.key) == (kv_heads * head_dim, hidden)
            assert shape(block, layout.value) == (kv_heads * head_dim, hidden)
        assert shape(block, layout.attention_output) == (hidden, heads * head_dim)
        for ffn_in in layout.ffn_in:
            assert shape(block, ffn_in) == (64, hidden)
        assert shape(block, layout.ffn_out) == (hidden, 64)


def test_llama_fixture_uses_grouped_query_attention():
    model = tiny_llama_lm()
    adapter = adapter_for(model)
    assert (adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)) == (4, 2, 8)
    assert adapter.layout.ffn_in == ("mlp.gate_proj", "mlp.up_proj")


def test_cnn_adapter_has_no_attention_heads():
    model = tiny_cnn()
    adapter = adapter_for(model)
    assert adapter.layout is None
    with pytest.raises(ValueError, match="no attention heads"):
        adapter.num_heads(model)


@pytest.mark.parametrize(
    "model, named",
    [
        (SimpleNamespace(config=SimpleNamespace(model_type="t5")), "'t5'"),
        (nn.Sequential(nn.Linear(4, 4)), "Sequential"),
        (type("NoConv", (nn.Module,), {})(), "NoConv"),
    ],
    ids=["unknown-model-type", "no-config", "no-features"],
)
def test_unsupported_models_raise_naming_the_model_and_the_families(model, named):
    with pytest.raises(UnsupportedModelError) as raised:
        adapter_for(model)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert named in message
    for family in ("bert-like", "llama-like", "opt", "gpt2", "cnn", "distilbert", "mpnet", "qwen2"):
        assert family in message


def test_a_features_attribute_without_convolutions_is_not_a_cnn():
    model = nn.Module()
    model.features = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UnsupportedModelError):
        adapter_for(model)
