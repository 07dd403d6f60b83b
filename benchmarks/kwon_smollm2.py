"""Kwon et al. (2022) post-training pruning of SmolLM2-135M: perplexity, pruning time and slimmed latency.

    python -m benchmarks.kwon_smollm2            # the measurement (see the estimate in --help)
    python -m benchmarks.kwon_smollm2 --quick    # a smoke run of every step: one fraction, tiny sizes

SmolLM2-135M-Instruct (the `smollm2-135m` asset, Llama architecture: 30 blocks, 9 query heads in 3 key/value
groups, 1536 FFN neurons) with the language-model loss, pruned by key/value group and FFN neuron:

* calibration: random windows of the State of the Union speeches (labels = the inputs, i.e. next-token loss);
  evaluation: perplexity on the first windows of Moby Dick, as in `benchmarks.llm_pruning_quality` (the two
  texts never overlap);
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

Writes benchmarks/results/kwon_smollm2.{json,md} (--quick: kwon_smollm2_quick.*).
"""

import argparse
import copy
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks/results")
# (name, rearrange, tune): the method's steps switched on one after another
VARIANTS = (("mask_search", False, False), ("rearrange", True, False), ("full", True, True))


def calibration_batches(tokenizer, n_samples: int, seq_len: int, batch_size: int, seed: int) -> list[dict]:
    """Labelled LM batches of random SOTU windows: labels = input_ids (the model shifts them), no padding."""
    from recipes.text_corpora import sotu_text, token_windows

    windows = token_windows(tokenizer, sotu_text(), n_samples, seq_len, seed=seed)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
            for chunk in windows.split(batch_size)]


def summary(result, structure) -> dict:
    """What a search kept, per layer and in total, and what it costs."""
    from inc_plugins.post_training import masked_macs, unit_costs

    units, neurons = result.unit_head_mask != 0, result.neuron_mask != 0
    dense = unit_costs(structure, result.seq_len).dense
    return {
        "flops_removed": 1 - masked_macs(structure, units, neurons, result.seq_len) / dense,
        "seq_len": result.seq_len, "cost_macs": result.cost, "budget_macs": result.budget, "dense_macs": result.dense_cost,
        "kept_kv_groups": int(units.sum()), "total_kv_groups": units.numel(),
        "kept_neurons": int(neurons.sum()), "total_neurons": neurons.numel(),
        "kept_kv_groups_per_layer": units.sum(dim=1).tolist(), "kept_neurons_per_layer": neurons.sum(dim=1).tolist(),
        "tuning": None if result.tuning is None else {
            "stopped_at_block": result.tuning.stopped_at,
            "fits": len(result.tuning.log), "rejected": [f"block {e.layer} {e.part}: {e.reason}"
                                                          for e in result.tuning.log if not e.accepted],
            "scale_range": [float(result.neuron_mask[neurons].min()), float(result.neuron_mask[neurons].max())],
        },
    }


def markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        "# Kwon et al. (2022) post-training pruning of SmolLM2-135M (LM loss, pruned by key/value group)",
        "",
        f"{'**QUICK SMOKE RUN: tiny sizes, not a measurement.** ' if s['quick'] else ''}"
        f"Calibration: {s['calibration_samples']} random windows of {s['calibration_len']} tokens of the State of the "
        f"Union speeches (batches of {s['calibration_batch']}); perplexity: the first {s['eval_windows']} windows of "
        f"{s['eval_len']} tokens of Moby Dick. Machine: {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; "
        f"shared with other jobs (1-minute load average {results['load_average_start'][0]:.1f} when pruning started, "
        f"{results.get('load_average_after_pruning', [float('nan')])[0]:.1f} when it ended, "
        f"{results['latency']['load_average_start'][0]:.1f} "
        f"and {results['latency']['load_average_end'][0]:.1f} around the timing; pruning ran under nice 19).",
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
        status = (f"all {t['fits']} fits accepted" if t["stopped_at_block"] is None
                  else f"stopped at block {t['stopped_at_block']} ({'; '.join(t['rejected'])}), later blocks untuned")
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


