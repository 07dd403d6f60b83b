"""What the studies run on: the real models and data (the offline assets), or with ``--quick`` tiny synthetic
stand-ins of the same kind, so that ``--quick`` runs every later step of a study unchanged.

* text classification: the fine-tuned MiniLM sentiment classifier of a recipe, its tokenizer and examples; quick: the
  synthetic BERT of ``inc_plugins.perf.synthetic``, a word-level tokenizer of its 128-token vocabulary and random
  sentences of those words with random labels;
* causal LM: SmolLM2-135M with windows of the State of the Union speeches (calibration) and of Moby Dick
  (evaluation); quick: the synthetic Llama with random token windows;
* digits: scikit-learn's digits split; quick: random 8x8 images with random labels, in a small split.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import BertTokenizerFast

from inc_plugins.perf.synthetic import VOCAB_SIZE, synthetic_bert_classifier, synthetic_llama_lm, synthetic_token_windows
from recipes import apply, finetune_cache
from recipes.digits import IMAGE_SHAPE, NUM_CLASSES, DigitsSplit, load_digits_split
from recipes.model_sources import load_causal_lm
from recipes.movie_snippets import Example
from recipes.text_corpora import moby_dick_text, sotu_text, text_token_ids, token_windows, windows_of

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = [f"w{i}" for i in range(VOCAB_SIZE - len(_SPECIAL))]
SYNTHETIC_TRAIN_EXAMPLES, SYNTHETIC_DEV_EXAMPLES = 96, 32


def synthetic_tokenizer() -> BertTokenizerFast:
    """A word-level tokenizer whose 128 ids fit the synthetic BERT: specials, then the words w0..w122."""
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(_SPECIAL + _WORDS)}, do_lower_case=True)


def synthetic_examples(count: int, seed: int) -> list[Example]:
    """Sentences of 4..12 random words of the synthetic vocabulary, each with a random label 0/1."""
    rng = random.Random(seed)
    return [Example(text=" ".join(rng.choices(_WORDS, k=rng.randint(4, 12))), label=rng.randint(0, 1))
            for _ in range(count)]


def text_classification_task(recipe, quick: bool, untrained: bool = False):
    """(model, tokenizer, train_examples, dev_examples) of a text-classification `recipe`, the model in eval mode:
    the fine-tuned model from the recipe machinery's fine-tune cache (fine-tuned first when the cache is empty);
    `untrained`: the pretrained model with a seeded, untrained head (chance accuracy: smoke runs only); `quick`: the
    synthetic stand-ins."""
    if quick:
        return (synthetic_bert_classifier(seed=0, num_labels=recipe.model.num_labels), synthetic_tokenizer(),
                synthetic_examples(SYNTHETIC_TRAIN_EXAMPLES, seed=0), synthetic_examples(SYNTHETIC_DEV_EXAMPLES, seed=1))
    if untrained:
        torch.manual_seed(0)
        model, tokenizer, train_examples, dev_examples, _ = apply.prepare_task(recipe.model_copy(update={"finetune": None}))
        return model.eval(), tokenizer, train_examples, dev_examples
    key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
    if not (finetune_cache.cached_dir(key) / "finetune.json").is_file():
        print(f"no cached fine-tuned model in {finetune_cache.cached_dir(key)}: fine-tuning it first", file=sys.stderr)
    model, tokenizer, train_examples, dev_examples, _ = apply.prepare_task(recipe)
    return model.eval(), tokenizer, train_examples, dev_examples


@dataclass
class CausalLMSource:
    """A causal LM and where its token windows come from: calibration (labels are the inputs) and evaluation."""

    quick: bool
    description: str
    model: nn.Module
    tokenizer: object | None

    def calibration_windows(self, n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
        """[n_windows, seq_len] token ids: random windows of the State of the Union speeches (quick: random ids)."""
        if self.quick:
            return synthetic_token_windows(n_windows, seq_len, seed=seed)
        return windows_of(self._calibration_ids, n_windows, seq_len, seed=seed)

    @cached_property
    def _calibration_ids(self) -> torch.Tensor:
        """The State of the Union text's token ids, encoded once (10.8M characters: about a minute each time)."""
        return text_token_ids(self.tokenizer, sotu_text())

    def evaluation_windows(self, n_windows: int, seq_len: int) -> torch.Tensor:
        """[n_windows, seq_len] token ids: the first consecutive windows of Moby Dick (quick: random ids), so
        calibration and evaluation never overlap."""
        if self.quick:
            return synthetic_token_windows(n_windows, seq_len, seed=10_000)
        return token_windows(self.tokenizer, moby_dick_text(), n_windows, seq_len)


def causal_lm(quick: bool) -> CausalLMSource:
    """SmolLM2-135M (the ``smollm2-135m`` asset, de-quantized to fp32) and its tokenizer; quick: the synthetic
    Llama (grouped-query attention, random weights)."""
    if quick:
        return CausalLMSource(True, "synthetic tiny Llama (inc_plugins.perf.synthetic), random weights",
                              synthetic_llama_lm(seed=0), None)
    model, tokenizer = load_causal_lm("smollm2-135m")
    return CausalLMSource(False, "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 de-quantized to fp32)", model, tokenizer)


def digits_split(data, quick: bool) -> DigitsSplit:
    """scikit-learn's digits split by `data` (a recipe's ``data``: seed, test_fraction, val_fraction); quick: 64
    train, 32 validation and 32 test random images with random labels."""
    if not quick:
        return load_digits_split(data.seed, data.test_fraction, data.val_fraction)
    generator = torch.Generator().manual_seed(data.seed)

    def part(count: int):
        return (torch.rand(count, *IMAGE_SHAPE, generator=generator),
                torch.randint(0, NUM_CLASSES, (count,), generator=generator))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = part(64), part(32), part(32)
    return DigitsSplit(train_x, train_y, val_x, val_y, test_x, test_y, seed=data.seed)
