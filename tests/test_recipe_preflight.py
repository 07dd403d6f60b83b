"""Pre-flight checks of the inputs a recipe names (recipes.preflight.check_inputs): every problem is one RecipeError
line that names the file, raised before any model is loaded; and a model directory without tokenizer files never
loads as an empty tokenizer that maps every word to [UNK]."""

import contextlib
import csv
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from inc_plugins import assets
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm
from tests.fixtures.tiny_tokenizer import SPECIAL, WORDS, save_tiny_classifier, tiny_tokenizer
from recipes import model_sources, tasks
from recipes.input_checks import check_model_dir, check_tokenizer, read_text_file
from recipes.model_sources import load_classifier
from recipes.preflight import check_inputs, check_latency_tables
from recipes.schema import ModelSource, RecipeError, parse_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def fails_naming(path, match: str, call, *args):
    """Calls `call(*args)`; it must raise RecipeError, in one line, naming `path` and matching `match`."""
    with pytest.raises(RecipeError, match=match) as caught:
        call(*args)
    message = str(caught.value)
    assert str(path) in message, message
    assert "\n" not in message, message
    return message


def no_timer(name):
    return contextlib.nullcontext()


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_classifier(tmp_path / "tiny-bert")


def remove_tokenizer_files(directory: Path) -> Path:
    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    return directory


def write_csv(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(n=6):
    return [{"text": f"{WORDS[i % len(WORDS)]} film", "label": i % 2} for i in range(n)]


def classification_recipe(model_dir, train, dev=None, **data):
    files = {"train": str(train), **({"dev": str(dev)} if dev is not None else {})}
    return parse_recipe({
        "name": "preflight", "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"files": files, "dev_size": 2, **data},
        "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["bert.encoder"]}],
    })


@pytest.fixture
def files_recipe(tmp_path, model_dir):
    """A valid recipe over local CSV files; tests break one input at a time."""
    train, dev = write_csv(tmp_path / "train.csv", rows(8)), write_csv(tmp_path / "dev.csv", rows(4))
    return lambda **changes: classification_recipe(changes.pop("model", model_dir), changes.pop("train", train),
                                                   changes.pop("dev", dev), **changes)


# --------------------------------------------------------------------------------------------------- complete inputs


def test_a_complete_model_directory_and_data_pass(files_recipe, model_dir):
    check_model_dir(model_dir)
    check_inputs(files_recipe())


def test_a_sharded_model_directory_passes_and_a_missing_shard_is_named(tmp_path):
    directory = tmp_path / "sharded"
    tiny_bert_classifier().save_pretrained(directory, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(directory)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    check_model_dir(directory)
    shards[1].unlink()
    message = fails_naming(directory / "model.safetensors.index.json", "names shard .* which is missing",
                           check_model_dir, directory)
    assert shards[1].name in message


def test_a_causal_lm_recipe_with_local_files_passes(tmp_path):
    directory = tmp_path / "tiny-llama"
    tiny_llama_lm().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(0).choices(WORDS, k=200)))
    check_inputs(lm_recipe(directory, text, text))


def lm_recipe(model_dir, calibration, evaluation):
    return parse_recipe({
        "name": "lm", "task": "causal_lm", "model": {"path": str(model_dir)},
        "corpus": {"calibration": {"file": str(calibration)}, "evaluation": {"file": str(evaluation)},
                   "calibration_seq_len": 16, "evaluation_seq_len": 16, "evaluation_windows": 2},
        "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["model.layers"]}],
    })


# ------------------------------------------------------------------------------------------------- model directory


def test_a_missing_model_directory_is_named(files_recipe, tmp_path):
    missing = tmp_path / "no-such-model"
    fails_naming(missing, "model.path .* does not exist", check_inputs, files_recipe(model=missing))


def test_a_file_given_as_model_directory_is_named(files_recipe, tmp_path):
    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    fails_naming(a_file, "is a file, not a model directory", check_inputs, files_recipe(model=a_file))


def test_config_json_missing_unreadable_or_without_model_type_is_named(files_recipe, model_dir):
    config = model_dir / "config.json"
    original = config.read_text()
    config.write_text(original[:40])
    fails_naming(config, "model config .* is not valid JSON", check_inputs, files_recipe())
    config.write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "model_type"}))
    fails_naming(config, "has no 'model_type'", check_inputs, files_recipe())
    config.write_text(json.dumps({**json.loads(original), "model_type": "my_own_bert"}))
    fails_naming(config, "model_type 'my_own_bert' is not an architecture", check_inputs, files_recipe())
    config.unlink()
    fails_naming(model_dir, r"not a model directory \(no config.json in it\)", check_inputs, files_recipe())


