"""FFN widths that suit the hardware: mask_search's width_multiple on MiniLM-L6, accuracy and latency per multiple.

    python -m benchmarks.studies.width_multiple --step prune     # prune, slim, dev accuracy (no timing; under nice)
    python -m benchmarks.studies.width_multiple --step latency   # alone, on a quiet machine
    python -m benchmarks.studies.width_multiple --quick          # every step on the synthetic BERT, in seconds

Issue #16 item 5. `recipes/minilm_mask_search.yaml`'s fine-tuned MiniLM and pruning stage (its target, 40% of the
head+FFN MACs at the calibration samples' average length, its 2048 calibration samples, seed and checks), run once
per width multiple of settings.yaml (every block keeps a multiple of m FFN neurons, chosen inside the search). The
multiples share one Fisher pass (`structured_minilm.SharedFisher`: the gradients depend on neither the target nor
the switches).

* prune step: per multiple, the kept heads and FFN neurons per block, the MACs removed, dev accuracy and F1 of the
  slimmed model on the recipe's 2000 dev examples; the slimmed models are saved for the latency step.
* latency step: dense and every slimmed model on each backend of settings.yaml (eager bf16, OpenVINO bf16:
  `inc_plugins.perf.backends`) at each shape, all (model, backend) forms of a shape timed in turn within each round
  (`inc_plugins.perf.timing.interleaved_seconds`); speed-ups against m = 1 on the same backend. Then the FFN of one
  MiniLM layer timed at every width of settings.yaml's run (`inc_plugins.latency_table`, eager fp32: the only backend
  that times a lone layer so far) at each shape, and the multiple `width_multiple: auto` would pick from it
  (`inc_plugins.perf.width_choice`).

Writes <out>/width_multiple.{json,md} (--quick: width_multiple_quick.*).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, claim_models_dir,
                                       machine_line, prune_step_results, steps_models_dir, study_parser,
                                       study_settings)
from benchmarks.studies.measures import backend_forms_latency
from benchmarks.studies.sources import text_classification_task
from benchmarks.studies.structured_minilm import SharedFisher, stage_of
from inc_plugins.latency_table import measure_latency_table
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.backends import BACKENDS
from inc_plugins.perf.machine import load_average
from inc_plugins.perf.width_choice import choose_width_multiple
from recipes.pruning_stage import mask_search_summary
from recipes.schema import load_recipe
from recipes.text_classification import evaluate, tokenized_batches

STUDY = "width_multiple"
RECIPE = "minilm_mask_search.yaml"
DENSE = "dense"


def model_name(multiple: int) -> str:
    return f"m{multiple}"


def prune_step(run: StudyRun, recipe, settings: dict, models_dir: Path) -> dict:
    """Prunes at each width multiple from one Fisher pass, slims, saves under `models_dir`, measures accuracy."""
    dense, tokenizer, train_examples, dev_examples = text_classification_task(recipe, run.quick)
    dev_examples = dev_examples[: settings["dev_examples"]] if settings["dev_examples"] else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    template = recipe.pruning[0].model_copy(update={"calibration_samples": settings["calibration_samples"]})
    fisher = SharedFisher(template, tokenizer, train_examples, recipe.data.max_length)
    results = {"benchmark": STUDY,
               "settings": {"quick": run.quick, "recipe": RECIPE, **settings, "target": template.target_sparsity,
                            "dev_examples": len(dev_examples),
                            "data_note": "movie-snippet sentiment, SST-2-like, not official SST-2"},
               "models": {DENSE: {**evaluate(dense, dev, desc="evaluate dense"),
                                  "parameters": sum(p.numel() for p in dense.parameters())}}}
    dense.save_pretrained(models_dir / DENSE, safe_serialization=True)
    probe = {key: value for key, value in dev[0].items() if key != "labels"}
    for multiple in settings["multiples"]:
        name = model_name(multiple)
        model = copy.deepcopy(dense)
        result, seconds = fisher.prune(model, stage_of(template, {"width_multiple": multiple}))
        with torch.no_grad():
            masked = model(**probe).logits
            slimmed = slim_model(model, (result.head_mask != 0).float(), (result.neuron_mask != 0).float())
            difference = (slimmed(**probe).logits - masked).abs().max().item()
        save_slimmed(slimmed, models_dir / name)
        searched = mask_search_summary(SimpleNamespace(result=result))
        results["models"][name] = {
            "width_multiple": multiple, **evaluate(slimmed, dev, desc=f"evaluate {name}"),
            "parameters": sum(p.numel() for p in slimmed.parameters()), "prune_seconds": round(seconds, 3),
            "slimming_check": difference, **{key: searched[key] for key in (
                "removed_fraction", "seq_len", "kept_heads", "kept_neurons", "heads_per_layer", "neurons_per_layer",
                "step_checks")}}
        print(f"{name}: accuracy {results['models'][name]['accuracy']:.4f}, kept neurons "
              f"{searched['kept_neurons']}, {100 * searched['removed_fraction']:.2f}% MACs removed", flush=True)
        run.write_progress(results)
    results["prune_step_load_average"] = dict(run.load_averages, end=load_average())
    return results


def ffn_width_tables(dense, settings: dict) -> list[dict]:
    """Per shape: the FFN of one layer timed at every width of settings' run, and the multiple 'auto' picks."""
    first, last = settings["table_widths"]
    tables = []
    for batch, seq_len in settings["shapes"]:
        table = measure_latency_table(dense, batch_size=batch, seq_len=seq_len, repeats=settings["repeats"],
                                      warmup=settings["warmup"], neuron_step=dense.config.intermediate_size,
                                      neuron_widths=range(first, last + 1))
        entry = {"batch": batch, "seq_len": seq_len, "backend": "eager-fp32 (lone layer)",
                 "measured_neurons": table.measured_neurons, "measured_neuron_seconds": table.measured_neuron_seconds}
        try:
            choice = choose_width_multiple(table)
        except ValueError as error:  # a table without signal (a tiny layer's timings lost in noise): 'auto' refuses
            entry.update(auto_multiple=None, scores={}, widths=[first, last], no_choice=str(error))
            print(f"[table {batch} x {seq_len}] auto picks nothing: {error}", flush=True)
        else:
            entry.update(auto_multiple=choice.multiple, scores=choice.scores, widths=list(choice.widths))
            print(f"[table {batch} x {seq_len}] auto picks {choice.multiple}: {choice.scores}", flush=True)
        tables.append(entry)
    return tables


