"""Peak memory of a streamed ``causal_lm`` recipe against ``inc_plugins.prune_checkpoint`` called directly on the same
checkpoint: where the recipe holds more than the pruning needs, phase by phase.

    python -m benchmarks.studies.recipe_streaming_memory                            # ~15 min on 2 cores
    python -m benchmarks.studies.recipe_streaming_memory --baseline-code ../main    # also runs another checkout's code
    python -m benchmarks.studies.recipe_streaming_memory --quick                    # a tiny synthetic model

The model is a synthetic random-weight bf16 Llama (``inc_plugins.perf.synthetic_checkpoint``; shape in settings.yaml,
0.6 GB) with a character-level tokenizer: it measures memory, never quality. The recipe streams it through two Wanda
stages, evaluating perplexity before and after; the direct run prunes it once with the recipe's calibration shape
(random ids). Each run is a fresh process sampled from outside every 20 ms (VmRSS, and VmHWM for the peak), its
phases told apart by the ``[phase]`` lines ``recipes.apply`` prints. ``--baseline-code DIR`` runs the same recipe and
direct pruning with the code of the checkout DIR too, alternating with this one's, so a change's before and after
come from one run of this script. RSS is not timing: runs beside other work still measure what the process holds.

Writes <out>/recipe_streaming_memory.{json,md} (--quick: recipe_streaming_memory_quick.*).
"""

from __future__ import annotations

import re
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from transformers import BertTokenizerFast

from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from inc_plugins.perf.synthetic_checkpoint import write_synthetic_llama_checkpoint

STUDY = "recipe_streaming_memory"
REPO = Path(__file__).resolve().parents[2]
SAMPLE_SECONDS = 0.02
GIB = 2**30

# the direct run: only the public API, so it also runs on a checkout that lacks this study
DIRECT_PRUNE = """
import sys, torch
from neural_compressor import WeightPruningConfig
import inc_plugins
model, output, windows, seq_len, sparsity = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
generator = torch.Generator().manual_seed(0)
ids = [(torch.randint(0, 100, (1, seq_len), generator=generator),) for _ in range(windows)]  # the tokenizer's ids
print("[prune_checkpoint]", flush=True)
inc_plugins.prune_checkpoint(model, output, WeightPruningConfig(pruning_type="wanda", target_sparsity=sparsity,
                             pattern="1x1", op_names=["model.layers"]), dataloader=ids)
print("[done]", flush=True)
"""


def _status_kib(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {key: re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE) for key in ("VmRSS", "VmHWM")}
    return {key: int(match.group(1)) for key, match in fields.items() if match} if all(fields.values()) else None


def sampled_run(command: list[str], cwd: Path) -> dict:
    """Run ``command`` in ``cwd``; RSS sampled from outside. Returns the peak (GiB), and per phase (a ``[name]``
    line of its output starts one) its RSS at the start, its largest sample and its RSS at the end."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    high_water = [0]

    def sample() -> None:
        while process.poll() is None:
            status = _status_kib(process.pid)
            if status is not None:
                samples.append((time.perf_counter() - start, status["VmRSS"] * 1024))
                high_water[0] = max(high_water[0], status["VmHWM"] * 1024)
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks, tail = [], []
    for line in process.stdout:
        for part in line.replace("\r", "\n").split("\n"):
            phase = re.match(r"^\[(\w+)\]$", part.strip())
            if phase:
                marks.append((time.perf_counter() - start, phase.group(1)))
            tail = (tail + [part])[-40:]
    process.wait()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode}):\n" + "\n".join(tail))
    phases = {}
    bounds = marks + [(float("inf"), "")]
    for (begin, name), (end, _) in zip(bounds, bounds[1:]):
        inside = [rss for t, rss in samples if begin <= t < end]
        if not inside:  # a phase shorter than the sampling interval: the RSS last sampled before it ended
            inside = [rss for t, rss in samples if t < end][-1:]
        if inside:
            phases[name] = {"start_gib": inside[0] / GIB, "max_gib": max(inside) / GIB, "end_gib": inside[-1] / GIB}
    peak = max(high_water[0], max(rss for _, rss in samples))
    return {"peak_gib": peak / GIB, "phases": phases, "seconds": time.perf_counter() - start}


def character_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer of single characters (and their '##' continuations): any English text tokenizes, about
    one token per character, so a corpus's ids take what a real tokenizer's would at most."""
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def write_model(directory: Path, shape: dict) -> Path:
    write_synthetic_llama_checkpoint(directory, shape)
    character_tokenizer().save_pretrained(directory)
    return directory


