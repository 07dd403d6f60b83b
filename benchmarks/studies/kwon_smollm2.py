"""Kwon et al. (2022) post-training pruning of SmolLM2-135M: perplexity, pruning time and slimmed latency.

    python -m benchmarks.studies.kwon_smollm2            # the measurement (see the estimate in --help)
    python -m benchmarks.studies.kwon_smollm2 --quick    # every step on a tiny synthetic Llama, in seconds

SmolLM2-135M-Instruct (the `smollm2-135m` asset, Llama architecture: 30 blocks, 9 query heads in 3 key/value
groups, 1536 FFN neurons) with the language-model loss, pruned by key/value group and FFN neuron:

* calibration: random windows of the State of the Union speeches (labels = the inputs, i.e. next-token loss);
  evaluation: perplexity on the first windows of Moby Dick, as in the llm_pruning_quality study (the two texts
  never overlap); window lengths, evaluation windows and seed from `recipes/smollm2_wanda.yaml`, the rest from
  settings.yaml;
* for each fraction of head+FFN FLOPs removed: mask search only; + mask rearrangement; + mask tuning (the full
  method), each by `inc_plugins.post_training.prune_post_training`, the function the INC pruning type
  "mask_search" runs. The Fisher pass (mask gradients) depends on neither the fraction nor the switches, so it
  runs once and is handed to every search (`gradients=`); pruning time = that pass + the search call;
* the full method's masks are slimmed (`slim_model`: key/value groups and neurons physically removed, tuned scales
  folded in); its perplexity is measured again on the slimmed model;
* latency of the slimmed models against the dense one, eager and torch.compile (inductor), fp32, batch 1 and 8
  x 128 tokens, no KV cache (one full forward pass, prefill-like), every model timed in turn within each repeat
  so machine noise hits them alike; the ideal speedup is dense / slimmed MACs, of the heads and FFN (Kwon et al.'s
  accounting) and of the whole model (every matmul, the LM head included, via torch's FlopCounterMode).

Writes <out>/kwon_smollm2.{json,md} (--quick: kwon_smollm2_quick.*).
"""

import copy
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, machine_line,
                                       prune_step_results, steps_models_dir, study_parser, study_settings)
from benchmarks.studies.measures import compile_limits_for, time_models, whole_model_macs
from benchmarks.studies.sources import CausalLMSource, causal_lm
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.structure_masks import apply_structure_masks, mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.machine import load_average
from inc_plugins.post_training import (KwonSettings, collect_mask_gradients, masked_macs, prune_post_training,
                                       unit_costs)
from recipes.perplexity import perplexity
from recipes.schema import load_recipe

STUDY = "kwon_smollm2"
RECIPE = "smollm2_wanda.yaml"  # the calibration and evaluation text settings every SmolLM2 recipe shares

# (name, rearrange, tune): the method's steps switched on one after another
VARIANTS = (("mask_search", False, False), ("rearrange", True, False), ("full", True, True))


def calibration_batches(source: CausalLMSource, n_samples: int, seq_len: int, batch_size: int, seed: int) -> list[dict]:
    """Labelled LM batches of random SOTU windows: labels = input_ids (the model shifts them), no padding."""
    windows = source.calibration_windows(n_samples, seq_len, seed)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
            for chunk in windows.split(batch_size)]


def summary(result, structure) -> dict:
    """What a search kept, per layer and in total, and what it costs."""
    units, neurons = result.unit_head_mask != 0, result.neuron_mask != 0
    dense = unit_costs(structure, result.seq_len).dense
    return {
        "flops_removed": 1 - masked_macs(structure, units, neurons, result.seq_len) / dense,
        "seq_len": result.seq_len, "cost_macs": result.cost, "budget_macs": result.budget, "dense_macs": result.dense_cost,
        "kept_kv_groups": int(units.sum()), "total_kv_groups": units.numel(),
        "kept_neurons": int(neurons.sum()), "total_neurons": neurons.numel(),
        "kept_kv_groups_per_layer": units.sum(dim=1).tolist(), "kept_neurons_per_layer": neurons.sum(dim=1).tolist(),
        "tuning": None if result.tuning is None else {
            "fits": len(result.tuning.log), "rejected": [f"block {e.layer} {e.part}: {e.reason}"
                                                          for e in result.tuning.rejected],
            "scale_range": [float(result.neuron_mask[neurons].min()), float(result.neuron_mask[neurons].max())],
        },
    }


def _first(loads: dict, point: str) -> str:
    values = loads.get(point)
    return f"{values[0]:.1f}" if values else "unknown"


