"""Calibration on 2 gloo ranks (spawned processes, each with its own shard of the batches) gives every rank the
same weights, and the masks of one process calibrating on all the batches.

Synthetic tiny Llama (random weights) saved as sharded safetensors; random token batches.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from neural_compressor import WeightPruningConfig
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import inc_plugins
from recipes import apply
from recipes.schema import load_recipe
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_llama_lm
from tests.test_recipe_streaming import _two_stages
from tests.test_recipe_tasks import llm_recipe, tiny_lm  # noqa: F401  (tiny_lm: the fixture)

REPO = Path(__file__).resolve().parent.parent
# fixed, one per test, so parallel runs do not collide
MASTER_PORT = {"in_memory": 29531, "streaming": 29532, "mask_search": 29533, "streaming_two_stages": 29534,
               "two_nodes": 29535}

WORLD = 2
CONFIGS = {
    "wanda": dict(pruning_type="wanda", target_sparsity=0.5, pattern="1x1"),
    "wanda_dsnot_update": dict(pruning_type="wanda", target_sparsity=0.5, pattern="2:4", dsnot=True,
                                   update_weights=True),
    "sparse_gpt": dict(pruning_type="sparse_gpt", target_sparsity=0.5, pattern="1x1"),
    "wanda_variant": dict(pruning_type="wanda", target_sparsity=0.4, pattern="1x1", use_variant=True),  # (0.5: the
    # tiny layers cannot reach it within the variant's 0.001)
    "magnitude_dsnot": dict(pruning_type="one_shot_magnitude", target_sparsity=0.5, pattern="1x1", dsnot=True),
}

# largest weight difference from one process, relative to the layer's largest weight: Wanda's masked weights are the
# dense ones; SparseGPT's and the refit's solves carry the statistics' rounding (the refit's CG stops at 1e-3)
# mask entries that may differ from one process (of 18,432): DSnoT's swaps compare running sums, so rounding can
# flip one (measured: 2, one swap)
MASK_DIFFERENCES = {"wanda": 0, "wanda_dsnot_update": 18, "sparse_gpt": 0, "wanda_variant": 0, "magnitude_dsnot": 18}
WEIGHT_TOLERANCE = {"wanda": 0.0, "wanda_dsnot_update": 1e-2, "sparse_gpt": 1e-4, "wanda_variant": 0.0,
                    "magnitude_dsnot": 0.0}


def _batches():
    return token_batches(n_batches=4, batch_size=2, seq_len=16, seed=7)


def _rank_main(rank: int, directory: str, name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        shard = _batches()[rank::WORLD]
        config = WeightPruningConfig(**CONFIGS[name])
        model = AutoModelForCausalLM.from_pretrained(f"{directory}/source")
        inc_plugins.prepare_pruning(model, config, dataloader=shard)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  f"{directory}/in_memory_rank{rank}.safetensors")
        run = inc_plugins.prune_checkpoint(f"{directory}/source", f"{directory}/streamed", config, dataloader=shard)
        with open(f"{directory}/rank{rank}.json", "w") as handle:
            json.dump({"world_size": run.world_size, "samples_per_rank": run.samples_per_rank,
                       "bytes": run.bytes_gathered_per_block, "layer_sparsity": run.result.layer_sparsity}, handle)
    finally:
        dist.destroy_process_group()


def _masks(state: dict) -> dict:
    return {name: tensor == 0 for name, tensor in state.items() if name.endswith("proj.weight")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_prune_like_one_process(tmp_path, name):
    tiny_llama_lm(seed=9).save_pretrained(tmp_path / "source", max_shard_size="20KB")
    mp.spawn(_rank_main, args=(str(tmp_path), name), nprocs=WORLD, join=True)

    single = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    inc_plugins.prepare_pruning(single, WeightPruningConfig(**CONFIGS[name]), dataloader=_batches())
    expected = {k: v for k, v in single.state_dict().items() if k != "lm_head.weight"}

    ranks = [load_file(tmp_path / f"in_memory_rank{rank}.safetensors") for rank in range(WORLD)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)  # every rank derives the same weights
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert all(torch.equal(streamed[k], ranks[0][k]) for k in expected)  # streaming == in memory, on 2 ranks too
    # the combined statistics round differently from one process's running sums: masks agree, weights to rounding
    masks, single_masks = _masks(ranks[0]), _masks(expected)
    differ = sum(int((masks[k] != single_masks[k]).sum()) for k in masks)
    print(name, "mask entries that differ from one process:", differ, "of", sum(m.numel() for m in masks.values()))
    assert differ <= MASK_DIFFERENCES[name]
    worst = 0.0  # over the output rows whose masks agree (a row with another mask is solved for another mask)
    for k in expected:
        rows = (masks[k] == single_masks[k]).all(dim=1) if k in masks else slice(None)
        worst = max(worst, float((ranks[0][k][rows] - expected[k][rows]).abs().max() / expected[k].abs().max()))
    assert worst <= WEIGHT_TOLERANCE[name], worst

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert all(r["world_size"] == WORLD and r["samples_per_rank"] == [4, 4] for r in reports)
    assert reports[0]["layer_sparsity"] == reports[1]["layer_sparsity"]
    assert len(reports[0]["bytes"]) == 2 and all(size > 0 for size in reports[0]["bytes"].values())


def _lm_batches():
    return token_batches(n_batches=5, batch_size=2, seq_len=16, seed=7, labels="lm")


def _mask_search_rank_main(rank: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(f"{directory}/source")
        pruning = inc_plugins.prepare_pruning(model, WeightPruningConfig(pruning_type="mask_search",
                                                                         target_sparsity=0.3),
                                              dataloader=_lm_batches()[rank::WORLD])
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  f"{directory}/mask_search_rank{rank}.safetensors")
        save_file({"head": pruning.result.unit_head_mask, "neuron": pruning.result.neuron_mask,
                   "gradients": pruning.result.gradients.neuron}, f"{directory}/masks_rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_mask_search_on_two_ranks_is_one_process_bit_for_bit(tmp_path):
    """Each rank runs the Fisher pass on its share of 5 batches (3 and 2); the gradients gathered back in one
    process's order make every later step (search, rearrangement, tuning, the step checks) one process's."""
    tiny_llama_lm(seed=9).save_pretrained(tmp_path / "source")
    mp.spawn(_mask_search_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)

    single = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    pruning = inc_plugins.prepare_pruning(single, WeightPruningConfig(pruning_type="mask_search", target_sparsity=0.3),
                                          dataloader=_lm_batches())
    expected = {"head": pruning.result.unit_head_mask, "neuron": pruning.result.neuron_mask,
                "gradients": pruning.result.gradients.neuron}
    assert expected["gradients"].shape[0] == 5 and 0 < int((expected["neuron"] == 0).sum()) < expected["neuron"].numel()
    weights = {k: v for k, v in single.state_dict().items() if k != "lm_head.weight"}
    for rank in range(WORLD):
        masks = load_file(tmp_path / f"masks_rank{rank}.safetensors")
        assert all(torch.equal(masks[k], expected[k]) for k in expected), rank
        state = load_file(tmp_path / f"mask_search_rank{rank}.safetensors")
        assert all(torch.equal(state[k], weights[k]) for k in weights), rank


def test_a_type_that_does_not_combine_across_ranks_is_refused(monkeypatch):
    monkeypatch.setattr("inc_plugins.inc.entry.world_size", lambda: WORLD)  # as under a 2-rank process group
    with pytest.raises(inc_plugins.PruningConfigError, match=r"\['network_trimming'\] calibrate on one process's data; "
                                                              r"under torch.distributed \(world size 2\) .* are flap, mask_search"):
        inc_plugins.prepare_pruning(tiny_llama_lm(), WeightPruningConfig(
            pruning_type="network_trimming", target_sparsity=0.5, pattern="1xchannel", apoz_threshold=0.05),
            dataloader=_batches())


def _recipe_file(tmp_path, tiny_lm, pruning=None, slim=False, **execution) -> Path:  # noqa: F811
    recipe = llm_recipe(*tiny_lm)
    if execution:
        recipe["execution"] = execution
    if pruning is not None:
        recipe.update(pruning=pruning, slim=slim)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# mask_search, slimmed, then Wanda on the slimmed model (every rank slims as rank 0 does)
SLIMMED_THEN_WANDA = [{"pruning_type": "mask_search", "target_sparsity": 0.3, "calibration_samples": 6, "batch_size": 2},
                      {"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, "op_names": ["model.layers"],
                       "calibration_samples": 6, "batch_size": 2}]


def _torchrun(mode: str, recipe: Path, run_dir: Path) -> None:
    """The recipe on WORLD ranks: one torchrun with WORLD processes, or ("two_nodes") one torchrun per node, as on two
    machines (here sharing a filesystem), each rank its node's only process: global rank 1 has local rank 0."""
    apply_recipe = ["-m", "recipes.apply", str(recipe), "--run-dir", str(run_dir), "--allow-outside-cwd"]
    run = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(MASTER_PORT[mode])]
    if mode != "two_nodes":
        launches = [run + ["--nproc-per-node", str(WORLD)] + apply_recipe]
    else:
        launches = [run + ["--nnodes", str(WORLD), "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr",
                           "127.0.0.1"] + apply_recipe for node in range(WORLD)]
    nodes = [subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for launch in launches]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]


