"""A causal-LM recipe with `execution:` streaming (or `auto` over a small budget) gives the run an in-memory recipe
gives: the same perplexities, sparsities and weights, with the pruned checkpoint written shard by shard.

Synthetic tiny Llama with a tiny word-level tokenizer and random text files (tests.test_recipe_tasks' fixture).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from inc_plugins.models.safetensors_checkpoint import CheckpointReader
from recipes import apply
from recipes.schema import RecipeError, parse_recipe
from tests.test_recipe_tasks import llm_recipe, tiny_lm  # noqa: F401  (tiny_lm: the fixture)

REPO = Path(__file__).resolve().parent.parent


def _run(recipe: dict, run_dir):
    path = apply.run(parse_recipe(recipe), run_dir, allow_outside_cwd=True)
    return json.loads((path / "report.json").read_text()), path


def _two_stages(recipe: dict) -> dict:
    second = {**recipe["pruning"][0], "pruning_type": "one_shot_magnitude", "target_sparsity": 0.6}
    second.pop("update_weights", None)
    return {**recipe, "pruning": [recipe["pruning"][0], second]}


@pytest.mark.parametrize("stages", [1, 2])
def test_a_streamed_run_equals_the_in_memory_run(tiny_lm, tmp_path, stages):  # noqa: F811
    recipe = llm_recipe(*tiny_lm, update_weights=True)
    if stages == 2:  # the second stage streams from the first stage's checkpoint
        recipe = _two_stages(recipe)
    in_memory, memory_dir = _run({**recipe, "execution": {"mode": "in_memory"}}, tmp_path / "in_memory")
    streamed, streamed_dir = _run({**recipe, "execution": {"mode": "streaming"}}, tmp_path / "streamed")

    assert in_memory["data"]["execution"] == {"mode": "in_memory", "dtype": "float32"}
    assert streamed["data"]["execution"]["mode"] == "streaming" and streamed["data"]["execution"]["blocks"] == 2
    assert streamed["metrics"] == in_memory["metrics"]
    assert streamed["layer_sparsity"] == in_memory["layer_sparsity"]
    assert streamed["parameters"] == in_memory["parameters"]
    assert all(stage["streamed"] and len(stage["seconds_per_block"]) == 2 for stage in streamed["pruning_stages"])
    expected = AutoModelForCausalLM.from_pretrained(memory_dir / "model").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(streamed_dir / "model").state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    assert sorted(p.name for p in streamed_dir.iterdir()) == sorted(p.name for p in memory_dir.iterdir())
    assert (streamed_dir / "model" / "tokenizer.json").is_file()


def test_a_bfloat16_checkpoint_is_held_in_bfloat16_unless_a_stage_takes_gradients(tiny_lm, tmp_path):  # noqa: F811
    model_dir, calibration, evaluation = tiny_lm
    bf16_dir = tmp_path / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    for path in model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (bf16_dir / path.name).write_bytes(path.read_bytes())
    recipe = llm_recipe(bf16_dir, calibration, evaluation)
    in_memory, memory_dir = _run({**recipe, "execution": {"mode": "in_memory"}}, tmp_path / "in_memory")
    streamed, streamed_dir = _run({**recipe, "execution": {"mode": "streaming"}}, tmp_path / "streamed")
    assert in_memory["data"]["execution"] == {"mode": "in_memory", "dtype": "bfloat16"}
    assert streamed["data"]["execution"]["dtype"] == "bfloat16"
    assert streamed["metrics"] == in_memory["metrics"] and streamed["layer_sparsity"] == in_memory["layer_sparsity"]
    expected = AutoModelForCausalLM.from_pretrained(memory_dir / "model", dtype="auto").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(streamed_dir / "model", dtype="auto").state_dict()
    assert all(tensor.dtype == torch.bfloat16 and torch.equal(loaded[name], tensor) for name, tensor in expected.items())

    retrained = {**recipe, "pruning": [{**recipe["pruning"][0], "retrain_steps": 1}]}
    report, _ = _run({**retrained, "execution": {"mode": "in_memory"}}, tmp_path / "retrained")
    assert report["data"]["execution"] == {"mode": "in_memory", "dtype": "float32"}


def _float32_and_held_bytes(model_dir):
    reader = CheckpointReader(model_dir)
    sizes = {name: torch.Size(reader.shape(name)).numel() * 4 for name in reader.names}
    block = sum(size for name, size in sizes.items() if name.startswith("model.layers.0."))
    return sum(sizes.values()), sum(size for name, size in sizes.items() if ".layers." not in name) + block


def test_auto_streams_a_model_larger_than_the_budget(tiny_lm, tmp_path):  # noqa: F811
    float32, held = _float32_and_held_bytes(tiny_lm[0])
    recipe = llm_recipe(*tiny_lm)
    small, _ = _run({**recipe, "execution": {"memory_budget": (float32 + held) // 2}}, tmp_path / "small")
    large, _ = _run({**recipe, "execution": {"memory_budget": 2 * float32}}, tmp_path / "large")
    assert small["data"]["execution"]["mode"] == "streaming" and large["data"]["execution"]["mode"] == "in_memory"
    assert small["metrics"] == large["metrics"]


def test_a_budget_smaller_than_one_block_is_refused(tiny_lm, tmp_path):  # noqa: F811
    _, held = _float32_and_held_bytes(tiny_lm[0])
    recipe = {**llm_recipe(*tiny_lm), "execution": {"mode": "streaming", "memory_budget": held - 1024}}
    with pytest.raises(RecipeError, match=r"memory_budget: the memory budget .* is smaller than what streaming holds at once: .*weights "
                                          r"outside the blocks .* \+ the largest block"):
        apply.run(parse_recipe(recipe), tmp_path / "run", allow_outside_cwd=True)
    assert not (tmp_path / "run").exists()


def test_auto_refuses_to_stream_what_needs_the_whole_model(tiny_lm, tmp_path):  # noqa: F811
    recipe = {**llm_recipe(*tiny_lm), "execution": {"memory_budget": 1024},
              "benchmark": {"backends": ["eager-fp32"], "batch_size": 1, "seq_len": 8, "rounds": 1}}
    with pytest.raises(RecipeError, match="execution 'auto' would stream it, but streaming cannot run: benchmark"):
        apply.run(parse_recipe(recipe), tmp_path / "run", allow_outside_cwd=True)


@pytest.mark.parametrize("change, message", [
    ({"slim": True, "pruning": [{"pruning_type": "mask_search", "target_sparsity": 0.3}]},
     r"cannot run: slim: true; pruning stage 0 \(mask_search\): streaming runs one_shot_magnitude, sparse_gpt, wanda"),
    ({"model": {"hub_id": "someone/model"}}, r"cannot run: model.hub_id \(stream a local directory or asset\)"),
    ({"pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "retrain_steps": 2}]},
     "cannot run: pruning stage 0: retrain_steps"),
])
def test_streaming_refuses_steps_that_need_the_whole_model(tiny_lm, change, message):  # noqa: F811
    recipe = {**llm_recipe(*tiny_lm), "execution": {"mode": "streaming"}, **change}
    with pytest.raises((RecipeError, ValidationError), match=message):
        parse_recipe(recipe)


_KILLED_RECIPE = textwrap.dedent("""
    import os, sys
    from inc_plugins.execution.streamed_model import BlockStream
    from recipes import apply
    written = BlockStream.write
    def write_then_die(self, index, layer_sparsity):
        written(self, index, layer_sparsity)
        os._exit(9)  # killed after the first block: no cleanup runs
    BlockStream.write = write_then_die
    apply.main([sys.argv[1], "--run-dir", sys.argv[2], "--allow-outside-cwd"])
