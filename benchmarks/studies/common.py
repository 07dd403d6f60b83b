"""What every study shares: its command line, its settings, and its results files.

* Command line: ``--quick`` (the same code path on tiny synthetic models and data, in seconds: a check that every
  step runs, never a measurement; results go to ``<name>_quick.*`` so a smoke run never overwrites a published
  file) and ``--out`` (the results directory, default benchmarks/results).
* Settings: what a shipped recipe holds is read from that recipe (``recipes.schema.load_recipe``); what no recipe
  holds (grids, seeds, timing shapes) is in ``settings.yaml`` next to this file, with the ``--quick`` sizes.
* Results: ``<out>/<name>.json`` with the study's numbers plus, recorded by ``StudyRun``, the command, when it
  started, how long it took, the machine (``inc_plugins.perf.machine.machine_description``, with the oneDNN probe
  outside ``--quick``), the library versions and the load averages seen at the start, at the points the study marks
  and at the end. A study never claims the machine was quiet: it records what it saw. ``<name>.md`` holds its tables
  and ``<name>.png`` its plot, each written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import neural_compressor  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from inc_plugins.perf.machine import load_average, machine_description  # noqa: E402
from inc_plugins.atomic import write_json, write_text  # noqa: E402

RESULTS_DIR = Path("benchmarks/results")
SETTINGS_FILE = Path(__file__).with_name("settings.yaml")


def study_parser(study: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The study's argparse parser with ``--quick`` and ``--out``; the description is the first paragraph of `doc`."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.studies.{study}", description=doc.split("\n\n")[0],
                                     epilog=epilog)
    parser.add_argument("--quick", action="store_true",
                        help="tiny synthetic models and data: runs every step in seconds, measures nothing "
                             "(writes <name>_quick.*)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    return parser


def add_step_arguments(parser: argparse.ArgumentParser, study: str, measured: str) -> None:
    """``--models-dir`` and ``--step``, for studies that prune (and measure ``measured``) in one step and time the
    saved models in another, so the timing can run alone on a quiet machine."""
    parser.add_argument("--models-dir", type=Path,
                        help=f"where the prune step saves the slimmed models for the latency step (default "
                             f"runs/{study}_models; --quick: a temporary directory)")
    parser.add_argument("--step", choices=("all", "prune", "latency"), default="all",
                        help=f"prune: pruning and {measured} only (run it under nice); latency: time the models the "
                             f"prune step saved (reads its JSON); all: both in one process")


def check_step_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.quick and args.step != "all" and args.models_dir is None:
        parser.error("--quick with --step prune/latency needs --models-dir (the default is a temporary directory)")


def steps_models_dir(args: argparse.Namespace, study: str, temporary: str) -> Path:
    """Where the slimmed models of ``add_step_arguments``' steps live."""
    return args.models_dir or (Path(temporary) if args.quick else Path(f"runs/{study}_models"))


def claim_models_dir(models_dir: Path, resume: bool | None = None) -> None:
    """Creates the prune step's models directory; refuses one that holds files (an earlier prune step's models),
    unless `resume` (None: the study cannot resume, and the message does not offer it)."""
    if not resume and models_dir.is_dir() and any(models_dir.iterdir()):
        remedy = "remove it or pass another --models-dir" + ("" if resume is None else ", or --resume to add the "
                                                              "models it lacks")
        raise SystemExit(f"error: {models_dir} is not empty (an earlier prune step's models?): {remedy}")
    models_dir.mkdir(parents=True, exist_ok=True)


def prune_step_results(run: "StudyRun", key: str, what: str) -> dict:
    """The results the prune step wrote for ``--step latency`` to time; exits with an error when they hold no `key`
    (`what` names it: "pruned model")."""
    path = run.stem.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: run --step prune first (with the same --out)")
    results = json.loads(path.read_text())
    if not results.get(key):
        raise SystemExit(f"error: {run.stem}.json holds no {what}: run --step prune first")
    return results