def test_a_directory_without_weights_is_named(files_recipe, model_dir):
    (model_dir / "model.safetensors").unlink()
    fails_naming(model_dir, "has no weights: expected model.safetensors", check_inputs, files_recipe())
    (model_dir / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(60))
    fails_naming(model_dir, "holds model.Q4_1.gguf, but a GGUF file is only read through model.asset",
                 check_inputs, files_recipe())


@pytest.mark.parametrize("cut", [1, 5, 4096])
def test_a_truncated_safetensors_file_is_named_before_loading(files_recipe, model_dir, cut):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-cut])
    message = fails_naming(weights, "is truncated", check_inputs, files_recipe())
    assert f"{cut} missing" in message


@pytest.mark.parametrize("keep", [0, 5, 100])
def test_a_safetensors_file_cut_inside_its_header_is_named(model_dir, keep):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    fails_naming(weights, "truncated", check_model_dir, model_dir)


def test_a_damaged_safetensors_header_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    original = weights.read_bytes()
    assert original[8:9] == b"{"
    weights.write_bytes(original[:8] + b"]" + original[9:])  # the header's opening brace
    fails_naming(weights, "header is not valid JSON", check_model_dir, model_dir)
    weights.write_bytes(original + b"tail")
    fails_naming(weights, "4 bytes follow the last tensor's data", check_model_dir, model_dir)


def test_a_truncated_pytorch_model_bin_is_named(model_dir):
    (model_dir / "model.safetensors").unlink()
    weights = model_dir / "pytorch_model.bin"
    torch.save(tiny_bert_classifier().state_dict(), weights)
    check_model_dir(model_dir)
    weights.write_bytes(weights.read_bytes()[:-100])
    fails_naming(weights, "is truncated or damaged", check_model_dir, model_dir)


def test_a_directory_without_tokenizer_files_is_named(files_recipe, model_dir):
    remove_tokenizer_files(model_dir)
    fails_naming(model_dir, r"has no tokenizer files: .*\[UNK\]; allowed: tokenizer.json", check_inputs, files_recipe())
    (model_dir / "tokenizer_config.json").write_text("{}")  # settings alone are no vocabulary
    fails_naming(model_dir, r"has no tokenizer files \(only tokenizer_config.json\)", check_inputs, files_recipe())


def test_a_damaged_tokenizer_json_is_named(model_dir):
    tokenizer_json = model_dir / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text()[:100])
    fails_naming(tokenizer_json, "tokenizer file .* is not valid JSON", check_model_dir, model_dir)


# --------------------------------------------------------------------------------------- the real loaders, no [UNK] run


def test_the_classifier_loader_refuses_a_directory_without_tokenizer_files(model_dir):
    remove_tokenizer_files(model_dir)
    fails_naming(model_dir, r"no tokenizer files: transformers would build an empty tokenizer that maps every word "
                            r"to \[UNK\]", load_classifier, ModelSource(path=model_dir))


def test_a_loaded_tokenizer_without_a_vocabulary_is_an_error(model_dir):
    """vocab.txt passes the file check but holds only the special tokens: the loaded tokenizer maps every word to
    [UNK], and the loader stops there instead of calibrating and evaluating on [UNK]s."""
    remove_tokenizer_files(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(SPECIAL) + "\n")
    check_model_dir(model_dir)
    fails_naming(model_dir, r"tokenizer from .* maps every word to \[UNK\]: the directory lacks tokenizer files; "
                            r"allowed: ", load_classifier, ModelSource(path=model_dir))


def test_check_tokenizer_accepts_a_real_vocabulary_and_refuses_an_empty_one(model_dir):
    check_tokenizer(tiny_tokenizer(), model_dir)
    from transformers import AutoTokenizer

    remove_tokenizer_files(model_dir)
    empty = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)  # what transformers builds from nothing
    assert len(empty) <= len(SPECIAL)
    fails_naming(model_dir, r"maps every word to \[UNK\]", check_tokenizer, empty, model_dir)


def test_the_causal_lm_task_refuses_a_directory_without_tokenizer_files(tmp_path):
    directory = tmp_path / "tiny-llama"
    tiny_llama_lm().save_pretrained(directory)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(0).choices(WORDS, k=200)))
    recipe = lm_recipe(directory, text, text)
    fails_naming(directory, r"has no tokenizer files", check_inputs, recipe)
    fails_naming(directory, r"has no tokenizer files", tasks.task_for(recipe).load, no_timer)


