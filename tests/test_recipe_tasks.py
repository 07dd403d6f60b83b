"""Recipe tasks and data sources: sentence pairs from a local CSV (accuracy and F1), JSON/JSONL files, causal-LM
perplexity from local text files, seeded calibration sampling, and a clear error when `datasets` is missing."""

import csv
import json
import math
import random

import pytest
import torch

from tests.fixtures.tiny_models import tiny_llama_lm
from tests.fixtures.tiny_tokenizer import WORDS, tiny_tokenizer
from recipes import apply, tasks
from recipes.schema import RecipeError, parse_recipe
from recipes.tabular_data import file_examples, read_rows
from recipes.text_classification import evaluate, tokenized_batches


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Clearly synthetic MRPC-like rows: label 1 when the second sentence repeats the first, else 0."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first = " ".join(rng.choices(WORDS, k=5))
        same = rng.random() < 0.5
        second = first if same else " ".join(rng.choices(WORDS, k=5))
        rows.append({"sentence1": first, "sentence2": second, "label": int(same)})
    return rows


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def pair_recipe(model_dir, train, dev):
    return {
        "name": "pairs",
        "model": {"path": str(model_dir), "num_labels": 2},
        "data": {"files": {"train": str(train), "dev": str(dev)}, "text_column": "sentence1",
                 "text_pair_column": "sentence2", "label_column": "label", "max_length": 32},
        "pruning": [{"pruning_type": "wanda", "pattern": "2:4", "target_sparsity": 0.5, "op_names": ["bert.encoder"],
                     "calibration_samples": 16, "batch_size": 8}],
        "evaluation": {"batch_size": 16},
    }


def test_sentence_pairs_from_a_local_csv_run_and_report_accuracy_and_f1(workspace):
    tmp_path, model_dir = workspace
    train = write_csv(tmp_path / "train.csv", synthetic_pairs(40, seed=1))
    dev_rows = synthetic_pairs(24, seed=2)
    dev = write_csv(tmp_path / "dev.csv", dev_rows)
    run_dir = apply.run(parse_recipe(pair_recipe(model_dir, train, dev)))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["sentence_pairs"] is True
    assert report["data"]["train_examples"] == 40 and report["data"]["dev_examples"] == 24
    for when in ("before", "after"):
        assert set(report["metrics"][when]) == {"accuracy", "f1", "examples"}

    # the metrics are those of the pair-encoded dev set, recomputed here by hand from the model's predictions
    recipe = parse_recipe(pair_recipe(model_dir, train, dev))
    examples = file_examples(recipe.data, 2)[1]
    assert [e.text_pair for e in examples] == [row["sentence2"] for row in dev_rows]
    batches = tokenized_batches(tiny_tokenizer(), examples, 16, 32)
    assert all((batch["token_type_ids"] == 1).any() for batch in batches)  # the second sentence is segment 1
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    with torch.no_grad():
        predicted = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) for b in batches])
    gold = torch.tensor([row["label"] for row in dev_rows])
    tp = int(((predicted == 1) & (gold == 1)).sum())
    fp, fn = int(((predicted == 1) & (gold == 0)).sum()), int(((predicted == 0) & (gold == 1)).sum())
    f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    assert report["metrics"]["after"]["accuracy"] == pytest.approx((predicted == gold).float().mean().item())
    assert report["metrics"]["after"]["f1"] == pytest.approx(f1)


