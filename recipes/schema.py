"""The recipe schema: a pydantic model of a pruning job, validated before any model is loaded."""

import difflib
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ByteSize, Field, TypeAdapter, ValidationError, create_model, model_validator

import inc_plugins  # registers the plugins' pruning types, which stages name
from inc_plugins.deploy.openvino_export import PRECISIONS
from inc_plugins.deploy.output_comparison import DEFAULT_TOLERANCES, Tolerance
from inc_plugins.inc import one_shot
from inc_plugins.inc.config_checks import check_pruner_settings
from inc_plugins.inc.layer_selection import compiled

from .recipe_base import (BatchSize, CalibrationSamples, Description, Fraction, LayerNames, LearningRate, LocalPath,
                          RecipeError, RecipeName, Seed, SequenceLength, Steps, Strict, short_repr, validation_error)
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
    seed: Seed = 0  # draws the new task head and the dropout masks, and shuffles the training order


# Kwon et al. (2022) calibrate with 2048 samples on GLUE; the other one-shot pruners need far fewer.
DEFAULT_CALIBRATION_SAMPLES = {"mask_search": 2048}
FALLBACK_CALIBRATION_SAMPLES = 128


class _StageCommon(Strict):
    """One INC `WeightPruningConfig` entry, plus how the recipe drives it.

    One-shot types (sparse_gpt and the plugins') prune from `calibration_samples` training examples (default 2048
    for mask_search, as in Kwon et al. 2022, else 128); with `retrain_steps` the pruned model is then retrained
    with every weight that pruning zeroed held at zero (a prune / fine-tune iteration, as network trimming does).
    Training-aware types (magnitude, snip_momentum, ...) prune through INC's callbacks while training for
    `training_steps` steps.

    The plugins' own keys come from each pruning type's settings model (`inc_plugins.plugin_settings_model`); they
    are optional here, and only the ones a recipe sets reach the INC config entry, so the pruner's defaults apply to
    the rest.
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
    retrain_steps: Steps = 0  # one-shot types: retrain after pruning, zeros held (`finetune` is before pruning)
    # with retrain_steps: learn the model's own outputs from before this stage instead of the labels (knowledge
    # distillation); the temperature softens both sides' logits. None: the labels.
    distillation_temperature: Annotated[float, Field(gt=0, le=100)] | None = None
    learning_rate: LearningRate = 5e-5
    batch_size: BatchSize = 32
    calibration_samples: CalibrationSamples | None = None
    seed: Seed = 0  # draws the calibration samples; seeds a plugin's own search too (particle_filter)

    def plugin_keys_given(self) -> list[str]:
        return [key for key in PLUGIN_KEYS if getattr(self, key) is not None]

    @model_validator(mode="after")
    def _type_specific_keys(self):
        read = one_shot.TYPE_CONFIG_KEYS.get(self.pruning_type, frozenset())
        foreign = [key for key in self.plugin_keys_given() if key not in read]
        if foreign:
            readers = sorted({t for key in foreign for t, keys in one_shot.TYPE_CONFIG_KEYS.items() if key in keys})
            raise ValueError(
                f"{', '.join(map(repr, foreign))} only apply to pruning_type {' / '.join(map(repr, readers))}, "
                f"not {self.pruning_type!r}: remove them or change pruning_type"
            )
        if self.calibration_samples is None:
            self.calibration_samples = DEFAULT_CALIBRATION_SAMPLES.get(self.pruning_type, FALLBACK_CALIBRATION_SAMPLES)
        num_samples = getattr(self, "num_samples", None)
        if num_samples is not None and num_samples > self.calibration_samples:
            raise ValueError(
                f"num_samples {num_samples} is more than calibration_samples {self.calibration_samples}: "
                f"calibration_samples is how many training examples are drawn; set that instead"
            )
        return self

    @model_validator(mode="after")
    def _runnable_by_a_pruner(self):
        """The pruner name, pattern, sparsity and settings checks of inc_plugins, before any model is loaded."""
        settings = self.inc_settings()
        try:
            check_pruner_settings(settings)  # the type's settings model included
            compiled(self.op_names, "op_names")  # INC reads them as regular expressions
            compiled(self.excluded_op_names, "excluded_op_names")
        except inc_plugins.PruningConfigError as err:
            raise ValueError(str(err)) from None
        one_shot_type = inc_plugins.is_one_shot(self.pruning_type)
        if not one_shot_type and self.training_steps < 1:
            raise ValueError(
                f"pruning_type {self.pruning_type!r} prunes during training: set training_steps >= 1 in its stage"
            )
        if self.retrain_steps and not one_shot_type:
            raise ValueError(f"retrain_steps is for one-shot pruning types; {self.pruning_type!r} already trains "
                             f"while it prunes: raise training_steps instead")
        if self.distillation_temperature is not None and not self.retrain_steps:
            raise ValueError("distillation_temperature applies to the retraining after pruning: set retrain_steps "
                             ">= 1 in the stage, or remove distillation_temperature")
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
        for key in one_shot.TYPE_CONFIG_KEYS.get(self.pruning_type, ()):
            if getattr(self, key, None) is not None:
                settings[key] = getattr(self, key)
        return settings


def _plugin_fields() -> dict:
    """The plugins' own keys, declared once in their settings models, as optional stage keys (None: the pruner's
    default). A key two types share must mean the same there."""
    fields: dict = {}
    types_reading: dict[str, list[str]] = {}
    for pruning_type, settings_model in one_shot.PLUGIN_SETTINGS_MODELS.items():
        for name in sorted(one_shot.TYPE_CONFIG_KEYS[pruning_type] - set(_StageCommon.model_fields)):
            info = settings_model.model_fields[name]
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            if name in fields and fields[name][0] != annotation | None:
                raise TypeError(f"plugin key {name!r} has different types in two pruning types' settings")
            types_reading.setdefault(name, []).append(pruning_type)
            fields[name] = (annotation | None, Field(
                default=None, description=f"{', '.join(types_reading[name])}: {info.description}"))
    # a recipe names its latency table by file (the Python API also takes a loaded table)
    fields["latency_table"] = (Annotated[str, Field(max_length=4096)] | None,
                               Field(default=None, description=fields["latency_table"][1].description))
    return fields


PLUGIN_FIELDS = _plugin_fields()
PLUGIN_KEYS = tuple(PLUGIN_FIELDS)
PruningStage = create_model("PruningStage", __base__=_StageCommon, __module__=__name__, **PLUGIN_FIELDS)


class Evaluation(Strict):
    batch_size: BatchSize = 128


class Benchmark(Strict):
    """Optional last stage: latency of the dense and the pruned model on `inc_plugins.perf.backends` backends, timed in
    alternating rounds in one process so a busy machine slows both alike. Inputs are `batch_size` x `seq_len`
    random token ids (seeded)."""

    backends: Annotated[list[Annotated[str, Field(max_length=100)]], Field(min_length=1, max_length=50)] = Field(
        default_factory=lambda: ["eager-fp32"])
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    seq_len: Annotated[int, Field(ge=1, le=8192)] = 128
    warmup: Annotated[int, Field(ge=0, le=1000)] = 3
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 10
    seed: Seed = 0


class _ComparedWithPyTorch(Strict):
    """Tolerances of a deployed model's check against the PyTorch model; None: `DEFAULT_TOLERANCES[...]`."""

    max_relative_logit_diff: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="largest |logit difference| over the largest |logit| of the PyTorch model")
    metric_tolerance: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="accuracy and F1: absolute difference; perplexity: relative difference")

    def tolerance_against(self, default: Tolerance) -> Tolerance:
        return Tolerance(default.relative_logits if self.max_relative_logit_diff is None
                         else self.max_relative_logit_diff,
                         default.metric if self.metric_tolerance is None else self.metric_tolerance)


