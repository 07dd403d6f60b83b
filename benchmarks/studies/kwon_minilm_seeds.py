"""Kwon et al. (2022) mask tuning on MiniLM-L6 across fine-tune seeds: does it help on every fine-tune, not just one?

    python -m benchmarks.studies.kwon_minilm_seeds            # the full measurement (see the estimate in --help)
    python -m benchmarks.studies.kwon_minilm_seeds --quick    # every step on tiny synthetic BERTs, in seconds

For each fine-tune seed in settings.yaml (full: 0, 1, 2), MiniLM is fine-tuned on the movie-snippet sentiment task
of `recipes/minilm_mask_search.yaml` with the recipe's fine-tune block and `finetune.seed` set to that seed (through
the recipe machinery, so each fine-tune is cached by the hash of everything that shaped it), then evaluated on the
recipe's dev set (accuracy and F1):

* dense;
* mask search only: `mask_search` at the recipe's target (40% of the head+FFN FLOPs removed) with rearrange=False,
  tune=False;
* each step alone on top of the search, kept unchecked: rearrangement only, and tuning only (without
  rearrangement), to see which step moves the accuracy;
* the paper's full method, rearrangement and tuning kept unchecked (check_steps=False);
* the full method as shipped (rearrange=True, tune=True, check_steps=True): each step kept only when it raises the
  top-1 agreement with the dense model on the 512 least-sure calibration samples (the report's
  ``mask_search["step_checks"]``), with its per-sub-layer mask-tuning decisions (``mask_search["tuning"]``:
  held-out samples, how many fits kept their tuned scales, and for each sub-layer why not and its held-out
  reconstruction errors).

Both prunings run through the recipe's pruning stage (`recipes.pruning_stage.run_pruning_stage`, the product's
path), from the recipe's calibration samples (2048), batch size and seed, each on a fresh copy of the dense model.
The report shows, per seed, full - dense and full - search-only in points, against two criteria: the full method
within 1 point of dense, and never more than 0.2 points below search only; and, for full against search only, how
many dev examples only one of the two gets right, with the exact two-sided McNemar p-value of that split (how
likely so lopsided a split is if neither is better).

Full run on 2 cores: 3 fine-tunes of about 6-10 minutes each (only those not already in the fine-tune cache;
`make demo` caches seed 0's), plus 12 mask searches of about 1 minute each and 15 evaluations of 2000 examples.

--quick uses the synthetic BERT of `inc_plugins.perf.synthetic` drawn with each seed (so the seeds' models differ),
a word-level tokenizer and random sentences: it checks the steps run, it measures nothing.

Writes <out>/kwon_minilm_seeds.{json,md,png} (--quick: kwon_minilm_seeds_quick.*).
"""

import copy
import logging
import math
import time

import torch

from benchmarks.studies.common import StudyRun, figure, machine_line, save_figure, study_parser, study_settings
from benchmarks.studies.sources import (SYNTHETIC_DEV_EXAMPLES, SYNTHETIC_TRAIN_EXAMPLES, synthetic_examples,
                                        synthetic_tokenizer, text_classification_task)
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.perf.synthetic import synthetic_bert_classifier
from recipes import finetune_cache
from inc_plugins.post_training.step_checks import CHECK_SAMPLES
from recipes.pruning_stage import calibration_batches, run_pruning_stage
from recipes.schema import load_recipe
from recipes.text_classification import classification_metrics, predict, tokenized_batches

STUDY = "kwon_minilm_seeds"
RECIPE = "minilm_mask_search.yaml"
# (name, rearrange, tune, check_steps): search only, each step alone, the paper's full method (steps unchecked), and
# the full method as shipped (each step checked)
VARIANTS = (("search_only", False, False, False), ("rearrange_only", True, False, False),
            ("tune_only", False, True, False), ("full_unchecked", True, True, False), ("full", True, True, True))
LABELS = {"dense": "dense", "search_only": "mask search only", "rearrange_only": "+ rearrangement only",
          "tune_only": "+ tuning only", "full_unchecked": "+ both, unchecked (paper)",
          "full": "full method (both, each checked)"}
