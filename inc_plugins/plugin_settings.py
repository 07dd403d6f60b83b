"""The base of every plugin pruning type's settings model, and the error its bad values raise.

Each plugin pruning type declares the keys of its INC config entry once, as the fields of one ``PluginSettings``
subclass next to its INC adapter (e.g. ``inc_plugins.inc.wanda.WandaSettings``). Field names are the config keys;
every field has a one-line ``description`` (what it does, its unit). The same model serves INC config entries
(``from_config``), direct calls (``prune_post_training(model, batches, KwonSettings(0.4))``) and, through
``inc_plugins.inc.one_shot.plugin_settings_model``, the recipe schema.

Strict like the recipe schema: a value must already have the type its key declares (``true`` is not the number 1,
``"0.5"`` is not 0.5), floats are finite, unknown keys are errors, and every count has an upper bound.

No INC and no torch here: ``post_training`` (below ``inc`` in the import order) builds its settings on this base.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["PluginSettings", "PruningConfigError"]

_MAX_VALUE_CHARS = 200  # of a value quoted in an error message


class PruningConfigError(ValueError):
    """A pruning setting that no pruner can run."""


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else f"{text[:_MAX_VALUE_CHARS]}... ({len(text):,} characters)"


def _members(annotation: Any) -> list[tuple[Any, list]]:
    """(type, constraints) of each member of an annotation, through Optional, unions and Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        # Field(ge=...) inside Annotated is a FieldInfo holding the constraints in its own metadata
        metadata = [c for item in metadata for c in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return [(member, constraints + metadata) for member, constraints in _members(inner)]
    if origin in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(annotation) for member in _members(arg)]
    return [(annotation, [])]


def _literal_values(annotation: Any) -> tuple:
    """The allowed values of a Literal annotation, through Optional; () for other annotations."""
    return tuple(value for member, _ in _members(annotation) if typing.get_origin(member) is typing.Literal
                 for value in typing.get_args(member))


def _bounds(constraints: list) -> str:
    """Numeric bounds as text, e.g. "in [1, 10000]", ">= 0"; constraints are annotated_types' Ge(ge=...), ..."""
    found = {name: getattr(item, name) for item in constraints for name in ("ge", "gt", "le", "lt")
             if getattr(item, name, None) is not None}
    low = next(((kind, found[kind]) for kind in ("ge", "gt") if kind in found), None)
    high = next(((kind, found[kind]) for kind in ("le", "lt") if kind in found), None)
    if low and high:
        opening, closing = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
        return f"in {opening}{_number(low[1])}, {_number(high[1])}{closing}"
    symbol = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{symbol[bound[0]]} {_number(bound[1])}" for bound in (low, high) if bound)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _allowed(field: FieldInfo) -> str:
    """What a field accepts, in words."""
    members = [(member, constraints + field.metadata) for member, constraints in _members(field.annotation)]
    optional = " (or null for the default)" if any(member is type(None) for member, _ in members) else ""
    for kind, words in ((bool, "true or false"), (int, "a whole number"), (float, "a finite number"), (str, "text")):
        for member, constraints in members:
            if member is kind:
                if kind is str:
                    limit = next((c.max_length for c in constraints if getattr(c, "max_length", None)), None)
                    return f"text{f' of at most {limit} characters' if limit else ''}{optional}"
                bounds = _bounds(constraints)
                return f"{words}{' ' + bounds if bounds else ''}{optional}"
    return f"a value of type {field.annotation}"


class PluginSettings(BaseModel):
    """Settings of one plugin pruning type: one field per config key, with its default and bounds.

    Subclasses declare fields (with ``description=``) and put cross-field rules in validators; a validator's
    ValueError message is shown to people as it is, so it names the keys, the values and what is allowed. Fields
    that are INC's own keys (``target_sparsity``, ``pattern``, ``pruning_scope``) are read for validation and
    convenience; the registry lists the other fields as the type's own config keys.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    # INC's own key, which every pruning type reads; types refine its description (what is counted)
    target_sparsity: float = Field(ge=0, lt=1, description="fraction of the weights to prune, in [0, 1)")

    @classmethod
    def from_config(cls, info: Mapping[str, Any]):
        """The settings of one INC config entry (a ``pruning_configs`` entry or INC's processed dict).

        Reads the keys this model declares; a key that is absent or None takes the field's default, keys the
        model does not declare (INC's own) are ignored. Raises PruningConfigError with one line naming the key,
        the value given and what is allowed.
        """
        values = {key: info[key] for key in cls.model_fields if info.get(key) is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise PruningConfigError(cls.error_line(error)) from None

    @classmethod
    def error_line(cls, error: ValidationError) -> str:
        """The first problem of a ValidationError of this model, as one line for people."""
        problem = error.errors()[0]
        loc = [str(part) for part in problem["loc"]]
        if problem["type"] == "value_error" or not loc:  # a validator's own message says it all
            message = str(problem.get("ctx", {}).get("error", problem["msg"]))
            return message.removeprefix("Value error, ")
        key, value = loc[0], problem["input"]
        field = cls.model_fields.get(key)
        if field is None:
            nearest = difflib.get_close_matches(key, list(cls.model_fields), n=1)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            return f"{cls.__name__} has no key {key!r}.{hint} Its keys: {', '.join(cls.model_fields)}"
        if problem["type"] == "missing":
            return f"{key} is required: {field.description or _allowed(field)}"
        choices = _literal_values(field.annotation)
        if choices:
            nearest = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            return f"{key} {_short_repr(value)} is not one of {', '.join(map(repr, choices))}.{hint}"
        return f"{key} must be {_allowed(field)}, got {_short_repr(value)}"
