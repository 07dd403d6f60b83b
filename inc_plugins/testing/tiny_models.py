"""Synthetic, seeded tiny models for tests: built from configs, never downloaded, with random weights.

Every builder seeds torch's RNG inside `torch.random.fork_rng`, so two calls with one seed give identical
weights and the caller's global RNG state is left untouched. Models are returned in eval mode.
"""

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 64

M = TypeVar("M", bound=nn.Module)


def _seeded(seed: int, build: Callable[[], M]) -> M:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_bert_classifier(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """Synthetic BERT sequence classifier: vocab 128, hidden 32, 2 layers x 4 heads, FFN 64, 64 positions."""
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: BertForSequenceClassification(config))


def tiny_llama_lm(seed: int = 0) -> LlamaForCausalLM:
    """Synthetic Llama causal LM: vocab 128, hidden 32, 2 layers, 4 query heads sharing 2 key/value heads (GQA),
    FFN 64 (gate/up/down), rotary position embeddings."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_opt_lm(seed: int = 0) -> OPTForCausalLM:
    """Synthetic OPT causal LM: vocab 128, hidden 32, 2 layers x 4 heads, FFN 64, 64 learned positions."""
    config = OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        word_embed_proj_dim=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        ffn_dim=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: OPTForCausalLM(config))


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    """Synthetic GPT-2 LM: vocab 128, hidden 32, 2 layers x 4 heads, FFN 64, 64 positions.

    GPT-2's projections are transformers' `Conv1D`, whose weight is [in_features, out_features]
    (the transpose of `nn.Linear`), and its query/key/value share one fused `c_attn`.
    """
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        n_inner=INTERMEDIATE_SIZE,
        n_positions=MAX_POSITIONS,
        # the defaults (50256) lie outside this vocabulary
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class TinyCNN(nn.Module):
    """Synthetic CNN for [batch, 1, 8, 8] images (the shape of sklearn's digits).

    `features` holds three Conv2d+BatchNorm2d+ReLU blocks (8, 16, 32 channels; 8x8 -> 8x8 -> 4x4 -> 2x2),
    followed by global average pooling and a Linear `classifier` to [batch, num_classes] logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_conv_block(1, 8, 1), _conv_block(8, 16, 2), _conv_block(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(images)).flatten(1))


def _randomize_batchnorm(model: nn.Module) -> None:
    """Fresh BatchNorm layers are the identity (scale 1, shift 0, mean 0, var 1); random values let
    BN-scale criteria and BN folding see channels that differ."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.1)
            nn.init.normal_(module.running_mean, std=0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)


def tiny_cnn(seed: int = 0, num_classes: int = 10) -> TinyCNN:
    """Synthetic `TinyCNN` with random convolution, BatchNorm and classifier parameters, in eval mode."""

    def build() -> TinyCNN:
        model = TinyCNN(num_classes)
        with torch.no_grad():
            _randomize_batchnorm(model)
        return model

    return _seeded(seed, build)