class Export(_ComparedWithPyTorch):
    """Optional stage after the last evaluation: the final model (pruned, slimmed) as OpenVINO IR in `<run>/openvino/`
    (`openvino_model.xml/.bin`, float32 weights, batch and sequence length free), with `precision` as its inference
    hint. The IR is then run on the evaluation data beside the PyTorch model: the largest logit difference (over the
    largest logit) and the metric of each go into report.json; past the tolerance the run fails (a conversion bug)."""

    format: Literal["openvino"] = "openvino"
    precision: Literal[tuple(PRECISIONS)] = "fp32"

    def tolerance(self) -> Tolerance:
        return self.tolerance_against(DEFAULT_TOLERANCES[self.precision])


class Quantize(_ComparedWithPyTorch):
    """Optional stage after export: static int8 post-training quantization of the final model, calibrated on
    `calibration_samples` examples of the recipe's calibration data (training examples; for causal_lm, windows of the
    calibration text) drawn with `seed`. `nncf`: `nncf.quantize` of the OpenVINO IR, written to
    `<run>/openvino_int8/` (inference hint: export.precision, else fp32), the deployable int8 model. `inc`: INC
    3.7.1's PyTorch post-training quantization (its 2.x `fit` API: the 3.x one needs IPEX or torch's removed PT2E
    quantizer), evaluated in PyTorch and not saved. Each is evaluated beside the float PyTorch model (metric, largest
    logit difference) and checked to keep every pruned zero at zero; past the tolerance the report says so (int8
    losing accuracy is a result, not a broken run)."""

    methods: Annotated[list[Literal["nncf", "inc"]], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: ["nncf"])
    calibration_samples: CalibrationSamples = 300  # NNCF's default subset size
    batch_size: BatchSize = 8  # of the calibration batches (NNCF then reads them one sample at a time)
    seed: Seed = 0

    @model_validator(mode="after")
    def _each_method_once(self):
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"quantize.methods names a method twice: {self.methods}")
        return self

    def tolerance(self) -> Tolerance:
        return self.tolerance_against(DEFAULT_TOLERANCES["int8"])


