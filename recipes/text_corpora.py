"""Plain-text corpora from the offline assets, cut into token windows for calibration and perplexity."""

import random
from pathlib import Path

import torch

from inc_plugins.assets import AssetError, asset_path

from .input_checks import read_text_file
from .schema import RecipeError


def _asset_dir(name: str) -> Path:
    """The verified asset directory; a missing or corrupted asset is one RecipeError line with the fetch command."""
    try:
        return asset_path(name)
    except AssetError as err:
        raise RecipeError(str(err)) from None


def moby_dick_text() -> str:
    return (_asset_dir("moby-dick") / "moby_dick.txt").read_text(encoding="utf-8")


def sotu_text() -> str:
    """Every State of the Union speech, oldest first, separated by blank lines."""
    files = sorted((_asset_dir("sotu") / "speeches").glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def corpus_file_text(path: Path) -> str:
    """A recipe's corpus `file`: RecipeError naming it when it is missing, a directory, unreadable, not UTF-8 (with
    the byte offset) or empty."""
    return read_text_file(path, "corpus file")


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
