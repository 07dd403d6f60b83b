"""Plain-text corpora from the offline assets, cut into token windows for calibration and perplexity."""

import random

import torch

from inc_plugins.assets import asset_path


def moby_dick_text() -> str:
    return (asset_path("moby-dick") / "moby_dick.txt").read_text(encoding="utf-8")


def sotu_text() -> str:
    """Every State of the Union speech, oldest first, separated by blank lines."""
    files = sorted((asset_path("sotu") / "speeches").glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def token_windows(tokenizer, text: str, n_windows: int, seq_len: int, seed: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] token ids, without special tokens.

    With a seed, windows start at random offsets (calibration sampling); without one, they are the first
    consecutive, non-overlapping windows of the text (a fixed evaluation set).
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < n_windows * seq_len and seed is None or len(ids) <= seq_len:
        raise ValueError(f"text has {len(ids)} tokens, too few for {n_windows} windows of {seq_len}")
    if seed is None:
        starts = [i * seq_len for i in range(n_windows)]
    else:
        rng = random.Random(seed)
        starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n_windows)]
    return torch.stack([ids[s : s + seq_len] for s in starts])