MODELS = ("dense", *(name for name, *_ in VARIANTS))
# the acceptance criteria, in accuracy points
MAX_BELOW_DENSE, MAX_BELOW_SEARCH = 1.0, 0.2


def seed_recipe(recipe, seed: int):
    """`recipe` with its fine-tune seed set to `seed` (everything else, the fine-tune cache key included, follows)."""
    return recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"seed": seed})})


def seed_task(recipe, seed: int, quick: bool):
    """(model, tokenizer, train_examples, dev_examples, finetune) for the fine-tune `seed`: the recipe machinery's
    fine-tuned model (from its cache, or fine-tuned now and cached); quick: the synthetic BERT drawn with `seed`,
    on the same synthetic sentences for every seed."""
    recipe = seed_recipe(recipe, seed)
    if quick:
        model = synthetic_bert_classifier(seed=seed, num_labels=recipe.model.num_labels)
        return (model, synthetic_tokenizer(), synthetic_examples(SYNTHETIC_TRAIN_EXAMPLES, seed=0),
                synthetic_examples(SYNTHETIC_DEV_EXAMPLES, seed=1), {"seed": seed, "synthetic": True})
    key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
    cached = (finetune_cache.cached_dir(key) / "finetune.json").is_file()
    start = time.perf_counter()
    model, tokenizer, train_examples, dev_examples = text_classification_task(recipe, quick)
    info = {"seed": seed, "cache_key": key, "was_cached": cached,
            "load_or_finetune_seconds": round(time.perf_counter() - start, 1)}
    return model, tokenizer, train_examples, dev_examples, info


@torch.no_grad()
def least_sure_samples(dense, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(the dense model's predictions on the calibration batches, the CHECK_SAMPLES samples of smallest top-1 minus
    top-2 logit margin): where the step checks look."""
    logits = torch.cat([dense(**{k: v for k, v in batch.items() if k != "labels"}).logits for batch in batches])
    top2 = logits.topk(2, dim=-1).values
    return logits.argmax(dim=-1), torch.sort(top2[:, 0] - top2[:, 1], stable=True).indices[:CHECK_SAMPLES]


def calibration_agreement(model, batches, dense_pred: torch.Tensor, least_sure: torch.Tensor, desc: str) -> dict:
    """How many of the dense model's calibration predictions `model` repeats: on every sample, and on the least-sure
    ones (if the pruned model changes only low-margin decisions, the two miss the same number)."""
    pred, _ = predict(model, batches, desc=desc)
    same = pred == dense_pred
    return {"all": int(same.sum()), "samples": len(same), "least_sure": int(same[least_sure].sum()),
            "least_sure_samples": len(least_sure)}


def correct(metrics: dict) -> int:
    """How many examples `metrics` (`evaluate`'s) got right: its float32 accuracy times its examples, rounded."""
    return round(metrics["accuracy"] * metrics["examples"])


def exact_mcnemar(a_right: torch.Tensor, b_right: torch.Tensor) -> dict:
    """Of the examples only one of two models gets right: how many each, and the exact two-sided McNemar p-value
    (binomial, p = 1/2, over the discordant examples)."""
    only_a, only_b = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    n, low = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(low + 1)) / 2 ** n) if n else 1.0
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": p}


def points(a: dict, b: dict) -> float:
    """Accuracy of `a` minus that of `b`, in points (percent), from their counts of correct examples: exact, so a
    difference of exactly 1 point (20 of 2000 examples) is 1.0, not 1.0000000238 from float32 accuracies."""
    assert a["examples"] == b["examples"], (a, b)
    return 100 * (correct(a) - correct(b)) / a["examples"]


# ---------------------------------------------------------------------------------------------------- outputs


