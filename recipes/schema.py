"""The recipe schema: a pydantic model of a pruning job, validated before any model is loaded."""

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the value given and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """Exactly one of `asset` (an offline asset name), `path` (a local directory) or `hub_id`."""

    asset: str | None = None
    path: Path | None = None
    hub_id: str | None = None
    revision: str | None = None
    # Loading code shipped with a hub model runs arbitrary Python: off unless the recipe says so.
    trust_remote_code: bool = False
    num_labels: Annotated[int, Field(ge=2)] = 2

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("asset", "path", "hub_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"model needs exactly one of 'asset', 'path' or 'hub_id'; got {given or 'none'}")
        return self


class DataSource(_Strict):
    """The movie-snippet sentiment task: label = mean rating > 0, keeping |rating| >= 0.5."""

    asset: Literal["movie-snippets"] = "movie-snippets"
    max_length: Annotated[int, Field(ge=8, le=512)] = 64
    dev_size: Annotated[int, Field(ge=1)] = 2000
    max_train_samples: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0


class FineTune(_Strict):
    """Fine-tunes a model without a task head before pruning; the result is cached by content hash."""

    epochs: Annotated[float, Field(gt=0, le=20)] = 1.0
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    seed: int = 0


class PruningStage(_Strict):
    """One INC `WeightPruningConfig` entry, plus how the recipe drives it.

    One-shot types (sparse_gpt and the plugins') prune from `calibration_samples` training examples. Training-aware
    types (magnitude, snip_momentum, ...) prune through INC's callbacks while training for `training_steps` steps.
    """

    pruning_type: str
    target_sparsity: Annotated[float, Field(ge=0, lt=1)]
    pattern: str = "4x1"
    op_names: list[str] = Field(default_factory=list)
    excluded_op_names: list[str] = Field(default_factory=list)
    pruning_scope: Literal["global", "local"] = "global"
    start_step: Annotated[int, Field(ge=0)] = 0
    end_step: Annotated[int, Field(ge=0)] | None = None
    pruning_frequency: Annotated[int, Field(ge=1)] = 1
    sparsity_decay_type: Literal["exp", "cos", "linear", "cube"] = "exp"
    training_steps: Annotated[int, Field(ge=0)] = 0
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 5e-5
    batch_size: Annotated[int, Field(ge=1)] = 32
    calibration_samples: Annotated[int, Field(ge=1)] = 128
    seed: int = 0

    def inc_settings(self) -> dict:
        """The keys INC's WeightPruningConfig understands, with INC's defaults for what the recipe left out."""
        settings = self.model_dump(
            include={"pruning_type", "target_sparsity", "pattern", "op_names", "excluded_op_names", "pruning_scope",
                     "start_step", "pruning_frequency", "sparsity_decay_type"}
        )
        settings["end_step"] = self.end_step if self.end_step is not None else max(self.training_steps - 1, self.start_step)
        return settings


class Evaluation(_Strict):
    batch_size: Annotated[int, Field(ge=1)] = 128


class Output(_Strict):
    """Runs go to `<dir>/<recipe name>-<UTC time>/`; an existing run directory is never overwritten."""

    dir: Path = Path("runs")


class Recipe(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    model: ModelSource
    data: DataSource = Field(default_factory=DataSource)
    finetune: FineTune | None = None
    pruning: Annotated[list[PruningStage], Field(min_length=1)]
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)


def _fields_at(loc: tuple) -> list[str]:
    """Field names allowed at a location of the recipe, for 'did you mean' hints."""
    node: typing.Any = Recipe
    for part in loc:
        while typing.get_origin(node) in (typing.Union, types.UnionType, list, Annotated):
            args = [a for a in typing.get_args(node) if a is not type(None)]
            node = args[0]
        if isinstance(part, int):
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return []
        node = node.model_fields[part].annotation
    while typing.get_origin(node) in (typing.Union, types.UnionType, list, Annotated):
        node = [a for a in typing.get_args(node) if a is not type(None)][0]
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "recipe"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown key '{where}'.{hint} Allowed here: {', '.join(allowed)}"
    given = f" (got {error['input']!r})" if not isinstance(error.get("input"), dict) else ""
    return f"'{where}': {error['msg']}{given}"


def parse_recipe(data: typing.Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise RecipeError(f"{source} is not a valid recipe:\n  " + "\n  ".join(lines)) from None


RECIPES_DIR = Path(__file__).resolve().parent


def resolve_recipe_path(name: str | Path) -> Path:
    """A path as given, or a bare file name looked up in the shipped recipes/ folder."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe {str(name)!r} not found (shipped recipes: {available})")


def load_recipe(name: str | Path) -> Recipe:
    path = resolve_recipe_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    return parse_recipe(data, source=str(path))
