"""Kwon et al.'s mask search with FLAP's bias compensation on SmolLM2-135M: perplexity at equal head+FFN FLOPs.

    python -m benchmarks.studies.kwon_bias_smollm2 --fisher-cache runs/kwon_smollm2_fisher.safetensors
    python -m benchmarks.studies.kwon_bias_smollm2 --quick    # every step on a tiny synthetic Llama, in seconds

The settings of the kwon_smollm2 study (its section of settings.yaml: 256 random windows of 128 tokens of the State
of the Union speeches in batches of 8, seed 0; perplexity on the first 8 windows of 512 tokens of Moby Dick), so
its "search only" row repeats that study's number. For each fraction of head+FFN FLOPs removed (settings.yaml), each
variant of ``mask_search`` (``prune_post_training``, the function the INC type runs; steps unchecked, as the paper)
with and without ``bias_compensation``: the removed key/value groups' and neurons' mean inputs to o_proj / down_proj,
over the calibration tokens of the pruned (and tuned) model, go into those projections' biases
(``post_training.bias_compensation``). The Fisher pass runs once and serves every search; ``--fisher-cache`` keeps
it in a file for the next run. Each pruned model is folded (masks and biases written into the weights), then slimmed
for the perplexity of the model one would ship (the folded model's first-window perplexity is checked against the
slimmed one's).

Writes <out>/kwon_bias_smollm2.{json,md} (--quick: kwon_bias_smollm2_quick.*). Accuracy only: no timing.
"""

import copy
import logging
import time
from pathlib import Path

import torch

from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.fisher_cache import cached_mask_gradients
from benchmarks.studies.kwon_smollm2 import calibration_batches, perplexity_of, summary
from benchmarks.studies.sources import causal_lm
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.post_training import KwonSettings, collect_mask_gradients, fold_kwon_result, prune_post_training
from recipes.schema import load_recipe

STUDY = "kwon_bias_smollm2"
RECIPE = "smollm2_wanda.yaml"  # the calibration and evaluation text settings every SmolLM2 recipe shares
LABELS = {"mask_search": "search only", "rearrange": "+ rearrangement", "full": "+ rearrangement + tuning (full)"}


