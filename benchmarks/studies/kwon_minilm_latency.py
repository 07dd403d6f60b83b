"""Kwon et al. (2022) mask search under a LATENCY budget on the fine-tuned MiniLM-L6: predicted vs measured.

    python -m inc_plugins.latency_table measure --model minilm-l6 --batch-size 32 --seq-len 128 --backend eager \\
        --output benchmarks/results/latency_table_minilm_b32_s128_eager.json     # this machine's table (~1 min)
    python -m benchmarks.studies.kwon_minilm_latency --latency-table benchmarks/results/latency_table_minilm_b32_s128_eager.json
    python -m benchmarks.studies.kwon_minilm_latency --quick    # every step on a tiny synthetic BERT and its table

The latency table holds, for one MiniLM layer on this machine (eager fp32, batch 32 x 128 tokens, torch's thread
count), the seconds per number of heads kept and per number of FFN neurons kept. `mask_search` with
`constraint: latency` and `target_sparsity: t` keeps the masks with the largest Fisher importance whose
table latency (summed over the 6 layers) is at most (1 - t) of the dense layers' table latency. This study runs
it through the recipe's pruning stage (`recipes/minilm_mask_search.yaml`: its target fraction, calibration samples,
rearrangement and tuning) and reports:

* dev accuracy (2000 examples) dense and pruned;
* the predicted latency of the kept layers from the table, against the dense table latency;
* the measured latency of the slimmed model against dense, whole model (embeddings and classifier included), on the
  table's backend and shape, the median of interleaved repeats (every model timed in turn within each repeat);
* for comparison, the FLOPs-constrained search at the same target fraction, timed in the same repeats.

--quick measures a table for the synthetic model first (its tiny shape) and uses it.

Writes <out>/kwon_minilm_latency.{json,md} (--quick: kwon_minilm_latency_quick.*, and the table it measured).
"""

import copy
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

import inc_plugins
from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, machine_line,
                                       steps_models_dir, study_parser, study_settings)
from benchmarks.studies.measures import time_models
from benchmarks.studies.sources import text_classification_task
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.perf.latency_table import load_latency_table, save_latency_table
from inc_plugins.perf.layer_latency import measure_latency_table
from inc_plugins.post_training import masked_macs, unit_costs
from recipes.pruning_stage import run_pruning_stage
from recipes.schema import load_recipe
from recipes.text_classification import evaluate, tokenized_batches

STUDY = "kwon_minilm_latency"
RECIPE = "minilm_mask_search.yaml"


def markdown(results: dict) -> str:
    s, lat = results["settings"], results["latency"]
    table = results["latency_table"]
    loads = results["run"]["load_average"]
    lines = [
        "# Kwon et al. (2022) mask search under a latency budget: MiniLM-L6 (movie-snippet sentiment)",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model, data and table, not a measurement.** ' if s['quick'] else ''}"
        f"Latency table: {table['path']} (one layer, {table['backend']} fp32, batch {table['batch_size']} x "
        f"{table['seq_len']} tokens, {table['num_threads']} threads, measured on this machine). Target: remove "
        f"{100 * s['target']:.0f}% of the layers' table latency (budget {100 * (1 - s['target']):.0f}% of dense). "
        f"{s['calibration_samples']} calibration samples, rearrangement and tuning on; dev accuracy on "
        f"{s['dev_examples']} examples (SST-2-like labels, not the official SST-2). {machine_line(results, loads=False)}",
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
              "", f"Wall time: pruning step {results['prune_seconds'] / 60:.1f} min (pruning and evaluations of every "
              f"constraint included), timing {lat['seconds'] / 60:.1f} min. 1-minute load average when pruning "
              f"started {_first(results['prune_step_load_average'], 'start')}, when it ended "
              f"{_first(results['prune_step_load_average'], 'after_pruning')}, before the timing "
              f"{_first(loads, 'before_timing')} and after it {_first(loads, 'end')}."]
    return "\n".join(lines) + "\n"