def prune_step(args, settings: dict, stem: Path) -> dict:
    """Dense perplexity, one Fisher pass, then each fraction's three searches; saves each full-method model slimmed
    under ``args.models_dir``. Returns the results (also written to ``stem``.json, incomplete, after each step)."""
    from benchmarks.kwon_minilm import machine_info, whole_model_macs
    from inc_plugins.models.slimming import save_slimmed, slim_model
    from inc_plugins.models.structure_masks import apply_structure_masks, mask_structure
    from inc_plugins.post_training import (KwonSettings, collect_mask_gradients, masked_macs, prune_post_training,
                                           unit_costs)
    from recipes.atomic import write_json
    from recipes.model_sources import load_causal_lm

    started, wall, load_start = datetime.now(timezone.utc), time.perf_counter(), os.getloadavg()
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm("smollm2-135m")
    structure = mask_structure(model)
    samples = calibration_batches(tokenizer, settings["calibration_samples"], args.calibration_len,
                                  args.calibration_batch, args.seed)
    evaluation = evaluation_windows(tokenizer, settings)
    seq_len = settings["latency_seq_len"]
    results = {
        "benchmark": "kwon_smollm2", "started": started.isoformat(), "machine": machine_info(),
        "load_average_start": load_start, "settings": settings | {"structure": vars(structure) | {"n_head_units": structure.n_head_units}},
        "dense": {"perplexity": perplexity_of(model, evaluation), "parameters": sum(p.numel() for p in model.parameters())},
        "fractions": [],
    }
    # the JSON is rewritten after every step (marked incomplete), so an interrupted run keeps what it measured
    save_progress = lambda: write_json(stem.with_suffix(".json"), results | {"complete": False})  # noqa: E731
    print(f"dense perplexity {results['dense']['perplexity']:.2f}", flush=True)

    start = time.perf_counter()
    gradients = collect_mask_gradients(model, samples)
    results["fisher_seconds"] = round(time.perf_counter() - start, 1)
    print(f"Fisher pass: {results['fisher_seconds']} s", flush=True)
    save_progress()

    dense_head_ffn = unit_costs(structure, seq_len).dense
    dense_whole = whole_model_macs(model, seq_len)
    for fraction in settings["fractions"]:
        row = {"target": fraction, "name": f"slim_{round(100 * fraction)}", "variants": {}}
        for name, rearrange, tune in VARIANTS:
            start = time.perf_counter()
            result = prune_post_training(model, samples, KwonSettings(fraction, rearrange=rearrange, tune=tune),
                                         gradients=gradients)
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
        save_slimmed(slimmed, args.models_dir / row["name"])
        slim_head_ffn = masked_macs(structure, result.unit_head_mask, result.neuron_mask, seq_len)
        slim_whole = whole_model_macs(slimmed, seq_len)
        row["macs_at_latency_seq_len"] = {"seq_len": seq_len, "dense_head_ffn": dense_head_ffn, "slimmed_head_ffn": slim_head_ffn,
                                          "dense_whole_model": dense_whole, "slimmed_whole_model": slim_whole}
        row["ideal_speedup"] = {"head_ffn": dense_head_ffn / slim_head_ffn, "whole_model": dense_whole / slim_whole}
        row["slimmed_parameters"] = sum(p.numel() for p in slimmed.parameters())
        results["fractions"].append(row)
        save_progress()
        del slimmed
    results["prune_step_seconds"] = round(time.perf_counter() - wall, 1)
    results["load_average_after_pruning"] = os.getloadavg()
    save_progress()
    return results


def latency_step(args, results: dict, stem: Path) -> dict:
    """Loads the saved slimmed models (``load_slimmed``; their first-window perplexity is checked against the one
    measured before saving) and times them against the dense model, interleaved."""
    from benchmarks.kwon_minilm import time_models
    from inc_plugins.models.slimming import load_slimmed
    from recipes.model_sources import load_causal_lm

    wall = time.perf_counter()
    settings = results["settings"]
    dense, tokenizer = load_causal_lm("smollm2-135m")
    first_window = evaluation_windows(tokenizer, settings)[:1]
    slimmed_models = {}
    for row in results["fractions"]:
        slimmed_models[row["name"]] = load_slimmed(args.models_dir / row["name"])
        row["loaded_first_window_perplexity"] = perplexity_of(slimmed_models[row["name"]], first_window)
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # one compiled forward per model, all of one code object
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 4 * (len(slimmed_models) + 1)))
    seq_len = settings["latency_seq_len"]
    latency = {"seq_len": seq_len, "batches": settings["latency_batches"], "warmup": settings["warmup"],
               "repeats": settings["repeats"], "dtype": "float32", "kv_cache": False, "runs": {},
               "load_average_start": os.getloadavg()}
    generator = torch.Generator().manual_seed(args.seed)
    for backend in args.backends:
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
    latency["load_average_end"] = os.getloadavg()
    latency["seconds"] = round(time.perf_counter() - wall, 1)
    results["latency"] = latency
    return results


