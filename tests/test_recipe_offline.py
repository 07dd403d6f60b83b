"""bert_mrpc.yaml needs the model and dataset hubs: offline it must stop at once, clearly, before loading anything."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes import apply
from recipes.hub_access import hub_needs, offline_recipes, unreachable_reason
from recipes.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_bert_mrpc_names_what_it_needs_from_the_hub():
    recipe = load_recipe("bert_mrpc.yaml")
    assert hub_needs(recipe) == ["model 'textattack/bert-base-uncased-MRPC'", "dataset 'nyu-mll/glue' (mrpc)"]
    stage = recipe.pruning[0]
    assert (stage.pruning_type, stage.target_sparsity, stage.constraint) == ("mask_search", 0.4, "flops")
    assert recipe.data.text_pair_column == "sentence2" and recipe.model.trust_remote_code is False


def test_offline_switch_stops_bert_mrpc_at_once_naming_the_offline_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert apply.main(["bert_mrpc.yaml"]) == 2
    assert time.perf_counter() - start < 20  # the hub check and the offline-recipe list: no retries, no downloads
    err = capsys.readouterr().err
    assert "recipe 'bert_mrpc' needs the Hugging Face hub for model 'textattack/bert-base-uncased-MRPC' and " \
           "dataset 'nyu-mll/glue' (mrpc)" in err and "HF_HUB_OFFLINE is set" in err
    assert "Offline recipes that run here: " in err and "minilm_mask_search_wanda.yaml" in err
    assert "bert_mrpc.yaml" not in err.split("Offline recipes that run here: ")[1]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_endpoint_fails_fast_without_the_switch(monkeypatch):
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.perf_counter()
    reason = unreachable_reason(timeout=1.0)
    assert time.perf_counter() - start < 3
    assert reason.startswith("http://127.0.0.1:9 cannot be reached")


def test_offline_recipes_are_every_shipped_recipe_but_the_hub_ones():
    assert set(offline_recipes()) >= {"minilm_sentiment.yaml", "minilm_mask_search.yaml", "smollm2_wanda.yaml"}
    assert "bert_mrpc.yaml" not in offline_recipes()


def test_the_command_exits_non_zero_without_a_stack_trace(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # how fast the check itself is, is asserted in-process above; here most of the time is importing torch,
    # transformers and INC, which on a shared 2-core machine took anywhere from 10 to 70 s
    result = subprocess.run([sys.executable, "-m", "recipes.apply", "bert_mrpc.yaml"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "needs the Hugging Face hub" in result.stderr and "Traceback" not in result.stderr
