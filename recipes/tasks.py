"""What a recipe's task means for each step of a run: loading the model and data, calibration and training
batches, evaluation, and how the pruned model is saved and loaded again.

Every task class takes the recipe and offers the same methods; `apply.run` only talks to this interface.
`TASKS` maps the recipe's `task:` value to its class.
"""

import dataclasses
import random
import shutil
from pathlib import Path

import torch

import inc_plugins
from inc_plugins.execution.distributed import gathered_in_rank_order, is_writer, rank, rank_shard, world_size
from inc_plugins.execution.streamed_model import loading_each_block
from inc_plugins.models.batch_inputs import named_batch_tensors
from inc_plugins.inc.checkpoint_pruning import partial_output
from inc_plugins.finite_checks import check_metric
from inc_plugins.models.saving import save_slimmed
from inc_plugins.post_training.data import average_sequence_length

from . import finetune_cache
from .model_sources import GGUF_FILES, load_causal_lm, load_classifier, load_local_causal_lm, local_checkpoint
from .movie_snippets import load_examples, train_dev_split
from .perplexity import perplexity
from .streaming_choice import StreamedCheckpoint, open_streamed, streams
from .image_classification import ImageClassificationTask
from .pruning_stage import (StageOutcome, calibration_inputs, prune_checkpoint_stage, prune_with_batches,
                            run_pruning_stage)
from .report import parameter_counts
from .schema import CausalLMRecipe, PruningStage, Quantize, RecipeError, TextClassificationRecipe, TextSource
from .shape_checks import check_pattern_fits
from .tabular_data import file_examples, hub_examples
from .text_classification import epochs_to_steps, evaluate, evaluated_model, tokenized_batches, train
from .text_corpora import corpus_file_text, moby_dick_text, sotu_text, text_token_ids, token_windows, windows_of

# a slimmed model's type is registered with transformers' Auto classes by `import inc_plugins`
LOAD_SLIMMED = "import inc_plugins; model = {auto}.from_pretrained({path!r})"
MOVIE_SNIPPETS_NOTE = "movie-snippet sentiment (SST-2-like), not the official SST-2 labels or split"


def classification_examples(recipe: TextClassificationRecipe):
    """(train, dev) examples of the recipe's data, and a note on what they are."""
    data, num_labels = recipe.data, recipe.model.num_labels
    if data.asset == "movie-snippets":
        train_examples, dev_examples = _split(load_examples(), data, "the movie-snippets asset")
        note = MOVIE_SNIPPETS_NOTE
    else:
        if data.files is not None:
            train_examples, dev_examples = file_examples(data, num_labels)
            note = f"local files {data.files.train}" + (f", {data.files.dev}" if data.files.dev else "")
        else:
            train_examples, dev_examples = hub_examples(data, num_labels)
            note = f"hub dataset {data.hub.name}" + (f"/{data.hub.config}" if data.hub.config else "")
        if dev_examples is None:
            train_examples, dev_examples = _split(train_examples, data, note)
        dev_examples = dev_examples[: data.dev_size]
    if data.max_train_samples is not None:
        train_examples = train_examples[: data.max_train_samples]
    return train_examples, dev_examples, note


def _split(examples, data, what: str):
    try:
        return train_dev_split(examples, data.dev_size, data.seed)
    except ValueError as err:
        raise RecipeError(f"data.dev_size: {err} in {what}; lower dev_size or add a dev file") from None


class _TransformersTask:
    """What the text tasks share: pattern checks against the model's layers, and parameter counts.

    `work_dir`: where the task may keep intermediate files (the run's staging directory, set by `apply.run`)."""

    work_dir: Path | None = None

    def check_stage(self, model: torch.nn.Module, stage: PruningStage, where: str) -> None:
        check_pattern_fits(model, stage, where)

    def size(self, model: torch.nn.Module) -> dict:
        return parameter_counts(model)


