"""Pre-flight: every input a recipe names is checked before the first stage runs, without loading a model.

    from recipes.preflight import check_inputs
    check_inputs(recipe)   # RecipeError, one line naming the file at fault

What is checked:
- model: an offline asset is present and matches its pinned sha256 (else the fetch command is named); a
  `model.path` directory has a readable config.json with a known `model_type`, intact weights (safetensors headers
  against the file size, every shard of a sharded index, a torch.save archive's directory) and tokenizer files.
  A hub model is left to `recipes.hub_access`.
- text classification data: local files (CSV/TSV/JSON/JSONL) are read in full: missing, a directory, unreadable,
  not UTF-8 (with the byte offset), empty, a missing column or a label outside [0, num_labels) is an error naming
  the file, line and row; a dev_size that leaves no training examples too. Hub datasets are left to hub_access.
- causal-LM corpus: each `file` exists and is non-empty UTF-8; each asset is present and verified.
- mask_search latency tables: the file exists and is a latency table.

What needs the model (the tokenizer's vocabulary, whether a corpus has enough tokens, pattern shapes) is checked
when it is loaded (`recipes.model_sources`, `recipes.tasks`).
"""

from pathlib import Path

from inc_plugins.assets import AssetError, asset_path
from inc_plugins.latency_table import load_latency_table

from .input_checks import check_model_dir, read_json_file, read_text_file
from .model_sources import GGUF_FILES
from .schema import Corpus, ImageClassificationRecipe, Recipe, RecipeError
from .tasks import classification_examples
from .text_corpora import corpus_file_text


def _asset_dir(name: str) -> Path:
    try:
        return asset_path(name)
    except AssetError as err:
        raise RecipeError(str(err)) from None


def check_model(recipe: Recipe) -> None:
    source = recipe.model
    if source.path is not None:
        check_model_dir(source.path, "model.path", needs_tokenizer=True)
    elif source.asset is not None:
        directory = _asset_dir(source.asset)
        if recipe.task == "causal_lm":
            if source.asset not in GGUF_FILES:
                raise RecipeError(f"model.asset {source.asset!r}: no causal-LM loader for it; causal-LM assets: "
                                  f"{', '.join(GGUF_FILES)}")
            gguf = directory / GGUF_FILES[source.asset]
            with open(gguf, "rb") as handle:
                if handle.read(4) != b"GGUF":
                    raise RecipeError(f"model file {str(gguf)!r} is not a GGUF file")
        elif source.asset in GGUF_FILES:
            raise RecipeError(f"model.asset {source.asset!r} is a causal language model: use it with task: causal_lm")
        else:
            check_model_dir(directory, f"model.asset {source.asset!r}", needs_tokenizer=True)


def check_corpus(corpus: Corpus) -> None:
    for key in ("calibration", "evaluation"):
        source = getattr(corpus, key)
        if source.file is not None:
            try:
                corpus_file_text(source.file)
            except RecipeError as err:
                raise RecipeError(f"corpus.{key}: {err}") from None
        else:
            _asset_dir(source.asset)


def check_latency_tables(recipe: Recipe) -> None:
    for index, stage in enumerate(recipe.pruning):
        if getattr(stage, "latency_table", None) is None:
            continue
        path = Path(stage.latency_table)
        where = f"pruning stage {index} ({stage.pruning_type}): latency_table"
        try:
            read_text_file(path, "latency table")
            read_json_file(path, "latency table")
            load_latency_table(path)
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
        except (OSError, ValueError, TypeError) as err:
            detail = " ".join(str(err).split())
            named = detail if str(path) in detail else f"{str(path)!r}: {detail}"
            raise RecipeError(f"{where}: {named} (write one with python -m inc_plugins.latency_table)") from None


def check_inputs(recipe):
    """Runs every check that needs no model load; raises RecipeError (one line, naming the file) at the first
    problem. Recipes of other kinds (the digits recipes read scikit-learn's bundled data) have nothing to check.

    Returns the (train, dev, note) examples of a text-classification recipe with local data, read and validated in
    full here, so the run uses them instead of reading the files again; else None."""
    if isinstance(recipe, ImageClassificationRecipe):
        return None
    check_model(recipe)
    examples = None
    if recipe.task == "causal_lm":
        check_corpus(recipe.corpus)
    elif recipe.data.hub is None:
        examples = classification_examples(recipe)  # every row parsed and validated; the hub is never contacted
    check_latency_tables(recipe)
    return examples
