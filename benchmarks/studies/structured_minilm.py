"""Structured pruning without retraining on the fine-tuned MiniLM-L6 encoder: Kwon et al.'s mask search (with and
without FLAP's bias compensation) against FLAP, Wanda-sp and structured magnitude at equal head+FFN FLOPs removed.

    python -m benchmarks.studies.structured_minilm            # the measurement (see the estimate in --help)
    python -m benchmarks.studies.structured_minilm --quick    # every method on a tiny synthetic BERT, in seconds

Every method is `recipes/minilm_mask_search.yaml` with only its pruning stage changed (settings.yaml lists the
changes): the same cached fine-tune, the same target (40% of the head+FFN MACs, counted at the calibration
samples' average length), the same 2048 calibration samples drawn with the stage's seed, in batches of 32. FLAP,
Wanda-sp and magnitude run through the recipe's stage runner (`recipes.pruning_stage.run_pruning_stage`, i.e.
`inc_plugins.prepare_pruning`). The mask_search variants share one Fisher pass (it depends on neither the switches
nor the target): each calls `prune_post_training`, the function the INC type runs, with the stage's settings and
the gradients, and `fold_kwon_result` writes masks and biases into the weights as the type does; their pruning time
is the Fisher pass plus the call. Each pruned model is slimmed and evaluated on the recipe's 2000 dev examples:
accuracy, F1, parameters, and the pruning wall time (on a shared machine: the load averages are recorded).

Writes <out>/structured_minilm.{json,md} (--quick: structured_minilm_quick.*).
"""

import copy
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.sources import text_classification_task
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.post_training import KwonSettings, collect_mask_gradients, fold_kwon_result, prune_post_training
from recipes.pruning_stage import calibration_batches, mask_search_summary, run_pruning_stage, slim_pruned_model
from recipes.schema import PruningStage, load_recipe
from recipes.text_classification import evaluate, tokenized_batches

STUDY = "structured_minilm"
RECIPE = "minilm_mask_search.yaml"
MASK_SEARCH_ONLY_KEYS = ("constraint", "rearrange", "tune")


def stage_of(template: PruningStage, changes: dict) -> PruningStage:
    """The recipe's pruning stage with `changes`; a stage of another type drops mask_search's own keys."""
    entry = template.model_dump(exclude_none=True)
    if changes.get("pruning_type", "mask_search") != "mask_search":
        entry = {key: value for key, value in entry.items() if key not in MASK_SEARCH_ONLY_KEYS}
    return PruningStage.model_validate({**entry, **changes})


class SharedFisher:
    """mask_search from one Fisher pass over the stage's calibration batches (computed at the first call)."""

    def __init__(self, template: PruningStage, tokenizer, train_examples, max_length: int):
        self.batches, self.samples = calibration_batches(template, tokenizer, train_examples, max_length)
        self.gradients, self.seconds = None, 0.0

    def prune(self, model, stage: PruningStage):
        """(the KwonResult, the pruning seconds) of `stage` on `model`, whose weights it then holds."""
        if self.gradients is None:
            start = time.perf_counter()
            self.gradients = collect_mask_gradients(model, self.batches)
            self.seconds = time.perf_counter() - start
        entry = {**stage.inc_settings(), "num_samples": self.samples}
        settings = KwonSettings(**{key: value for key, value in entry.items() if key in KwonSettings.model_fields})
        start = time.perf_counter()
        result = prune_post_training(model, self.batches, settings, gradients=self.gradients)
        fold_kwon_result(model, result)
        return result, self.seconds + time.perf_counter() - start


def mask_search_row(model, stage: PruningStage, fisher: SharedFisher, probe: dict) -> tuple:
    """(slimmed model, the row's facts besides the metrics) of a mask_search stage."""
    result, seconds = fisher.prune(model, stage)
    with torch.no_grad():
        inputs = {key: value for key, value in probe.items() if key != "labels"}
        masked = model(**inputs).logits
        slimmed = slim_model(model, (result.head_mask != 0).float(), (result.neuron_mask != 0).float())
        difference = (slimmed(**inputs).logits - masked).abs().max().item()
    summary = mask_search_summary(SimpleNamespace(result=result))
    return slimmed, {"prune_seconds": round(seconds, 3), "fisher_seconds": round(fisher.seconds, 3),
                     "removed_fraction": summary["removed_fraction"], "slimming_check": difference, **{
                         key: summary[key] for key in ("seq_len", "kept_heads", "kept_neurons", "heads_per_layer",
                                                       "neurons_per_layer", "step_checks")}}


def stage_row(model, stage: PruningStage, tokenizer, train_examples, max_length: int, probe: dict) -> tuple:
    """(slimmed model, the row's facts besides the metrics) of a flap / wanda_sp / structured_magnitude stage."""
    outcome = run_pruning_stage(model, stage, tokenizer, train_examples, max_length)
    structure = outcome.report["structure"]
    slimmed, check = slim_pruned_model(model, probe, outcome.result)
    return slimmed, {"prune_seconds": outcome.report["prune_seconds"], "removed_fraction": structure["removed_fraction"],
                     "slimming_check": check["max_abs_logit_difference_on_a_dev_batch"], **{
                         key: structure[key] for key in ("seq_len", "kept_heads", "kept_neurons", "heads_per_layer",
                                                         "neurons_per_layer")}}


