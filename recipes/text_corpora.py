"""Plain-text corpora from the offline assets, cut into token windows for calibration and perplexity."""

import random
import re
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


# A tokenizer holds several hundred bytes per token while it encodes (offsets, alignments, token strings): the
# 10.8M-character State of the Union text in one call peaked 1.4 GB above the process with SmolLM2's tokenizer, more
# than a streamed 7B block. So a long text is encoded in pieces of about this many characters.
PIECE_CHARS = 1 << 16
_CUT_CANDIDATE = re.compile(r"(?<=\w)(?= \w)")  # before a single space between two word characters
_CUT_CONTEXT = 256  # characters either side of a cut that must tokenize the same apart as together


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _cuts(tokenizer, text: str) -> list[int]:
    """Positions about PIECE_CHARS apart where the text may be split: the pieces' tokens, concatenated, are the whole
    text's. A candidate is kept only if the text around it gives the same tokens split there as unsplit, so a
    tokenizer that treats a piece's start specially (e.g. a prefix space) just gets fewer cuts."""
    cuts, position = [], PIECE_CHARS
    while (found := _CUT_CANDIDATE.search(text, position)) is not None:
        cut = found.start()
        left, right = text[max(0, cut - _CUT_CONTEXT) : cut], text[cut : cut + _CUT_CONTEXT]
        if _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right):
            cuts.append(cut)
            position = cut + PIECE_CHARS
        else:
            position = cut + 1
    return cuts


def text_token_ids(tokenizer, text: str) -> torch.Tensor:
    """[n_tokens] int32 the text's token ids without special tokens, encoded piece by piece (see PIECE_CHARS). A run
    holds its calibration text's ids all along: int32 (every vocabulary fits) takes half of int64's 8 bytes a token."""
    bounds = [0, *_cuts(tokenizer, text), len(text)]
    return torch.cat([torch.tensor(_ids(tokenizer, text[start:end]), dtype=torch.int32)
                      for start, end in zip(bounds, bounds[1:])])


def windows_of(ids: torch.Tensor, n_windows: int, seq_len: int, seed: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] int64 (model inputs' dtype) windows of the token ids ``ids`` [n_tokens].

    With a seed, windows start at random offsets (calibration sampling); without one, they are the first
    consecutive, non-overlapping windows of the text (a fixed evaluation set).
    """
    if len(ids) < n_windows * seq_len and seed is None or len(ids) <= seq_len:
        raise ValueError(f"text has {len(ids)} tokens, too few for {n_windows} windows of {seq_len}")
    if seed is None:
        starts = [i * seq_len for i in range(n_windows)]
    else:
        rng = random.Random(seed)
        starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n_windows)]
    return torch.stack([ids[s : s + seq_len] for s in starts]).long()


def token_windows(tokenizer, text: str, n_windows: int, seq_len: int, seed: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] token ids of ``text``, without special tokens (``windows_of``)."""
    return windows_of(text_token_ids(tokenizer, text), n_windows, seq_len, seed)