def latency_step(run: StudyRun, recipe, results: dict, models_dir: Path) -> dict:
    """Every (model, backend) of the prune step timed at each shape, interleaved; then the FFN width tables."""
    settings = results["settings"]
    dense, *_ = text_classification_task(recipe, run.quick)
    models = {DENSE: dense, **{name: load_slimmed(models_dir / name) for name in results["models"] if name != DENSE}}
    available = [b for b in settings["backends"] if BACKENDS[b].availability().available]
    latency = {"warmup": settings["warmup"], "repeats": settings["repeats"], "threads": torch.get_num_threads(),
               "backends_unavailable": [b for b in settings["backends"] if b not in available], "shapes": []}
    for shape in backend_forms_latency(models, available, settings["shapes"], dense.config.vocab_size,
                                       settings["warmup"], settings["repeats"],
                                       after_shape=lambda shape: run.mark(f"after_{shape}")):
        timed = shape.pop("timed")
        latency["shapes"].append({**shape, "timings": [
            {"model": name, "backend": backend, **stats,
             "speedup_vs_m1": timed[(model_name(1), backend)]["median_s"] / stats["median_s"]
             if (model_name(1), backend) in timed else None}
            for (name, backend), stats in timed.items()]})
    latency["ffn_width_tables"] = ffn_width_tables(dense, settings)
    return {**results, "latency": latency}


