"""Synthetic, seeded calibration batches: random token ids and random images, no real data.

Each function draws from its own `torch.Generator`, so results depend only on the arguments.
"""

import torch
from torch import Tensor

PAD_TOKEN_ID = 0
IGNORE_INDEX = -100  # positions that cross-entropy losses in transformers skip


def _right_padded_mask(batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """[batch, seq_len] 0/1 mask: odd rows end in padding (1..seq_len//2 pad positions), even rows are full."""
    lengths = torch.full((batch_size,), seq_len)
    odd_rows = torch.arange(1, batch_size, 2)
    if seq_len > 1 and len(odd_rows):
        shortest = max(1, seq_len - seq_len // 2)
        lengths[odd_rows] = torch.randint(shortest, seq_len, (len(odd_rows),), generator=generator)
    return (torch.arange(seq_len) < lengths[:, None]).long()


def token_batches(
    n_batches: int,
    batch_size: int,
    seq_len: int,
    vocab_size: int = 128,
    seed: int = 0,
    labels: str | None = None,
    num_labels: int = 2,
) -> list[dict[str, Tensor]]:
    """Synthetic token batches, each a dict of int64 tensors.

    `input_ids` and `attention_mask` are [batch, seq_len]; odd rows end in padding (mask 0, id `PAD_TOKEN_ID`),
    so code that ignores the mask gives different results. Real tokens are drawn from 1..vocab_size-1.
    `labels`: None adds no labels; "classification" adds `labels` [batch] in 0..num_labels-1;
    "lm" adds `labels` [batch, seq_len], the input ids with padding set to -100.
    """
    if labels not in (None, "classification", "lm"):
        raise ValueError(f"labels must be None, 'classification' or 'lm', got {labels!r}")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        attention_mask = _right_padded_mask(batch_size, seq_len, generator)
        input_ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator)
        input_ids = input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels == "classification":
            batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=generator)
        elif labels == "lm":
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batches.append(batch)
    return batches


def image_batches(
    n_batches: int, batch_size: int, seed: int = 0, num_classes: int = 10
) -> list[tuple[Tensor, Tensor]]:
    """Synthetic image batches: (images [batch, 1, 8, 8] float32 in [0, 1), labels [batch] int64)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch_size, 1, 8, 8, generator=generator),
            torch.randint(0, num_classes, (batch_size,), generator=generator),
        )
        for _ in range(n_batches)
    ]
