"""The Rotten Tomatoes movie-snippet sentiment task, built from the offline `movie-snippets` asset.

Each line of the asset is `id <TAB> mean rating (-4..4) <TAB> sentence`. Following the SST-2 convention, a sentence
is positive when its mean rating is above 0; near-neutral sentences (|rating| < 0.5) are dropped. This is an
SST-2-like binary task, NOT the official SST-2 labels or split.
"""

import random
from dataclasses import dataclass

from inc_plugins.assets import AssetError, asset_path

from .schema import RecipeError

NEUTRAL_MARGIN = 0.5


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None  # the second sentence of a sentence-pair task


def load_examples() -> list[Example]:
    try:
        path = asset_path("movie-snippets") / "movieReviewSnippets_GroundTruth.txt"
    except AssetError as err:  # missing or corrupted: one line with the fetch command
        raise RecipeError(str(err)) from None
    examples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        rating, text = float(fields[1]), "\t".join(fields[2:]).strip()
        if abs(rating) >= NEUTRAL_MARGIN and text:
            examples.append(Example(text=text, label=int(rating > 0)))
    return examples


def train_dev_split(examples: list[Example], dev_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the last `dev_size` examples are the dev set."""
    if dev_size >= len(examples):
        raise ValueError(f"dev_size {dev_size} leaves no training data ({len(examples)} examples)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return shuffled[:-dev_size], shuffled[-dev_size:]
