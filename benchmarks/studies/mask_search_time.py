"""Where the time of Kwon et al.'s mask search goes: the Fisher pass, the search, the rearrangement, the tuning and
the step checks.

    python -m benchmarks.studies.mask_search_time           # the demo's fine-tuned MiniLM, 2048 samples (minutes)
    python -m benchmarks.studies.mask_search_time --quick   # the synthetic tiny BERT, in seconds

The setting of ``recipes/minilm_mask_search.yaml`` (the `make demo` recipe): its fine-tuned MiniLM-L6, its target
(40% of head+FFN FLOPs removed), and its 2048 calibration samples drawn with the stage's seed, in batches of its batch
size. ``prune_post_training`` runs ``repeats`` times on the same model and samples; each phase is timed by wrapping
the pipeline's own calls (``collect_mask_gradients``, ``rearrange_mask``, ``tune_mask_scales``; the step checks are
the pipeline's own ``phase_seconds["check"]``, 0 in checkouts without them; the search is the rest), so the same
file also times an older checkout of the library: put that checkout first on ``PYTHONPATH`` and
run this file by its path. Each run's masks are hashed: every repeat must find the same ones. A timing: run it on a
quiet machine; the results say the load average they saw.

Writes <out>/mask_search_time.{json,md} (--quick: mask_search_time_quick.*).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import statistics
import time

import torch

import inc_plugins
import inc_plugins.post_training.pipeline as pipeline
from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.sources import text_classification_task
from recipes.schema import load_recipe
from recipes.text_classification import tokenized_batches

STUDY = "mask_search_time"
RECIPE = "minilm_mask_search.yaml"
PHASES = ("fisher", "search", "rearrange", "tune", "check")
TIMED_CALLS = {"fisher": "collect_mask_gradients", "rearrange": "rearrange_mask", "tune": "tune_mask_scales"}


def timed_phases(settings, model, batches) -> tuple[dict[str, float], str]:
    """({phase: seconds}, sha256 of the masks) of one ``prune_post_training`` run on a copy of ``model``."""
    seconds = dict.fromkeys(PHASES, 0.0)
    originals = {phase: getattr(pipeline, name) for phase, name in TIMED_CALLS.items()}

    def timing(phase):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return originals[phase](*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
        return call

    for phase, name in TIMED_CALLS.items():
        setattr(pipeline, name, timing(phase))
    try:
        start = time.perf_counter()
        result = pipeline.prune_post_training(copy.deepcopy(model), batches, settings)
        total = time.perf_counter() - start
    finally:
        for phase, name in TIMED_CALLS.items():
            setattr(pipeline, name, originals[phase])
    seconds["check"] = result.phase_seconds.get("check", 0.0)
    seconds["search"] = total - sum(seconds.values())
    digest = hashlib.sha256()
    for mask in (result.head_mask, result.neuron_mask):
        digest.update(mask.detach().float().contiguous().numpy().tobytes())
    return {**{phase: round(value, 2) for phase, value in seconds.items()}, "total": round(total, 2)}, \
        digest.hexdigest()[:16]


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Mask search time, phase by phase{' (quick: synthetic model, not a measurement)' if s['quick'] else ''}",
             "", f"`{results['run']['command']}` with `inc_plugins` from `{s['library']}`. {s['model']}; "
                 f"{s['calibration_samples']} calibration samples in batches of {s['batch_size']}, "
                 f"{100 * s['target']:.0f}% of head+FFN FLOPs removed, rearrangement and tuning on; "
                 f"{s['repeats']} runs, median seconds.", "", machine_line(results), "",
             "| phase | " + " | ".join(f"run {i + 1}" for i in range(s["repeats"])) + " | median |",
             "|---|" + "---:|" * (s["repeats"] + 1)]
    for phase in (*PHASES, "total"):
        values = [run[phase] for run in results["runs"]]
        lines.append(f"| {phase} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {results['median'][phase]:.1f} |")
    lines += ["", f"Masks: {'the same in every run' if results['same_masks'] else 'DIFFERENT between runs'} "
                  f"(sha256 {', '.join(sorted(set(results['mask_hashes'])))}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog="Full run on 2 quiet cores: about a minute per repeat with this "
                                                 "library (plus a fine-tune of about 10 minutes if the cache is empty).")
    parser.add_argument("--repeats", type=int, help="runs of the whole search (default: settings.yaml)")
    args = parser.parse_args(argv)
    settings = study_settings(STUDY, args.quick)
    repeats = args.repeats or settings["repeats"]
    recipe = load_recipe(RECIPE)
    stage = recipe.pruning[0]
    samples = settings.get("calibration_samples", stage.calibration_samples)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)

    model, tokenizer, train_examples, _ = text_classification_task(recipe, args.quick)
    sample = random.Random(stage.seed).sample(train_examples, min(samples, len(train_examples)))
    batches = tokenized_batches(tokenizer, sample, stage.batch_size, recipe.data.max_length)
    kwon = pipeline.KwonSettings(target_sparsity=stage.target_sparsity, constraint=stage.constraint,
                                 rearrange=True, tune=True, num_samples=len(sample))
    runs, hashes = [], []
    for repeat in range(repeats):
        seconds, digest = timed_phases(kwon, model, batches)
        runs.append(seconds)
        hashes.append(digest)
        run.mark(f"after_run_{repeat + 1}")
        print(f"run {repeat + 1}: {seconds}", flush=True)
    results = {
        "settings": {"quick": args.quick, "recipe": RECIPE, "library": str(inc_plugins.__file__).rsplit("/", 2)[0],
                     "model": "synthetic tiny BERT" if args.quick else "MiniLM-L6 fine-tuned by the recipe",
                     "calibration_samples": len(sample), "batch_size": stage.batch_size,
                     "target": stage.target_sparsity, "repeats": repeats, "threads": torch.get_num_threads()},
        "runs": runs, "median": {key: statistics.median(r[key] for r in runs) for key in runs[0]},
        "mask_hashes": hashes, "same_masks": len(set(hashes)) == 1,
    }
    run.write(results, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