class TextClassificationTask(_TransformersTask):
    """Single-sentence or sentence-pair classification; accuracy and F1 on the dev set."""

    evaluated_on = "dev"

    def __init__(self, recipe: TextClassificationRecipe, examples: tuple | None = None):
        self.recipe = recipe
        self._read_examples = examples  # (train, dev, note) that the pre-flight check already read, or None

    def load(self, timer) -> torch.nn.Module:
        """Loads the model and data, and fine-tunes when the recipe says so (cached by content hash)."""
        recipe = self.recipe
        with timer("load"):
            # the fine-tune's seed also draws the new head, so the cached fine-tune is a function of the recipe
            head_seed = recipe.finetune.seed if recipe.finetune is not None else 0
            self.model, self.tokenizer = load_classifier(recipe.model, head_seed)
            self.train_examples, self.dev_examples, self.data_note = (self._read_examples
                                                                      or classification_examples(recipe))
        self.finetune_info = None
        if recipe.finetune is not None:
            self.model, self.tokenizer, self.finetune_info = self._finetuned(timer)
        self.dev_batches = tokenized_batches(self.tokenizer, self.dev_examples, recipe.evaluation.batch_size,
                                             recipe.data.max_length)
        return self.model

    def _finetuned(self, timer):
        recipe = self.recipe
        key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
        cached = finetune_cache.load_cached(key)
        if cached is not None:
            print(f"  reusing cached fine-tuned model {finetune_cache.cached_dir(key)}")
            model, tokenizer, info = cached
            return model, tokenizer, {**info, "cached": True}
        with timer("finetune"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.finetune.seed)  # dropout masks
            batches = tokenized_batches(self.tokenizer, self.train_examples, recipe.finetune.batch_size,
                                        recipe.data.max_length, shuffle_seed=recipe.finetune.seed)
            steps = epochs_to_steps(recipe.finetune.epochs, len(batches))
            losses = train(self.model, batches, steps, recipe.finetune.learning_rate, desc="fine-tune")
        info = {"key": key, "steps": steps, "final_loss": losses[-1], "seconds": timer.seconds["finetune"]}
        finetune_cache.store(key, self.model, self.tokenizer, info)
        return self.model, self.tokenizer, {**info, "cached": False}

    def prune(self, model: torch.nn.Module, stage: PruningStage) -> tuple[torch.nn.Module, StageOutcome]:
        """Prunes in place; returns the model, what the report says about the stage, and the pruner's result."""
        return model, run_pruning_stage(model, stage, self.tokenizer, self.train_examples,
                                        self.recipe.data.max_length)

    def evaluate(self, model: torch.nn.Module, desc: str) -> dict:
        return evaluate(model, self.dev_batches, desc=desc)

    def probe_batch(self) -> dict:
        return self.dev_batches[0]

    def export_example(self) -> dict:
        """Two rows of model inputs for a dynamic export (torch.export fixes a dimension of size 1)."""
        return {name: tensor[:1].repeat(2, 1) for name, tensor in self.dev_batches[0].items() if name != "labels"}

    def calibration_inputs(self, settings: Quantize) -> list[dict]:
        """Model-input batches of `settings.calibration_samples` training examples drawn with `settings.seed`."""
        return calibration_inputs(settings, self.tokenizer, self.train_examples, self.recipe.data.max_length)

    def macs_seq_len(self) -> int:
        return average_sequence_length(self.dev_batches)

    def describe_data(self) -> dict:
        return {"train_examples": len(self.train_examples), "dev_examples": len(self.dev_examples),
                "sentence_pairs": self.recipe.data.text_pair_column is not None, "note": self.data_note}

    def save(self, model: torch.nn.Module, directory: Path, slimmed: bool, final: Path) -> str:
        """Saves into `directory`; returns the Python line that loads it from `final`."""
        if slimmed:
            save_slimmed(model, directory)
        else:
            model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if slimmed:
            return LOAD_SLIMMED.format(auto="AutoModelForSequenceClassification", path=str(final))
        return f"AutoModelForSequenceClassification.from_pretrained({str(final)!r})"


def corpus_text(source: TextSource) -> str:
    if source.file is not None:
        return corpus_file_text(source.file)
    return {"sotu": sotu_text, "moby-dick": moby_dick_text}[source.asset]()