def markdown(results: dict) -> str:
    settings = results["settings"]
    models = results["models"]
    first = next(row for name, row in models.items() if name != DENSE)
    lines = [f"# width_multiple: FFN widths in multiples of m on MiniLM-L6"
             f"{' (quick: synthetic, meaningless)' if settings['quick'] else ''}", "",
             f"`{RECIPE}`'s fine-tuned MiniLM-L6 and mask_search stage ({100 * settings['target']:.0f}% of the head+FFN "
             f"MACs, {settings['calibration_samples']} calibration samples, one Fisher pass for every m), slimmed; dev "
             f"accuracy and F1 on {settings['dev_examples']} dev examples ({settings['data_note']}). "
             + machine_line(results), "",
             "| model | accuracy | F1 | MACs removed | parameters | kept FFN neurons per block (of "
             f"{first['neurons_per_layer']}) | kept heads (of {first['heads_per_layer']}) |",
             "|---|---:|---:|---:|---:|---|---|"]
    for name, row in models.items():
        if name == DENSE:
            lines.append(f"| dense | {row['accuracy']:.4f} | {row['f1']:.4f} | 0 | {row['parameters'] / 1e6:.2f}M | | |")
            continue
        lines.append(f"| m = {row['width_multiple']} | {row['accuracy']:.4f} | {row['f1']:.4f} | "
                     f"{100 * row['removed_fraction']:.2f}% | {row['parameters'] / 1e6:.2f}M | {row['kept_neurons']} | "
                     f"{row['kept_heads']} |")
    checks = max(row["slimming_check"] for name, row in models.items() if name != DENSE)
    lines += ["", f"Largest |logit| difference between masked and slimmed on a dev batch: {checks:.1e}."]
    latency = results.get("latency")
    if latency is None:
        lines += ["", "Latency: not measured yet (`--step latency`, alone on a quiet machine)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"## Latency (median of {latency['repeats']} interleaved rounds after {latency['warmup']} warm-up; "
                  f"{latency['threads']} threads)"]
    if latency["backends_unavailable"]:
        lines += ["", f"Not available here: {', '.join(latency['backends_unavailable'])}."]
    for shape in latency["shapes"]:
        loads = shape["load_average"]
        lines += ["", f"### {shape['batch']} x {shape['seq_len']} tokens (1-minute load average "
                      f"{loads['before'][0]:.2f} before, {loads['after'][0]:.2f} after)", "",
                  "| model | backend | ms | speed-up vs m = 1 |", "|---|---|---:|---:|"]
        for timing in shape["timings"]:
            speedup = f"{timing['speedup_vs_m1']:.3f}x" if timing["speedup_vs_m1"] else ""
            lines.append(f"| {timing['model']} | {timing['backend']} | {1000 * timing['median_s']:.2f} | {speedup} |")
    lines += ["", "## What `width_multiple: auto` picks (one layer's FFN timed at every width of a run)", "",
              "| shape | backend | widths | auto | score per candidate (1 + mean latency above the fitted line at its "
              "multiples, over the mean latency) |", "|---|---|---|---:|---|"]
    for table in latency["ffn_width_tables"]:
        scores = ", ".join(f"{m}: {score:.4f}" for m, score in table["scores"].items()) or table.get("no_choice")
        lines.append(f"| {table['batch']} x {table['seq_len']} | {table['backend']} | {table['widths'][0]}-"
                     f"{table['widths'][1]} | {table['auto_multiple'] or 'none'} | {scores} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog=(
        "Full run on 2 cores: the prune step about 20 minutes with the fine-tune cached (one Fisher pass of 2048 "
        "samples, five mask tunings, six evaluations of 2000 examples); the latency step about 10 minutes on a quiet "
        "machine (24 OpenVINO conversions, the timed rounds, two FFN width tables of about 290 widths)."))
    add_step_arguments(parser, STUDY, "accuracy")
    parser.add_argument("--multiples", type=int, nargs="+", help="width multiples to prune with (default: settings)")
    args = parser.parse_args(argv)
    check_step_arguments(parser, args)
    recipe = load_recipe(RECIPE)
    settings = {"calibration_samples": recipe.pruning[0].calibration_samples, **study_settings(STUDY, args.quick)}
    if args.multiples:
        settings["multiples"] = args.multiples
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    with tempfile.TemporaryDirectory() as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = prune_step_results(run, "models", "models")
        else:
            claim_models_dir(models_dir)
            results = prune_step(run, recipe, settings, models_dir)
        if args.step == "prune":
            run.write(results, markdown)
            print(f"wrote {run.stem}.json (accuracy only); time it with --step latency")
            return 0
        results = latency_step(run, recipe, results, models_dir)
    print(markdown(run.write(results, markdown)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
