"""A synthetic 128-token WordPiece tokenizer that fits the tiny BERT fixture's vocabulary (no downloads)."""

import string
from pathlib import Path

from transformers import BertTokenizerFast

from .tiny_models import VOCAB_SIZE, tiny_bert_classifier

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "and", "of", "to", "is", "it", "film", "movie", "good", "bad", "not", "great", "story",
         "fun", "dull", "best", "worst", "funny", "boring", "love", "hate"]


def tiny_vocabulary() -> list[str]:
    """Specials, single characters and their '##' continuations, then common words: any text tokenizes."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = SPECIAL + chars + [f"##{c}" for c in string.ascii_lowercase] + WORDS
    vocab += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab


def tiny_tokenizer() -> BertTokenizerFast:
    vocab = {token: index for index, token in enumerate(tiny_vocabulary())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def save_tiny_classifier(directory: Path, seed: int = 0) -> Path:
    """Saves the tiny BERT classifier with its tokenizer, loadable like any local model directory."""
    tiny_bert_classifier(seed=seed).save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
    return directory
