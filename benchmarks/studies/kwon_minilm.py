"""Kwon et al. (2022) post-training pruning on the fine-tuned MiniLM-L6: accuracy, pruning time and latency.

    python -m benchmarks.studies.kwon_minilm            # the full measurement (see the estimate in --help)
    python -m benchmarks.studies.kwon_minilm --quick    # every step on a tiny synthetic BERT, in seconds

For each fraction of attention-head + FFN-neuron FLOPs removed (settings.yaml: 30/40/50/60%), on the movie-snippet
sentiment task (dev accuracy on the recipe's 2000 dev examples):

* dense; mask search only; + mask rearrangement; + mask tuning (the full method), each a separate
  `mask_search` run through the recipe's pruning stage (`recipes/minilm_mask_search.yaml`: its calibration
  samples, batch size and seed; seq_len = the calibration samples' average length);
* INC's built-in `retrain_free` pruner (Fisher scores + rearrangement of FFN channels only: no heads, no FLOPs
  search, no tuning) at the fraction of FFN neurons the full method removed, from the same calibration samples;
* pruning wall time of each (the pruning call only: no tokenization, no evaluation);
* latency of the slimmed full-method model against the dense model, eager and torch.compile (inductor), fp32,
  batch 32 x 128 tokens, the median of timed repeats after warm-up (the interleaved timer: every model timed in
  turn within each repeat, so machine noise hits all of them alike); and the ideal speedup, dense MACs / slimmed
  MACs, counted over the heads and FFN (Kwon et al.'s accounting) and over the whole model (every matmul, via
  torch's FlopCounterMode).

The fine-tuned model comes from the recipe machinery's fine-tune cache (`make demo` fills it); without it, this
study fine-tunes first (about 10 minutes on 2 cores) and caches the result.

Writes <out>/kwon_minilm.{json,md,png} (--quick: kwon_minilm_quick.*).
"""

import copy
import logging
import random

import torch
import torch._inductor.config as inductor_config
from torch.utils.data import DataLoader

import inc_plugins
from benchmarks.studies.common import StudyRun, figure, machine_line, save_figure, study_parser, study_settings
from benchmarks.studies.measures import compile_limits_for, time_models, whole_model_macs
from benchmarks.studies.sources import text_classification_task
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.perf.timing import seconds_of
from inc_plugins.post_training import masked_macs
from recipes.pruning_stage import dense_prunable_macs, prunable_macs, run_pruning_stage
from recipes.schema import load_recipe
from recipes.text_classification import evaluate, tokenized_batches

STUDY = "kwon_minilm"
RECIPE = "minilm_mask_search.yaml"
# (name, rearrange, tune): the method's steps switched on one after another
VARIANTS = (("mask_search", False, False), ("rearrange", True, False), ("full", True, True))
LABELS = {"mask_search": "mask search", "rearrange": "+ rearrangement", "full": "+ mask tuning (full)",
          "retrain_free": "INC retrain_free (FFN only)"}
# BERT's FFN output projection: its input channels are the FFN neurons
FFN_OUT = r"bert\.encoder\.layer\.\d+\.output\.dense$"


# ------------------------------------------------------------------------------------------------ the pruners


def ffn_neuron_keep(model) -> torch.Tensor:
    """[n_layers, n_neurons] bool: FFN neurons whose output-projection column is not all zero."""
    return torch.stack([(layer.output.dense.weight != 0).any(dim=0) for layer in model.bert.encoder.layer])