def markdown(results: dict) -> str:
    s = results["settings"]
    prune_loads, latency = results.get("prune_step_load_average", {}), results["latency"]
    lines = [
        "# Kwon et al. (2022) post-training pruning of SmolLM2-135M (LM loss, pruned by key/value group)",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"Calibration: {s['calibration_samples']} random windows of {s['calibration_len']} tokens of the State of the "
        f"Union speeches (batches of {s['calibration_batch']}); perplexity: the first {s['eval_windows']} windows of "
        f"{s['eval_len']} tokens of Moby Dick. {machine_line(results, loads=False)} 1-minute load average when pruning started "
        f"{_first(prune_loads, 'start')}, when it ended {_first(prune_loads, 'after_pruning')}; around the timing "
        f"{_first(latency['load_average'], 'start')} and {_first(latency['load_average'], 'end')}.",
        "",
        f"Dense perplexity: {results['dense']['perplexity']:.2f}. Fisher pass (mask gradients, shared by every row): "
        f"{results['fisher_seconds']:.0f} s.",
        "",
        f"## Perplexity (head+FFN FLOPs counted at {s['calibration_len']} tokens, the calibration length; "
        f"key/value groups and neurons kept by the full method)",
        "",
        "| target FLOPs removed | mask search | + rearrangement | + mask tuning (full) | full, slimmed model | "
        "kept kv groups | kept neurons |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["fractions"]:
        v = row["variants"]
        full = v["full"]["search"]
        lines.append(
            f"| {100 * row['target']:.0f}% | " + " | ".join(f"{v[n]['perplexity']:.2f}" for n in ("mask_search", "rearrange", "full"))
            + f" | {row['slimmed_perplexity']:.2f} | {full['kept_kv_groups']}/{full['total_kv_groups']} | "
            f"{full['kept_neurons']}/{full['total_neurons']} |")
    tuning = []
    for row in results["fractions"]:
        t = row["variants"]["full"]["search"]["tuning"]
        status = (f"all {t['fits']} fits accepted" if not t["rejected"]
                  else f"{t['fits'] - len(t['rejected'])} of {t['fits']} fits accepted (kept scales of 1: "
                       f"{'; '.join(t['rejected'])})")
        tuning.append(f"{100 * row['target']:.0f}%: {status}, neuron scales {t['scale_range'][0]:.2f}..{t['scale_range'][1]:.2f}")
    lines += ["", "Mask tuning: " + "; ".join(tuning) + "."]
    lines += ["", "## Pruning wall time (s): the shared Fisher pass + each search call", "",
              "| target | mask search | + rearrangement | + mask tuning (full) |", "|---|---|---|---|"]
    for row in results["fractions"]:
        lines.append(f"| {100 * row['target']:.0f}% | " + " | ".join(
            f"{row['variants'][n]['prune_seconds']:.0f}" for n in ("mask_search", "rearrange", "full")) + " |")
    lat = results["latency"]
    lines += ["", f"## Latency: slimmed full method vs dense, fp32, {lat['seq_len']} tokens, no KV cache "
              f"(median of {lat['repeats']} interleaved repeats after {lat['warmup']} warm-up)", "",
              "| target | backend | batch | dense ms | slimmed ms | speedup | ideal (head+FFN MACs) | ideal (whole model) | "
              "speedup / ideal (whole) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["fractions"]:
        ideal = row["ideal_speedup"]
        for key, timing in lat["runs"].items():
            backend, batch = key.split("/b")
            if "error" in timing:
                lines.append(f"| {100 * row['target']:.0f}% | {backend} | {batch} | failed: {timing['error'][:80]} | | | | | |")
                continue
            dense_ms, slim_ms = timing["dense"]["median_ms"], timing[row["name"]]["median_ms"]
            speedup = dense_ms / slim_ms
            lines.append(f"| {100 * row['target']:.0f}% | {backend} | {batch} | {dense_ms:.1f} | {slim_ms:.1f} | "
                         f"{speedup:.2f}x | {ideal['head_ffn']:.2f}x | {ideal['whole_model']:.2f}x | "
                         f"{100 * speedup / ideal['whole_model']:.0f}% |")
    lines += ["", "Saved with `save_slimmed` and reloaded with `load_slimmed` for timing; first-window perplexity before "
              "saving / after loading: " + ", ".join(
                  f"{100 * row['target']:.0f}%: {row['slimmed_first_window_perplexity']:.3f} / "
                  f"{row['loaded_first_window_perplexity']:.3f}" for row in results["fractions"]) + ".",
              ""]
    if "prune_step_seconds" in results:
        pruning = f"Wall time: pruning step {results['prune_step_seconds'] / 60:.1f} min, "
    else:
        done = ", ".join(f"{100 * t:.0f}%" for t in results["prune_interrupted_after"])
        pruning = f"The pruning step was stopped after {done} to leave time for the timing; "
    lines.append(pruning + f"latency step {lat['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def prune_step(run: StudyRun, source: CausalLMSource, settings: dict, models_dir: Path) -> dict:
    """Dense perplexity, one Fisher pass, then each fraction's three searches; saves each full-method model slimmed
    under `models_dir`. Returns the results (also written, marked incomplete, after each step)."""
    wall = time.perf_counter()
    torch.manual_seed(settings["seed"])
    model = source.model
    structure = mask_structure(model)
    samples = calibration_batches(source, settings["calibration_samples"], settings["calibration_len"],
                                  settings["calibration_batch"], settings["seed"])
    evaluation = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])
    seq_len = settings["latency_seq_len"]
    results = {
        "benchmark": STUDY,
        "settings": settings | {"structure": vars(structure) | {"n_head_units": structure.n_head_units}},
        "dense": {"perplexity": perplexity_of(model, evaluation), "parameters": sum(p.numel() for p in model.parameters())},
        "fractions": [],
    }
    print(f"dense perplexity {results['dense']['perplexity']:.2f}", flush=True)

    start = time.perf_counter()
    gradients = collect_mask_gradients(model, samples)
    results["fisher_seconds"] = round(time.perf_counter() - start, 1)
    print(f"Fisher pass: {results['fisher_seconds']} s", flush=True)
    run.write_progress(results)

    dense_head_ffn = unit_costs(structure, seq_len).dense
    dense_whole = whole_model_macs(model, seq_len)
    for fraction in settings["fractions"]:
        row = {"target": fraction, "name": f"slim_{round(100 * fraction)}", "variants": {}}
        for name, rearrange, tune in VARIANTS:
            start = time.perf_counter()
            # the paper's variants: each step kept unchecked
            kwon = KwonSettings(fraction, rearrange=rearrange, tune=tune, check_steps=False)
            result = prune_post_training(model, samples, kwon, gradients=gradients)
            seconds = time.perf_counter() - start
            with apply_structure_masks(model, result.head_mask, result.neuron_mask):
                masked_perplexity = perplexity_of(model, evaluation)
            row["variants"][name] = {"perplexity": masked_perplexity, "search_call_seconds": round(seconds, 1),
                                     "prune_seconds": round(results["fisher_seconds"] + seconds, 1),
                                     "search": summary(result, structure)}
            print(f"{fraction:.0%} {name}: perplexity {masked_perplexity:.2f}, search call {seconds:.1f} s", flush=True)
        slimmed = slim_model(copy.deepcopy(model), result.head_mask, result.neuron_mask).eval()
        row["slimmed_perplexity"] = perplexity_of(slimmed, evaluation)
        row["slimmed_first_window_perplexity"] = perplexity_of(slimmed, evaluation[:1])
        save_slimmed(slimmed, models_dir / row["name"])
        slim_head_ffn = masked_macs(structure, result.unit_head_mask, result.neuron_mask, seq_len)
        slim_whole = whole_model_macs(slimmed, seq_len)
        row["macs_at_latency_seq_len"] = {"seq_len": seq_len, "dense_head_ffn": dense_head_ffn, "slimmed_head_ffn": slim_head_ffn,
                                          "dense_whole_model": dense_whole, "slimmed_whole_model": slim_whole}
        row["ideal_speedup"] = {"head_ffn": dense_head_ffn / slim_head_ffn, "whole_model": dense_whole / slim_whole}
        row["slimmed_parameters"] = sum(p.numel() for p in slimmed.parameters())
        results["fractions"].append(row)
        run.write_progress(results)
        del slimmed
    results["prune_step_seconds"] = round(time.perf_counter() - wall, 1)
    run.mark("after_pruning")
    results["prune_step_load_average"] = dict(run.load_averages)
    run.write_progress(results)
    return results


def latency_step(source: CausalLMSource, results: dict, models_dir: Path, backends: list[str], seed: int) -> dict:
    """Loads the saved slimmed models (``load_slimmed``; their first-window perplexity is checked against the one
    measured before saving) and times them against the dense model, interleaved."""
    wall = time.perf_counter()
    settings = results["settings"]
    dense = source.model
    first_window = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])[:1]
    slimmed_models = {}
    for row in results["fractions"]:
        slimmed_models[row["name"]] = load_slimmed(models_dir / row["name"])
        row["loaded_first_window_perplexity"] = perplexity_of(slimmed_models[row["name"]], first_window)
    compile_limits_for(len(slimmed_models) + 1)  # one compiled forward per model, all of one code object
    seq_len = settings["latency_seq_len"]
    latency = {"seq_len": seq_len, "batches": settings["latency_batches"], "warmup": settings["warmup"],
               "repeats": settings["repeats"], "dtype": "float32", "kv_cache": False, "runs": {},
               "load_average": {"start": load_average()}}
    generator = torch.Generator().manual_seed(seed)
    for backend in backends:
        for batch in settings["latency_batches"]:
            key = f"{backend}/b{batch}"
            print(f"[latency {key}]", flush=True)
            ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=generator)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
            torch._dynamo.reset()  # a fresh cache per shape: every compile sees static shapes
            try:
                latency["runs"][key] = time_models({"dense": dense, **slimmed_models}, backend, inputs,
                                                   settings["warmup"], settings["repeats"])
            except Exception as error:  # a backend that fails is a result to record, not a reason to lose the others
                latency["runs"][key] = {"error": f"{type(error).__name__}: {error}"}
                print(f"latency {key} failed: {error}", flush=True)
    latency["load_average"]["end"] = load_average()
    latency["seconds"] = round(time.perf_counter() - wall, 1)
    results["latency"] = latency
    return results