def fisher_identity(model_description: str, settings: dict) -> dict:
    """What the Fisher pass's gradients depend on (``fisher_cache``'s identity): the model and kwon_smollm2's
    calibration (SOTU windows: count, length, batch, seed). width_multiple_smollm2 reads the same cache file."""
    return {"model": model_description, "text": "sotu",
            **{key: settings[key] for key in ("calibration_samples", "calibration_len", "calibration_batch")},
            "seed": settings["seed"], "per_sample": False}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Kwon et al.'s mask search with and without FLAP's bias compensation (SmolLM2-135M)",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"Calibration: {s['calibration_samples']} random windows of {s['calibration_len']} tokens of the State of the "
        f"Union speeches (batches of {s['calibration_batch']}, seed {s['seed']}); perplexity: the first "
        f"{s['eval_windows']} windows of {s['eval_len']} tokens of Moby Dick; steps unchecked (`check_steps: false`). "
        f"Fisher pass: {results['fisher_seconds']:.0f} s ({results['fisher_source']}). {machine_line(results)}",
        "",
        f"Dense perplexity: {results['dense']['perplexity']:.2f}, {results['dense']['parameters'] / 1e6:.2f}M parameters.",
        "",
        "| target | variant | bias compensation | perplexity (slimmed) | FLOPs removed | kept kv groups | kept neurons | "
        "parameters | search call s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        search = row["search"]
        lines.append(
            f"| {100 * row['target']:.0f}% | {LABELS[row['variant']]} | {'yes' if row['bias_compensation'] else 'no'} | "
            f"{row['perplexity']:.2f} | {100 * search['flops_removed']:.4f}% | {search['kept_kv_groups']}/"
            f"{search['total_kv_groups']} | {search['kept_neurons']}/{search['total_neurons']} | "
            f"{row['parameters'] / 1e6:.2f}M | {row['search_call_seconds']:.0f} |")
    lines += ["", "First-window perplexity of the folded model before slimming and of the slimmed model differ by at "
              f"most {max(abs(r['first_window'] - r['folded_first_window']) for r in results['rows']):.2e}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog="Full run on 2 cores: about 16 minutes of Fisher pass (none with a "
                                                 "filled --fisher-cache), a minute per search and compensation, about "
                                                 "17 minutes per mask tuning (variant full).")
    parser.add_argument("--fractions", type=float, nargs="+", help="head+FFN FLOPs fractions to remove")
    parser.add_argument("--variants", nargs="+", choices=tuple(LABELS), help="default: settings.yaml")
    parser.add_argument("--compensation", choices=("both", "on", "off"), default="both",
                        help="rows with bias compensation, without, or both (default)")
    parser.add_argument("--name", default=STUDY, help=f"results file stem (default {STUDY})")
    parser.add_argument("--fisher-cache", type=Path,
                        help="file of the mask gradients: read when it exists (and was written for these settings), "
                             "else written after the Fisher pass")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args(argv)
    quick = args.quick
    corpus = load_recipe(RECIPE).corpus
    settings = {"calibration_len": corpus.calibration_seq_len, "eval_windows": corpus.evaluation_windows,
                "eval_len": corpus.evaluation_seq_len, "seed": load_recipe(RECIPE).pruning[0].seed,
                **study_settings("kwon_smollm2", quick), **study_settings(STUDY, quick)}
    settings.update({key: value for key, value in {"fractions": args.fractions, "variants": args.variants}.items()
                     if value is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    run = StudyRun(STUDY, quick, args.out, argv, name=args.name)
    source = causal_lm(quick)
    model = source.model.eval()
    structure = mask_structure(model)
    torch.manual_seed(settings["seed"])
    samples = calibration_batches(source, settings["calibration_samples"], settings["calibration_len"],
                                  settings["calibration_batch"], settings["seed"])
    evaluation = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])
    keys = ("fractions", "variants", "calibration_samples", "calibration_len", "calibration_batch", "eval_windows",
            "eval_len", "seed")
    results = {"benchmark": STUDY, "settings": {"quick": quick, "model": source.description,
                                                **{key: settings[key] for key in keys}},
               "dense": {"perplexity": perplexity_of(model, evaluation),
                         "parameters": sum(p.numel() for p in model.parameters())},
               "rows": []}
    print(f"dense perplexity {results['dense']['perplexity']:.2f}", flush=True)

    identity = fisher_identity(source.description, settings)
    start = time.perf_counter()
    cached = args.fisher_cache is not None and args.fisher_cache.is_file()
    gradients = cached_mask_gradients(args.fisher_cache, identity, lambda: collect_mask_gradients(model, samples))
    results["fisher_seconds"] = round(time.perf_counter() - start, 1)
    results["fisher_source"] = f"read from {args.fisher_cache}" if cached else "computed in this run"
    run.write_progress(results)

    for fraction in settings["fractions"]:
        for variant in settings["variants"]:
            for compensate in {"both": (False, True), "on": (True,), "off": (False,)}[args.compensation]:
                kwon = KwonSettings(fraction, rearrange=variant != "mask_search", tune=variant == "full",
                                    check_steps=False, bias_compensation=compensate)
                start = time.perf_counter()
                result = prune_post_training(model, samples, kwon, gradients=gradients)
                seconds = time.perf_counter() - start
                pruned = copy.deepcopy(model)
                fold_kwon_result(pruned, result)
                folded = perplexity_of(pruned, evaluation[:1])
                slimmed = slim_model(pruned, (result.head_mask != 0).float(), (result.neuron_mask != 0).float())
                row = {"target": fraction, "variant": variant, "bias_compensation": compensate,
                       "perplexity": perplexity_of(slimmed, evaluation), "folded_first_window": folded,
                       "first_window": perplexity_of(slimmed, evaluation[:1]),
                       "parameters": sum(p.numel() for p in slimmed.parameters()),
                       "search_call_seconds": round(seconds, 1), "search": summary(result, structure)}
                results["rows"].append(row)
                run.write_progress(results)
                print(f"{fraction:.0%} {variant} compensation={compensate}: perplexity {row['perplexity']:.2f} "
                      f"({seconds:.0f} s)", flush=True)
                del pruned, slimmed
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
