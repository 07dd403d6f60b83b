"""Every study behind the docs' tables runs its --quick path (tiny synthetic models and data, the same code as the
published run) and writes its results file with the machine description and the load averages it saw.

Each study runs in a subprocess, as its command does (the studies set torch's threads and compile settings)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.studies.common import StudyRun, prune_step_results
from benchmarks.studies.fisher_cache import cached_mask_gradients
from benchmarks.studies.kwon_minilm_seeds import exact_mcnemar
from benchmarks.studies.measures import per_token_cost_fit
from inc_plugins.post_training import MaskGradients
from inc_plugins.perf.synthetic import NUM_LAYERS

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
    assert methods == ["dense", "magnitude", "magnitude_dsnot", "sparse_gpt", "wanda", "wanda_dsnot", "wanda_owl",
                       "wanda_update", "wanda_dsnot_update", "wanda_owl_update"]
    assert all("error" not in r and "not_applicable" not in r for r in data["results"]), data["results"]
    assert all(r["peak_rss_mb"] >= r["peak_rss_increase_mb"] >= 0 for r in data["results"][1:])


def test_llm_pruning_quality_lists_what_a_pattern_cannot_run():
    from benchmarks.studies.llm_pruning_quality import not_applicable

    assert "works with pattern '1x1'" in not_applicable("wanda_owl_update", "2:4", 0.5)
    assert not_applicable("wanda_dsnot", "2:4", 0.5) is None and not_applicable("magnitude", "2:4", 0.5) is None


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
    """The quick path runs on the synthetic tiny BERT and sentences: no fine-tune cache needed."""
    run_study("classic_methods", "minilm_trimming", out=tmp_path)
    minilm = results(tmp_path / "classic_minilm_trimming_quick.json", "method", "minilm")["minilm"]
    rows = minilm["rows"]
    assert [row["iteration"] for row in rows] == [1, 2] and [row["fraction"] for row in rows] == [0.3, 0.5]
    for chain in ("apoz", "random"):
        pruned = [row[chain]["neurons_pruned"] for row in rows]
        assert 0 < pruned[0] < pruned[1]  # cumulative: every iteration prunes more
        for row in rows:
            assert 0 <= row[chain]["accuracy_pruned"] <= 1 and 0 <= row[chain]["accuracy_finetuned"] <= 1
    # 2 layers of 64 FFN neurons, int(fraction * 64) pruned in each; the random control prunes the same counts
    assert [row["apoz"]["neurons_pruned"] for row in rows] == [2 * 19, 2 * 32]
    assert all(row["apoz"]["neurons_pruned"] == row["random"]["neurons_pruned"] for row in rows)
    assert 0 <= minilm["dense_accuracy"] <= 1 and len(minilm["apoz_quantiles"]) == 3
    assert minilm["settings"]["finetune_steps"] == 3
    assert (tmp_path / "classic_minilm_trimming_quick.md").is_file()
    assert (tmp_path / "classic_minilm_trimming_quick.png").is_file()


def test_exact_mcnemar_p_values_are_the_binomial_tails():
    def split(only_a, only_b, both=5):
        a = torch.tensor([True] * only_a + [False] * only_b + [True] * both)
        return exact_mcnemar(a, torch.tensor([False] * only_a + [True] * only_b + [True] * both))

    assert split(2, 0) == {"only_first_right": 2, "only_second_right": 0, "p_value": 0.5}  # 2 * (1/2)^2
    assert split(0, 0)["p_value"] == 1.0 and split(3, 3)["p_value"] == 1.0  # no evidence either way
    assert abs(split(33, 17)["p_value"] - 0.0328) < 1e-3  # 2 * P(Binomial(50, 1/2) <= 17)
    assert split(17, 33)["p_value"] == split(33, 17)["p_value"]


def test_kwon_minilm_seeds_quick(tmp_path):
    """A row per fine-tune seed (quick: synthetic BERTs drawn with each seed), each with dense, search-only and full
    accuracies and the full method's mask-tuning decisions: one fit per sub-layer (attention and FFN of each block)."""
    run_study("kwon_minilm_seeds", out=tmp_path)
    data = results(tmp_path / "kwon_minilm_seeds_quick.json", "settings", "seeds", "criteria")
    rows = data["seeds"]
    assert [row["seed"] for row in rows] == data["settings"]["finetune_seeds"] == [0, 1]
    assert data["settings"]["calibration_samples"] == 64 and data["settings"]["dev_examples"] == 32
    for row in rows:
        for name in ("dense", "search_only", "rearrange_only", "tune_only", "full_unchecked", "full"):
            assert 0 <= row[name]["accuracy"] <= 1 and row[name]["examples"] == 32
            assert row[name]["correct"] == round(32 * row[name]["accuracy"])
            assert 0 <= row[name]["agreement_with_dense"] <= 1
            if name != "dense":  # 64 calibration samples: the least-sure 512 are all of them
                agreement = row[name]["calibration_agreement"]
                assert agreement["samples"] == agreement["least_sure_samples"] == 64
                assert 0 <= agreement["all"] == agreement["least_sure"] <= 64
        assert row["dense"]["agreement_with_dense"] == 1
        test = row["full_vs_search_only"]  # discordant examples: the difference of the correct counts
        difference = row["full"]["correct"] - row["search_only"]["correct"]
        assert test["only_first_right"] - test["only_second_right"] == difference
        assert 0 < test["p_value"] <= 1
        # in points, exact: from the counts of correct examples
        assert row["full_minus_dense"] == 100 * (row["full"]["correct"] - row["dense"]["correct"]) / 32
        assert row["full_minus_search_only"] == 100 * (row["full"]["correct"] - row["search_only"]["correct"]) / 32
        assert row["criteria"]["within_1pt_of_dense"] == (row["full_minus_dense"] >= -1)
        assert row["criteria"]["not_below_search_only"] == (row["full_minus_search_only"] >= -0.2)
        assert row["search_only"]["search"]["tuning"] is None  # tune=False: no tuning report
        assert row["rearrange_only"]["search"]["tuning"] is None and row["tune_only"]["search"]["tuning"] is not None
        tuning = row["full"]["search"]["tuning"]
        assert row["n_layers"] == NUM_LAYERS and tuning["fits"] == 2 * NUM_LAYERS == len(tuning["sublayers"])
        assert tuning["accepted"] == sum(entry["accepted"] for entry in tuning["sublayers"])
        assert {(entry["block"], entry["part"]) for entry in tuning["sublayers"]} == {
            (block, part) for block in range(NUM_LAYERS) for part in ("attention", "ffn")}
        assert all(entry["accepted"] or entry["reason"] for entry in tuning["sublayers"])
        assert not row["full_unchecked"]["search"]["step_checks"]  # check_steps=False
        for check in row["full"]["search"]["step_checks"]:
            assert check["step"] in ("rearrangement", "tuning") and check["samples"] == 64  # fewer than 512: all
            assert check["kept"] == (check["agreement_with"] > check["agreement_without"])
        assert set(row["criteria"]) == {"within_1pt_of_dense", "not_below_search_only"}
    # the seeds draw different models: their masks or their dense outputs differ
    assert rows[0]["dense"] != rows[1]["dense"] or rows[0]["full"]["search"] != rows[1]["full"]["search"]
    markdown = (tmp_path / "kwon_minilm_seeds_quick.md").read_text()
    assert "QUICK SMOKE RUN" in markdown and ("PASS" in markdown or "FAIL" in markdown)
    assert (tmp_path / "kwon_minilm_seeds_quick.png").is_file()


