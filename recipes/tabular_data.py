"""Classification examples from local CSV/TSV/JSON/JSONL files or from a `datasets` hub dataset.

Columns are named in the recipe (`text_column`, `text_pair_column`, `label_column`); labels must be integers
in [0, num_labels). The hub is only contacted when a recipe names a hub dataset.
"""

import csv
import json
from pathlib import Path

from .movie_snippets import Example
from .schema import DataSource, RecipeError

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl"}


def read_rows(path: Path) -> list[dict]:
    """Rows of a local data file as dicts keyed by column name."""
    form = FILE_FORMATS.get(path.suffix.lower())
    if form is None:
        raise RecipeError(f"data file {str(path)!r}: unknown format {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    if not path.is_file():
        raise RecipeError(f"data file {str(path)!r} does not exist (paths in a recipe are relative to the recipe file)")
    text = path.read_text(encoding="utf-8")
    try:
        if form in ("csv", "tsv"):
            return list(csv.DictReader(text.splitlines(), delimiter="," if form == "csv" else "\t"))
        if form == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as err:
        raise RecipeError(f"data file {str(path)!r} is not valid {form}: {err}") from None
    if not isinstance(rows, list):
        raise RecipeError(f"data file {str(path)!r}: a .json data file holds a list of objects, got {type(rows).__name__}")
    return rows


def to_examples(rows: list, data: DataSource, num_labels: int, where: str) -> list[Example]:
    text_key, pair_key, label_key = data.text_column or "text", data.text_pair_column, data.label_column or "label"
    examples = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RecipeError(f"{where}, row {index}: expected an object with named columns, got {row!r}")
        missing = [key for key in (text_key, pair_key, label_key) if key is not None and key not in row]
        if missing:
            raise RecipeError(f"{where}, row {index}: no column {missing}; columns there: {', '.join(map(str, row))}")
        try:
            label = int(str(row[label_key]).strip())
        except ValueError:
            label = -1
        if not 0 <= label < num_labels:
            raise RecipeError(f"{where}, row {index}: label {row[label_key]!r} in column {label_key!r} is not an "
                              f"integer in [0, {num_labels}) (model.num_labels is {num_labels})")
        examples.append(Example(text=str(row[text_key]), label=label,
                                text_pair=None if pair_key is None else str(row[pair_key])))
    if not examples:
        raise RecipeError(f"{where} has no examples")
    return examples


def file_examples(data: DataSource, num_labels: int) -> tuple[list[Example], list[Example] | None]:
    """(train, dev or None) from the recipe's local files."""
    train = to_examples(read_rows(data.files.train), data, num_labels, str(data.files.train))
    dev = None
    if data.files.dev is not None:
        dev = to_examples(read_rows(data.files.dev), data, num_labels, str(data.files.dev))
    return train, dev


def hub_examples(data: DataSource, num_labels: int) -> tuple[list[Example], list[Example]]:
    """(train, dev) from a `datasets` hub dataset. Reachability is checked before any model is loaded
    (recipes.hub_access); this only reports what still goes wrong."""
    from .hub_access import import_datasets

    datasets = import_datasets()
    hub = data.hub
    label = f"hub dataset {hub.name!r}" + (f" ({hub.config})" if hub.config else "")
    try:
        loaded = {split: datasets.load_dataset(hub.name, hub.config, split=split, revision=hub.revision)
                  for split in (hub.train_split, hub.dev_split)}
    except Exception as err:  # datasets raises many unrelated types for "not found", "offline", "bad split"
        raise RecipeError(f"cannot load {label}: {type(err).__name__}: {err}") from None
    return (to_examples(list(loaded[hub.train_split]), data, num_labels, f"{label} split {hub.train_split!r}"),
            to_examples(list(loaded[hub.dev_split]), data, num_labels, f"{label} split {hub.dev_split!r}"))