def run_retrain_free(model, stage, tokenizer, train_examples, max_length, ffn_fraction: float) -> dict:
    """INC's retrain_free on the FFN output projections (pattern channelx1: whole input columns = neurons), in
    place, through `inc_plugins.prepare_pruning(..., dataloader=)`, from the calibration samples mask_search used.

    Schedule: start_step 0, end_step = pruning_frequency = n (the number of calibration batches), exp decay. INC
    then prunes at step 0 to sparsity 0 (it has no scores yet) and at step n to the target, from the Fisher
    scores of batches 0..n-1, and folds the masks into the weights at step n. Batch n only runs the masked model,
    so batch 0 is fed again there. (start_step == end_step would use the one-shot scheduler, which prunes at a
    step with all-zero scores: INC 3.7.1 then removes 100% of the columns.)
    """
    sample = random.Random(stage.seed).sample(train_examples, min(stage.calibration_samples, len(train_examples)))
    batches = tokenized_batches(tokenizer, sample, stage.batch_size, max_length)
    steps = len(batches)
    config = inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "retrain_free", "pattern": "channelx1", "op_names": [FFN_OUT], "pruning_scope": "global",
        "target_sparsity": ffn_fraction, "start_step": 0, "end_step": steps, "pruning_frequency": steps,
        "sparsity_decay_type": "exp",
    }])
    # INC's retrain_free loop reads len(dataloader.dataset); batch_size=None hands the ready batches through
    loader = DataLoader(batches + batches[:1], batch_size=None)
    seconds = seconds_of(lambda: inc_plugins.prepare_pruning(model, config, dataloader=loader))
    # INC froze the FFN weights (requires_grad False) and left gradients on the rest: undo both
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    keep = ffn_neuron_keep(model)
    return {"prune_seconds": round(seconds, 3), "calibration_samples": len(sample), "target_ffn_fraction": ffn_fraction,
            "ffn_fraction_removed": 1 - keep.float().mean().item(), "kept_neurons": keep.sum(dim=1).tolist()}