def test_mask_search_time_quick(tmp_path):
    run_study("mask_search_time", out=tmp_path)
    data = results(tmp_path / "mask_search_time_quick.json", "settings", "runs", "median", "mask_hashes")
    assert len(data["runs"]) == 2 and set(data["median"]) == {"fisher", "search", "rearrange", "tune", "check", "total"}
    for seconds in data["runs"]:
        assert all(seconds[phase] >= 0 for phase in seconds)
        assert seconds["total"] >= seconds["fisher"] + seconds["tune"]
    assert data["same_masks"] is True  # the same model and samples give the same masks every run
    assert (tmp_path / "mask_search_time_quick.md").is_file()


def test_streaming_memory_quick(tmp_path):
    run_study("streaming_memory", out=tmp_path)
    data = results(tmp_path / "streaming_memory_quick.json", "settings", "model", "run_result", "output")
    assert data["model"]["synthetic"] and data["model"]["blocks"] == 3
    assert data["run_result"]["peak_rss_mb"] >= data["run_result"]["rss_after_imports_mb"] > 0
    assert data["output"]["pruned_layers"] == 3 * 7 and abs(data["output"]["sparsity"] - 0.5) < 0.01
    assert "Synthetic random weights" in (tmp_path / "streaming_memory_quick.md").read_text()