def markdown(results: dict) -> str:
    s = results["settings"]
    dense = results["dense"]
    lines = [
        "# Structured pruning of MiniLM-L6 without retraining: mask_search, FLAP, Wanda-sp, magnitude",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"`{s['recipe']}` with its pruning stage changed: {100 * s['target']:.0f}% of the head+FFN MACs removed, "
        f"{s['calibration_samples']} calibration samples (seed {s['seed']}, batches of {s['batch_size']}); dev "
        f"accuracy and F1 on {s['dev_examples']} dev examples (movie snippets, SST-2-like labels, not the official "
        f"SST-2) of the slimmed model. Pruning seconds: the pruning call alone, on a machine shared with other jobs. "
        f"{machine_line(results)}" + (f" Rows measured in the runs of {', '.join(results['reused'])} (same settings), "
                                      f"combined here." if results.get("reused") else ""),
        "",
        "| method | stage changes | accuracy | F1 | MACs removed | parameters | pruning s |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| dense | | {dense['accuracy']:.4f} | {dense['f1']:.4f} | 0 | {dense['parameters'] / 1e6:.2f}M | |",
    ]
    for name, row in results["methods"].items():
        changes = ", ".join(f"`{key}: {str(value).lower()}`" for key, value in row["changes"].items()) or "(the recipe)"
        if "error" in row:
            lines.append(f"| {name} | {changes} | failed: {row['error'][:100]} | | | | |")
            continue
        lines.append(f"| {name} | {changes} | {row['accuracy']:.4f} | {row['f1']:.4f} | "
                     f"{100 * row['removed_fraction']:.2f}% | {row['parameters'] / 1e6:.2f}M | "
                     f"{row['prune_seconds']:.0f} |")
    lines += ["", f"Kept heads (of {results['structure']['heads_per_layer']}) and FFN neurons (of "
              f"{results['structure']['neurons_per_layer']}) per block:", ""]
    for name, row in results["methods"].items():
        if "error" not in row:
            lines.append(f"- {name}: heads {row['kept_heads']}, neurons {row['kept_neurons']}")
    lines += ["", "Largest |logit| difference between the masked and the slimmed model on a dev batch: "
              f"{max(row['slimming_check'] for row in results['methods'].values() if 'error' not in row):.1e}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog="Full run on 2 cores: about 10 minutes with the fine-tune cached "
                                                 "(two mask tunings of about a minute, eight evaluations of 2000 "
                                                 "examples); about 10 more the first time, to fine-tune MiniLM.")
    parser.add_argument("--methods", nargs="+", help="method names of settings.yaml (default: all)")
    parser.add_argument("--name", default=STUDY, help=f"results file stem (default {STUDY})")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[],
                        help="results files of earlier runs with the same settings (e.g. --methods split over "
                             "processes): their dense row and methods are taken instead of measured again")
    args = parser.parse_args(argv)
    quick = args.quick
    recipe = load_recipe(RECIPE)
    template = recipe.pruning[0]
    settings = study_settings(STUDY, quick)
    methods = {name: changes or {} for name, changes in settings["methods"].items()
               if args.methods is None or name in args.methods}
    if "calibration_samples" in settings:
        template = template.model_copy(update={"calibration_samples": settings["calibration_samples"]})
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    run = StudyRun(STUDY, quick, args.out, argv, name=args.name)
    dense, tokenizer, train_examples, dev_examples = text_classification_task(recipe, quick)
    dev_examples = dev_examples[:settings["dev_examples"]] if settings.get("dev_examples") else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    results = {
        "benchmark": STUDY,
        "settings": {"quick": quick, "recipe": RECIPE, "target": template.target_sparsity,
                     "calibration_samples": template.calibration_samples, "batch_size": template.batch_size,
                     "seed": template.seed, "dev_examples": len(dev_examples),
                     "data_note": "movie-snippet sentiment, SST-2-like, not official SST-2"},
        "methods": {},
    }
    for path in args.reuse:
        earlier = json.loads(path.read_text())
        if earlier["settings"] != results["settings"]:
            raise SystemExit(f"error: {path} was written for other settings: {earlier['settings']}")
        results["dense"], results["structure"] = earlier["dense"], earlier["structure"]
        results["methods"].update({name: row for name, row in earlier["methods"].items() if "error" not in row})
        results.setdefault("reused", []).append(str(path))
    if "dense" not in results:
        results["dense"] = {**evaluate(dense, dev, desc="evaluate dense"),
                            "parameters": sum(p.numel() for p in dense.parameters())}
    print(f"dense accuracy {results['dense']['accuracy']:.4f}", flush=True)
    fisher = SharedFisher(template, tokenizer, train_examples, recipe.data.max_length)
    for name, changes in methods.items():
        if name in results["methods"]:
            continue
        model = copy.deepcopy(dense)
        try:
            stage = stage_of(template, changes)
            if stage.pruning_type == "mask_search":
                slimmed, facts = mask_search_row(model, stage, fisher, dev[0])
            else:
                slimmed, facts = stage_row(model, stage, tokenizer, train_examples, recipe.data.max_length, dev[0])
        except Exception as error:  # a method that fails is a result to record, not a reason to lose the others
            results["methods"][name] = {"changes": changes, "error": f"{type(error).__name__}: {error}"}
            print(f"{name} failed: {error}", flush=True)
            continue
        results["structure"] = {key: facts.pop(key) for key in ("heads_per_layer", "neurons_per_layer")}
        results["methods"][name] = {"changes": changes, **evaluate(slimmed, dev, desc=f"evaluate {name}"),
                                    "parameters": sum(p.numel() for p in slimmed.parameters()), **facts}
        run.write_progress(results)
        print(f"{name}: accuracy {results['methods'][name]['accuracy']:.4f}, {facts['prune_seconds']:.0f} s", flush=True)
    order = list(settings["methods"])  # the settings' order, also for rows of --reuse
    results["methods"] = dict(sorted(results["methods"].items(),
                                     key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
