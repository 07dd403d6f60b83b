"""Streaming and distributed calibration on SmolLM2-135M: (1) streamed pruning (``inc_plugins.prune_checkpoint``)
against the same pruning of the model in memory, for Wanda 50%, Wanda 2:4 and SparseGPT 50%: identical weights and
perplexity, with the peak RSS and time of each; (2) Wanda 50% calibrated by 2 gloo ranks with 1 thread each against
1 process with 1 thread (and with 2): masks, seconds per calibration pass, bytes gathered per block.

    python -m benchmarks.studies.streaming_smollm2               # both parts (~25 min; time it alone)
    python -m benchmarks.studies.streaming_smollm2 --part ranks  # part 2 alone (~6 min; streaming_smollm2_ranks.*)
    python -m benchmarks.studies.streaming_smollm2 --quick       # a tiny synthetic Llama

Calibration and evaluation windows as in `recipes/smollm2_wanda.yaml` (State of the Union / Moby Dick). Every run is
a fresh spawned process, so its peak RSS (``ru_maxrss``) is its own; runs go in alternating order (in memory first
for one setting, streamed first for the next). The pass time of the ranks is the block walk of Wanda's one pass:
the forward passes split between the ranks, and so does the ranking (each rank ranks its share of a block's layers
and the masks are gathered).

Writes <out>/streaming_smollm2.{json,md} (--quick: streaming_smollm2_quick.*).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from neural_compressor import WeightPruningConfig
from transformers import AutoModelForCausalLM

import inc_plugins
from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.sources import causal_lm
from inc_plugins.execution.streamed_model import loading_each_block, open_streamed_causal_lm
from inc_plugins.models.safetensors_checkpoint import CheckpointReader
from inc_plugins.perf.memory import peak_rss_bytes
from recipes.model_sources import converted_checkpoint
from recipes.perplexity import perplexity
from recipes.schema import load_recipe

STUDY = "streaming_smollm2"
RECIPE = "smollm2_wanda.yaml"  # calibration and evaluation windows, evaluation batch, seed


def _config(setting: dict) -> WeightPruningConfig:
    return WeightPruningConfig(op_names=["model.layers"], **setting)


def _prune_once(mode: str, checkpoint: str, output: str, setting: dict, calibration, evaluation, eval_batch: int,
                threads: int) -> dict:
    """One run in a fresh process: prune (in memory, or streamed into `output`), then perplexity."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if mode == "in_memory":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        loaded = time.perf_counter()
        inc_plugins.prepare_pruning(model, _config(setting), dataloader=calibration)
        pruned = time.perf_counter()
        model.save_pretrained(output)
    else:
        loaded = time.perf_counter()
        run = inc_plugins.prune_checkpoint(checkpoint, output, _config(setting), dataloader=calibration)
        pruned = time.perf_counter()
        model = open_streamed_causal_lm(run.output)
    with loading_each_block(model):
        value = perplexity(model, evaluation, batch_size=eval_batch)
    return {"mode": mode, "load_seconds": loaded - start, "prune_seconds": pruned - loaded,
            "perplexity": value, "peak_rss_mb": peak_rss_bytes() / 2**20}