def latency_inputs(vocab_size: int, batch: int, seq_len: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=generator),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------- outputs


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Kwon et al. (2022) post-training pruning of MiniLM-L6 (movie-snippet sentiment)",
        "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"{'**UNTRAINED classification head: accuracies are chance.** ' if s['untrained'] else ''}"
        f"Dev accuracy on {s['dev_examples']} dev examples (SST-2-like labels, not the official SST-2); "
        f"{s['calibration_samples']} calibration samples. {machine_line(results)}",
        "",
        f"Dense accuracy: {results['dense']['accuracy']:.4f}",
        "",
        "## Accuracy (head+FFN FLOPs actually removed, at the calibration average length)",
        "",
        "| target FLOPs removed | mask search | + rearrangement | + mask tuning (full) | INC retrain_free (FFN only) |",
        "|---|---|---|---|---|",
    ]
    for row in results["fractions"]:
        cells = []
        for name in ("mask_search", "rearrange", "full", "retrain_free"):
            v = row["variants"].get(name, {})
            if "error" in v:
                cells.append(f"failed: {v['error'][:80]}")
            elif "accuracy" in v:
                cells.append(f"{v['accuracy']:.4f} ({100 * v['flops_removed']:.1f}%)")
            else:
                cells.append("-")
        lines.append(f"| {100 * row['target']:.0f}% | " + " | ".join(cells) + " |")
    lines += ["", "retrain_free removes the same fraction of FFN neurons as the full method and no heads, so it removes "
              "fewer FLOPs (in brackets).", "",
              "## Pruning wall time (s, the pruning call only)", "",
              "| target | mask search | + rearrangement | + mask tuning (full) | INC retrain_free |", "|---|---|---|---|---|"]
    for row in results["fractions"]:
        cells = [f"{row['variants'][n]['prune_seconds']:.1f}" if "prune_seconds" in row["variants"].get(n, {}) else "-"
                 for n in ("mask_search", "rearrange", "full", "retrain_free")]
        lines.append(f"| {100 * row['target']:.0f}% | " + " | ".join(cells) + " |")
    lat = results["latency"]
    lines += ["", f"## Latency: slimmed full method vs dense, fp32, batch {lat['batch']} x {lat['seq_len']} tokens "
              f"(median of {lat['repeats']} interleaved repeats after {lat['warmup']} warm-up)", "",
              "| target | backend | dense ms | slimmed ms | speedup | ideal (head+FFN MACs) | ideal (whole model) | "
              "speedup / ideal (whole) | >= 85% of ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["fractions"]:
        ideal = row["ideal_speedup"]
        for backend, timing in lat["backends"].items():
            if "error" in timing:
                lines.append(f"| {100 * row['target']:.0f}% | {backend} | failed: {timing['error'][:80]} | | | | | | |")
                continue
            dense_ms, slim_ms = timing["dense"]["median_ms"], timing[row["name"]]["median_ms"]
            speedup = dense_ms / slim_ms
            ratio = speedup / ideal["whole_model"]
            lines.append(f"| {100 * row['target']:.0f}% | {backend} | {dense_ms:.1f} | {slim_ms:.1f} | {speedup:.2f}x | "
                         f"{ideal['head_ffn']:.2f}x | {ideal['whole_model']:.2f}x | {100 * ratio:.0f}% | "
                         f"{'yes' if ratio >= 0.85 else 'no'} |")
    lines += ["", f"Total wall time of the run: {results['run']['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    fig, ax = figure(figsize=(6.4, 4.2))
    ax.axhline(results["dense"]["accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
    for name, marker in (("mask_search", "o"), ("rearrange", "s"), ("full", "D"), ("retrain_free", "x")):
        points = [(100 * v["flops_removed"], v["accuracy"]) for row in results["fractions"]
                  if "accuracy" in (v := row["variants"].get(name, {}))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, label=LABELS[name])
    ax.set_xlabel("head + FFN FLOPs removed (%)")
    ax.set_ylabel(f"dev accuracy ({results['settings']['dev_examples']} examples)")
    ax.set_title("MiniLM-L6, movie-snippet sentiment: post-training pruning" + (" (QUICK)" if results["settings"]["quick"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = study_parser(
        STUDY, __doc__,
        epilog="Full run on 2 quiet cores: about 30 minutes (12 mask_search + 4 retrain_free prunings of 2048 samples, "
               "17 evaluations of 2000 examples, 10 model builds for latency), plus about 10 minutes the first "
               "time, to fine-tune MiniLM when the fine-tune cache is empty.")
    parser.add_argument("--fractions", type=float, nargs="+", help="FLOPs fractions to remove (default: settings.yaml)")
    parser.add_argument("--calibration-samples", type=int, help="default: the recipe's")
    parser.add_argument("--dev-examples", type=int, help="default: all the recipe's")
    parser.add_argument("--batch", type=int, help="latency batch size (default: settings.yaml)")
    parser.add_argument("--seq-len", type=int, help="latency tokens per sequence (default: settings.yaml)")
    parser.add_argument("--warmup", type=int, help="untimed calls after compiling (default: settings.yaml)")
    parser.add_argument("--repeats", type=int, help="timed calls per model (default: settings.yaml)")
    parser.add_argument("--backends", nargs="+", choices=("eager", "inductor"), help="default: settings.yaml")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--untrained", action="store_true",
                        help="skip the fine-tune: pretrained MiniLM with an untrained head (chance accuracy; smoke runs only)")
    args = parser.parse_args(argv)
    quick = args.quick
    recipe = load_recipe(RECIPE)
    template = recipe.pruning[0]
    settings = {"calibration_samples": template.calibration_samples, **study_settings(STUDY, quick)}
    given = {"fractions": args.fractions, "calibration_samples": args.calibration_samples,
             "dev_examples": args.dev_examples, "latency_batch": args.batch, "latency_seq_len": args.seq_len,
             "warmup": args.warmup, "repeats": args.repeats, "backends": args.backends}
    settings.update({key: value for key, value in given.items() if value is not None})
    n_calibration, n_dev = settings["calibration_samples"], settings["dev_examples"]
    batch, seq_len = settings["latency_batch"], settings["latency_seq_len"]
    warmup, repeats = settings["warmup"], settings["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if quick:
        inductor_config.compile_threads = 1  # a smoke run should not fan out compile workers
    run = StudyRun(STUDY, quick, args.out, argv, name=STUDY if not args.untrained or quick else f"{STUDY}_untrained")

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    dense, tokenizer, train_examples, dev_examples = text_classification_task(recipe, quick, args.untrained)
    dev_examples = dev_examples[:n_dev] if n_dev else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    max_length = recipe.data.max_length
    structure = mask_structure(dense)
    dense_head_ffn, dense_whole = dense_prunable_macs(structure, seq_len), whole_model_macs(dense, seq_len)

    results = {
        "benchmark": STUDY,
        "settings": {"quick": quick, "untrained": args.untrained, "recipe": RECIPE, "fractions": settings["fractions"],
                     "calibration_samples": n_calibration, "calibration_batch_size": template.batch_size,
                     "dev_examples": len(dev_examples), "max_length": max_length,
                     "data_note": "movie-snippet sentiment, SST-2-like, not official SST-2"},
        "dense": {**evaluate(dense, dev, desc="evaluate dense"), "parameters": sum(p.numel() for p in dense.parameters())},
        "fractions": [],
    }
    print(f"dense accuracy {results['dense']['accuracy']:.4f}", flush=True)

    slimmed_models = {}
    for fraction in settings["fractions"]:
        row = {"target": fraction, "name": f"slim_{round(100 * fraction)}", "variants": {}}
        full = None
        for name, rearrange, tune in VARIANTS:
            # the paper's variants: each step kept unchecked (check_steps is kwon_minilm_seeds' subject)
            stage = template.model_copy(update={"target_sparsity": fraction, "rearrange": rearrange, "tune": tune,
                                                "check_steps": False, "calibration_samples": n_calibration})
            model = copy.deepcopy(dense)
            # the recipe's stage runner, i.e. the product's path: inc_plugins.prepare_pruning with mask_search
            outcome = run_pruning_stage(model, stage, tokenizer, train_examples, max_length)
            info = outcome.report
            searched = info["mask_search"]
            row["variants"][name] = {**evaluate(model, dev, desc=name), "prune_seconds": info["prune_seconds"],
                                     "flops_removed": searched["removed_fraction"], "search": searched}
            print(f"{fraction:.0%} {name}: accuracy {row['variants'][name]['accuracy']:.4f}, "
                  f"{info['prune_seconds']:.1f} s", flush=True)
            full, full_result = model, outcome.result
        searched = row["variants"]["full"]["search"]
        ffn_fraction = 1 - sum(searched["kept_neurons"]) / (structure.n_layers * structure.n_neurons)
        try:
            model = copy.deepcopy(dense)
            info = run_retrain_free(model, template.model_copy(update={"calibration_samples": n_calibration}),
                                    tokenizer, train_examples, max_length, ffn_fraction)
            neurons = ffn_neuron_keep(model).float()
            units = torch.ones(structure.n_layers, structure.n_head_units)
            at = searched["seq_len"]
            kept = masked_macs(structure, units, neurons, at)
            row["variants"]["retrain_free"] = {**evaluate(model, dev, desc="retrain_free"), **info,
                                               "flops_removed": 1 - kept / dense_prunable_macs(structure, at)}
            print(f"{fraction:.0%} retrain_free: accuracy {row['variants']['retrain_free']['accuracy']:.4f}", flush=True)
        except Exception as error:  # a baseline that fails is a result to record, not a reason to lose the others
            row["variants"]["retrain_free"] = {"error": f"{type(error).__name__}: {error}", "target_ffn_fraction": ffn_fraction}
            print(f"{fraction:.0%} retrain_free failed: {error}", flush=True)

        slimmed = inc_plugins.slim(full, full_result)
        slimmed_models[row["name"]] = slimmed
        slim_head_ffn, slim_whole = prunable_macs(slimmed, structure, seq_len), whole_model_macs(slimmed, seq_len)
        row["macs_at_latency_seq_len"] = {"seq_len": seq_len, "dense_head_ffn": dense_head_ffn, "slimmed_head_ffn": slim_head_ffn,
                                          "dense_whole_model": dense_whole, "slimmed_whole_model": slim_whole}
        row["ideal_speedup"] = {"head_ffn": dense_head_ffn / slim_head_ffn, "whole_model": dense_whole / slim_whole}
        row["slimmed_parameters"] = sum(p.numel() for p in slimmed.parameters())
        results["fractions"].append(row)
        del full
    run.mark("after_pruning")

    inputs = latency_inputs(dense.config.vocab_size, batch, seq_len)
    compile_limits_for(len(slimmed_models) + 1)  # one compiled forward per model, all of one code object
    latency = {"batch": batch, "seq_len": seq_len, "warmup": warmup, "repeats": repeats, "dtype": "float32", "backends": {}}
    for backend in settings["backends"]:
        print(f"[latency {backend}]", flush=True)
        try:
            latency["backends"][backend] = time_models({"dense": dense, **slimmed_models}, backend, inputs, warmup, repeats)
        except Exception as error:
            latency["backends"][backend] = {"error": f"{type(error).__name__}: {error}"}
            print(f"latency on {backend} failed: {error}", flush=True)
    results["latency"] = latency
    results = run.write(results, markdown, plot)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