def _first(loads: dict, point: str) -> str:
    values = loads.get(point)
    return f"{values[0]:.2f}" if values else "unknown"


def table_latency(table, kept_heads: list[int], kept_neurons: list[int]) -> float:
    """Seconds the table predicts for layers with these kept head and neuron counts."""
    return sum(table.head_latency[h] + table.neuron_latency[n] for h, n in zip(kept_heads, kept_neurons))


def quick_table(model, out: Path, settings: dict) -> Path:
    """A latency table of the synthetic model at the quick shape, saved next to the quick results: measured (so the
    measuring code runs), then given synthetic latencies proportional to the kept units, because the tiny model's
    timings are noise and a busy machine can make every unit look free, leaving the search nothing to remove."""
    shape = settings["table"]
    table = measure_latency_table(model, batch_size=shape["batch_size"], seq_len=shape["seq_len"],
                                  repeats=shape["repeats"], warmup=shape["warmup"], neuron_step=shape["neuron_step"])
    table = dataclasses.replace(table, head_latency=[1e-4 * k for k in range(len(table.head_latency))],
                                neuron_latency=[1e-6 * n for n in range(len(table.neuron_latency))])
    return save_latency_table(table, out / f"{STUDY}_quick_table.json")


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog="About 8 minutes on 2 quiet cores (two prunings of 2048 samples, "
                                                 "three evaluations of 2000 examples, the interleaved timing).")
    parser.add_argument("--latency-table", type=Path,
                        help="a table from `python -m inc_plugins.latency_table measure --model minilm-l6 ...` "
                             "(required, except with --quick)")
    parser.add_argument("--target", type=float, help="fraction of the table latency to remove (default: the recipe's)")
    parser.add_argument("--calibration-samples", type=int, help="default: the recipe's")
    parser.add_argument("--dev-examples", type=int, help="default: all the recipe's")
    parser.add_argument("--no-flops-comparison", action="store_true", help="skip the FLOPs-constrained search")
    parser.add_argument("--warmup", type=int, help="default: settings.yaml")
    parser.add_argument("--repeats", type=int, help="default: settings.yaml")
    add_step_arguments(parser, STUDY, "accuracy")
    args = parser.parse_args(argv)
    if args.latency_table is None and not args.quick:
        parser.error("--latency-table is required (measure one with python -m inc_plugins.latency_table measure)")
    check_step_arguments(parser, args)
    recipe = load_recipe(RECIPE)
    template = recipe.pruning[0]
    settings = {"target": template.target_sparsity, "calibration_samples": template.calibration_samples,
                **study_settings(STUDY, args.quick)}
    given = {"target": args.target, "calibration_samples": args.calibration_samples, "dev_examples": args.dev_examples,
             "warmup": args.warmup, "repeats": args.repeats}
    settings.update({key: value for key, value in given.items() if value is not None})
    if args.no_flops_comparison:
        settings["compare_flops"] = False
    settings["quick"] = args.quick
    run = StudyRun(STUDY, args.quick, args.out, argv)

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    dense, tokenizer, train_examples, dev_examples = text_classification_task(recipe, args.quick)
    table_path = args.latency_table if args.latency_table is not None else quick_table(dense, args.out, settings)
    table = load_latency_table(table_path)  # refused later, by the search, if it is from elsewhere
    dev_examples = dev_examples[: settings["dev_examples"]] if settings["dev_examples"] else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}-models-") as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = json.loads(run.stem.with_suffix(".json").read_text())
            if "prune_seconds" not in results:
                raise SystemExit(f"error: {run.stem}.json holds no finished prune step: run --step prune first")
            slimmed = {name: load_slimmed(models_dir / name) for name in results["runs"]}
        else:
            results, slimmed = prune(table_path, table, settings, recipe, dense, tokenizer, train_examples, dev)
            run.mark("after_pruning")
            results["prune_step_load_average"] = dict(run.load_averages)
            run.write_progress(results)
            for name, model in slimmed.items():
                save_slimmed(model, models_dir / name)
            slimmed = {name: load_slimmed(models_dir / name) for name in slimmed}
        if args.step == "prune":
            print(f"wrote {run.stem}.json (pruning only); time it with --step latency")
            return 0
        if args.step == "latency":
            run = StudyRun(STUDY, args.quick, args.out, argv)  # the timing's own load averages

        batch, seq_len = table.machine.get("batch_size"), table.machine.get("seq_len")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        run.mark("before_timing")
        wall = time.perf_counter()
        timing = time_models({"dense": dense, **slimmed}, table.machine.get("backend"), inputs, settings["warmup"],
                             settings["repeats"])
    results["latency"] = {"backend": table.machine.get("backend"), "batch": batch, "seq_len": seq_len,
                          "warmup": settings["warmup"], "repeats": settings["repeats"], "dtype": "float32",
                          "timing": timing, "seconds": round(time.perf_counter() - wall, 1)}
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


