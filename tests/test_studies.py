"""Every study behind the docs' tables runs its --quick path (tiny synthetic models and data, the same code as the
published run) and writes its results file with the machine description and the load averages it saw.

Each study runs in a subprocess, as its command does (the studies set torch's threads and compile settings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import finetune_cache
from recipes.schema import load_recipe

REPO = Path(__file__).resolve().parent.parent
RUN_KEYS = {"study", "command", "quick", "started", "seconds", "machine", "versions", "load_average"}


def run_study(module: str, *arguments: str, out: Path, timeout: int = 600) -> None:
    done = subprocess.run([sys.executable, "-m", f"benchmarks.studies.{module}", *arguments, "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def results(path: Path, *keys: str) -> dict:
    data = json.loads(path.read_text())
    assert {*keys, "run", "complete"} <= set(data), sorted(data)
    assert RUN_KEYS <= set(data["run"]) and data["run"]["quick"] is True and data["complete"] is True
    machine = data["run"]["machine"]
    assert machine["cpu_model"] and set(machine["flags"]) and machine["torch_threads"] >= 1
    assert "start" in data["run"]["load_average"] and "end" in data["run"]["load_average"]
    assert "quiet" not in json.dumps(data["run"]).lower()  # load averages are recorded, quietness never claimed
    return data


def test_kwon_minilm_quick(tmp_path):
    run_study("kwon_minilm", out=tmp_path)
    data = results(tmp_path / "kwon_minilm_quick.json", "settings", "dense", "fractions", "latency")
    row = data["fractions"][0]
    assert {"mask_search", "rearrange", "full", "retrain_free"} <= set(row["variants"])
    assert "error" not in row["variants"]["retrain_free"], row["variants"]["retrain_free"]
    assert "dense" in data["latency"]["backends"]["eager"] and row["name"] in data["latency"]["backends"]["eager"]
    assert (tmp_path / "kwon_minilm_quick.md").is_file() and (tmp_path / "kwon_minilm_quick.png").is_file()


def test_kwon_minilm_latency_quick(tmp_path):
    run_study("kwon_minilm_latency", out=tmp_path)
    data = results(tmp_path / "kwon_minilm_latency_quick.json", "settings", "latency_table", "dense", "runs", "latency")
    assert set(data["runs"]) == {"latency", "flops"}
    assert data["runs"]["latency"]["table_latency_s"] <= (1 - data["settings"]["target"]) * data["dense"]["table_latency_s"] + 1e-12
    assert (tmp_path / "kwon_minilm_latency_quick_table.json").is_file()
    assert (tmp_path / "kwon_minilm_latency_quick.md").is_file()


def test_kwon_smollm2_quick(tmp_path):
    run_study("kwon_smollm2", out=tmp_path)
    data = results(tmp_path / "kwon_smollm2_quick.json", "settings", "dense", "fractions", "fisher_seconds", "latency")
    row = data["fractions"][0]
    assert {"mask_search", "rearrange", "full"} <= set(row["variants"]) and "loaded_first_window_perplexity" in row
    assert row["name"] in data["latency"]["runs"]["eager/b1"]


def test_llm_pruning_quality_quick(tmp_path):
    run_study("llm_pruning_quality", out=tmp_path)
    data = results(tmp_path / "llm_pruning_quality_quick.json", "settings", "results")
    methods = [r["method"] for r in data["results"]]
    assert methods == ["dense", "magnitude", "sparse_gpt", "wanda"]
    assert all("error" not in r for r in data["results"]), data["results"]
    assert all(r["peak_rss_mb"] >= r["peak_rss_increase_mb"] >= 0 for r in data["results"][1:])


def test_wanda_against_incs_prune_wanda_quick(tmp_path):
    run_study("llm_pruning_quality", "--compare-inc", out=tmp_path)
    data = results(tmp_path / "wanda_vs_inc_quick.json", "settings", "comparisons")
    comparison = data["comparisons"][0]
    assert comparison["layers"] > 0 and comparison["layers_with_different_masks"] == []


def test_classic_methods_on_digits_quick(tmp_path):
    run_study("classic_methods", "slimming", "trimming", "lottery", "particle_filter", "--threads", "1", out=tmp_path)
    slimming = results(tmp_path / "classic_slimming_quick.json", "method", "settings", "split", "runs", "latency")
    assert {"dense", "0.5"} == set(slimming["latency"])
    trimming = results(tmp_path / "classic_trimming_quick.json", "method", "settings", "runs", "latency")
    assert set(trimming["latency"]) == {"digits_mlp", "digits_cnn"}
    lottery = results(tmp_path / "classic_lottery_quick.json", "method", "settings", "runs")
    assert len(lottery["runs"][0]["rounds"]) == lottery["settings"]["rounds"] + 1
    particle_filter = results(tmp_path / "classic_particle_filter_quick.json", "method", "settings", "runs")
    assert {"particle_filter", "random"} <= set(particle_filter["runs"][0]["settings"][0])
    for method in ("slimming", "trimming", "lottery", "particle_filter"):
        assert (tmp_path / f"classic_{method}_quick.md").is_file() and (tmp_path / f"classic_{method}_quick.png").is_file()


def test_classic_minilm_trimming_quick(tmp_path):
    recipe = load_recipe("minilm_sentiment.yaml")
    cached = finetune_cache.cached_dir(finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune))
    if not (cached / "finetune.json").is_file():
        pytest.skip("needs the cached fine-tuned MiniLM (make demo): recipes.minilm_trimming.trimming_on_minilm loads "
                    "the model itself, so this study has no synthetic stand-in yet")
    run_study("classic_methods", "minilm_trimming", out=tmp_path)
    results(tmp_path / "classic_minilm_trimming_quick.json", "method", "minilm")