def markdown(results: dict) -> str:
    s = results["settings"]
    seeds = ", ".join(str(row["seed"]) for row in results["seeds"])
    lines = [
        "# Kwon et al. (2022) mask tuning on MiniLM-L6 across fine-tune seeds (movie-snippet sentiment)",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic models and data, not a measurement.** ' if s['quick'] else ''}"
        f"Recipe `recipes/{s['recipe']}`: MiniLM-L6 fine-tuned with each fine-tune seed ({seeds}; everything else "
        f"the recipe's), then pruned by `mask_search` to {100 * s['target']:.0f}% of the head+FFN FLOPs removed, "
        f"from {s['calibration_samples']} calibration samples, through the recipe's pruning stage: search only "
        f"(no rearrangement, no tuning), each step alone, both steps unchecked (the paper's full method), and the "
        f"full method as shipped (each step kept only when its check passes). Dev "
        f"accuracy on "
        f"{s['dev_examples']} dev examples (SST-2-like labels, not the official SST-2). {machine_line(results)}",
        "",
        "| fine-tune seed | dense acc (F1) | search only acc (F1) | full acc (F1) | full - dense (pts) | "
        "full - search only (pts) | FLOPs removed (full) | sub-layer fits kept / fits (tuning kept by its check) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["seeds"]:
        dense, search, full = row["dense"], row["search_only"], row["full"]
        tuning = full["search"]["tuning"] or {}
        checked = {check["step"]: check["kept"] for check in full["search"].get("step_checks", [])}
        kept = {True: "yes", False: "no"}.get(checked.get("tuning"), "-")
        lines.append(
            f"| {row['seed']} | {dense['accuracy']:.4f} ({dense.get('f1', float('nan')):.4f}) | "
            f"{search['accuracy']:.4f} ({search.get('f1', float('nan')):.4f}) | "
            f"{full['accuracy']:.4f} ({full.get('f1', float('nan')):.4f}) | {row['full_minus_dense']:+.2f} | "
            f"{row['full_minus_search_only']:+.2f} | {100 * full['flops_removed']:.1f}% | "
            f"{tuning.get('accepted', '-')} / {tuning.get('fits', '-')} ({kept}) |")
    lines += ["", "## Which step moves the accuracy", "",
              "Dev accuracy, and in brackets the share of dev examples on which the model predicts what the dense "
              "model predicts. Full vs search only: the dev examples only one of the two gets right, and the exact "
              "two-sided McNemar p-value of that split.", "",
              "| fine-tune seed | " + " | ".join(LABELS[name] for name in MODELS) +
              " | only full right / only search right | McNemar p |",
              "|---" * (len(MODELS) + 3) + "|"]
    for row in results["seeds"]:
        test = row["full_vs_search_only"]
        lines.append(f"| {row['seed']} | " + " | ".join(
            f"{row[name]['accuracy']:.4f} ({row[name]['agreement_with_dense']:.3f})" for name in MODELS) +
            f" | {test['only_first_right']} / {test['only_second_right']} | {test['p_value']:.3f} |")
    lines += ["", "## Criteria (per seed)", "",
              f"Differences in points are exact, from the counts of correct dev examples (1 point = "
              f"{s['dev_examples'] / 100:g} of {s['dev_examples']} examples); a criterion met with equality passes.",
              "",
              "| fine-tune seed | full within 1 point of dense (full - dense >= -1) | "
              "full not more than 0.2 points below search only (full - search only >= -0.2) |",
              "|---|---|---|"]
    for row in results["seeds"]:
        c = row["criteria"]
        lines.append(f"| {row['seed']} | {'PASS' if c['within_1pt_of_dense'] else 'FAIL'} "
                     f"({row['full_minus_dense']:+.2f}) | {'PASS' if c['not_below_search_only'] else 'FAIL'} "
                     f"({row['full_minus_search_only']:+.2f}) |")
    every = results["criteria"]
    lines += ["", f"Every seed: full within 1 point of dense: {'PASS' if every['within_1pt_of_dense'] else 'FAIL'}; "
              f"full not more than 0.2 points below search only: {'PASS' if every['not_below_search_only'] else 'FAIL'}.",
              "", "## Agreement with the dense model on the calibration samples", "",
              f"How many of the dense model's predictions each pruned model repeats, on all calibration samples and "
              f"on the {CHECK_SAMPLES} the dense model is least sure of (smallest top-1 minus top-2 logit): the "
              f"step checks look only at the latter, which misses nothing when both columns miss the same number.",
              "", "| fine-tune seed | " + " | ".join(LABELS[name] for name in MODELS[1:]) + " |",
              "|---" * len(MODELS) + "|"]
    for row in results["seeds"]:
        cells = []
        for name in MODELS[1:]:
            a = row[name]["calibration_agreement"]
            cells.append(f"{a['all']}/{a['samples']} (missed {a['samples'] - a['all']}); least sure "
                         f"{a['least_sure']}/{a['least_sure_samples']} (missed {a['least_sure_samples'] - a['least_sure']})")
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "## Step checks of the full method", "",
              "Each step is kept only when the model with it repeats more of the dense model's top-1 predictions on "
              "the calibration samples the dense model is least sure of (a tie drops it).", "",
              "| fine-tune seed | step | samples | agreement without | agreement with | kept |",
              "|---|---|---|---|---|---|"]
    for row in results["seeds"]:
        checks = row["full"]["search"]["step_checks"]
        lines += [f"| {row['seed']} | {c['step']} | {c['samples']} | {c['agreement_without']} | "
                  f"{c['agreement_with']} | {'yes' if c['kept'] else 'no'} |" for c in checks] or \
            [f"| {row['seed']} | (no step changed the masks) | | | | |"]
    lines += ["", "## Mask-tuning decisions of the full method", ""]
    for row in results["seeds"]:
        tuning = row["full"]["search"]["tuning"]
        if tuning is None:
            lines += [f"Seed {row['seed']}: no tuning report.", ""]
            continue
        lines += [f"Seed {row['seed']}: {tuning['accepted']} of {tuning['fits']} sub-layer fits kept their tuned "
                  f"scales ({tuning['heldout_samples']} held-out calibration samples judged them).", ""]
        rejected = [entry for entry in tuning["sublayers"] if not entry["accepted"]]
        if not rejected:
            lines += ["No sub-layer kept scales of 1.", ""]
            continue
        lines += ["| block | part | kept units | reason scales of 1 were kept | held-out error untuned | tuned |",
                  "|---|---|---|---|---|---|"]
        for entry in rejected:
            lines.append(f"| {entry['block']} | {entry['part']} | {entry['kept_units']} | {_cell(entry['reason'])} | "
                         f"{_error(entry['heldout_error_untuned'])} | {_error(entry['heldout_error_tuned'])} |")
        lines.append("")
    lines += [f"Total wall time of the run: {results['run']['seconds'] / 60:.1f} min "
              f"(fine-tunes run now: {sum(not row['finetune'].get('was_cached', True) for row in results['seeds'])})."]
    return "\n".join(lines) + "\n"


