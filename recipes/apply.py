"""Runs a recipe end to end: load, fine-tune (cached), evaluate, prune (one or more stages), slim (optional),
evaluate, benchmark (optional), export to OpenVINO IR and check it (optional), int8 quantization (optional), save,
report.

    python -m recipes.apply minilm_mask_search_wanda.yaml   # a bare name is looked up in recipes/
    python -m recipes.apply path/to/my_recipe.yaml --run-dir runs/my-run --overwrite
    torchrun --nproc-per-node 2 -m recipes.apply smollm2_wanda.yaml   # calibration shared by 2 processes (gloo)

Under torchrun every rank loads the model and runs the pruning stages on its share of the calibration batches (the
statistics are combined across ranks, so all derive the same masks); rank 0 alone evaluates, saves and reports.
"""

import argparse
import contextlib
import copy
import logging
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from inc_plugins.atomic import write_text
from inc_plugins.deploy import RecordedOutputs
from inc_plugins.execution.distributed import rank, torchrun_process_group, world_size
from inc_plugins.perf.memory import peak_rss_bytes
from inc_plugins.inc import one_shot

from .benchmark_stage import benchmark_dense_and_pruned, select_benchmark_backends
from .export_stage import EXPORT_DIR, export_and_check
from .hub_access import require_hub_if_needed
from .preflight import check_inputs
from .quantize_stage import quantize_and_check
from .pruning_stage import dense_prunable_macs, prunable_macs, slim_pruned_model, structure_or_none
from .report import environment, layer_sparsity, weights_bytes
from .run_dir import (Terminated, check_run_dir, fresh_path, interrupted_stream_stages, remove_stale_staging,
                      staged_run)
from .schema import Recipe, RecipeError, TextClassificationRecipe, load_recipe
from .summary import terminal_table, write_summary
from .tasks import TextClassificationTask, task_for