def test_a_model_load_error_is_one_line_naming_the_weights_file(model_dir, monkeypatch):
    """A damage the header check cannot see still ends as one line naming the file, not a safetensors traceback."""
    def damaged(*args, **kwargs):
        raise model_sources.SafetensorError("Error while deserializing header: invalid offset")

    monkeypatch.setattr(model_sources.AutoModelForSequenceClassification, "from_pretrained", damaged)
    fails_naming(model_dir / "model.safetensors", "cannot load weights file .*: Error while deserializing header",
                 load_classifier, ModelSource(path=model_dir))

    def unreadable(*args, **kwargs):
        raise OSError("Unable to load weights\nfrom a file\n")

    monkeypatch.setattr(model_sources.AutoModelForSequenceClassification, "from_pretrained", unreadable)
    fails_naming(model_dir, "cannot load the model in .*: OSError: Unable to load weights from a file",
                 load_classifier, ModelSource(path=model_dir))


# ------------------------------------------------------------------------------------------------------- data files


def test_a_missing_data_file_or_a_directory_is_named(files_recipe, tmp_path):
    missing = tmp_path / "nope.csv"
    fails_naming(missing, "data file .* does not exist", check_inputs, files_recipe(train=missing))
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    fails_naming(folder, "data file .* is a directory", check_inputs, files_recipe(train=folder))


def test_an_unreadable_data_file_is_named(files_recipe, tmp_path, monkeypatch):
    train = tmp_path / "train.csv"
    real_read_bytes = Path.read_bytes

    def denied(self):
        if self == train:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    fails_naming(train, "data file .* cannot be read: Permission denied", check_inputs, files_recipe())


def test_a_latin1_csv_is_named_with_the_byte_offset(files_recipe, tmp_path):
    train = write_csv(tmp_path / "latin1.csv", [{"text": "good", "label": 1}, {"text": "café", "label": 0}],
                      encoding="latin-1")
    offset = train.read_bytes().index(b"\xe9")
    fails_naming(train, rf"is not UTF-8: byte 0xe9 at byte offset {offset} \(line 3, column 4\)", check_inputs,
                 files_recipe(train=train))


