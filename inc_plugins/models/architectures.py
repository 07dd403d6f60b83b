"""Where the blocks, attention projections, FFN layers and task heads live in each supported model family.

Blocks are found by their known module path, never by taking "the first ModuleList": which ModuleList
comes first in `named_modules()` is an accident of construction order (embeddings, heads and wrappers
may hold their own).
Module names below were read from transformers 5.5.4.
"""

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model belongs to no family this package knows how to take apart."""


@dataclass(frozen=True)
class BlockLayout:
    """Names of a transformer block's projections, relative to the block.

    `query`, `key` and `value` are one name when the projection is fused (GPT-2's `c_attn`, which outputs
    [query | key | value] along its output features). `ffn_in` holds every layer that reads the block's
    hidden states into the FFN (Llama: gate_proj and up_proj); `ffn_out` maps FFN neurons back to hidden.
    `ffn_output_norm`: in post-norm blocks, the LayerNorm that ends the block, applied to the FFN's input plus
    `ffn_out`'s output (None for families that are always pre-norm).
    """

    query: str
    key: str
    value: str
    attention_output: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    ffn_output_norm: str | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.query == self.key == self.value


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to take apart one model family.

    `blocks_path` is relative to the transformers base model (`model.bert`, `model.model`, ...) or, for
    models without one, to the model itself. `head_candidates` are task-head module names (relative to the
    model) that are excluded from pruning by default when present. `layout` is None for CNNs.
    `weights_transposed` marks transformers' `Conv1D` (GPT-2), whose weight is [in_features, out_features].
    """

    family: str
    blocks_path: str
    head_candidates: tuple[str, ...]
    layout: BlockLayout | None = None
    weights_transposed: bool = False

    def blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential]:
        """(full module name, container) of the model's blocks, in execution order."""
        name = _base_model_prefix(model) + self.blocks_path
        try:
            container = model.get_submodule(name)
        except AttributeError as error:
            raise UnsupportedModelError(
                f"{type(model).__name__} was dispatched to the {self.family} family but has no module {name!r}"
            ) from error
        return name, container

    def head_names(self, model: nn.Module) -> list[str]:
        """Names of the task-head modules present in `model` (e.g. ["classifier"], ["lm_head"])."""
        present = {name for name, _ in model.named_modules()}
        return [name for name in self.head_candidates if name in present]

    def num_heads(self, model: nn.Module) -> int:
        """Query heads per attention layer."""
        return self._transformer_config(model).num_attention_heads

    def num_kv_heads(self, model: nn.Module) -> int:
        """Key/value heads per attention layer: fewer than `num_heads` under grouped-query attention."""
        config = self._transformer_config(model)
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, model: nn.Module) -> int:
        """Features per attention head."""
        config = self._transformer_config(model)
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def _transformer_config(self, model: nn.Module):
        if self.layout is None:
            raise ValueError(f"{self.family} models have no attention heads")
        return model.config


def _base_model_prefix(model: nn.Module) -> str:
    """The base model's name plus a dot ("bert." in BertForSequenceClassification), or "" when the model
    is itself the base model (a bare BertModel) or a plain torch module."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


_BERT_LAYOUT = BlockLayout(
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    ffn_output_norm="output.LayerNorm",
)
_DISTILBERT_LAYOUT = BlockLayout(
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attention_output="attention.out_lin",
    ffn_in=("ffn.lin1",),
    ffn_out="ffn.lin2",
    ffn_output_norm="output_layer_norm",
)
_MPNET_LAYOUT = BlockLayout(
    query="attention.attn.q",
    key="attention.attn.k",
    value="attention.attn.v",
    attention_output="attention.attn.o",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    ffn_output_norm="output.LayerNorm",
)
_LLAMA_LAYOUT = BlockLayout(
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attention_output="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
)
_OPT_LAYOUT = BlockLayout(
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attention_output="self_attn.out_proj",
    ffn_in=("fc1",),
    ffn_out="fc2",
    ffn_output_norm="final_layer_norm",  # OPT-350m's post-norm blocks (do_layer_norm_before=False)
)
_GPT2_LAYOUT = BlockLayout(
    query="attn.c_attn",
    key="attn.c_attn",
    value="attn.c_attn",
    attention_output="attn.c_proj",
    ffn_in=("mlp.c_fc",),
    ffn_out="mlp.c_proj",
)

# Heads of the task classes (…ForSequenceClassification, …ForMaskedLM, …ForQuestionAnswering, ...).
_ENCODER_HEADS = ("pre_classifier", "classifier", "qa_outputs", "cls", "lm_head", "vocab_transform", "vocab_projector")
_DECODER_HEADS = ("lm_head", "score", "qa_outputs")

_BERT = ArchitectureAdapter("bert-like", "encoder.layer", _ENCODER_HEADS, _BERT_LAYOUT)
_LLAMA = ArchitectureAdapter("llama-like", "layers", _DECODER_HEADS, _LLAMA_LAYOUT)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": ArchitectureAdapter("bert-like", "transformer.layer", _ENCODER_HEADS, _DISTILBERT_LAYOUT),
    "mpnet": ArchitectureAdapter("bert-like", "encoder.layer", _ENCODER_HEADS, _MPNET_LAYOUT),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": ArchitectureAdapter("opt", "decoder.layers", _DECODER_HEADS, _OPT_LAYOUT),
    "gpt2": ArchitectureAdapter("gpt2", "h", _DECODER_HEADS, _GPT2_LAYOUT, weights_transposed=True),
}
"""Adapters by `model.config.model_type`."""

CNN_ADAPTER = ArchitectureAdapter("cnn", "features", ("classifier",))
"""For plain torch CNNs (no `config`) whose convolution blocks sit in an `nn.Sequential`/`nn.ModuleList`
named `features`, torchvision-style."""


def supported_families() -> str:
    """Human-readable list of families and their model types, for error messages."""
    families: dict[str, list[str]] = {}
    for model_type, adapter in ADAPTERS.items():
        families.setdefault(adapter.family, []).append(model_type)
    listed = [f"{family} ({', '.join(model_types)})" for family, model_types in families.items()]
    listed.append("cnn (a torch module without `config` whose conv blocks are in `features`)")
    return "; ".join(listed)


def _is_cnn(model: nn.Module) -> bool:
    features = getattr(model, "features", None)
    return (
        getattr(model, "config", None) is None
        and isinstance(features, (nn.Sequential, nn.ModuleList))
        and any(isinstance(module, nn.Conv2d) for module in features.modules())
    )


SLIMMED_PREFIX = "inc_slimmed_"
"""A slimmed model's type is its family's with this prefix (``slimmed_auto``); its layers are laid out the same."""


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`, by `model.config.model_type` (a slimmed model's: its family's), or the CNN adapter for
    a config-less CNN.

    Raises UnsupportedModelError naming the model type and the supported families.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family_type = model_type.removeprefix(SLIMMED_PREFIX) if isinstance(model_type, str) else model_type
    if family_type in ADAPTERS:
        return ADAPTERS[family_type]
    if _is_cnn(model):
        return CNN_ADAPTER
    described = f"model type {model_type!r}" if model_type else "a model without config.model_type"
    raise UnsupportedModelError(
        f"{type(model).__name__} ({described}) is not supported; supported families: {supported_families()}"
    )