def test_recipe_streaming_memory_quick(tmp_path):
    run_study("recipe_streaming_memory", out=tmp_path)
    data = results(tmp_path / "recipe_streaming_memory_quick.json", "settings", "codes")
    (code,) = data["codes"]
    (run,) = code["runs"]
    assert {"load", "evaluate_before", "prune_0_wanda", "prune_1_wanda", "evaluate_after", "save"} <= set(
        run["recipe"]["phases"])
    assert all(phase["max_gib"] <= run["recipe"]["peak_gib"] for phase in run["recipe"]["phases"].values())
    assert run["direct"]["peak_gib"] > 0.1  # (the interpreter and torch alone)
    assert "SYNTHETIC" in (tmp_path / "recipe_streaming_memory_quick.md").read_text()


def test_streaming_smollm2_quick(tmp_path):
    run_study("streaming_smollm2", out=tmp_path)
    data = results(tmp_path / "streaming_smollm2_quick.json", "settings", "equivalence", "ranks")
    for row in data["equivalence"]:
        assert row["comparison"]["weights_differing"] == 0, row
        assert row["in_memory"]["perplexity"] == row["streamed"]["perplexity"]
    ranks = data["ranks"]
    assert [r["samples"] for r in ranks["per_rank"]] == [2, 2] and ranks["comparison"]["mask_entries_differing"] == 0