def write_recipe(path: Path, model: Path, settings: dict, corpus: dict) -> Path:
    stages = [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": sparsity, "op_names": ["model.layers"],
               "calibration_samples": settings["calib_windows"], "batch_size": 1, "seed": 0}
              for sparsity in settings["stage_sparsities"]]
    recipe = {"name": STUDY, "task": "causal_lm", "model": {"path": str(model)}, "corpus": {
        **corpus, "calibration_seq_len": settings["calib_len"], "evaluation_seq_len": settings["eval_len"],
        "evaluation_windows": settings["eval_windows"]}, "pruning": stages,
        "evaluation": {"batch_size": settings["eval_batch"]}, "execution": {"mode": "streaming"}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _code_commit(code: Path) -> str:
    """The checkout's commit ("+ uncommitted changes" when it has some), or "not a git checkout" (e.g. a `git archive`
    of a commit, named after it)."""
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + (" + uncommitted changes" if dirty else "")


def measure(code: Path, model: Path, recipe: Path, scratch: Path, settings: dict, repeat: int) -> dict:
    """One recipe run and one direct run with the code of checkout ``code``."""
    tag = f"{code.name}-{repeat}"
    recipe_run = sampled_run([sys.executable, "-m", "recipes.apply", str(recipe), "--run-dir", str(scratch / f"run-{tag}"),
                              "--allow-outside-cwd"], code)
    direct_run = sampled_run([sys.executable, "-c", DIRECT_PRUNE, str(model), str(scratch / f"direct-{tag}"),
                              str(settings["calib_windows"]), str(settings["calib_len"]),
                              str(settings["stage_sparsities"][-1])], code)
    return {"recipe": recipe_run, "direct": direct_run}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# A streamed recipe's peak memory against prune_checkpoint's", "",
        f"SYNTHETIC random-weight bf16 Llama (hidden {s['shape']['hidden_size']}, {s['shape']['num_hidden_layers']} "
        f"blocks, vocab {s['shape']['vocab_size']}; {results['model_gib']:.2f} GiB of shards) with a character-level "
        f"tokenizer: memory only, never quality. Recipe: {len(s['stage_sparsities'])} streamed Wanda stages "
        f"({', '.join(f'{x:.0%}' for x in s['stage_sparsities'])}), {s['calib_windows']} x {s['calib_len']} calibration "
        f"tokens each, perplexity on {s['eval_windows']} x {s['eval_len']} tokens before and after. Direct: "
        f"`prune_checkpoint` once, Wanda {s['stage_sparsities'][-1]:.0%}, the same calibration shape. Command: "
        f"`{results['run']['command']}`.", "",
        machine_line(results), "",
        f"Peak RSS (GiB; each run a fresh process sampled every {SAMPLE_SECONDS * 1000:.0f} ms from outside, peak from "
        f"VmHWM), {s['repeats']} run(s) each:", "",
        "| code | recipe peak | median | direct prune_checkpoint peak | median |", "|---|---|---|---|---|"]
    for code in results["codes"]:
        recipe_peaks = [run["recipe"]["peak_gib"] for run in code["runs"]]
        direct_peaks = [run["direct"]["peak_gib"] for run in code["runs"]]
        lines.append(f"| {code['label']}: {Path(code['path']).name} ({code['commit']}) | {', '.join(f'{p:.2f}' for p in recipe_peaks)} | "
                     f"{_median(recipe_peaks):.2f} | {', '.join(f'{p:.2f}' for p in direct_peaks)} | "
                     f"{_median(direct_peaks):.2f} |")
    lines += ["", "The recipe's phases (GiB, median over the runs: RSS when the phase starts, its largest sample, RSS "
                  "when it ends):", ""]
    for code in results["codes"]:
        lines += [f"{code['label']}: {Path(code['path']).name} ({code['commit']}):", "", "| phase | start | max | end |", "|---|---|---|---|"]
        for phase in code["runs"][0]["recipe"]["phases"]:
            values = [run["recipe"]["phases"][phase] for run in code["runs"] if phase in run["recipe"]["phases"]]
            lines.append(f"| {phase} | " + " | ".join(f"{_median([v[key] for v in values]):.2f}"
                                                      for key in ("start_gib", "max_gib", "end_gib")) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--baseline-code", type=Path, metavar="DIR",
                        help="a checkout (or `git archive`) of this project whose code is measured too, alternating "
                             "with this one's")
    parser.add_argument("--repeats", type=int, help="runs of each (default: settings.yaml)")
    args = parser.parse_args(argv)
    settings = study_settings(STUDY, args.quick)
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    run = StudyRun(STUDY, args.quick, args.out, argv)
    codes = [("this checkout", REPO)]
    if args.baseline_code is not None:
        codes.insert(0, ("baseline", args.baseline_code.resolve()))
    commits = {label: _code_commit(code) for label, code in codes}  # the code as measured, not as it is at the end
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as temporary:
        scratch = Path(temporary)
        model = write_model(scratch / "model", settings["shape"])
        if args.quick:  # two small text files instead of the corpus assets
            words = " ".join(f"word{i % 97}" for i in range(2000))
            (scratch / "calibration.txt").write_text(words)
            (scratch / "evaluation.txt").write_text(words[::-1])
            corpus = {"calibration": {"file": str(scratch / "calibration.txt")},
                      "evaluation": {"file": str(scratch / "evaluation.txt")}}
        else:
            corpus = {"calibration": {"asset": "sotu"}, "evaluation": {"asset": "moby-dick"}}
        recipe = write_recipe(scratch / "recipe.yaml", model, settings, corpus)
        measured = {label: [] for label, _ in codes}
        for repeat in range(settings["repeats"]):
            for label, code in codes if repeat % 2 == 0 else codes[::-1]:  # alternate which code runs first
                measured[label].append(measure(code, model, recipe, scratch, settings, repeat))
                print(f"{label} run {repeat + 1}: recipe peak {measured[label][-1]['recipe']['peak_gib']:.2f} GiB, "
                      f"direct {measured[label][-1]['direct']['peak_gib']:.2f} GiB", flush=True)
            run.mark(f"after_run_{repeat + 1}")
        model_gib = sum(path.stat().st_size for path in model.glob("*.safetensors")) / GIB
    results = {"settings": settings, "model_gib": model_gib,
               "codes": [{"label": label, "path": str(code), "commit": commits[label], "runs": measured[label]}
                         for label, code in codes]}
    return run.write(results, _markdown)


if __name__ == "__main__":
    main()