def _cell(text: str | None) -> str:
    """`text` for a Markdown table cell: its pipes escaped (a reason may say "max |scale| 13.3 > 10.0")."""
    return (text or "-").replace("|", "\\|")


def _error(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot(results: dict, path) -> None:
    fig, ax = figure(figsize=(6.4, 4.2))
    rows = results["seeds"]
    width = 0.16
    for i, name in enumerate(MODELS):
        xs = [j + (i - (len(MODELS) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, [row[name]["accuracy"] for row in rows], width=width, label=LABELS[name])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(rows)), [f"seed {row['seed']}" for row in rows])
    accuracies = [row[name]["accuracy"] for row in rows for name in MODELS]
    low, high = min(accuracies), max(accuracies)
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, high + 0.05))
    ax.set_ylabel(f"dev accuracy ({results['settings']['dev_examples']} examples)")
    ax.set_title(f"MiniLM-L6, {100 * results['settings']['target']:.0f}% head+FFN FLOPs removed"
                 + (" (QUICK)" if results["settings"]["quick"] else ""))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = study_parser(
        STUDY, __doc__,
        epilog="Full run on 2 cores: 3 fine-tunes of about 6-10 minutes each unless already in the fine-tune cache "
               "(seed 0's is after `make demo`), plus 6 mask searches of about 1 minute each and 9 evaluations of "
               "2000 examples.")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tune seeds (default: settings.yaml)")
    parser.add_argument("--calibration-samples", type=int, help="default: the recipe's")
    parser.add_argument("--dev-examples", type=int, help="default: all the recipe's")
    args = parser.parse_args(argv)
    quick = args.quick
    recipe = load_recipe(RECIPE)
    template = recipe.pruning[0]
    settings = {"calibration_samples": template.calibration_samples, **study_settings(STUDY, quick)}
    given = {"finetune_seeds": args.seeds, "calibration_samples": args.calibration_samples,
             "dev_examples": args.dev_examples}
    settings.update({key: value for key, value in given.items() if value is not None})
    n_calibration, n_dev = settings["calibration_samples"], settings["dev_examples"]
    run = StudyRun(STUDY, quick, args.out, argv)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    max_length = recipe.data.max_length

    results = {
        "benchmark": STUDY,
        "settings": {"quick": quick, "recipe": RECIPE, "finetune_seeds": settings["finetune_seeds"],
                     "finetune": recipe.finetune.model_dump(mode="json"), "target": template.target_sparsity,
                     "constraint": template.constraint, "calibration_samples": n_calibration,
                     "calibration_batch_size": template.batch_size, "pruning_seed": template.seed,
                     "dev_examples": None, "max_length": max_length,
                     "criteria_points": {"max_below_dense": MAX_BELOW_DENSE, "max_below_search_only": MAX_BELOW_SEARCH},
                     "data_note": "movie-snippet sentiment, SST-2-like, not official SST-2"},
        "seeds": [],
    }
    for seed in settings["finetune_seeds"]:
        print(f"[fine-tune seed {seed}]", flush=True)
        dense, tokenizer, train_examples, dev_examples, finetune_info = seed_task(recipe, seed, quick)
        dev_examples = dev_examples[:n_dev] if n_dev else dev_examples
        results["settings"]["dev_examples"] = len(dev_examples)
        dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, max_length)
        structure = mask_structure(dense)
        dense_pred, gold = predict(dense, dev, desc=f"evaluate dense (seed {seed})")
        row = {"seed": seed, "finetune": finetune_info, "n_layers": structure.n_layers,
               "dense": classification_metrics(dense_pred, gold)}
        predictions = {"dense": dense_pred}
        calibration, _ = calibration_batches(template.model_copy(update={"calibration_samples": n_calibration}),
                                             tokenizer, train_examples, max_length)
        dense_calibration, least_sure = least_sure_samples(dense, calibration)
        print(f"seed {seed} dense: accuracy {row['dense']['accuracy']:.4f}", flush=True)
        for name, rearrange, tune, check_steps in VARIANTS:
            stage = template.model_copy(update={"rearrange": rearrange, "tune": tune, "check_steps": check_steps,
                                                "calibration_samples": n_calibration})
            model = copy.deepcopy(dense)
            outcome = run_pruning_stage(model, stage, tokenizer, train_examples, max_length)
            info = outcome.report
            searched = info["mask_search"]
            pred, _ = predict(model, dev, desc=f"evaluate {name} (seed {seed})")
            predictions[name] = pred
            row[name] = {**classification_metrics(pred, gold), "prune_seconds": info["prune_seconds"],
                         "flops_removed": searched["removed_fraction"],
                         "calibration_agreement": calibration_agreement(model, calibration, dense_calibration,
                                                                        least_sure, f"calibration {name} (seed {seed})"),
                         "search": searched}
            print(f"seed {seed} {name}: accuracy {row[name]['accuracy']:.4f}, {info['prune_seconds']:.1f} s",
                  flush=True)
            del model
        for name in MODELS:
            row[name]["correct"] = correct(row[name])
            row[name]["agreement_with_dense"] = float((predictions[name] == dense_pred).float().mean())
        row["full_vs_search_only"] = exact_mcnemar(predictions["full"] == gold, predictions["search_only"] == gold)
        row["full_minus_dense"] = points(row["full"], row["dense"])
        row["full_minus_search_only"] = points(row["full"], row["search_only"])
        row["criteria"] = {"within_1pt_of_dense": row["full_minus_dense"] >= -MAX_BELOW_DENSE,
                           "not_below_search_only": row["full_minus_search_only"] >= -MAX_BELOW_SEARCH}
        results["seeds"].append(row)
        run.mark(f"after_seed_{seed}")
        run.write_progress(results)
        del dense
    results["criteria"] = {key: all(row["criteria"][key] for row in results["seeds"])
                           for key in ("within_1pt_of_dense", "not_below_search_only")}
    results = run.write(results, markdown, plot)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