class Output(Strict):
    """Runs go to `<dir>/<recipe name>-<UTC time>/`; an existing run directory is never overwritten."""

    dir: LocalPath = Path("runs")


class _TransformersRecipe(Strict):
    """What the text tasks share: a transformers model, INC pruning stages, optional slimming and benchmark."""

    name: RecipeName
    description: Description = ""
    model: ModelSource
    pruning: Annotated[list[PruningStage], Field(min_length=1, max_length=100)]
    # Physically remove the heads and FFN neurons a structured stage (mask_search, flap, wanda_sp,
    # structured_magnitude) pruned (inc_plugins.slim). The saved model then
    # has layers of different sizes: its model type (inc_slimmed_<family>) loads with from_pretrained after
    # `import inc_plugins`.
    slim: bool = False
    evaluation: Evaluation = Field(default_factory=Evaluation)
    benchmark: Benchmark | None = None
    export: Export | None = None
    quantize: Quantize | None = None
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _slim_needs_structured_masks(self):
        structured = one_shot.structured_types()
        if self.slim and not any(stage.pruning_type in structured for stage in self.pruning):
            types = ", ".join(repr(stage.pruning_type) for stage in self.pruning)
            raise ValueError(
                f"slim: true removes the attention heads and FFN neurons that a structured stage "
                f"({', '.join(map(repr, structured))}) pruned, but the stages are {types}; add one or set slim: false"
            )
        return self

    def input_paths(self) -> list[Path]:
        """The local files and folders the recipe reads: a run may never replace a directory that holds one."""
        paths = [self.model.path, *(stage.latency_table for stage in self.pruning)]
        return [Path(path) for path in paths if path is not None]