def perplexity_of(model, windows: torch.Tensor) -> float:
    return perplexity(model, windows, batch_size=4)


def main(argv=None) -> int:
    parser = study_parser(
        STUDY, __doc__,
        epilog="Default run on 2 quiet cores: about 30 minutes (one Fisher pass and three mask tunings over the "
               "calibration samples, 13 perplexity evaluations, 16 timed model builds for latency).")
    parser.add_argument("--fractions", type=float, nargs="+", help="head+FFN FLOPs fractions to remove")
    parser.add_argument("--calibration-samples", type=int, help="calibration windows")
    parser.add_argument("--calibration-len", type=int, help="tokens per calibration window (default: the recipe's)")
    parser.add_argument("--calibration-batch", type=int, help="windows per Fisher batch (one gradient each)")
    parser.add_argument("--eval-windows", type=int, help="Moby Dick windows (default: the recipe's)")
    parser.add_argument("--eval-len", type=int, help="tokens per evaluation window (default: the recipe's)")
    parser.add_argument("--latency-batches", type=int, nargs="+", help="batch sizes to time")
    parser.add_argument("--seq-len", type=int, help="latency tokens per sequence")
    parser.add_argument("--warmup", type=int, help="untimed calls after compiling")
    parser.add_argument("--repeats", type=int, help="timed calls per model")
    parser.add_argument("--backends", nargs="+", choices=("eager", "inductor"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--seed", type=int, help="default: the recipe's")
    add_step_arguments(parser, STUDY, "perplexity")
    args = parser.parse_args(argv)
    quick = args.quick
    check_step_arguments(parser, args)
    recipe = load_recipe(RECIPE)
    corpus = recipe.corpus
    settings = {"calibration_len": corpus.calibration_seq_len, "eval_windows": corpus.evaluation_windows,
                "eval_len": corpus.evaluation_seq_len, "seed": recipe.pruning[0].seed, **study_settings(STUDY, quick)}
    given = {"fractions": args.fractions, "calibration_samples": args.calibration_samples,
             "calibration_len": args.calibration_len, "calibration_batch": args.calibration_batch,
             "eval_windows": args.eval_windows, "eval_len": args.eval_len, "latency_batches": args.latency_batches,
             "latency_seq_len": args.seq_len, "warmup": args.warmup, "repeats": args.repeats,
             "backends": args.backends, "seed": args.seed}
    settings.update({key: value for key, value in given.items() if value is not None})
    backends = settings.pop("backends")
    if args.threads:
        torch.set_num_threads(args.threads)
    if quick:
        inductor_config.compile_threads = 1  # a smoke run should not fan out compile workers
    source = causal_lm(quick)
    settings = {"quick": quick, "model": source.description, **settings,
                "calibration_text": "State of the Union (random windows)", "eval_text": "Moby Dick (first windows)"}
    logging.basicConfig(level=logging.WARNING)
    run = StudyRun(STUDY, quick, args.out, argv)
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}-models-") as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = prune_step_results(run, "fractions", "pruned fraction")
            if "prune_step_seconds" not in results:  # an interrupted prune step: time the fractions it finished
                results["prune_interrupted_after"] = [row["target"] for row in results["fractions"]]
        else:
            results = prune_step(run, source, settings, models_dir)
        if args.step == "prune":
            print(f"wrote {run.stem}.json (pruning only); time it with --step latency")
            return 0
        del source  # the timing loads the dense model afresh, as a separate --step latency would
        results = latency_step(causal_lm(quick), results, models_dir, backends, settings["seed"])
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
