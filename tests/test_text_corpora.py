"""A long corpus is encoded piece by piece (recipes.text_corpora.text_token_ids) with exactly the whole text's token
ids: checked on the real Moby Dick asset with SmolLM2's tokenizer and the tiny word-level one, cut every ~4000
characters, and with a tokenizer that marks the start of every call, where no cut is safe."""

import pytest
import torch

from recipes import text_corpora
from recipes.model_sources import gguf_tokenizer
from recipes.text_corpora import moby_dick_text, text_token_ids, windows_of
from tests.fixtures.tiny_tokenizer import tiny_tokenizer


def _whole(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(text_corpora, "PIECE_CHARS", 4000)


@pytest.mark.parametrize("tokenizer", [lambda: gguf_tokenizer("smollm2-135m"), tiny_tokenizer],
                         ids=["smollm2", "tiny_word_level"])
def test_pieces_give_the_whole_texts_ids(small_pieces, tokenizer):
    tokenizer, text = tokenizer(), moby_dick_text()
    assert len(text_corpora._cuts(tokenizer, text)) > 200
    ids = text_token_ids(tokenizer, text)
    assert ids.dtype == torch.int32 and torch.equal(ids, _whole(tokenizer, text))


class StartMarking:
    """Synthetic: the tiny tokenizer with a marker token before every call's text, as a tokenizer that adds a prefix
    space to each input would: splitting the text anywhere changes its ids."""

    def __init__(self):
        self.inner = tiny_tokenizer()

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [0, *self.inner(text, add_special_tokens=add_special_tokens)["input_ids"]]}


def test_a_tokenizer_that_marks_each_start_is_never_cut(small_pieces):
    tokenizer, text = StartMarking(), moby_dick_text()[:50_000]
    assert text_corpora._cuts(tokenizer, text) == []
    assert torch.equal(text_token_ids(tokenizer, text), _whole(tokenizer, text))


def test_windows_are_seeded_offsets_or_the_first_consecutive_ones():
    ids = torch.arange(1000, dtype=torch.int32)  # (text_token_ids' dtype)
    first = windows_of(ids, 3, 10)
    assert first.dtype == torch.long and torch.equal(first, torch.arange(30).view(3, 10))
    sampled = windows_of(ids, 4, 10, seed=7)
    assert torch.equal(sampled, windows_of(ids, 4, 10, seed=7))
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in sampled)
    with pytest.raises(ValueError, match="too few for 101 windows of 10"):
        windows_of(ids, 101, 10)
