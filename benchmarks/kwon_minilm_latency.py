"""Kwon et al. (2022) mask search under a LATENCY budget on the fine-tuned MiniLM-L6: predicted vs measured.

    python -m inc_plugins.latency_table measure --model minilm-l6 --batch-size 32 --seq-len 128 --backend eager \\
        --output benchmarks/results/latency_table_minilm_b32_s128_eager.json     # this machine's table (~1 min)
    python -m benchmarks.kwon_minilm_latency --latency-table benchmarks/results/latency_table_minilm_b32_s128_eager.json

The latency table holds, for one MiniLM layer on this machine (eager fp32, batch 32 x 128 tokens, torch's thread
count), the seconds per number of heads kept and per number of FFN neurons kept. `mask_search` with
`constraint: latency` and `target_sparsity: t` keeps the masks with the largest Fisher importance whose
table latency (summed over the 6 layers) is at most (1 - t) of the dense layers' table latency. This script runs
it through the recipe's pruning stage (`recipes/minilm_mask_search.yaml`, 2048 calibration samples, rearrangement
and tuning on) and reports:

* dev accuracy (2000 examples) dense and pruned;
* the predicted latency of the kept layers from the table, against the dense table latency;
* the measured latency of the slimmed model against dense, whole model (embeddings and classifier included), eager
  fp32, batch 32 x 128, the median of interleaved repeats (every model timed in turn within each repeat);
* for comparison, the FLOPs-constrained search at the same target fraction, timed in the same repeats.

Writes benchmarks/results/kwon_minilm_latency.{json,md}.
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
RECIPE = "minilm_mask_search.yaml"


def markdown(results: dict) -> str:
    s, m, lat = results["settings"], results["machine"], results["latency"]
    table = results["latency_table"]
    lines = [
        "# Kwon et al. (2022) mask search under a latency budget: MiniLM-L6 (movie-snippet sentiment)",
        "",
        f"Latency table: {table['path']} (one layer, {table['backend']} fp32, batch {table['batch_size']} x "
        f"{table['seq_len']} tokens, {table['num_threads']} threads, measured on this machine). Target: remove "
        f"{100 * s['target']:.0f}% of the layers' table latency (budget {100 * (1 - s['target']):.0f}% of dense). "
        f"{s['calibration_samples']} calibration samples, rearrangement and tuning on; dev accuracy on "
        f"{s['dev_examples']} examples (SST-2-like labels, not the official SST-2). Machine: {m['cpu_model']}, "
        f"{m['threads']} threads, torch {m['torch']} (1-minute load average "
        f"{results['load_average_start'][0]:.1f} when pruning started, {results['load_average_after_pruning'][0]:.1f} "
        f"when it ended, {results['load_average_before_timing'][0]:.1f} before the timing and "
        f"{results['load_average_end'][0]:.1f} after it).",
        "",
        f"Dense accuracy: {results['dense']['accuracy']:.4f}",
        "",
        f"| constraint | accuracy | kept heads | kept neurons | head+FFN FLOPs removed (at {lat['seq_len']} tokens) | predicted layers' latency "
        f"(table) | predicted speedup (layers) | measured whole model, {lat['backend']} | measured speedup | "
        f"pruning time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_ms = lat["timing"]["dense"]["median_ms"]
    lines.append(f"| dense | {results['dense']['accuracy']:.4f} | {s['total_heads']} | {s['total_neurons']} | 0% | "
                 f"{1000 * results['dense']['table_latency_s']:.1f} ms | 1.00x | {dense_ms:.1f} ms | 1.00x | - |")
    for name, run in results["runs"].items():
        measured = lat["timing"][name]["median_ms"]
        lines.append(
            f"| {name} ({100 * s['target']:.0f}%) | {run['accuracy']:.4f} | {sum(run['kept_heads'])} | "
            f"{sum(run['kept_neurons'])} | {100 * run['flops_removed']:.1f}% | {1000 * run['table_latency_s']:.1f} ms | "
            f"{results['dense']['table_latency_s'] / run['table_latency_s']:.2f}x | {measured:.1f} ms | "
            f"{dense_ms / measured:.2f}x | {run['prune_seconds']:.0f} s |")
    lines += ["", f"Measured: median of {lat['repeats']} interleaved repeats after {lat['warmup']} warm-up "
              f"(min dense {lat['timing']['dense']['min_ms']:.1f} ms, "
              + ", ".join(f"min {n} {lat['timing'][n]['min_ms']:.1f} ms" for n in results["runs"]) + ").",
              "", "The slimmed models were saved with `save_slimmed` and reloaded with `load_slimmed` for the timing.",
              "", f"Wall time: pruning step {results['prune_seconds'] / 60:.1f} min (pruning and evaluations of every constraint "
              f"included), timing {lat['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def table_latency(table, kept_heads: list[int], kept_neurons: list[int]) -> float:
    """Seconds the table predicts for layers with these kept head and neuron counts."""
    return sum(table.head_latency[h] + table.neuron_latency[n] for h, n in zip(kept_heads, kept_neurons))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kwon_minilm_latency", description=__doc__.split("\n\n")[0],
                                     epilog="About 8 minutes on 2 quiet cores (two prunings of 2048 samples, three "
                                            "evaluations of 2000 examples, the interleaved timing).")
    parser.add_argument("--latency-table", type=Path, required=True,
                        help="a table from `python -m inc_plugins.latency_table measure --model minilm-l6 ...`")
    parser.add_argument("--target", type=float, default=0.4, help="fraction of the table latency to remove (default 0.4)")
    parser.add_argument("--calibration-samples", type=int, default=2048)
    parser.add_argument("--dev-examples", type=int, help="default: all the recipe's 2000")
    parser.add_argument("--no-flops-comparison", action="store_true", help="skip the FLOPs-constrained search")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--models-dir", type=Path, default=Path("runs/kwon_minilm_latency_models"),
                        help="where the prune step saves the slimmed models for the latency step")
    parser.add_argument("--step", choices=("all", "prune", "latency"), default="all",
                        help="prune: pruning and accuracy only (run it under nice); latency: time the models the "
                             "prune step saved (reads its JSON); all: both in one process")
    args = parser.parse_args(argv)
    started, load_start = datetime.now(timezone.utc), os.getloadavg()

    from benchmarks.kwon_minilm import finetuned_task, time_models
    from inc_plugins.latency_table import load_latency_table
    from inc_plugins.models.slimming import load_slimmed, save_slimmed
    from recipes.atomic import write_json, write_text
    from recipes.schema import load_recipe
    from recipes.text_classification import tokenized_batches

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    stem = args.out_dir / "kwon_minilm_latency"
    table = load_latency_table(args.latency_table)  # refused later, by the search, if it is from elsewhere
    recipe = load_recipe(RECIPE)
    dense, tokenizer, train_examples, dev_examples = finetuned_task(recipe, quick=False, untrained=False)
    dev_examples = dev_examples[: args.dev_examples] if args.dev_examples else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    if args.step == "latency":
        results = json.loads(stem.with_suffix(".json").read_text())
        if "prune_seconds" not in results:
            raise SystemExit(f"error: {stem}.json holds no finished prune step: run --step prune first")
        slimmed = {name: load_slimmed(args.models_dir / name) for name in results["runs"]}
    else:
        results, slimmed = prune(args, table, dense, tokenizer, train_examples, dev_examples, dev, started, load_start)
        write_json(stem.with_suffix(".json"), results | {"complete": False})
        for name, model in slimmed.items():
            save_slimmed(model, args.models_dir / name)
    if args.step == "prune":
        print(f"wrote {stem}.json (pruning only); time it with --step latency")
        return 0

    wall = time.perf_counter()
    results["load_average_before_timing"] = os.getloadavg()
    batch, seq_len = table.machine.get("batch_size"), table.machine.get("seq_len")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    timing = time_models({"dense": dense, **slimmed}, table.machine.get("backend"), inputs, args.warmup, args.repeats)
    results["latency"] = {"backend": table.machine.get("backend"), "batch": batch, "seq_len": seq_len,
                          "warmup": args.warmup, "repeats": args.repeats, "dtype": "float32", "timing": timing,
                          "seconds": round(time.perf_counter() - wall, 1)}
    results["load_average_end"] = os.getloadavg()
    results["complete"] = True
    write_json(stem.with_suffix(".json"), results)
    text = markdown(results)
    write_text(stem.with_suffix(".md"), text)
    print(text)
    print(f"wrote {stem}.json, .md")
    return 0


def prune(args, table, dense, tokenizer, train_examples, dev_examples, dev, started, load_start) -> tuple[dict, dict]:
    """(results, slimmed models by constraint): dense accuracy, then each constraint's pruning, accuracy and costs."""
    import inc_plugins
    from benchmarks.kwon_minilm import machine_info
    from inc_plugins.models.structure_masks import mask_structure
    from inc_plugins.post_training import masked_macs, unit_costs
    from recipes.pruning_stage import run_pruning_stage
    from recipes.schema import load_recipe
    from recipes.text_classification import evaluate

    wall = time.perf_counter()
    recipe = load_recipe(RECIPE)
    template = recipe.pruning[0]
    seq_len = table.machine.get("seq_len")
    structure = mask_structure(dense)
    full = [structure.n_heads] * structure.n_layers, [structure.n_neurons] * structure.n_layers
    results = {
        "benchmark": "kwon_minilm_latency", "started": started.isoformat(), "machine": machine_info(),
        "load_average_start": load_start,
        "latency_table": {"path": str(args.latency_table), **{k: table.machine.get(k) for k in
                          ("backend", "batch_size", "seq_len", "num_threads", "cpu_model", "torch_version")},
                          "head_latency_ms": [1000 * v for v in table.head_latency],
                          "neuron_latency_ms_every_64": [1000 * v for v in table.neuron_latency[::64]]},
        "settings": {"recipe": RECIPE, "target": args.target, "calibration_samples": args.calibration_samples,
                     "dev_examples": len(dev_examples), "total_heads": structure.n_layers * structure.n_heads,
                     "total_neurons": structure.n_layers * structure.n_neurons},
        "dense": {**evaluate(dense, dev, desc="evaluate dense"), "table_latency_s": table_latency(table, *full)},
        "runs": {},
    }
    print(f"dense accuracy {results['dense']['accuracy']:.4f}", flush=True)

    constraints = {"latency": {"constraint": "latency", "latency_table": str(args.latency_table)}}
    if not args.no_flops_comparison:
        constraints["flops"] = {"constraint": "flops"}
    slimmed = {}
    for name, update in constraints.items():
        stage = template.model_copy(update={"target_sparsity": args.target, "calibration_samples": args.calibration_samples,
                                            "rearrange": True, "tune": True, **update})
        model = copy.deepcopy(dense)
        info = run_pruning_stage(model, stage, tokenizer, train_examples, recipe.data.max_length)
        searched = info["mask_search"]
        heads, neurons = searched["kept_heads"], searched["kept_neurons"]
        # FLOPs at the timed shape's length, for both constraints alike
        kept_macs = masked_macs(structure, model.inc_structure_masks["head_mask"], model.inc_structure_masks["neuron_mask"], seq_len)
        results["runs"][name] = {
            **evaluate(model, dev, desc=name), "prune_seconds": info["prune_seconds"], "kept_heads": heads,
            "kept_neurons": neurons, "table_latency_s": table_latency(table, heads, neurons),
            "flops_removed": 1 - kept_macs / unit_costs(structure, seq_len).dense, "flops_counted_at_seq_len": seq_len,
            "search": searched,
        }
        print(f"{name}: accuracy {results['runs'][name]['accuracy']:.4f}, heads {heads}, neurons {neurons}", flush=True)
        slimmed[name] = inc_plugins.slim(model)
    results["prune_seconds"] = round(time.perf_counter() - wall, 1)
    results["load_average_after_pruning"] = os.getloadavg()
    return results, slimmed


if __name__ == "__main__":
    raise SystemExit(main())