def test_an_empty_or_header_only_data_file_is_named(files_recipe, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails_naming(empty, "data file .* is empty", check_inputs, files_recipe(train=empty))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    fails_naming(header, r"has no examples \(only a header\)", check_inputs, files_recipe(dev=header))


def test_a_missing_column_is_named_with_file_line_and_row(files_recipe, tmp_path):
    train = write_csv(tmp_path / "cols.csv", [{"sentence": "good", "label": 1}])
    fails_naming(train, r"line 2, row 0: no column \['text'\]; columns there: sentence, label", check_inputs,
                 files_recipe(train=train))
    fails_naming(tmp_path / "train.csv", r"line 2, row 0: no column \['review'\]", check_inputs,
                 files_recipe(text_column="review"))


def test_a_label_out_of_range_is_named_with_file_line_and_row(files_recipe, tmp_path):
    dev = write_csv(tmp_path / "labels.csv", [{"text": "good", "label": 1}, {"text": "bad", "label": 2}])
    fails_naming(dev, r"line 3, row 1: label '2' in column 'label' is not an integer in \[0, 2\)", check_inputs,
                 files_recipe(dev=dev))


def test_a_short_csv_row_and_bad_jsonl_line_are_named(files_recipe, tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("text,label\ngood,1\nbad\n")
    fails_naming(short, r"line 3, row 1: 1 field, but the header \(line 1\) has 2: text, label", check_inputs,
                 files_recipe(train=short))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    fails_naming(jsonl, "line 2 is not valid JSON", check_inputs, files_recipe(train=jsonl))
    nulls = tmp_path / "rows.json"
    nulls.write_text('[{"text": null, "label": 1}]')
    fails_naming(nulls, "row 0: column 'text' is empty", check_inputs, files_recipe(train=nulls))


def test_a_byte_order_mark_is_not_part_of_the_first_column(files_recipe, tmp_path):
    train = write_csv(tmp_path / "bom.csv", rows(6), encoding="utf-8-sig")
    check_inputs(files_recipe(train=train))


def test_a_dev_size_that_leaves_no_training_data_names_the_file(model_dir, tmp_path):
    train = write_csv(tmp_path / "small.csv", rows(3))
    fails_naming(train, "dev_size 5 leaves no training data", check_inputs,
                 classification_recipe(model_dir, train, dev_size=5))


# ----------------------------------------------------------------------------------------------------------- corpus


def test_corpus_files_missing_not_utf8_or_empty_are_named(tmp_path):
    directory = tmp_path / "tiny-llama"
    tiny_llama_lm().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    good = tmp_path / "good.txt"
    good.write_text("the film was good " * 20)
    missing = tmp_path / "missing.txt"
    fails_naming(missing, "corpus.calibration: corpus file .* does not exist", check_inputs,
                 lm_recipe(directory, missing, good))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the story\nna\xefve".encode("latin-1"))
    fails_naming(latin, r"corpus.evaluation: corpus file .* is not UTF-8: byte 0xef at byte offset 12 \(line 2",
                 check_inputs, lm_recipe(directory, good, latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails_naming(empty, r"is empty \(only white space\)", check_inputs, lm_recipe(directory, empty, good))
    fails_naming(empty, "is empty", read_text_file, empty, "corpus file")


# ----------------------------------------------------------------------------------------------------------- assets


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return cache


def asset_recipe(asset="minilm-l6", task="text_classification"):
    return parse_recipe({"name": "a", "task": task, "model": {"asset": asset},
                         "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}]})


def test_a_missing_asset_is_one_line_with_the_fetch_command(private_cache):
    message = fails_naming(private_cache, r"asset 'minilm-l6' is not in .*Fetch it with: .* -m inc_plugins\.assets "
                                          r"fetch minilm-l6", check_inputs, asset_recipe())
    assert message.endswith("fetch minilm-l6")


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_damaged_asset_tokenizer_file_is_one_line_with_the_fetch_command(tmp_path, monkeypatch, damage):
    real = assets.asset_path("minilm-l6")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "cache" / "minilm-l6"
    copy.parent.mkdir()
    copy.mkdir()
    for path in real.iterdir():
        if path.name == "model.safetensors":
            (copy / path.name).symlink_to(path)  # 90 MB: shared, not copied
        else:
            shutil.copy(path, copy / path.name)
    assets.asset_path("minilm-l6")  # the intact copy verifies
    if damage == "delete":
        (copy / "vocab.txt").unlink()
        match = "vocab.txt is missing"
    else:
        (copy / "tokenizer.json").write_text("{}")
        match = "tokenizer.json has sha256 .* expected"
    message = fails_naming(copy, match + r".*Re-fetch it: .* -m inc_plugins\.assets fetch minilm-l6", check_inputs,
                           asset_recipe())
    assert "\n" not in message


def test_a_missing_data_asset_is_one_line_with_the_fetch_command(private_cache, model_dir):
    recipe = parse_recipe({"name": "a", "model": {"path": str(model_dir)},
                           "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}]})
    fails_naming(private_cache, "asset 'movie-snippets' is not in .*fetch movie-snippets", check_inputs, recipe)


def test_assets_for_the_wrong_task_are_refused():
    with pytest.raises(RecipeError, match="'minilm-l6': no causal-LM loader for it; causal-LM assets: smollm2-135m"):
        check_inputs(asset_recipe(task="causal_lm"))
    with pytest.raises(RecipeError, match="'smollm2-135m' is a causal language model: use it with task: causal_lm"):
        check_inputs(asset_recipe("smollm2-135m"))


def test_the_shipped_asset_recipes_pass():
    check_inputs(asset_recipe())
    check_inputs(asset_recipe("smollm2-135m", task="causal_lm"))


# ---------------------------------------------------------------------------------------------------- latency table


def test_a_missing_or_foreign_latency_table_is_named(tmp_path):
    table = tmp_path / "table.json"
    recipe = SimpleNamespace(pruning=[SimpleNamespace(pruning_type="mask_search", latency_table=str(table))])
    fails_naming(table, "pruning stage 0 .*latency table .* does not exist", check_latency_tables, recipe)
    table.write_text('{"format": 0}')
    fails_naming(table, "is not a latency table of format", check_latency_tables, recipe)
    table.write_text('{"format": ')
    fails_naming(table, r"latency table .* is not valid JSON: Expecting value \(line 1, column 12\)",
                 check_latency_tables, recipe)


# ---------------------------------------------------------------------------------------------------- the command


def test_the_command_stops_with_one_line_and_exit_code_2_instead_of_a_unk_run(model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """Before: every word became [UNK], the run 'succeeded' with exit 0 and saved the broken tokenizer."""
    from recipes import apply

    monkeypatch.chdir(tmp_path)
    remove_tokenizer_files(model_dir)
    train = write_csv(tmp_path / "train.csv", rows(8))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({
        "name": "no-tokenizer", "model": {"path": str(model_dir)},
        "data": {"files": {"train": str(train)}, "dev_size": 2},
        "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["bert.encoder"]}],
    }))
    assert apply.main([str(recipe_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the error is one line; a runner that stops in a stage may add a line naming the .failed report
    assert str(model_dir) in err[0] and "no tokenizer files" in err[0] and "Traceback" not in "".join(err), err
    assert not [p for p in tmp_path.glob("runs/no-tokenizer*") if not p.name.endswith(".failed")]
