"""Classification examples from local CSV/TSV/JSON/JSONL files or from a `datasets` hub dataset.

Columns are named in the recipe (`text_column`, `text_pair_column`, `label_column`); labels must be integers
in [0, num_labels). The hub is only contacted when a recipe names a hub dataset.
"""

import csv
import io
import json
from pathlib import Path

from .hub_access import import_datasets
from .input_checks import read_text_file
from .movie_snippets import Example
from .schema import DataSource, RecipeError

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl"}


def _where(path: Path) -> str:
    return f"data file {str(path)!r}"


def _delimited_rows(path: Path, text: str, form: str) -> tuple[list[dict], list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if form == "csv" else "\t")
    rows, lines = [], []
    try:
        header = reader.fieldnames or []
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                fields = len(header) + len(row.get(None) or ()) - sum(value is None for value in row.values())
                raise RecipeError(f"{_where(path)}, line {reader.line_num}, row {len(rows)}: {fields} "
                                  f"field{'s' * (fields != 1)}, but the header (line 1) has {len(header)}: "
                                  f"{', '.join(header)}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as err:
        raise RecipeError(f"{_where(path)} is not valid {form}: {err} (line {reader.line_num})") from None
    return rows, lines


def read_table(path: Path) -> tuple[list, list[int] | None]:
    """(rows, the file line each row ends on, or None for .json) of a local data file. RecipeError naming the
    file (and line) when it is missing, a directory, unreadable, not UTF-8, empty or not valid for its format."""
    path = Path(path)
    form = FILE_FORMATS.get(path.suffix.lower())
    if form is None:
        raise RecipeError(f"data file {str(path)!r}: unknown format {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    text = read_text_file(path, "data file")
    if form in ("csv", "tsv"):
        return _delimited_rows(path, text, form)
    if form == "jsonl":
        rows, lines = [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecipeError(f"{_where(path)}, line {number} is not valid JSON: {err.msg} (column "
                                  f"{err.colno})") from None
            lines.append(number)
        return rows, lines
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{_where(path)} is not valid json: {err.msg} (line {err.lineno}, column "
                          f"{err.colno})") from None
    if not isinstance(rows, list):
        raise RecipeError(f"data file {str(path)!r}: a .json data file holds a list of objects, got {type(rows).__name__}")
    return rows, None


def read_rows(path: Path) -> list[dict]:
    """Rows of a local data file as dicts keyed by column name."""
    return read_table(path)[0]


def to_examples(rows: list, data: DataSource, num_labels: int, where: str,
                lines: list[int] | None = None) -> list[Example]:
    """Examples of the named columns; `lines` (the file line of each row) goes into the error messages."""
    text_key, pair_key, label_key = data.text_column or "text", data.text_pair_column, data.label_column or "label"
    examples = []
    for index, row in enumerate(rows):
        at = f"{where}, line {lines[index]}, row {index}" if lines else f"{where}, row {index}"
        if not isinstance(row, dict):
            raise RecipeError(f"{at}: expected an object with named columns, got {row!r}")
        missing = [key for key in (text_key, pair_key, label_key) if key is not None and key not in row]
        if missing:
            raise RecipeError(f"{at}: no column {missing}; columns there: {', '.join(map(str, row))}")
        empty = [key for key in (text_key, pair_key) if key is not None and row[key] is None]
        if empty:
            raise RecipeError(f"{at}: column {empty[0]!r} is empty (null)")
        try:
            label = int(str(row[label_key]).strip())
        except ValueError:
            label = -1
        if not 0 <= label < num_labels:
            raise RecipeError(f"{at}: label {row[label_key]!r} in column {label_key!r} is not an "
                              f"integer in [0, {num_labels}) (model.num_labels is {num_labels})")
        examples.append(Example(text=str(row[text_key]), label=label,
                                text_pair=None if pair_key is None else str(row[pair_key])))
    if not examples:
        raise RecipeError(f"{where} has no examples" + (" (only a header)" if lines is not None else ""))
    return examples


def file_examples(data: DataSource, num_labels: int) -> tuple[list[Example], list[Example] | None]:
    """(train, dev or None) from the recipe's local files."""
    rows, lines = read_table(data.files.train)
    train = to_examples(rows, data, num_labels, _where(data.files.train), lines)
    dev = None
    if data.files.dev is not None:
        rows, lines = read_table(data.files.dev)
        dev = to_examples(rows, data, num_labels, _where(data.files.dev), lines)
    return train, dev


def hub_examples(data: DataSource, num_labels: int) -> tuple[list[Example], list[Example]]:
    """(train, dev) from a `datasets` hub dataset. Reachability is checked before any model is loaded
    (recipes.hub_access); this only reports what still goes wrong."""
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