""")


def test_a_killed_streamed_run_resumes_with_resume(tiny_lm, tmp_path):  # noqa: F811
    recipe = {**llm_recipe(*tiny_lm, update_weights=True), "execution": {"mode": "streaming"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole, _ = _run(recipe, tmp_path / "whole")
    killed = subprocess.run([sys.executable, "-c", _KILLED_RECIPE, str(path), str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not (tmp_path / "run").exists() and list(tmp_path.glob(".run.staging-*/.streamed_stage_0.partial"))

    resumed_dir = apply.run(parse_recipe(recipe), tmp_path / "run", allow_outside_cwd=True, resume=True)
    resumed = json.loads((resumed_dir / "report.json").read_text())
    assert resumed["pruning_stages"][0]["resumed_blocks"] == [0]
    assert resumed["metrics"] == whole["metrics"] and resumed["layer_sparsity"] == whole["layer_sparsity"]
    assert not list(tmp_path.glob(".run.staging-*"))  # the killed run's staging directory is gone


def test_resume_without_an_interrupted_run_is_refused(tiny_lm, tmp_path):  # noqa: F811
    recipe = {**llm_recipe(*tiny_lm), "execution": {"mode": "streaming"}}
    with pytest.raises(RecipeError, match="--resume: no interrupted streamed stage of .*run to continue"):
        apply.run(parse_recipe(recipe), tmp_path / "run", allow_outside_cwd=True, resume=True)