class TextClassificationRecipe(_TransformersRecipe):
    """Single sentences or sentence pairs (`data`), accuracy and F1 on the dev set; the default task."""

    task: Literal["text_classification"] = "text_classification"
    data: DataSource = Field(default_factory=DataSource)
    finetune: FineTune | None = None

    def input_paths(self) -> list[Path]:
        files = [self.data.files.train, self.data.files.dev] if self.data.files is not None else []
        return super().input_paths() + [Path(path) for path in files if path is not None]


class Execution(Strict):
    """How a causal LM is held while it is pruned and evaluated: whole in memory, or streamed block by block from its
    safetensors shards (`inc_plugins.prune_checkpoint`; never the whole model in memory; the pruned checkpoint is
    written shard by shard; calibration activations past the budget kept on disk). Either way the weights keep the
    dtype they are stored in, except in memory when a stage takes gradients (mask_search, training, retraining):
    then float32. `auto` streams when the model in memory would not fit `memory_budget` (default: the memory
    available when the run starts)."""

    mode: Literal["auto", "in_memory", "streaming"] = "auto"
    memory_budget: ByteSize | None = Field(None, description="e.g. '4GiB', '6GB'; streaming refuses a budget smaller "
                                                             "than what it holds at once")


class CausalLMRecipe(_TransformersRecipe):
    """Perplexity of a decoder on a `corpus`, calibrated on another text."""

    task: Literal["causal_lm"]
    corpus: Corpus = Field(default_factory=Corpus)
    execution: Execution = Field(default_factory=Execution)

    @model_validator(mode="after")
    def _streaming_limits(self):
        refused = self.streaming_refusals() if self.execution.mode == "streaming" else []
        if refused:
            raise ValueError(f"execution.mode 'streaming' never holds the whole model, so it cannot run: "
                             f"{'; '.join(refused)}")
        return self

    @model_validator(mode="after")
    def _compensated_biases_need_slimming(self):
        """Bias compensation (flap's default, mask_search's option) adds biases to Llama-like o_proj / down_proj,
        which the dense model's config cannot describe: only a slimmed model records them, so plain from_pretrained
        would drop them from a masked one."""
        compensated = [(index, stage.pruning_type) for index, stage in enumerate(self.pruning)
                       if (stage.pruning_type == "flap" and stage.bias_compensation is not False)
                       or (stage.pruning_type == "mask_search" and stage.bias_compensation)]
        if compensated and not self.slim:
            index, pruning_type = compensated[0]
            raise ValueError(f"pruning stage {index} ({pruning_type}) compensates biases that only a slimmed decoder "
                             f"can save: set slim: true, or bias_compensation: false in the stage")
        return self

    def takes_gradients(self) -> bool:
        """Whether a stage differentiates the model (mask_search's Fisher and tuning, training-aware types,
        retrain_steps): the model in memory is then float32, whatever dtype its weights are stored in."""
        return any(stage.pruning_type == "mask_search" or stage.training_steps or stage.retrain_steps
                   for stage in self.pruning)

    def streaming_refusals(self) -> list[str]:
        """What in this recipe a streamed model cannot run (empty: it can stream)."""
        return [what for what, present in (
            ("model.hub_id (stream a local directory or asset)", self.model.hub_id is not None),
            ("benchmark", self.benchmark is not None), ("slim: true", self.slim), ("export", self.export is not None),
            ("quantize", self.quantize is not None),
            *((f"pruning stage {i} ({stage.pruning_type}): streaming runs "
               f"{', '.join(one_shot.streaming_types())}", stage.pruning_type not in one_shot.streaming_types())
              for i, stage in enumerate(self.pruning)),
            *((f"pruning stage {i}: retrain_steps", bool(stage.retrain_steps)) for i, stage in enumerate(self.pruning)),
        ) if present]

    def input_paths(self) -> list[Path]:
        files = [self.corpus.calibration.file, self.corpus.evaluation.file]
        return super().input_paths() + [Path(path) for path in files if path is not None]


