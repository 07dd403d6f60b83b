"""What every recipe section shares: strict validation, bounded value types, and errors written for people.

Strict means a value must already have the type its key declares: `true` is not the number 1, `"0.5"` is not the
number 0.5, and `.inf`/`.nan` are not numbers at all. Every count has an upper bound that says what it protects
(memory, time), so a typo such as `calibration_samples: 1000000000000` stops at validation instead of after an hour.
"""

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the value given and what is allowed."""


class Strict(BaseModel):
    """Unknown keys are errors; no value is converted to another type; floats are finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Paths are written as strings in YAML: the one place where a conversion is wanted.
LocalPath = Annotated[Path, Field(strict=False)]
# numpy's generators take seeds in [0, 2**32); torch takes more, so numpy's range is the one both accept.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Batches are held in memory whole, and a longer batch no longer helps a 2-to-64-core CPU.
BatchSize = Annotated[int, Field(ge=1, le=4096)]
# Steps of training or pruning schedules: ten million steps is months of CPU time.
Steps = Annotated[int, Field(ge=0, le=10_000_000)]
# Calibration samples are tokenized and held in memory together (Kwon et al. use 2048, Wanda 128).
CalibrationSamples = Annotated[int, Field(ge=1, le=65_536)]
# Tokens per sequence: no model the project supports reads more than this.
SequenceLength = Annotated[int, Field(ge=2, le=8192)]
LearningRate = Annotated[float, Field(gt=0, lt=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# Names become file names (run directories are `<name>-<UTC time>`): portable characters, well under 255 bytes.
RecipeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)]
Description = Annotated[str, Field(max_length=10_000)]
# INC reads layer names as regular expressions, one per entry.
LayerNames = Annotated[list[Annotated[str, Field(min_length=1, max_length=500)]], Field(max_length=1000)]

MAX_VALUE_CHARS = 200  # of a value shown in an error message
MAX_LINE_CHARS = 600  # of one error line (a validator's message may quote a value too)
MAX_ERROR_LINES = 20


def short_repr(value, limit: int = MAX_VALUE_CHARS) -> str:
    """repr(value), cut to `limit` characters: an error message never echoes a whole file back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _members(annotation) -> list:
    """The model types an annotation may hold (through Optional, unions, lists and Annotated)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, Annotated):
        args = typing.get_args(annotation)
        args = args[:1] if origin is Annotated else args
        return [member for arg in args if arg is not type(None) for member in _members(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at a location of a recipe, for 'did you mean' hints. A location step that names a
    member of a tagged union (pydantic writes the tag, e.g. 'network_slimming', into the location) picks it."""
    candidates: list = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        by_tag = [m for m in candidates for field in m.model_fields.values()
                  if typing.get_origin(field.annotation) is typing.Literal and part in typing.get_args(field.annotation)]
        if len(candidates) > 1 and by_tag:
            candidates = by_tag[:1]
            continue
        fields = [m.model_fields[part] for m in candidates if part in m.model_fields]
        if not fields:
            return []
        candidates = _members(fields[0].annotation)
    return list(candidates[0].model_fields) if len(candidates) == 1 else []


def describe(error: dict, root: type[BaseModel]) -> str:
    """One line for one pydantic error: where, what is wrong, what was given (cut short)."""
    where = ".".join(str(part) for part in error["loc"]) or "recipe"
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(root, error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown key {short_repr(where)}.{hint} Allowed here: {', '.join(allowed)}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {short_repr(given)})"
    return f"'{where}': {error['msg']}{shown}"


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE_CHARS else f"{line[:MAX_LINE_CHARS]}... ({len(line):,} characters)"


def validation_error(err: ValidationError, root: type[BaseModel], source: str, kind: str) -> RecipeError:
    lines = [_cut(describe(e, root)) for e in err.errors()]
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"... and {len(lines) - MAX_ERROR_LINES} more"]
    return RecipeError(f"{source} is not a valid {kind}:\n  " + "\n  ".join(lines))