def _rank_pass(rank: int, world: int, rendezvous: str, checkpoint: str, output: str, setting: dict, calibration,
               results) -> None:
    """One gloo rank (1 thread): Wanda on its share of the calibration batches; rank 0 saves the pruned model."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        dist.barrier()  # start the clocks together
        start = time.perf_counter()
        pruning = inc_plugins.prepare_pruning(model, _config(setting), dataloader=calibration[rank::world])
        seconds = time.perf_counter() - start
        if rank == 0:
            model.save_pretrained(output)
        results[rank] = {"pass_seconds": seconds, "bytes_gathered_per_block": pruning.gather_log.bytes_per_block,
                         "samples": sum(batch[0].shape[0] for batch in calibration[rank::world])}
    finally:
        dist.destroy_process_group()


def _in_one_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def compare_checkpoints(first: Path, second: Path) -> dict:
    """Mask entries (zero or not) and weights that differ between two saved models, read one tensor at a time."""
    a, b = CheckpointReader(first), CheckpointReader(second)
    if set(a.names) != set(b.names):
        raise ValueError(f"{first} and {second} hold different tensors")
    mask_differences = weight_differences = entries = 0
    max_difference = 0.0
    for name in a.names:
        x, y = a.read([name])[name], b.read([name])[name]
        mask_differences += int(((x == 0) != (y == 0)).sum())
        weight_differences += int((x != y).sum())
        entries += x.numel()
        max_difference = max(max_difference, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(a.names), "entries": entries, "mask_entries_differing": mask_differences,
            "weights_differing": weight_differences, "max_abs_difference": max_difference}


def _markdown(results: dict) -> str:
    lines = [f"# Streaming and distributed calibration: {results['model']}", "",
             f"Command: `{results['run']['command']}`.", "", machine_line(results), ""]
    if "equivalence" in results:
        lines += _equivalence_lines(results)
    if "ranks" in results:
        lines += _ranks_lines(results)
    return "\n".join(lines)


def _equivalence_lines(results: dict) -> list[str]:
    lines = ["## Streamed vs in memory (one process, 2 threads)", "",
             "| setting | mode | perplexity | prune s | peak RSS MB | weights differing | mask entries differing |",
             "|---|---|---|---|---|---|---|"]
    for row in results["equivalence"]:
        same = row["comparison"]
        for mode in ("in_memory", "streamed"):
            r = row[mode]
            lines.append(f"| {row['setting']} | {mode} | {r['perplexity']:.4f} | {r['prune_seconds']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {same['weights_differing']} of {same['entries']} | "
                         f"{same['mask_entries_differing']} |")
    return lines + [""]


def _ranks_lines(results: dict) -> list[str]:
    ranks = results["ranks"]
    lines = [f"## Wanda 50% calibrated by {ranks['world']} gloo ranks (1 thread each) vs one process", "",
             "| run | seconds per calibration pass | speed-up vs 1 process, 1 thread |", "|---|---|---|"]
    base = ranks["one_thread"]["prune_seconds"]
    lines.append(f"| 1 process, 1 thread | {base:.1f} | 1.00x |")
    lines.append(f"| 1 process, 2 threads | {ranks['two_threads']['prune_seconds']:.1f} | "
                 f"{base / ranks['two_threads']['prune_seconds']:.2f}x |")
    slowest = max(r["pass_seconds"] for r in ranks["per_rank"])
    lines.append(f"| {ranks['world']} ranks, 1 thread each | {slowest:.1f} (slowest rank) | {base / slowest:.2f}x |")
    per_block = ranks["per_rank"][0]["bytes_gathered_per_block"]
    lines += ["", f"Masks vs 1 process: {ranks['comparison']['mask_entries_differing']} of "
              f"{ranks['comparison']['entries']} entries differ; weights differing: "
              f"{ranks['comparison']['weights_differing']}. Bytes each rank sends per block (statistics gathered "
              f"before the block is pruned): {min(per_block.values()):,} - {max(per_block.values()):,}. Samples per "
              f"rank: {[r['samples'] for r in ranks['per_rank']]}.", ""]
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--part", choices=("all", "equivalence", "ranks"), default="all",
                        help="run one part alone (results: streaming_smollm2_<part>.*)")
    args = parser.parse_args(argv)
    settings = study_settings(STUDY, args.quick)
    recipe = load_recipe(RECIPE)
    stage, corpus = recipe.pruning[0], recipe.corpus
    run = StudyRun(STUDY, args.quick, args.out, argv, name=STUDY if args.part == "all" else f"{STUDY}_{args.part}")
    source = causal_lm(args.quick)
    calibration = [(window[None],) for window in source.calibration_windows(
        settings.get("calib_windows", stage.calibration_samples), settings.get("calib_len", corpus.calibration_seq_len),
        stage.seed)]
    evaluation = source.evaluation_windows(settings.get("eval_windows", corpus.evaluation_windows),
                                           settings.get("eval_len", corpus.evaluation_seq_len))
    eval_batch = recipe.evaluation.batch_size
    with tempfile.TemporaryDirectory(prefix="streaming_smollm2_") as scratch:
        scratch = Path(scratch)
        if args.quick:
            checkpoint = scratch / "model"
            source.model.save_pretrained(checkpoint)
        else:
            checkpoint = converted_checkpoint("smollm2-135m")
        results = {"model": source.description, "settings": settings}
        if args.part in ("all", "equivalence"):
            results["equivalence"] = _equivalence(run, settings, checkpoint, scratch, calibration, evaluation,
                                                  eval_batch)
        if args.part in ("all", "ranks"):
            results["ranks"] = _ranks(run, settings, checkpoint, scratch, calibration, evaluation, eval_batch)
    return run.write(results, _markdown)


def _equivalence(run, settings, checkpoint, scratch, calibration, evaluation, eval_batch) -> list[dict]:
    """Part 1: each setting pruned in memory and streamed, in alternating order; their outputs compared."""
    rows = []
    for index, (name, setting) in enumerate(settings["settings"].items()):
        row = {"setting": name, "config": setting}
        order = ("in_memory", "streamed") if index % 2 == 0 else ("streamed", "in_memory")
        for mode in order:
            row[mode] = _in_one_process(_prune_once, mode, str(checkpoint), str(scratch / f"{index}_{mode}"),
                                        setting, calibration, evaluation, eval_batch, 2)
            run.mark(f"{name}_{mode}")
        row["comparison"] = compare_checkpoints(scratch / f"{index}_in_memory", scratch / f"{index}_streamed")
        rows.append(row)
    return rows


def _ranks(run, settings, checkpoint, scratch, calibration, evaluation, eval_batch) -> dict:
    """Part 2: Wanda calibrated by gloo ranks with 1 thread each, then one process with 1 and with 2 threads."""
    wanda = settings["settings"][settings["ranks_setting"]]
    world = settings["ranks"]
    per_rank = multiprocessing.get_context("spawn").Manager().dict()
    torch.multiprocessing.spawn(_rank_pass, args=(world, str(scratch / "rendezvous"), str(checkpoint),
                                                  str(scratch / "ranks"), wanda, calibration, per_rank),
                                nprocs=world, join=True)
    run.mark("ranks")
    ranks = {"world": world, "setting": settings["ranks_setting"], "per_rank": [dict(per_rank[r]) for r in range(world)]}
    for threads, key in ((1, "one_thread"), (2, "two_threads")):
        ranks[key] = _in_one_process(_prune_once, "in_memory", str(checkpoint), str(scratch / f"single_{threads}"),
                                     wanda, calibration, evaluation, eval_batch, threads)
        run.mark(f"single_{threads}_thread")
    ranks["comparison"] = compare_checkpoints(scratch / "single_1", scratch / "ranks")
    return ranks


if __name__ == "__main__":
    main()
