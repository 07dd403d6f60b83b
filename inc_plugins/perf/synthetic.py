"""Synthetic models and token batches: random weights, random token ids, built from configs, never downloaded.

For exercising measurement code paths in seconds (the latency-table command's ``tiny-bert`` / ``tiny-llama``, the
benchmark suites' tiny scales, the studies' ``--quick`` runs). Their timings and accuracies mean nothing.

Sizes: vocabulary 128, hidden 32, 2 layers of 4 heads (the Llama: 2 key/value groups), FFN 64, 64 positions.
Every builder seeds torch's RNG inside ``torch.random.fork_rng``, so one seed gives identical weights and the
caller's RNG state is left alone; models come back in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 64
PAD_TOKEN_ID = 0
IGNORE_INDEX = -100  # label positions that transformers' cross-entropy skips

M = TypeVar("M", bound=nn.Module)


def synthetic_bert_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
                      num_attention_heads=NUM_HEADS, intermediate_size=INTERMEDIATE_SIZE,
                      max_position_embeddings=MAX_POSITIONS, num_labels=num_labels, attn_implementation="eager")


def synthetic_llama_config() -> LlamaConfig:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
                       num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
                       intermediate_size=INTERMEDIATE_SIZE, max_position_embeddings=MAX_POSITIONS,
                       attn_implementation="eager")


def seeded_model(seed: int, build: Callable[[], M]) -> M:
    """``build()`` under torch's RNG seeded with ``seed`` (the caller's RNG state left alone), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def synthetic_bert_classifier(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    return seeded_model(seed, lambda: BertForSequenceClassification(synthetic_bert_config(num_labels)))


def synthetic_llama_lm(seed: int = 0) -> LlamaForCausalLM:
    return seeded_model(seed, lambda: LlamaForCausalLM(synthetic_llama_config()))


def synthetic_token_batches(n_batches: int, batch_size: int, seq_len: int, labels: str | None = None,
                            seed: int = 0, vocab_size: int = VOCAB_SIZE,
                            num_labels: int = 2) -> list[dict[str, torch.Tensor]]:
    """Batches of random token ids (1..vocab_size-1): ``input_ids`` and ``attention_mask`` [batch, seq_len], odd
    rows ending in padding (mask 0, id ``PAD_TOKEN_ID``). ``labels``: None, "classification" ([batch] classes) or
    "lm" ([batch, seq_len], the ids with padding set to -100)."""
    if labels not in (None, "classification", "lm"):
        raise ValueError(f"labels must be None, 'classification' or 'lm', got {labels!r}")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.full((batch_size,), seq_len)
        odd_rows = torch.arange(1, batch_size, 2)
        if seq_len > 1 and len(odd_rows):
            lengths[odd_rows] = torch.randint(max(1, seq_len - seq_len // 2), seq_len, (len(odd_rows),),
                                              generator=generator)
        attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
        input_ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator)
        input_ids = input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels == "classification":
            batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=generator)
        elif labels == "lm":
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batches.append(batch)
    return batches


def synthetic_token_windows(n_windows: int, seq_len: int, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """[n_windows, seq_len] random token ids (1..vocab_size-1), the shape ``recipes.text_corpora.token_windows``
    gives for real text."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (n_windows, seq_len), generator=generator)