def study_settings(study: str, quick: bool) -> dict:
    """The study's section of settings.yaml: its ``full`` values, overridden by its ``quick`` values with --quick."""
    sections = yaml.safe_load(SETTINGS_FILE.read_text())
    if study not in sections:
        raise KeyError(f"{SETTINGS_FILE} has no section {study!r} (sections: {', '.join(sections)})")
    section = sections[study]
    return {**section.get("full", {}), **(section.get("quick", {}) if quick else {})}


def figure(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the file-only backend; give the figure to ``save_figure``."""
    return plt.subplots(*args, **kwargs)


def empty_figure(**kwargs):
    """``matplotlib.pyplot.figure`` on the file-only backend (lay out its axes yourself); give it to ``save_figure``."""
    return plt.figure(**kwargs)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write `fig` as PNG to `path` atomically (a temporary sibling, then a rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(staging, dpi=dpi, format="png")
        os.replace(staging, path)
    finally:
        plt.close(fig)
        staging.unlink(missing_ok=True)


class StudyRun:
    """One run of a study: its results stem, its start, and the load averages it saw along the way."""

    def __init__(self, study: str, quick: bool, out: Path, argv: list[str] | None, name: str | None = None):
        self.study, self.quick, self.out = study, quick, Path(out)
        self.name = name or study
        self.command = " ".join([f"python -m benchmarks.studies.{study}", *(sys.argv[1:] if argv is None else argv)])
        self.started = datetime.now(timezone.utc)
        self._wall = time.perf_counter()
        self.load_averages = {"start": load_average()}

    @property
    def stem(self) -> Path:
        """``<out>/<name>`` (``<name>_quick`` with --quick): add .json, .md, .png."""
        return self.out / (f"{self.name}_quick" if self.quick else self.name)

    def mark(self, point: str) -> None:
        """Record the load averages now, under `point` (e.g. "after_pruning")."""
        self.load_averages[point] = load_average()

    def record(self) -> dict:
        """What the results file says about this run besides the study's numbers."""
        return {
            "study": self.study, "command": self.command, "quick": self.quick, "started": self.started.isoformat(),
            "seconds": round(time.perf_counter() - self._wall, 1),
            "machine": machine_description(probe_onednn=not self.quick),
            "versions": {"transformers": transformers.__version__, "neural_compressor": neural_compressor.__version__},
            "load_average": {**self.load_averages, "end": load_average()},
        }

    def write_progress(self, results: dict) -> Path:
        """Write the results so far, marked incomplete (an interrupted run keeps what it measured)."""
        path = self.stem.with_suffix(".json")
        write_json(path, results | {"run": self.record(), "complete": False})
        return path

    def write(self, results: dict, markdown: Callable[[dict], str] | None = None,
              plot: Callable[[dict, Path], None] | None = None) -> dict:
        """Add ``run`` (``record()``) and ``complete``, then write ``<stem>.json`` and, when given, ``<stem>.md``
        (``markdown(results)``) and ``<stem>.png`` (``plot(results, path)``). Returns the results as written."""
        results = results | {"run": self.record(), "complete": True}
        write_json(self.stem.with_suffix(".json"), results)
        written = [".json"]
        if markdown is not None:
            write_text(self.stem.with_suffix(".md"), markdown(results))
            written.append(".md")
        if plot is not None:
            plot(results, self.stem.with_suffix(".png"))
            written.append(".png")
        print(f"wrote {self.stem}{{{','.join(written)}}}", flush=True)
        return results


def machine_line(results: dict, loads: bool = True) -> str:
    """'Machine: <CPU>, <n> logical CPUs, <t> torch threads, torch <v>, INC <v>; 1-minute load average: <a> start,
    ..., <b> end.' for a Markdown header, from what ``StudyRun`` recorded (``loads=False``: without the loads, for a
    study that words them itself)."""
    run = results["run"]
    m = run["machine"]
    line = (f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, torch "
            f"{m['torch']}, INC {run['versions']['neural_compressor']}")
    if not loads:
        return line + "."
    seen = ", ".join(f"{values[0]:.2f} {point.replace('_', ' ')}" for point, values in run["load_average"].items()
                     if values)
    return f"{line}; 1-minute load average: {seen}."