def test_f1_matches_a_hand_count():
    class Fixed(torch.nn.Module):
        def forward(self, input_ids, **_):
            logits = torch.zeros(len(input_ids), 2)
            logits[torch.arange(len(input_ids)), input_ids[:, 0]] = 1
            return type("Out", (), {"logits": logits})

    predictions, gold = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1 -> F1 = 4 / 6
    batch = {"input_ids": torch.tensor(predictions)[:, None], "labels": torch.tensor(gold)}
    metrics = evaluate(Fixed(), [batch])
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["f1"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".tsv"])
def test_json_jsonl_and_tsv_files_read_the_named_columns(tmp_path, suffix):
    rows = [{"review": "good film", "stars": 1}, {"review": "dull", "stars": 0}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text("review\tstars\n" + "".join(f"{r['review']}\t{r['stars']}\n" for r in rows))
    data = parse_recipe({"name": "r", "model": {"asset": "minilm-l6"},
                         "data": {"files": {"train": str(path)}, "text_column": "review", "label_column": "stars"},
                         "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}]}).data
    train, dev = file_examples(data, 2)
    assert [(e.text, e.label, e.text_pair) for e in train] == [("good film", 1, None), ("dull", 0, None)] and dev is None


def test_bad_data_files_get_clear_errors(tmp_path):
    data = parse_recipe({"name": "r", "model": {"asset": "minilm-l6"},
                         "data": {"files": {"train": str(tmp_path / "t.csv")}, "text_column": "sentence"},
                         "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}]}).data
    with pytest.raises(RecipeError, match="does not exist"):
        file_examples(data, 2)
    write_csv(tmp_path / "t.csv", [{"text": "good", "label": 1}])
    with pytest.raises(RecipeError, match=r"row 0: no column \['sentence'\]; columns there: text, label"):
        file_examples(data, 2)
    write_csv(tmp_path / "t.csv", [{"sentence": "good", "label": "positive"}])
    with pytest.raises(RecipeError, match=r"label 'positive' in column 'label' is not an integer in \[0, 2\)"):
        file_examples(data, 2)
    with pytest.raises(RecipeError, match="unknown format '.xlsx'"):
        read_rows(tmp_path / "t.xlsx")


def llm_recipe(model_dir, calibration, evaluation, **stage):
    return {
        "name": "tiny-lm", "task": "causal_lm", "model": {"path": str(model_dir)},
        "corpus": {"calibration": {"file": str(calibration)}, "evaluation": {"file": str(evaluation)},
                   "calibration_seq_len": 16, "evaluation_seq_len": 16, "evaluation_windows": 3},
        "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["model.layers"],
                     "calibration_samples": 6, "batch_size": 2, **stage}],
        "evaluation": {"batch_size": 2},
    }


@pytest.fixture
def tiny_lm(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_llama_lm().save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text(" ".join(rng.choices(WORDS, k=400)))
    evaluation.write_text(" ".join(rng.choices(WORDS, k=200)))
    return model_dir, calibration, evaluation


def test_causal_lm_task_reports_perplexity_that_matches_a_recount(tiny_lm):
    model_dir, calibration, evaluation = tiny_lm
    run_dir = apply.run(parse_recipe(llm_recipe(model_dir, calibration, evaluation)))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "causal_lm" and report["pruning_stages"][0]["calibration_samples"] == 6
    layers = {k: v for k, v in report["layer_sparsity"].items() if k.startswith("model.layers")}
    assert layers and all(v == pytest.approx(0.5, abs=0.02) for v in layers.values())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    ids = torch.tensor(tiny_tokenizer()(evaluation.read_text(), add_special_tokens=False)["input_ids"][:48]).view(3, 16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert report["metrics"]["after"]["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert report["metrics"]["after"]["perplexity"] != report["metrics"]["before"]["perplexity"]


def test_calibration_sampling_is_seeded(tiny_lm):
    model_dir, calibration, evaluation = tiny_lm
    recipe = parse_recipe(llm_recipe(model_dir, calibration, evaluation))
    task = tasks.task_for(recipe)
    task.load(apply.StageTimer())
    stage = recipe.pruning[0]
    first, again = task._windows(stage), task._windows(stage)
    other = task._windows(stage.model_copy(update={"seed": 1}))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_causal_lm_recipes_read_a_corpus_not_data():
    base = {"name": "r", "task": "causal_lm", "model": {"asset": "smollm2-135m"},
            "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5}]}
    assert parse_recipe(base).corpus.calibration.asset == "sotu"
    with pytest.raises(RecipeError, match=r"unknown key 'data'\. Allowed here: .*corpus"):
        parse_recipe({**base, "data": {"asset": "movie-snippets"}})
    with pytest.raises(RecipeError, match=r"unknown key 'corpus'\. Allowed here: .*data"):
        parse_recipe({**base, "task": "text_classification", "corpus": {}})


def test_a_hub_dataset_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    from recipes.hub_access import import_datasets

    with pytest.raises(RecipeError, match=r"optional `datasets` package: pip install 'inc-plugins\[hub\]'"):
        import_datasets()