class StageTimer:
    """Times named stages, and tells the staged run which stage is current (for the failure report)."""

    def __init__(self, on_start=None):
        self.seconds: dict[str, float] = {}
        self.on_start = on_start

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"[{name}]", flush=True)
        if self.on_start is not None:
            self.on_start(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def prepare_task(recipe: TextClassificationRecipe, timer: StageTimer | None = None):
    """(model, tokenizer, train_examples, dev_examples, finetune_info) of a text-classification recipe: its model,
    fine-tuned when the recipe says so (from the cache when an identical fine-tune was done before), and its data."""
    task = TextClassificationTask(recipe)
    model = task.load(timer or StageTimer())
    return model, task.tokenizer, task.train_examples, task.dev_examples, task.finetune_info


def _macs_seq_len(stages: list[dict], task) -> int:
    """The sequence length MACs are reported at: the one a FLOPs-constrained structured stage (mask_search, flap,
    wanda_sp, structured_magnitude) counted its target at (so the report can be checked against it), else the task's
    evaluation length."""
    for stage in reversed(stages):
        searched = stage.get("mask_search") or stage.get("structure") or {}
        if searched.get("seq_len"):
            return searched["seq_len"]
    return task.macs_seq_len()


def _last_structured_stage(recipe: Recipe) -> int | None:
    """The index of the last stage that removes whole heads and neurons (the one `slim: true` slims after)."""
    indices = [i for i, stage in enumerate(recipe.pruning) if stage.pruning_type in one_shot.structured_types()]
    return indices[-1] if indices else None


def _dense_weights_bytes(task, dense) -> int:
    with tempfile.TemporaryDirectory(prefix="inc-plugins-dense-") as directory:
        task.save(dense, Path(directory), False, Path(directory))
        return weights_bytes(Path(directory))


def check_distributed(recipe: Recipe) -> None:
    """Under torchrun, refuse what the ranks cannot share: only a causal-LM recipe's one-shot stages of the types that
    combine their statistics across ranks (`distributed_types`) run on several processes."""
    if world_size() == 1:
        return
    if recipe.task != "causal_lm":
        raise RecipeError(f"torchrun runs causal_lm recipes (their calibration is shared across ranks); this recipe's "
                          f"task is {recipe.task!r}: run it as one process")
    allowed = one_shot.distributed_types()
    refused = [f"{index} ({stage.pruning_type})" for index, stage in enumerate(recipe.pruning)
               if stage.pruning_type not in allowed or stage.retrain_steps]
    if refused:
        raise RecipeError(f"under torchrun every pruning stage must be one of {', '.join(allowed)} without "
                          f"retrain_steps (their statistics are combined across ranks); not stage(s) {', '.join(refused)}")
    if recipe.benchmark is not None:
        raise RecipeError("under torchrun a recipe cannot benchmark: the other ranks would time beside it; run the "
                          "benchmark as one process")


def run_other_rank(recipe: Recipe) -> None:
    """A torchrun rank other than 0: load the model and run every pruning stage on this rank's share of the
    calibration batches; rank 0 evaluates, saves and reports (a rank that fails makes torchrun stop them all)."""
    check_distributed(recipe)
    task = task_for(recipe)
    slim_after = _last_structured_stage(recipe) if getattr(recipe, "slim", False) else None
    with tempfile.TemporaryDirectory(prefix=f"inc-plugins-rank{rank()}-") as work_dir:
        task.work_dir = Path(work_dir)  # (nothing is written there: only rank 0 writes)
        model = task.load(StageTimer())
        for index, stage in enumerate(recipe.pruning):
            model, outcome = task.prune(model, stage)
            if index == slim_after:  # as rank 0 does: the stages after it prune the slimmed model
                model, _ = slim_pruned_model(model, task.probe_batch(), outcome.result)


def default_run_dir(recipe: Recipe, started: datetime) -> Path:
    return fresh_path(recipe.output.dir / f"{recipe.name}-{started.strftime('%Y%m%dT%H%M%SZ')}")


def run(recipe: Recipe, run_dir: Path | None = None, *, overwrite: bool = False,
        allow_outside_cwd: bool = False, resume: bool = False) -> Path:
    """Runs the recipe and returns its run directory, which appears only once everything succeeded.

    Every task runs the same way: load (and fine-tune or train), evaluate, the stages in the recipe's order on the
    same model (a stage may return a smaller one), evaluate, benchmark, export, quantize, save. With `slim: true` the
    model is slimmed right after the last structured stage (mask_search, flap, wanda_sp, structured_magnitude), so
    later stages (e.g. Wanda) prune the slimmed model and their target_sparsity is a fraction of the weights that
    remain. A failing stage leaves `<run>.failed` with the report so far. `resume`: a streamed stage continues the
    checkpoint that an interrupted or killed run of the same `run_dir` left, from its last completed block (the
    recipe's earlier steps run again)."""
    started = datetime.now(timezone.utc)
    run_dir = check_run_dir(run_dir or default_run_dir(recipe, started), overwrite, allow_outside_cwd,
                            inputs=recipe.input_paths())
    check_distributed(recipe)
    examples = check_inputs(recipe)  # every file the recipe names is readable, before any stage runs
    require_hub_if_needed(recipe)  # before any loading: offline, a hub recipe stops here at once
    # only the transformers tasks have these sections; the image task neither slims nor benchmarks
    benchmark, slim = getattr(recipe, "benchmark", None), getattr(recipe, "slim", False)
    export, quantize = getattr(recipe, "export", None), getattr(recipe, "quantize", None)
    if benchmark is not None:
        select_benchmark_backends(benchmark.backends)  # a misspelt backend fails now, not after pruning

    carry = interrupted_stream_stages(run_dir) if resume else []
    if resume and not carry:
        raise RecipeError(f"--resume: no interrupted streamed stage of {run_dir} to continue (looked for "
                          f"{run_dir.name}.failed* and the staging directories of killed runs in {run_dir.parent})")
    task = task_for(recipe, examples)
    with staged_run(run_dir, overwrite, carry) as staged:
        timer = StageTimer(on_start=lambda name: setattr(staged, "current_stage", name))
        report = staged.report
        report.update(recipe=recipe.name, description=recipe.description, task=recipe.task,
                      started=started.isoformat(), environment=environment(), stage_seconds=timer.seconds,
                      world_size=world_size())
        write_text(staged.path / "recipe.yaml",
                   yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False))

        task.work_dir = staged.path  # (a streamed model's pruned checkpoints are written there)
        model = task.load(timer)
        report.update(data=task.describe_data(), finetune=task.finetune_info, evaluated_on=task.evaluated_on)
        staged.stage_done("load")
        with timer("check_patterns"):
            for index, stage in enumerate(recipe.pruning):
                task.check_stage(model, stage, f"pruning stage {index} ({stage.pruning_type})")

        with timer("evaluate_before"):
            report["metrics"] = {"before": task.evaluate(model, desc="evaluate dense")}
        report["parameters"] = {"before": task.size(model)}
        structure = structure_or_none(model)  # of the dense model: a slimmed one has layers of different sizes
        dense = copy.deepcopy(model) if benchmark is not None else None  # the benchmark's baseline
        staged.stage_done("evaluate_before")

        stages, slimming, slim_after = [], None, _last_structured_stage(recipe) if slim else None
        searched = None  # the last structured stage's pruning result: its masks, for slimming and MACs
        report["pruning_stages"] = stages
        for index, stage in enumerate(recipe.pruning):
            name = f"prune_{index}_{stage.pruning_type}"
            with timer(name):
                task.check_stage(model, stage, f"pruning stage {index} ({stage.pruning_type})")
                model, outcome = task.prune(model, stage)
                if stage.pruning_type in one_shot.structured_types():
                    searched = outcome.result
                stages.append({"settings": stage.model_dump(mode="json", exclude_none=True), **outcome.report})
            staged.stage_done(name)
            if index == slim_after:
                with timer("slim"):
                    model, slimming = slim_pruned_model(model, task.probe_batch(), searched)
                staged.stage_done("slim")

        with timer("evaluate_after"):
            # the export and quantize stages compare their forms with these logits rather than run the model again
            evaluated = RecordedOutputs(model) if export is not None or quantize is not None else model
            report["metrics"]["after"] = task.evaluate(evaluated, desc="evaluate pruned")
        report["parameters"]["after"] = task.size(model)
        report["macs"] = None
        if structure is not None:
            seq_len = _macs_seq_len(stages, task)
            dense_macs = dense_prunable_macs(structure, seq_len)
            kept_macs = prunable_macs(model, structure, seq_len, searched)
            report["macs"] = {
                "accounting": "MACs per sequence of the attention heads and FFN neurons (Kwon et al. 2022); "
                              "embeddings, norms, biases and the task head are not counted; zeroed weights in "
                              "dense kernels still count",
                "seq_len": seq_len, "before": dense_macs, "after": kept_macs,
                "removed_fraction": 1 - kept_macs / dense_macs}
        report["layer_sparsity"] = layer_sparsity(model)
        staged.stage_done("evaluate_after")

        if benchmark is not None:
            with timer("benchmark"):
                report["benchmark"] = benchmark_dense_and_pruned(
                    dense, model, benchmark, task.calibration_inputs(quantize) if quantize is not None else None)
            staged.stage_done("benchmark")

        if export is not None:
            with timer("export"):
                report["export"] = export_and_check(task, model, evaluated, export, staged.path / EXPORT_DIR,
                                                    run_dir, report["metrics"]["after"])
            staged.stage_done("export")

        if quantize is not None:
            with timer("quantize"):
                report["quantize"] = quantize_and_check(task, model, evaluated, quantize, export, staged.path,
                                                        run_dir, report["metrics"]["after"])
            staged.stage_done("quantize")

        with timer("save"):
            load = task.save(model, staged.path / "model", slimming is not None, run_dir / "model")
            if dense is not None:  # what pruning buys: the size the dense model would take, saved the same way
                report["weights_on_disk_bytes"] = {"before": _dense_weights_bytes(task, dense),
                                                   "after": weights_bytes(staged.path / "model")}
            report["model"] = {"slimmed": slimming is not None, "load": load,
                               **({"slimming_check": slimming} if slimming else {})}
            report["peak_rss_bytes"] = peak_rss_bytes()  # of this process, the whole run up to here
            write_summary(report, staged.path)
        staged.stage_done("save")
    print("\n" + terminal_table(report))
    print(f"\nrun directory: {run_dir}")
    print(f"load it with: {report['model']['load']}")
    return run_dir