# --- image classification: the small digits networks and the classic methods ----------------------------------


class ImageModel(Strict):
    architecture: Literal["digits_cnn", "digits_mlp"]
    # default: (32, 64, 128) / (300, 100); 4096 channels or neurons is far beyond what 8x8 digits need
    widths: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(max_length=8)] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _widths_fit(self):
        expected = 3 if self.architecture == "digits_cnn" else 2
        if self.widths is not None and len(self.widths) != expected:
            raise ValueError(f"{self.architecture} takes {expected} widths, got {len(self.widths)}")
        return self


class ImageData(Strict):
    """scikit-learn's digits (1,797 8x8 images, 10 classes), split by class into train, validation and test."""

    dataset: Literal["digits"] = "digits"
    seed: Seed = 0
    test_fraction: Fraction = 0.2
    val_fraction: Fraction = 0.2

    @model_validator(mode="after")
    def _leaves_training_images(self):
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must be < 1 (the rest are the training images)")
        return self


class Training(Strict):
    """Adam (or SGD with momentum 0.9) with a cosine-decayed learning rate over `epochs` shuffled passes."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 30  # 1000 epochs of digits is hours on 2 cores
    batch_size: BatchSize = 64
    learning_rate: LearningRate = 2e-3
    # decay of 1 or more per step shrinks every weight to nothing (or, with Adam, to NaN)
    weight_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: Seed = 0


class SlimmingStage(Strict):
    """Network slimming (Liu et al. 2017): `l1` is the BatchNorm-scale penalty of the training before pruning
    (`train`), so this stage comes first; `target_sparsity` is the fraction of the channels removed."""

    pruning_type: Literal["network_slimming"]
    target_sparsity: Fraction
    pattern: Literal["1xchannel"] = "1xchannel"
    pruning_scope: Literal["global", "local"] = "global"
    l1: Annotated[float, Field(gt=0, le=10)] = 1e-2
    retrain: Training = Field(default_factory=Training)


class TrimmingStage(Strict):
    """Network trimming (Hu et al. 2016), one prune / retrain iteration: `target_sparsity` is the fraction of the
    original hidden neurons or channels removed once this stage is done (several stages are the paper's
    iterations, as in the text recipes)."""

    pruning_type: Literal["network_trimming"]
    target_sparsity: Fraction
    pattern: Literal["1xchannel"] = "1xchannel"
    apoz_threshold: Annotated[float, Field(ge=0, le=1e6)] | None = None
    retrain: Training = Field(default_factory=Training)


class LotteryStage(Strict):
    """Lottery tickets (Frankle and Carbin 2019): rounds of magnitude pruning with rewinding, trained from the
    initial weights each round, with the random re-initialisation control; the only stage of its recipe."""

    pruning_type: Literal["lottery_ticket"]
    prune_fraction: Fraction = 0.2
    rounds: Annotated[int, Field(ge=1, le=100)] = 10  # each round trains the network twice (ticket and control)
    rewind_to: Annotated[str, Field(pattern=r"^(init|step:[1-9][0-9]{0,6})$")] = "init"
    scope: Literal["layer", "global"] = "layer"
    output_layer_rate: Fraction | None = None


class ParticleFilterStage(Strict):
    """Particle-filter structured pruning (Anwar et al. 2017) of the convolutions, then retraining."""

    pruning_type: Literal["particle_filter"]
    target_sparsity: Fraction
    granularity: Literal["channel", "kernel", "intra_kernel"] = "channel"
    # each particle of each iteration is one evaluation of the network on the validation images
    num_particles: Annotated[int, Field(ge=1, le=10_000)] = 16
    iterations: Annotated[int, Field(ge=1, le=10_000)] = 6
    stride: Annotated[int, Field(ge=2, le=64)] = 2
    seed: Seed = 0
    retrain: Training = Field(default_factory=Training)


ImageStage = Annotated[SlimmingStage | TrimmingStage | LotteryStage | ParticleFilterStage,
                       Field(discriminator="pruning_type")]


class ImageClassificationRecipe(Strict):
    """A small network trained from scratch on the digits (`train`), pruned by the classic methods' stages,
    accuracy on the test images."""

    name: RecipeName
    description: Description = ""
    task: Literal["image_classification"]
    model: ImageModel
    data: ImageData = Field(default_factory=ImageData)
    train: Training = Field(default_factory=Training)
    pruning: Annotated[list[ImageStage], Field(min_length=1, max_length=100)]
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _stages_fit(self):
        types = [stage.pruning_type for stage in self.pruning]
        convolutional = ("network_slimming", "particle_filter")
        if self.model.architecture != "digits_cnn" and any(t in convolutional for t in types):
            raise ValueError(f"{[t for t in types if t in convolutional][0]} prunes convolution channels or kernels: "
                             f"use architecture digits_cnn")
        if "network_slimming" in types[1:]:
            raise ValueError("network_slimming shapes the training before pruning (its l1): make it the first stage")
        if "lottery_ticket" in types and len(types) > 1:
            raise ValueError("lottery_ticket trains from the initial weights in every round: it is a recipe's only "
                             "stage")
        cumulative = [stage.target_sparsity for stage in self.pruning if stage.pruning_type == "network_trimming"]
        if any(later <= earlier for earlier, later in zip(cumulative, cumulative[1:])):
            raise ValueError(f"network_trimming target_sparsity counts from the original network, so successive "
                             f"stages must increase it; got {cumulative}")
        return self

    def input_paths(self) -> list[Path]:
        return []  # the digits ship inside scikit-learn


Recipe = TextClassificationRecipe | CausalLMRecipe | ImageClassificationRecipe
RECIPE_TYPES: dict[str, type[Strict]] = {
    "text_classification": TextClassificationRecipe,
    "causal_lm": CausalLMRecipe,
    "image_classification": ImageClassificationRecipe,
}
DEFAULT_TASK = "text_classification"


def parse_recipe(data: typing.Any, source: str = "recipe") -> Recipe:
    """The recipe of the model its `task` names (default text_classification); RecipeError names every bad key, what
    was given and what is allowed."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    task = data.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or task not in RECIPE_TYPES:
        close = difflib.get_close_matches(str(task), RECIPE_TYPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{source}: unknown task {short_repr(task)}.{hint} Allowed: {', '.join(RECIPE_TYPES)}")
    model = RECIPE_TYPES[task]
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, model, source, "recipe") from None