def test_deploy_minilm_quick_in_two_steps(tmp_path):
    """The prune step measures every (model, backend) form's accuracy and sizes (a one-shot pruned model and one
    fine-tuned after pruning, its pruned weights held at zero); the latency step, run apart as on a
    quiet machine, times each of them at every shape against dense eager fp32; a second prune step into the same
    models directory refuses instead of overwriting, and with --resume makes only the models it lacks."""
    models = tmp_path / "models"
    run_study("deploy_minilm", "--step", "prune", "--models-dir", str(models), out=tmp_path)
    pruned = results(tmp_path / "deploy_minilm_quick.json", "settings", "models")
    assert "latency" not in pruned and set(pruned["models"]) == {"dense", "pruned_40", "pruned_50_distilled_0.1ep"}
    assert pruned["models"]["pruned_40"]["retrain"] is None
    retrained = pruned["models"]["pruned_50_distilled_0.1ep"]["retrain"]
    assert retrained["steps"] >= 1 and retrained["zeros_held"] > 0, retrained
    assert retrained["distillation_temperature"] == pruned["settings"]["distillation_temperature"]
    backends = pruned["settings"]["backends"]
    for name, model in pruned["models"].items():
        assert set(model["forms"]) == set(backends), name
        assert all("accuracy" in form or form["reason"] for form in model["forms"].values()), name
        assert model["bytes"]["openvino_int8_ir_bin"] < model["bytes"]["openvino_ir_bin"], model["bytes"]
    assert pruned["models"]["pruned_40"]["parameters"] < pruned["models"]["dense"]["parameters"]

    run_study("deploy_minilm", "--step", "latency", "--models-dir", str(models), out=tmp_path)
    data = results(tmp_path / "deploy_minilm_quick.json", "settings", "models", "latency", "target")
    available = [b for b in backends if pruned["models"]["dense"]["forms"][b]["available"]]
    for shape in data["latency"]["shapes"]:
        timed = {(t["model"], t["backend"]) for t in shape["timings"]}
        assert timed == {(name, b) for name in pruned["models"] for b in available}
        baseline = next(t for t in shape["timings"] if (t["model"], t["backend"]) == ("dense", "eager-fp32"))
        assert baseline["speedup_vs_dense_eager_fp32"] == 1.0 and baseline["paired_speedup_vs_dense_eager_fp32"] == 1.0
        assert all(len(t["samples_s"]) == t["repeats"] and t["paired_speedup_vs_dense_eager_fp32"] > 0
                   for t in shape["timings"])
    fastest = data["target"]["fastest"]
    assert fastest["model"] != "dense" and "int8" in fastest["backend"]
    within = data["target"]["fastest_within_1_point"]
    assert within is None or data["target"]["dense_accuracy"] - within["accuracy"] <= 0.01
    assert set(data["latency"]["cpu_features"]) >= {"avx512_vnni", "amx_int8"}

    again = subprocess.run([sys.executable, "-m", "benchmarks.studies.deploy_minilm", "--quick", "--step", "prune",
                            "--models-dir", str(models), "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode != 0 and "is not empty" in again.stderr

    # --resume keeps what is on disk and makes only the model that is missing
    shutil.rmtree(models / "pruned_40")
    run_study("deploy_minilm", "--step", "prune", "--resume", "--models-dir", str(models), out=tmp_path)
    resumed = results(tmp_path / "deploy_minilm_quick.json", "settings", "models")
    assert resumed["resumed_models"] == ["dense", "pruned_50_distilled_0.1ep"] and (models / "pruned_40").is_dir()
    assert resumed["models"]["pruned_40"]["forms"] == pruned["models"]["pruned_40"]["forms"]  # seeded: the same again


def test_a_latency_step_without_its_prune_step_says_what_to_run(tmp_path):
    run = StudyRun("deploy_minilm", quick=True, out=tmp_path, argv=[])
    with pytest.raises(SystemExit, match="deploy_minilm_quick.json does not exist: run --step prune first"):
        prune_step_results(run, "models", "models")
    run.write_progress({"models": {}})
    with pytest.raises(SystemExit, match="holds no models: run --step prune first"):
        prune_step_results(run, "models", "models")


def test_structured_generation_quick(tmp_path):
    """Every structured type prunes the tiny Llama (grouped-query attention: 2 key/value groups of 2 query heads of
    8 dims, hidden 32, FFN 64, vocabulary 128, LM head not tied); the masked and the slimmed model generate the same
    greedy tokens; the ideal decode speedup is the closed-form ratio of weight bytes; every timed generation gives the
    tokens the prune step recorded."""
    run_study("structured_generation", out=tmp_path)
    data = results(tmp_path / "structured_generation_quick.json", "settings", "dense", "models", "fisher_seconds",
                   "latency")
    rows = data["models"]
    assert [row["name"] for row in rows] == ["flap_20", "wanda_sp_20", "structured_magnitude_20", "mask_search_20"]
    hidden, vocab = 32, 128
    per_group = 2 * (hidden * 16) + 2 * (hidden * 8)  # q rows and o columns of 2 heads, k and v rows of one
    per_neuron = 3 * hidden  # gate and up rows, down column

    def weight_elements(groups, neurons, biases_per_layer=0):  # + the LM head, + one embedding row
        return (sum(per_group * g + per_neuron * n + biases_per_layer for g, n in zip(groups, neurons))
                + vocab * hidden + hidden)

    dense_elements = weight_elements([2, 2], [64, 64])
    assert data["dense"]["decode_weight_bytes"] == {"float32": 4 * dense_elements,
                                                    "bfloat16": 2 * (dense_elements - hidden) + 4 * hidden}
    assert data["dense"]["tied_embeddings"] is False
    for row in rows:
        check = row["masked_vs_slimmed"]
        assert check["greedy_tokens_equal"] and check["max_abs_logit_difference_first_window"] < 1e-4, row["name"]
        assert len(row["greedy_tokens"]) == data["settings"]["new_tokens"] == 8
        assert 0.2 <= row["flops_removed"] < 0.5 and row["perplexity"] > 1 and row["prune_seconds"] >= 0
        # FLAP's bias compensation adds an o_proj and a down_proj bias to every block
        elements = weight_elements(row["kept_kv_groups_per_layer"], row["kept_neurons_per_layer"],
                                   2 * hidden if row["method"] == "flap" else 0)
        assert row["decode_weight_bytes"]["float32"] == 4 * elements
        assert row["ideal_decode_speedup"]["float32"] == dense_elements / elements
        row["elements"] = elements
    latency = data["latency"]["backends"]
    assert set(latency) == {"eager-fp32", "eager-bf16", "eager-bf16-weights", "inductor-fp32",
                            "inductor-freezing-bf16-weights"}
    for backend, entry in latency.items():
        if not entry["available"]:  # only bf16, on a CPU without native bf16
            assert "bf16" in backend and "bf16" in entry["reason"]
            continue
        if backend.endswith("bf16-weights"):  # every weight read in bf16, the embedding row too: a ratio of elements
            assert all(entry["decode"][row["name"]]["ideal_speedup"] == dense_elements / row["elements"]
                       for row in rows)
        assert "error" not in entry, entry
        decode = entry["decode"]
        assert list(decode) == ["dense", *(row["name"] for row in rows)]
        assert decode["dense"]["speedup"] == 1 and decode["dense"]["ideal_speedup"] == 1
        assert decode["dense"]["paired_speedup"] == 1 and set(entry["per_token_fit"]) == {"fixed_ms", "gb_per_s", "r2"}
        for name, timing in decode.items():
            assert timing["decode_steps"] == 7 and timing["repeats"] == 2 and timing["tokens_per_s"] > 0
            assert len(timing["decode_s_per_round"]) == 2 and timing["paired_speedup"] > 0
            assert timing["same_tokens_every_round"], (backend, name)
            if "bf16" not in backend:  # fp32: the tokens the prune step's masked and slimmed models made
                assert timing["tokens_equal_to_prune_step"] and timing.get("tokens_equal_to_eager_fp32", True)
                assert timing["first_token_not_greedy"] is None  # each token the argmax given the ones before
        if backend.startswith("eager"):
            assert set(entry["prefill"]) == {"1x16", "2x16"}
        else:
            assert all(timing["first_call_s"] >= 0 for timing in decode.values())
    assert "QUICK SMOKE RUN" in (tmp_path / "structured_generation_quick.md").read_text()


def test_per_token_cost_fit_recovers_a_fixed_cost_and_a_read_rate():
    weight_bytes = [540_000_000, 450_000_000, 410_000_000]
    fit = per_token_cost_fit([0.010 + b / 5e9 for b in weight_bytes], weight_bytes)  # 10 ms + bytes at 5 GB/s
    assert fit["fixed_ms"] == pytest.approx(10.0) and fit["gb_per_s"] == pytest.approx(5.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = per_token_cost_fit([0.118, 0.095, 0.094], weight_bytes)  # off the line: r2 below 1
    assert 0 < noisy["r2"] < 1
    with pytest.raises(ValueError, match="different weight bytes"):
        per_token_cost_fit([0.1, 0.1], [5, 5])


def test_decode_step_costs_quick(tmp_path):
    """Every part runs on tiny shapes: each Linear form's timing streams at least kernel_stream_mb of weights and
    gets a per-call floor and rate; a decode step is profiled over exactly the decode steps (new tokens - 1: the
    prefill's token is not profiled), the operators' self times within its wall time; the uniform slim keeps the
    closed-form units (1 of 2 key/value groups, 48 of 64 neurons), so its ideal is a ratio of weight elements."""
    run_study("decode_step_costs", out=tmp_path)
    data = results(tmp_path / "decode_step_costs_quick.json", "settings", "kernels", "operators", "scale")
    for dtype, forms in data["kernels"].items():
        assert dtype in ("float32", "bfloat16") and set(forms) == {"eager", "prepacked"}
        for entry in forms.values():
            if not entry["available"]:  # only bf16, on a CPU without native bf16
                assert dtype == "bfloat16" and "bf16" in entry["reason"]
                continue
            assert list(entry["shapes"]) == ["64x32", "32x64", "16x32"] and set(entry["fit"]) == {
                "floor_us", "gb_per_s", "r2"}
            for shape, timing in entry["shapes"].items():
                rows, columns = map(int, shape.split("x"))
                assert timing["weight_bytes"] == rows * columns * (4 if dtype == "float32" else 2)
                assert timing["copies"] * timing["weight_bytes"] >= 1e6 and timing["median_us"] >= timing["min_us"] > 0
                assert timing["gb_per_s"] == pytest.approx(timing["weight_bytes"] / timing["median_us"] / 1e3)
    hidden, vocab = 32, 128
    # q and o: 2 heads of 8 per group; k and v: one head per group; gate, up and down: hidden per neuron

    def weight_elements(groups, neurons):  # 2 blocks + the LM head + one embedding row
        return 2 * (groups * (2 * 16 * hidden + 2 * 8 * hidden) + neurons * 3 * hidden) + vocab * hidden + hidden

    ideal = weight_elements(2, 64) / weight_elements(1, 48)
    operators = data["operators"]
    assert operators["models"] == ["dense", "uniform"] and operators["not_saved"] == ["flap_30"]
    for backend, entry in operators["backends"].items():
        if not entry["available"]:
            assert backend == "eager-bf16-weights"
            continue
        rows = entry["models"]
        assert rows["uniform"]["ideal_speedup"] == pytest.approx(ideal) and rows["dense"]["speedup"] == 1
        for row in rows.values():
            assert row["decode_steps"] == 7 and len(row["decode_s_per_round"]) == 2
            parts = row["ms_per_step"]  # operators' self times, and the rest of the profiled wall time
            assert parts["matmul"] > 0 and parts["other_operators"] > 0 and parts["outside_operators"] >= 0
            assert sum(parts.values()) == pytest.approx(row["profiled_ms_per_step"])
            assert row["of_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    (layout,) = data["scale"].values()
    dense_parameters = weight_elements(2, 64) - hidden + vocab * hidden + 5 * hidden  # + embedding, 5 norms
    assert layout["parameters"]["dense"] == dense_parameters
    for backend, timing in layout["backends"].items():
        if timing["available"]:
            assert timing["ideal_speedup"] == pytest.approx(ideal) and timing["speedup"] > 0
            assert len(timing["decode_s_per_round"]["uniform"]) == 2
    assert "QUICK SMOKE RUN" in (tmp_path / "decode_step_costs_quick.md").read_text()


def test_structured_minilm_quick(tmp_path):
    run_study("structured_minilm", out=tmp_path)
    data = results(tmp_path / "structured_minilm_quick.json", "settings", "dense", "methods")
    methods = data["methods"]
    assert len(methods) == 8 and not [name for name, row in methods.items() if "error" in row]
    assert all(row["removed_fraction"] >= data["settings"]["target"] for row in methods.values())
    # the methods that differ only in compensation removed the same units
    for plain, compensated in (("mask_search (search only)", "mask_search (search only) + compensation"),
                               ("flap without compensation", "flap")):
        assert methods[plain]["kept_neurons"] == methods[compensated]["kept_neurons"]
    assert (tmp_path / "structured_minilm_quick.md").is_file()

    # the latency of each method's slimmed shape; methods that kept the same counts share one timing
    run_study("structured_minilm_latency", out=tmp_path)
    latency = results(tmp_path / "structured_minilm_latency_quick.json", "settings", "pruned", "shapes")
    for shape in latency["shapes"]:
        timed = {(t["method"], t["backend"]): t for t in shape["timings"]}
        assert set(timed) == {(m, b) for m in ["dense", *methods] for b in latency["settings"]["backends"]}
        for backend in latency["settings"]["backends"]:
            assert timed[("dense", backend)]["speedup_vs_dense_same_backend"] == 1.0
            assert timed[("flap", backend)]["median_s"] == timed[("flap without compensation", backend)]["median_s"]
            assert timed[("flap", backend)]["parameters"] == methods["flap"]["parameters"]


def test_kwon_bias_smollm2_quick_reuses_its_fisher_cache(tmp_path):
    cache = tmp_path / "fisher.safetensors"
    run_study("kwon_bias_smollm2", "--fisher-cache", str(cache), out=tmp_path)
    first = results(tmp_path / "kwon_bias_smollm2_quick.json", "settings", "dense", "rows", "fisher_seconds")
    assert cache.is_file() and first["fisher_source"] == "computed in this run"
    assert {(row["variant"], row["bias_compensation"]) for row in first["rows"]} == {
        (variant, compensated) for variant in ("mask_search", "full") for compensated in (False, True)}
    run_study("kwon_bias_smollm2", "--fisher-cache", str(cache), "--variants", "mask_search", out=tmp_path)
    second = results(tmp_path / "kwon_bias_smollm2_quick.json", "settings", "dense", "rows", "fisher_seconds")
    assert second["fisher_source"].startswith("read from")
    assert [row["perplexity"] for row in second["rows"]] == [row["perplexity"] for row in first["rows"][:2]]
    done = subprocess.run([sys.executable, "-m", "benchmarks.studies.kwon_bias_smollm2", "--quick", "--out",
                           str(tmp_path), "--fisher-cache", str(cache), "--variants", "mask_search",
                           "--fractions", "0.3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0  # the fraction is not part of what the gradients depend on


def test_a_fisher_cache_written_for_other_settings_is_refused(tmp_path):
    path = tmp_path / "fisher.safetensors"
    stored = MaskGradients(torch.randn(3, 2, 4), torch.randn(3, 2, 8), per_sample=False)
    identity = {"model": "m", "seed": 0, "per_sample": False}
    assert cached_mask_gradients(path, identity, lambda: stored) is stored
    read = cached_mask_gradients(path, identity, lambda: pytest.fail("the cache was not read"))
    assert torch.equal(read.head, stored.head) and torch.equal(read.neuron, stored.neuron)
    with pytest.raises(ValueError, match="holds mask gradients of .*'seed': 0.*not of .*'seed': 1"):
        cached_mask_gradients(path, {**identity, "seed": 1}, lambda: stored)


def test_width_multiple_quick_in_two_steps(tmp_path):
    """The prune step keeps multiples of each m per block (one Fisher pass for all m); the latency step, run apart,
    times every (model, backend) against m = 1 on the same backend and reports the multiple 'auto' picks from one
    layer's FFN timed at every width of the run."""
    models = tmp_path / "models"
    run_study("width_multiple", "--step", "prune", "--models-dir", str(models), out=tmp_path)
    pruned = results(tmp_path / "width_multiple_quick.json", "settings", "models")
    assert "latency" not in pruned and set(pruned["models"]) == {"dense", "m1", "m16"}
    assert all(kept % 16 == 0 for kept in pruned["models"]["m16"]["kept_neurons"])
    assert pruned["models"]["m16"]["slimming_check"] < 1e-4

    run_study("width_multiple", "--step", "latency", "--models-dir", str(models), out=tmp_path)
    data = results(tmp_path / "width_multiple_quick.json", "settings", "models", "latency")
    for shape in data["latency"]["shapes"]:
        assert {(t["model"], t["backend"]) for t in shape["timings"]} == {
            (name, backend) for name in pruned["models"] for backend in pruned["settings"]["backends"]
            if backend not in data["latency"]["backends_unavailable"]}
        assert all(t["speedup_vs_m1"] == 1.0 for t in shape["timings"] if t["model"] == "m1")
    table = data["latency"]["ffn_width_tables"][0]
    assert table["measured_neurons"][1:42] == list(range(8, 49))
    # the tiny layer's timings may hold no signal; 'auto' then picks nothing and the study says why instead of failing
    assert table["auto_multiple"] in (1, 8, 16) or "no measurement" in table["no_choice"], table


def test_width_multiple_smollm2_quick_in_two_steps(tmp_path):
    """The prune step keeps multiples of each m per block on the tiny Llama (2 blocks of 2 key/value groups of 2
    query heads of 8 dims, hidden 32, FFN 64, vocabulary 128, LM head not tied), the slimmed model computes what the
    masked one does, and the bytes a decode step reads are the closed-form count of the kept weights; the latency
    step, run apart, times every (model, backend) available and gives the prune step's tokens on fp32."""
    models = tmp_path / "models"
    run_study("width_multiple_smollm2", "--step", "prune", "--models-dir", str(models), out=tmp_path)
    pruned = results(tmp_path / "width_multiple_smollm2_quick.json", "settings", "dense", "models", "fisher_seconds")
    assert "latency" not in pruned and pruned["steps"] == ["prune"]
    assert "Prune step only" in (tmp_path / "width_multiple_smollm2_quick.md").read_text()
    hidden, vocab = 32, 128
    per_group = 2 * (hidden * 16) + 2 * (hidden * 8)  # q rows and o columns of 2 heads, k and v rows of one
    per_neuron = 3 * hidden  # gate and up rows, down column

    def weight_elements(groups, neurons):  # + the LM head, + one embedding row
        return sum(per_group * g + per_neuron * n for g, n in zip(groups, neurons)) + vocab * hidden + hidden

    dense_elements = weight_elements([2, 2], [64, 64])
    assert pruned["dense"]["decode_weight_bytes"] == {"eager-fp32": 4 * dense_elements,
                                                      "eager-bf16-weights": 2 * dense_elements}
    rows = {row["name"]: row for row in pruned["models"]}
    assert list(rows) == ["m1", "m16"]
    for name, row in rows.items():
        search = row["search"]
        assert row["width_multiple"] == int(name[1:])
        assert all(kept % row["width_multiple"] == 0 for kept in search["kept_neurons_per_layer"]), row
        assert 0.2 <= search["flops_removed"] < 0.5
        assert row["max_abs_logit_difference_masked_vs_slimmed"] < 1e-4
        elements = weight_elements(search["kept_kv_groups_per_layer"], search["kept_neurons_per_layer"])
        assert row["decode_weight_bytes"] == {"eager-fp32": 4 * elements, "eager-bf16-weights": 2 * elements}
        assert row["ideal_decode_speedup"]["eager-fp32"] == dense_elements / elements
        assert row["ideal_decode_speedup_vs_m1"]["eager-fp32"] == (
            rows["m1"]["decode_weight_bytes"]["eager-fp32"] / (4 * elements))

    run_study("width_multiple_smollm2", "--step", "latency", "--models-dir", str(models), out=tmp_path)
    data = results(tmp_path / "width_multiple_smollm2_quick.json", "settings", "dense", "models", "latency")
    assert data["steps"] == ["prune", "latency"] and data["models"] == pruned["models"]
    backends = data["latency"]["backends"]
    assert set(backends) == {"eager-fp32", "eager-bf16-weights"} and backends["eager-fp32"]["available"]
    for backend, entry in backends.items():
        if not entry["available"]:  # only bf16, on a CPU without native bf16
            assert backend == "eager-bf16-weights" and "bf16" in entry["reason"]
            continue
        decode = entry["decode"]
        assert list(decode) == ["dense", "m1", "m16"]
        assert decode["m1"]["speedup_vs_m1"] == 1.0 and decode["m1"]["prefill_speedup_vs_m1"] == 1.0
        assert decode["dense"]["speedup_vs_dense"] == 1.0 and decode["dense"]["ideal_speedup_vs_dense"] == 1.0
        for name, timing in decode.items():
            assert timing["decode_steps"] == 7 and timing["repeats"] == 2 and timing["tokens_per_s"] > 0
            assert timing["prefill"]["median_ms"] > 0 and timing["same_tokens_every_round"], (backend, name)
            if name != "dense":
                assert timing["ideal_speedup_vs_dense"] == rows[name]["ideal_decode_speedup"][backend]
            if backend == "eager-fp32":  # the tokens of the slimmed model the prune step saved
                assert timing["tokens_equal_to_prune_step"], name
    assert "QUICK SMOKE RUN" in (tmp_path / "width_multiple_smollm2_quick.md").read_text()