class CausalLMTask(_TransformersTask):
    """Causal language modelling: calibration on random windows of one text, perplexity on another."""

    evaluated_on = "evaluation text"

    def __init__(self, recipe: CausalLMRecipe):
        self.recipe = recipe
        self.streamed: StreamedCheckpoint | None = None  # the checkpoint the model streams from, when it does

    def load(self, timer) -> torch.nn.Module:
        source, corpus = self.recipe.model, self.recipe.corpus
        with timer("load"):
            if streams(self.recipe):
                directory, self.tokenizer = local_checkpoint(source)
                model, self.streamed = open_streamed(directory, self.recipe.execution)
            elif source.asset is not None:
                model, self.tokenizer = load_causal_lm(source.asset)
            else:
                model, self.tokenizer = load_local_causal_lm(source, float32=self.recipe.takes_gradients())
            try:
                # encoded once: every stage samples its windows from it
                self.calibration_ids = text_token_ids(self.tokenizer, corpus_text(corpus.calibration))
                self.evaluation_windows = token_windows(self.tokenizer, corpus_text(corpus.evaluation),
                                                        corpus.evaluation_windows, corpus.evaluation_seq_len)
            except ValueError as err:
                raise RecipeError(f"corpus: {err}") from None
        self.finetune_info = None
        self.in_memory_dtype = str(model.dtype).removeprefix("torch.")  # (a streamed model's: self.streamed.dtype)
        return model

    def _windows(self, stage: PruningStage | Quantize) -> torch.Tensor:
        """`stage.calibration_samples` windows of the calibration text, drawn with `stage.seed`."""
        try:
            return windows_of(self.calibration_ids, stage.calibration_samples, self.recipe.corpus.calibration_seq_len,
                              seed=stage.seed)
        except ValueError as err:
            raise RecipeError(f"corpus.calibration: {err}") from None

    def prune(self, model: torch.nn.Module, stage: PruningStage) -> tuple[torch.nn.Module, StageOutcome]:
        """One-shot types calibrate on the stage's windows; training (or fine-tuning after a one-shot type) is
        next-token prediction on the same windows, shuffled with the stage's seed. Prunes in place."""
        windows = self._windows(stage)
        order = list(range(len(windows)))
        random.Random(stage.seed).shuffle(order)
        training = [{"input_ids": windows[order[i : i + stage.batch_size]], "labels": windows[order[i : i + stage.batch_size]]}
                    for i in range(0, len(order), stage.batch_size)]
        if inc_plugins.is_one_shot(stage.pruning_type):
            # under torchrun each rank calibrates on its share of the batches (statistics combined across ranks);
            # mask_search's Fisher pass differentiates the next-token loss, so its batches carry labels
            batches = [windows[i : i + stage.batch_size] for i in range(0, len(windows), stage.batch_size)]
            calibration = rank_shard([{"input_ids": batch, "labels": batch} if stage.pruning_type == "mask_search"
                                      else (batch,) for batch in batches])
            if self.streamed is not None:  # from the current checkpoint into the next, one block at a time
                previous = self.streamed
                if not previous.directory.is_dir():  # a later stage, on a machine without rank 0's staging directory
                    raise RecipeError(f"rank {rank()} cannot read {str(previous.directory)!r}, the checkpoint rank 0 "
                                      f"wrote: under torchrun across machines, a streamed recipe of several stages "
                                      f"needs its run directory on a filesystem every rank sees")
                # into the run's staging directory, rank 0's, which the next stage reads on every rank (a partial
                # checkpoint there was carried over from an interrupted run by `apply --resume`)
                output = self.work_dir / f"streamed_stage_{previous.stages}"
                output, resume = gathered_in_rank_order((output, partial_output(output).is_dir()))[0]
                # the opened model, not its directory, so its weights outside the blocks are not held twice (a rank
                # other than 0 opens no later checkpoint: its model is the source's)
                source = model if is_writer() or not previous.stages else previous.directory
                outcome = prune_checkpoint_stage(source, output, stage, calibration, len(windows), previous.budget,
                                                 resume)
                if not is_writer():  # rank 0 evaluates; the other ranks only prune the next stage from `output`
                    self.streamed = dataclasses.replace(previous, directory=output, stages=previous.stages + 1)
                    return model, outcome
                model, self.streamed = open_streamed(output, self.recipe.execution, previous.stages + 1)
                if previous.stages:  # an earlier stage's checkpoint: superseded (every rank is past it:
                    shutil.rmtree(previous.directory)  # prune_checkpoint returns once all ranks are done)
                return model, outcome
            outcome = prune_with_batches(model, stage, calibration=calibration, n_calibration=len(windows),
                                         training=training)
            if world_size() > 1:
                outcome.report.update(world_size=world_size(), samples_per_rank=gathered_in_rank_order(
                    sum(next(named_batch_tensors(batch))[1].shape[0] for batch in calibration)))
            return model, outcome
        return model, prune_with_batches(model, stage, training=training)

    def evaluate(self, model: torch.nn.Module, desc: str) -> dict:
        windows = self.evaluation_windows
        with loading_each_block(model):  # a streamed model's blocks are read as each forward pass reaches them
            value = perplexity(model, windows, batch_size=self.recipe.evaluation.batch_size)
        check_metric(model, "perplexity", value, evaluated_model(desc))  # NaN/Inf: stop, naming the first bad weight
        return {"perplexity": value, "windows": len(windows), "tokens_per_window": windows.shape[1]}

    def probe_batch(self) -> dict:
        return {"input_ids": self.evaluation_windows[:1]}

    def export_example(self) -> dict:
        """Two rows of model inputs for a dynamic export (torch.export fixes a dimension of size 1); the IR takes an
        attention mask, so a user can run padded batches."""
        input_ids = self.evaluation_windows[:1].repeat(2, 1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def calibration_inputs(self, settings: Quantize) -> list[dict]:
        """Model-input batches of `settings.calibration_samples` windows of the calibration text drawn with
        `settings.seed`, as a pruning stage draws its own."""
        windows = self._windows(settings)
        return [{"input_ids": batch, "attention_mask": torch.ones_like(batch)}
                for batch in windows.split(settings.batch_size)]

    def macs_seq_len(self) -> int:
        return self.recipe.corpus.evaluation_seq_len

    def describe_data(self) -> dict:
        corpus = self.recipe.corpus
        name = lambda source: source.asset or str(source.file)  # noqa: E731
        return {"calibration_text": name(corpus.calibration), "evaluation_text": name(corpus.evaluation),
                "evaluation_windows": corpus.evaluation_windows, "evaluation_seq_len": corpus.evaluation_seq_len,
                "calibration_seq_len": corpus.calibration_seq_len,
                "execution": self.streamed.describe() if self.streamed is not None else {
                    "mode": "in_memory", "dtype": self.in_memory_dtype}}

    def save(self, model: torch.nn.Module, directory: Path, slimmed: bool, final: Path) -> str:
        if self.streamed is not None:  # the last stage wrote the pruned checkpoint already: it becomes the model
            self.streamed.directory.rename(directory)
            load = f"AutoModelForCausalLM.from_pretrained({str(final)!r})"
        elif slimmed:
            save_slimmed(model, directory)
            load = LOAD_SLIMMED.format(auto="AutoModelForCausalLM", path=str(final))
        else:
            model.save_pretrained(directory, safe_serialization=True)
            load = f"AutoModelForCausalLM.from_pretrained({str(final)!r})"
        asset = self.recipe.model.asset
        if asset in GGUF_FILES:
            # a GGUF tokenizer saved with save_pretrained maps spaces to <|endoftext|> when reloaded: not saved
            return (f"{load}; tokenizer = AutoTokenizer.from_pretrained(inc_plugins.assets.asset_path({asset!r}), "
                    f"gguf_file={GGUF_FILES[asset]!r})")
        if self.streamed is None:  # (a streamed checkpoint carries its source's tokenizer files)
            self.tokenizer.save_pretrained(directory)
        return load


TASKS = {"text_classification": TextClassificationTask, "causal_lm": CausalLMTask,
         "image_classification": ImageClassificationTask}


def task_for(recipe, examples: tuple | None = None):
    """The task object of a recipe: `load`, `check_stage`, `evaluate`, `prune`, `size`, `describe_data`, `save`.
    `examples`: the text-classification examples `preflight.check_inputs` already read."""
    if examples is not None:
        return TextClassificationTask(recipe, examples)
    return TASKS[recipe.task](recipe)