def prune(table_path, table, settings: dict, recipe, dense, tokenizer, train_examples, dev) -> tuple[dict, dict]:
    """(results, slimmed models by constraint): dense accuracy, then each constraint's pruning, accuracy and costs."""
    wall = time.perf_counter()
    template = recipe.pruning[0]
    seq_len = table.machine.get("seq_len")
    structure = mask_structure(dense)
    full = [structure.n_heads] * structure.n_layers, [structure.n_neurons] * structure.n_layers
    results = {
        "benchmark": STUDY,
        "latency_table": {"path": str(table_path), **{k: table.machine.get(k) for k in
                          ("backend", "batch_size", "seq_len", "num_threads", "cpu_model", "torch_version")},
                          "head_latency_ms": [1000 * v for v in table.head_latency],
                          "neuron_latency_ms_every_64": [1000 * v for v in table.neuron_latency[::64]]},
        "settings": {"quick": settings["quick"], "recipe": RECIPE,
                     "target": settings["target"], "calibration_samples": settings["calibration_samples"],
                     "dev_examples": sum(len(batch["labels"]) for batch in dev),
                     "total_heads": structure.n_layers * structure.n_heads,
                     "total_neurons": structure.n_layers * structure.n_neurons},
        "dense": {**evaluate(dense, dev, desc="evaluate dense"), "table_latency_s": table_latency(table, *full)},
        "runs": {},
    }
    print(f"dense accuracy {results['dense']['accuracy']:.4f}", flush=True)

    constraints = {"latency": {"constraint": "latency", "latency_table": str(table_path)}}
    if settings["compare_flops"]:
        constraints["flops"] = {"constraint": "flops"}
    slimmed = {}
    for name, update in constraints.items():
        stage = template.model_copy(update={"target_sparsity": settings["target"],
                                            "calibration_samples": settings["calibration_samples"],
                                            "rearrange": True, "tune": True, "check_steps": False, **update})
        model = copy.deepcopy(dense)
        outcome = run_pruning_stage(model, stage, tokenizer, train_examples, recipe.data.max_length)
        info, result = outcome.report, outcome.result
        searched = info["mask_search"]
        heads, neurons = searched["kept_heads"], searched["kept_neurons"]
        # FLOPs at the timed shape's length, for both constraints alike
        kept_macs = masked_macs(structure, result.head_mask, result.neuron_mask, seq_len)
        results["runs"][name] = {
            **evaluate(model, dev, desc=name), "prune_seconds": info["prune_seconds"], "kept_heads": heads,
            "kept_neurons": neurons, "table_latency_s": table_latency(table, heads, neurons),
            "flops_removed": 1 - kept_macs / unit_costs(structure, seq_len).dense, "flops_counted_at_seq_len": seq_len,
            "search": searched,
        }
        print(f"{name}: accuracy {results['runs'][name]['accuracy']:.4f}, heads {heads}, neurons {neurons}", flush=True)
        slimmed[name] = inc_plugins.slim(model, result)
    results["prune_seconds"] = round(time.perf_counter() - wall, 1)  # the whole step: evaluations included
    return results, slimmed


if __name__ == "__main__":
    raise SystemExit(main())
