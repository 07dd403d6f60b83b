"""The same recipe in two separate processes gives the same fine-tune, masks, metrics and saved model, bit for bit,
even when the second process has used torch's global RNG before the run (the new task head is seeded)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from inc_plugins import assets
from inc_plugins.perf.synthetic import synthetic_bert_classifier
from tests.fixtures.tiny_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]

# the second process draws from torch's global RNG first, as any code that ran before the recipe may have
DISTURBED = "import sys, torch; torch.manual_seed(1234); torch.rand(99); from recipes.apply import main; " \
            "sys.exit(main(sys.argv[1:]))"


def headless_bert(directory: Path) -> Path:
    """A tiny BERT encoder without a classification head, so loading it as a classifier draws a new head."""
    synthetic_bert_classifier(seed=0).bert.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def run_in_a_new_process(tmp_path: Path, name: str, recipe: Path, disturbed: bool) -> Path:
    cache = tmp_path / f"cache-{name}"  # each process fine-tunes for itself: nothing is reused from the other
    cache.mkdir()
    (cache / "movie-snippets").symlink_to(assets.asset_path("movie-snippets"))
    env = {**os.environ, assets.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / f"run-{name}"
    command = [sys.executable, "-c", DISTURBED] if disturbed else [sys.executable, "-m", "recipes.apply"]
    done = subprocess.run([*command, str(recipe), "--run-dir", str(run_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_processes_give_identical_finetune_masks_metrics_and_weights(tmp_path):
    recipe = {
        "name": "tiny-determinism",
        "model": {"path": str(headless_bert(tmp_path / "headless-bert")), "num_labels": 2},
        "data": {"max_length": 16, "dev_size": 32, "max_train_samples": 64},
        "finetune": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "seed": 3},
        "pruning": [{"pruning_type": "mask_search", "target_sparsity": 0.4, "calibration_samples": 32,
                     "batch_size": 8, "seed": 5},
                    {"pruning_type": "wanda", "target_sparsity": 0.5, "calibration_samples": 16, "seed": 5}],
        "slim": True,
        "evaluation": {"batch_size": 16},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = run_in_a_new_process(tmp_path, "first", path, disturbed=False)
    second = run_in_a_new_process(tmp_path, "second", path, disturbed=True)

    reports = [json.loads((run / "report.json").read_text()) for run in (first, second)]
    assert reports[0]["finetune"]["cached"] is False and reports[1]["finetune"]["cached"] is False
    assert reports[0]["finetune"]["final_loss"] == reports[1]["finetune"]["final_loss"]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    searched = [report["pruning_stages"][0]["mask_search"] for report in reports]
    assert searched[0]["kept_heads"] == searched[1]["kept_heads"]
    assert searched[0]["kept_neurons"] == searched[1]["kept_neurons"]
    assert reports[0]["layer_sparsity"] == reports[1]["layer_sparsity"]
    weights = sorted(p.name for p in (first / "model").glob("*.safetensors"))
    assert weights
    assert [sha256(first / "model" / name) for name in weights] == \
           [sha256(second / "model" / name) for name in weights]