def _terminate(signum, frame):
    raise Terminated(f"signal {signum}")


def clean(folder: Path) -> int:
    """`--clean`: removes the staging directories that killed runs left in `folder`, and says which."""
    removed = remove_stale_staging(folder)
    for path in removed:
        print(f"removed {path}: the staging directory of an earlier run that was killed")
    print(f"{len(removed)} stale staging director{'y' if len(removed) == 1 else 'ies'} removed from {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="a recipe file, or the bare name of a shipped recipe in recipes/")
    parser.add_argument("--run-dir", type=Path, help="where to write this run (default: <output.dir>/<name>-<UTC time>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory that an earlier run wrote (on success only)")
    parser.add_argument("--allow-outside-cwd", action="store_true",
                        help="allow a run directory outside the current working directory")
    parser.add_argument("--clean", nargs="?", const=Path("runs"), type=Path, metavar="FOLDER",
                        help="remove the staging directories of killed runs from FOLDER (default: runs) and exit")
    parser.add_argument("--verbose", action="store_true", help="show INC's own INFO logs (every pruning step)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the streamed pruning that an interrupted or killed run of --run-dir left, from "
                             "its last completed block (needs --run-dir)")
    args = parser.parse_args(argv)
    if args.resume and args.run_dir is None:
        parser.error("--resume continues an earlier run of one run directory: name it with --run-dir")
    if args.clean is not None:
        return clean(args.clean)
    if args.recipe is None:
        parser.error("name a recipe file (or pass --clean)")
    if not args.verbose:
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _terminate)  # end like Ctrl-C: a .failed directory, nothing staged
    try:
        with torchrun_process_group():
            if rank() == 0:
                run(load_recipe(args.recipe), args.run_dir, overwrite=args.overwrite,
                    allow_outside_cwd=args.allow_outside_cwd, resume=args.resume)
            else:
                run_other_rank(load_recipe(args.recipe))
    except (RecipeError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be made or written: name it, no traceback
        print(f"error: cannot write the run: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