def recipe_json_schema() -> dict:
    """The JSON Schema of every recipe: one of the task's recipe models."""
    return TypeAdapter(Recipe).json_schema()


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

    if isinstance(recipe, _TransformersRecipe):
        recipe.model.path = under_base(recipe.model.path)
        for stage in recipe.pruning:
            if stage.latency_table is not None:
                stage.latency_table = str(under_base(stage.latency_table))
    if isinstance(recipe, TextClassificationRecipe) and recipe.data.files is not None:
        recipe.data.files.train = under_base(recipe.data.files.train)
        recipe.data.files.dev = under_base(recipe.data.files.dev)
    if isinstance(recipe, CausalLMRecipe):
        for text in (recipe.corpus.calibration, recipe.corpus.evaluation):
            text.file = under_base(text.file)
    if "output" in recipe.model_fields_set and "dir" in recipe.output.model_fields_set:
        recipe.output.dir = under_base(recipe.output.dir)
    return recipe


def load_recipe(name: str | Path) -> Recipe:
    """Reads (plain data only, within the limits of recipe_yaml), validates, and resolves paths relative to the
    recipe file."""
    path = resolve_recipe_path(name)
    try:
        data = load_recipe_yaml(path)
    except RecipeYAMLError as err:
        raise RecipeError(str(err)) from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
    return resolve_relative_paths(parse_recipe(data, source=str(path)), path.resolve().parent)