def evaluation_windows(tokenizer, settings: dict) -> torch.Tensor:
    from recipes.text_corpora import moby_dick_text, token_windows

    return token_windows(tokenizer, moby_dick_text(), settings["eval_windows"], settings["eval_len"])


def perplexity_of(model, windows: torch.Tensor) -> float:
    from recipes.perplexity import perplexity

    return perplexity(model, windows, batch_size=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kwon_smollm2", description=__doc__.split("\n\n")[0],
        epilog="Default run on 2 quiet cores: about 30 minutes (one Fisher pass and three mask tunings over the "
               "calibration samples, 13 perplexity evaluations, 16 timed model builds for latency).")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20%% only, 8 samples, tiny evaluation and latency")
    parser.add_argument("--fractions", type=float, nargs="+", help="head+FFN FLOPs fractions to remove (default 0.1 0.2 0.3)")
    parser.add_argument("--calibration-samples", type=int, help="calibration windows (default 256)")
    parser.add_argument("--calibration-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--calibration-batch", type=int, default=8, help="windows per Fisher batch (one gradient each)")
    parser.add_argument("--eval-windows", type=int, help="Moby Dick windows (default 8)")
    parser.add_argument("--eval-len", type=int, help="tokens per evaluation window (default 512)")
    parser.add_argument("--latency-batches", type=int, nargs="+", help="batch sizes to time (default 1 8)")
    parser.add_argument("--seq-len", type=int, help="latency tokens per sequence (default 128)")
    parser.add_argument("--warmup", type=int, help="untimed calls after compiling (default 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per model (default 6)")
    parser.add_argument("--backends", nargs="+", choices=("eager", "inductor"), default=["eager", "inductor"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--models-dir", type=Path, default=Path("runs/kwon_smollm2_models"),
                        help="where the prune step saves the slimmed models for the latency step")
    parser.add_argument("--step", choices=("all", "prune", "latency"), default="all",
                        help="prune: pruning and perplexity only (run it under nice); latency: time the models the "
                             "prune step saved (reads its JSON); all: both in one process")
    args = parser.parse_args(argv)
    quick = args.quick
    pick = lambda value, full, smoke: value if value is not None else (smoke if quick else full)  # noqa: E731
    fractions = pick(args.fractions, [0.1, 0.2, 0.3], [0.2])
    n_samples = pick(args.calibration_samples, 256, 8)
    eval_windows, eval_len = pick(args.eval_windows, 8, 1), pick(args.eval_len, 512, 64)
    latency_batches, seq_len = pick(args.latency_batches, [1, 8], [1]), pick(args.seq_len, 128, 32)
    warmup, repeats = pick(args.warmup, 2, 1), pick(args.repeats, 6, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if quick:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # a smoke run should not fan out compile workers
    settings = {"quick": quick, "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 de-quantized to fp32)",
                "fractions": fractions, "calibration_samples": n_samples, "calibration_len": args.calibration_len,
                "calibration_batch": args.calibration_batch, "calibration_text": "State of the Union (random windows)",
                "eval_windows": eval_windows, "eval_len": eval_len, "eval_text": "Moby Dick (first windows)",
                "latency_batches": latency_batches, "latency_seq_len": seq_len, "warmup": warmup, "repeats": repeats}
    logging.basicConfig(level=logging.WARNING)
    from recipes.atomic import write_json, write_text

    stem = args.out_dir / ("kwon_smollm2_quick" if quick else "kwon_smollm2")
    if args.step == "latency":
        results = json.loads(stem.with_suffix(".json").read_text())
        if not results.get("fractions"):
            raise SystemExit(f"error: {stem}.json holds no pruned fraction: run --step prune first")
        if "prune_step_seconds" not in results:  # an interrupted prune step: time the fractions it finished
            results["prune_interrupted_after"] = [row["target"] for row in results["fractions"]]
    else:
        results = prune_step(args, settings, stem)
    if args.step == "prune":
        print(f"wrote {stem}.json (pruning only); time it with --step latency")
        return 0
    results = latency_step(args, results, stem)
    results["load_average_end"] = os.getloadavg()
    results["complete"] = True
    write_json(stem.with_suffix(".json"), results)
    table = markdown(results)
    write_text(stem.with_suffix(".md"), table)
    print(table)
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
