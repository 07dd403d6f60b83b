"""The recipe schema: a pydantic model of a pruning job, validated before any model is loaded."""

import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from .recipe_base import (BatchSize, CalibrationSamples, Description, LayerNames, LearningRate, LocalPath,
                          RecipeError, RecipeName, Seed, SequenceLength, Steps, Strict, validation_error)
from .recipe_yaml import RecipeYAMLError, load_recipe_yaml

ColumnName = Annotated[str, Field(min_length=1, max_length=200)]


class ModelSource(Strict):
    """Exactly one of `asset` (an offline asset name), `path` (a local directory) or `hub_id`."""

    asset: Annotated[str, Field(max_length=100)] | None = None
    path: LocalPath | None = None
    hub_id: Annotated[str, Field(max_length=200)] | None = None
    revision: Annotated[str, Field(max_length=200)] | None = None
    # Loading code shipped with a hub model runs arbitrary Python: off unless the recipe says so.
    trust_remote_code: bool = False
    num_labels: Annotated[int, Field(ge=2, le=10_000)] = 2

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("asset", "path", "hub_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"model needs exactly one of 'asset', 'path' or 'hub_id'; got {given or 'none'}")
        return self


class DataFiles(Strict):
    """Local files with one example per row: .csv, .tsv/.txt (tab-separated), .json (a list of objects) or .jsonl,
    each with a header or keys naming the columns."""

    train: LocalPath
    # Without a dev file, the dev set is the last dev_size training rows after a seeded shuffle.
    dev: LocalPath | None = None


class HubDataset(Strict):
    """A `datasets` hub dataset (needs the optional `hub` extra and network), e.g. name: glue, config: mrpc."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    config: Annotated[str, Field(max_length=200)] | None = None
    revision: Annotated[str, Field(max_length=200)] | None = None
    train_split: Annotated[str, Field(max_length=200)] = "train"
    dev_split: Annotated[str, Field(max_length=200)] = "validation"


class DataSource(Strict):
    """Classification examples: exactly one of `asset` (default: the movie-snippet sentiment task, label = mean
    rating > 0, keeping |rating| >= 0.5), local `files` or a `hub` dataset. Files and hub datasets name their
    columns; with `text_pair_column` the task is sentence-pair classification (e.g. MRPC)."""

    asset: Literal["movie-snippets"] | None = None
    files: DataFiles | None = None
    hub: HubDataset | None = None
    text_column: ColumnName | None = None  # default "text"
    text_pair_column: ColumnName | None = None
    label_column: ColumnName | None = None  # default "label"; integer labels in [0, model.num_labels)
    max_length: Annotated[int, Field(ge=8, le=512)] = 64
    # Examples are tokenized and held in memory: ten million sentences is far beyond any classification set.
    dev_size: Annotated[int, Field(ge=1, le=10_000_000)] = 2000  # with a dev split: at most this many of its examples
    max_train_samples: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("asset", "files", "hub") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"data takes one of 'asset', 'files' or 'hub'; got {given}")
        columns = [k for k in ("text_column", "text_pair_column", "label_column") if getattr(self, k) is not None]
        if self.asset is not None and columns:
            raise ValueError(f"the {self.asset!r} asset has fixed columns: remove {columns}")
        if not given:
            self.asset = "movie-snippets"
        return self


class TextSource(Strict):
    """A plain-text corpus: exactly one of an offline `asset` or a UTF-8 `file`."""

    asset: Literal["sotu", "moby-dick"] | None = None
    file: LocalPath | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("asset", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a corpus needs exactly one of 'asset' or 'file'; got {given or 'none'}")
        return self


class Corpus(Strict):
    """Text for the causal_lm task: random windows of `calibration` calibrate (seeded by each stage's seed), and the
    first `evaluation_windows` consecutive windows of `evaluation` measure perplexity. Keep the two texts apart."""

    calibration: TextSource = Field(default_factory=lambda: TextSource(asset="sotu"))
    evaluation: TextSource = Field(default_factory=lambda: TextSource(asset="moby-dick"))
    calibration_seq_len: SequenceLength = 128
    evaluation_seq_len: SequenceLength = 512
    # Each window is one forward pass: 10,000 windows of 8192 tokens is days of CPU time for a small model.
    evaluation_windows: Annotated[int, Field(ge=1, le=10_000)] = 8


class FineTune(Strict):
    """Fine-tunes a model without a task head before pruning; the result is cached by content hash."""

    epochs: Annotated[float, Field(gt=0, le=20)] = 1.0
    batch_size: BatchSize = 32
    learning_rate: LearningRate = 1e-4
    seed: Seed = 0


# Keys that only one pruning type reads (its own settings beyond INC's), and the type that reads them. The names are
# those of inc_plugins' KwonSettings (mask_search) and WandaSettings (wanda); tests check that they stay in sync.
MASK_SEARCH_KEYS = ("constraint", "seq_len", "num_samples", "rearrange", "tune", "per_sample_fisher", "latency_table",
                    "latency_backend", "allow_foreign_latency_table", "damp", "max_abs_scale")
WANDA_KEYS = ("comparison_group", "use_variant")
NETWORK_TRIMMING_KEYS = ("apoz_threshold",)
PARTICLE_FILTER_KEYS = ("granularity", "num_particles", "iterations", "weighting", "temperature", "mutation_rate",
                        "stride", "keep_best")
TYPE_SPECIFIC_KEYS = {"mask_search": MASK_SEARCH_KEYS, "wanda": WANDA_KEYS, "network_trimming": NETWORK_TRIMMING_KEYS,
                      "particle_filter": PARTICLE_FILTER_KEYS}
# The stage's own `seed` (calibration sampling) also seeds these pruners' random search.
SEEDED_TYPES = ("particle_filter",)

# Kwon et al. (2022) calibrate with 2048 samples on GLUE; the other one-shot pruners need far fewer.
DEFAULT_CALIBRATION_SAMPLES = {"mask_search": 2048}
FALLBACK_CALIBRATION_SAMPLES = 128


class PruningStage(Strict):
    """One INC `WeightPruningConfig` entry, plus how the recipe drives it.

    One-shot types (sparse_gpt and the plugins') prune from `calibration_samples` training examples (default 2048
    for mask_search, as in Kwon et al. 2022, else 128); with `finetune_steps` the pruned model is then fine-tuned
    with every weight that pruning zeroed held at zero (a prune / fine-tune iteration, as network trimming does).
    Training-aware types (magnitude, snip_momentum, ...) prune through INC's callbacks while training for
    `training_steps` steps.

    mask_search's own keys (see `inc_plugins.post_training.KwonSettings`) and wanda's (`comparison_group`,
    `use_variant`) are optional; only the ones a recipe sets reach the INC config entry, so the pruner's own
    defaults apply to the rest.
    """

    pruning_type: Annotated[str, Field(max_length=100)]
    target_sparsity: Annotated[float, Field(ge=0, lt=1)]
    # None: the pruning type's own default (unstructured for wanda, INC's 4x1 for INC's types)
    pattern: Annotated[str, Field(max_length=50)] | None = None
    op_names: LayerNames = Field(default_factory=list)
    excluded_op_names: LayerNames = Field(default_factory=list)
    pruning_scope: Literal["global", "local"] = "global"
    start_step: Steps = 0
    end_step: Steps | None = None
    pruning_frequency: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    sparsity_decay_type: Literal["exp", "cos", "linear", "cube"] = "exp"
    training_steps: Steps = 0
    finetune_steps: Steps = 0  # one-shot types: fine-tune after pruning, zeros held
    learning_rate: LearningRate = 5e-5
    batch_size: BatchSize = 32
    calibration_samples: CalibrationSamples | None = None
    seed: Seed = 0

    # mask_search (Kwon et al. 2022): target_sparsity is the fraction of head+FFN FLOPs (or latency) removed
    constraint: Literal["flops", "latency"] | None = None
    seq_len: Annotated[int, Field(ge=1, le=8192)] | None = None  # tokens per sequence for FLOPs; default: calibration average
    num_samples: CalibrationSamples | None = None  # the first num_samples of the calibration samples
    rearrange: bool | None = None
    tune: bool | None = None
    per_sample_fisher: bool | None = None
    latency_table: Annotated[str, Field(max_length=4096)] | None = None  # a table file written by inc_plugins.latency_table
    latency_backend: Annotated[str, Field(max_length=100)] | None = None
    allow_foreign_latency_table: bool | None = None
    damp: Annotated[float, Field(ge=0, le=1e6)] | None = None
    max_abs_scale: Annotated[float, Field(gt=0, le=1e6)] | None = None

    # wanda
    comparison_group: Literal["per_output", "per_layer", "global"] | None = None
    use_variant: bool | None = None

    # network_trimming: activations with |x| <= apoz_threshold count as zeros (GELU/SiLU; 0 for ReLU)
    apoz_threshold: Annotated[float, Field(ge=0, le=1e6)] | None = None

    # particle_filter (the pruner validates the values and names the bad key)
    granularity: Literal["channel", "kernel", "intra_kernel"] | None = None
    # each particle of each iteration is one evaluation of the model on the calibration batches
    num_particles: Annotated[int, Field(ge=1, le=10_000)] | None = None
    iterations: Annotated[int, Field(ge=1, le=10_000)] | None = None
    weighting: Annotated[str, Field(max_length=100)] | None = None
    temperature: Annotated[float, Field(gt=0, le=1e6)] | None = None
    mutation_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    stride: Annotated[int, Field(ge=1, le=1024)] | None = None
    keep_best: bool | None = None

    @model_validator(mode="after")
    def _type_specific_keys(self):
        for owner, keys in TYPE_SPECIFIC_KEYS.items():
            given = [key for key in keys if getattr(self, key) is not None]
            if given and self.pruning_type != owner:
                raise ValueError(
                    f"{', '.join(map(repr, given))} only apply to pruning_type {owner!r}, "
                    f"not {self.pruning_type!r}: remove them or change pruning_type"
                )
        if self.calibration_samples is None:
            self.calibration_samples = DEFAULT_CALIBRATION_SAMPLES.get(self.pruning_type, FALLBACK_CALIBRATION_SAMPLES)
        if self.num_samples is not None and self.num_samples > self.calibration_samples:
            raise ValueError(
                f"num_samples {self.num_samples} is more than calibration_samples {self.calibration_samples}: "
                f"calibration_samples is how many training examples are drawn; set that instead"
            )
        if self.constraint == "latency" and self.latency_table is None:
            raise ValueError("constraint 'latency' needs latency_table: a table file (python -m inc_plugins.latency_table)")
        return self

    @model_validator(mode="after")
    def _runnable_by_a_pruner(self):
        """The pruner name, pattern and sparsity checks of inc_plugins, before any model is loaded."""
        import inc_plugins  # registers the plugins' types; imported here so that `import recipes.schema` stays light
        from inc_plugins.inc.layer_selection import compiled

        try:
            inc_plugins.inc.config_checks.check_pruner_settings(self.inc_settings())
            compiled(self.op_names, "op_names")  # INC reads them as regular expressions
            compiled(self.excluded_op_names, "excluded_op_names")
        except inc_plugins.PruningConfigError as err:
            raise ValueError(str(err)) from None
        one_shot = inc_plugins.is_one_shot(self.pruning_type)
        if not one_shot and self.training_steps < 1:
            raise ValueError(
                f"pruning_type {self.pruning_type!r} prunes during training: set training_steps >= 1 in its stage"
            )
        if self.finetune_steps and not one_shot:
            raise ValueError(f"finetune_steps is for one-shot pruning types; {self.pruning_type!r} already trains "
                             f"while it prunes: raise training_steps instead")
        return self

    def inc_settings(self) -> dict:
        """The keys INC's WeightPruningConfig understands, with INC's defaults for what the recipe left out, plus
        the pruner-specific keys the recipe set."""
        settings = self.model_dump(
            include={"pruning_type", "target_sparsity", "op_names", "excluded_op_names", "pruning_scope",
                     "start_step", "pruning_frequency", "sparsity_decay_type"}
        )
        if self.pattern is not None:  # else the pruning type's own default applies
            settings["pattern"] = self.pattern
        settings["end_step"] = self.end_step if self.end_step is not None else max(self.training_steps - 1, self.start_step)
        for key in TYPE_SPECIFIC_KEYS.get(self.pruning_type, ()):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        if self.pruning_type in SEEDED_TYPES:
            settings["seed"] = self.seed
        return settings


class Evaluation(Strict):
    batch_size: BatchSize = 128


class Benchmark(Strict):
    """Optional last stage: latency of the dense and the pruned model on `benchmarks.backends` backends, timed in
    alternating rounds in one process so a busy machine slows both alike. Inputs are `batch_size` x `seq_len`
    random token ids (seeded)."""

    backends: Annotated[list[Annotated[str, Field(max_length=100)]], Field(min_length=1, max_length=50)] = Field(
        default_factory=lambda: ["eager-fp32"])
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    seq_len: Annotated[int, Field(ge=1, le=8192)] = 128
    warmup: Annotated[int, Field(ge=0, le=1000)] = 3
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 10
    seed: Seed = 0


class Output(Strict):
    """Runs go to `<dir>/<recipe name>-<UTC time>/`; an existing run directory is never overwritten."""

    dir: LocalPath = Path("runs")


class Recipe(Strict):
    name: RecipeName
    description: Description = ""
    # text_classification: single sentences or sentence pairs (`data`); causal_lm: perplexity on a `corpus`
    task: Literal["text_classification", "causal_lm"] = "text_classification"
    model: ModelSource
    data: DataSource = Field(default_factory=DataSource)
    corpus: Corpus | None = None
    finetune: FineTune | None = None
    pruning: Annotated[list[PruningStage], Field(min_length=1, max_length=100)]
    # Physically remove the heads and FFN neurons a mask_search stage pruned (inc_plugins.slim). The saved model then
    # has layers of different sizes and loads with inc_plugins.models.slimming.load_slimmed, not from_pretrained.
    slim: bool = False
    evaluation: Evaluation = Field(default_factory=Evaluation)
    benchmark: Benchmark | None = None
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _sections_fit_the_task(self):
        if self.task == "causal_lm":
            wrong = [key for key in ("finetune",) if getattr(self, key) is not None]
            wrong += ["data"] if "data" in self.model_fields_set else []
            if wrong:
                raise ValueError(f"task 'causal_lm' reads its text from 'corpus'; remove {wrong}")
            if self.corpus is None:
                self.corpus = Corpus()
        elif self.corpus is not None:
            raise ValueError(f"'corpus' is for task 'causal_lm'; task {self.task!r} reads 'data'")
        return self

    @model_validator(mode="after")
    def _slim_needs_structured_masks(self):
        if self.slim and not any(stage.pruning_type == "mask_search" for stage in self.pruning):
            types = ", ".join(repr(stage.pruning_type) for stage in self.pruning)
            raise ValueError(
                f"slim: true removes the attention heads and FFN neurons that a 'mask_search' stage pruned, but the "
                f"stages are {types}; add a mask_search stage or set slim: false"
            )
        return self

    def input_paths(self) -> list[Path]:
        """The local files and folders the recipe reads: a run may never replace a directory that holds one."""
        paths = [self.model.path]
        if self.data.files is not None:
            paths += [self.data.files.train, self.data.files.dev]
        if self.corpus is not None:
            paths += [self.corpus.calibration.file, self.corpus.evaluation.file]
        paths += [stage.latency_table for stage in self.pruning]
        return [Path(path) for path in paths if path is not None]


def parse_recipe(data: typing.Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    from .classic_recipe import is_digits_recipe, parse_digits_recipe  # the digits recipes have their own sections

    if is_digits_recipe(data):
        return parse_digits_recipe(data, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, Recipe, source, "recipe") from None


RECIPES_DIR = Path(__file__).resolve().parent


def resolve_recipe_path(name: str | Path) -> Path:
    """A path as given, or a bare file name looked up in the shipped recipes/ folder."""
    path = Path(name)
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give a recipe file (.yaml) or the name of a shipped recipe")
    if path.is_file():
        return path
    shipped = RECIPES_DIR / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe {str(name)!r} not found (shipped recipes: {available})")


def resolve_relative_paths(recipe: Recipe, base: Path) -> Recipe:
    """Makes the recipe's relative paths relative to `base` (the recipe file's folder), so a recipe means the same
    wherever it is run from. `output.dir` counts only when the recipe sets it; the default `runs` stays relative to
    the working directory."""

    def under_base(path):
        return path if path is None or Path(path).is_absolute() else base / path

    recipe.model.path = under_base(recipe.model.path)
    if recipe.data.files is not None:
        recipe.data.files.train = under_base(recipe.data.files.train)
        recipe.data.files.dev = under_base(recipe.data.files.dev)
    if recipe.corpus is not None:
        for text in (recipe.corpus.calibration, recipe.corpus.evaluation):
            text.file = under_base(text.file)
    for stage in recipe.pruning:
        if stage.latency_table is not None:
            stage.latency_table = str(under_base(stage.latency_table))
    if "output" in recipe.model_fields_set and "dir" in recipe.output.model_fields_set:
        recipe.output.dir = under_base(recipe.output.dir)
    return recipe


def load_recipe(name: str | Path) -> Recipe:
    """Reads (plain data only, within the limits of recipe_yaml), validates, and resolves paths relative to the recipe file."""
    path = resolve_recipe_path(name)
    try:
        data = load_recipe_yaml(path)
    except RecipeYAMLError as err:
        raise RecipeError(str(err)) from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
    recipe = parse_recipe(data, source=str(path))
    # other recipe kinds (e.g. the digits recipes, if parse_recipe hands them on) resolve their own paths
    return resolve_relative_paths(recipe, path.resolve().parent) if isinstance(recipe, Recipe) else recipe


if __name__ == "__main__":
    # the older spelling of `python -m recipes.validate`
    import sys

    from .validate import main

    sys.exit(main())