@pytest.mark.parametrize("mode", ["in_memory", "streaming", "mask_search", "streaming_two_stages", "two_nodes"])
def test_a_recipe_under_torchrun_gives_the_single_process_run(tmp_path, tiny_lm, mode):  # noqa: F811
    if mode == "mask_search":
        recipe = _recipe_file(tmp_path, tiny_lm, pruning=SLIMMED_THEN_WANDA, slim=True)
    elif mode in ("streaming_two_stages", "two_nodes"):  # stage 2 streams, on every rank, from rank 0's checkpoint
        recipe = _recipe_file(tmp_path, tiny_lm, pruning=_two_stages(llm_recipe(*tiny_lm))["pruning"], mode="streaming")
    else:
        recipe = _recipe_file(tmp_path, tiny_lm, mode=mode)
    _torchrun(mode, recipe, tmp_path / "two_ranks")
    single = apply.run(load_recipe(recipe), tmp_path / "one", allow_outside_cwd=True)

    two, one = (json.loads((path / "report.json").read_text()) for path in (tmp_path / "two_ranks", single))
    assert two["world_size"] == WORLD and one["world_size"] == 1
    stage = two["pruning_stages"][-1]
    assert stage["world_size"] == WORLD and stage["samples_per_rank"] == [4, 2]  # batches of 2: ranks take 2 and 1
    assert two["metrics"] == one["metrics"] and two["layer_sparsity"] == one["layer_sparsity"]
    assert two["parameters"] == one["parameters"] and (mode != "mask_search" or two["model"]["slimmed"])
    assert not list(tmp_path.glob("two_ranks*.failed"))
