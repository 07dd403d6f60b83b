"""LLM pruning quality: perplexity, pruning time and peak memory of magnitude, SparseGPT and Wanda (uniform, or with
OWL's block sparsities: method wanda_owl; with DSnoT: wanda_dsnot; any of the three with the least-squares weight
update: suffix _update) on SmolLM2-135M. SparseGPT is INC's driver (sparse_gpt) or the plugins' (sparse_gpt_plugin,
uniform; sparse_gpt_owl, OWL's block sparsities); magnitude_owl / magnitude_dsnot are one_shot_magnitude with OWL's
block sparsities / DSnoT's swaps. A method the pruner refuses at a pattern (OWL at N:M) is listed as not applicable.

    python -m benchmarks.studies.llm_pruning_quality                       # every setting, default methods (~90 min)
    python -m benchmarks.studies.llm_pruning_quality --calib-windows 8     # a quick look
    python -m benchmarks.studies.llm_pruning_quality --compare-inc --settings 50% 2:4   # ours vs INC's prune_wanda
    python -m benchmarks.studies.llm_pruning_quality --quick               # every step on a tiny synthetic Llama
    python -m benchmarks.studies.llm_pruning_quality --methods wanda wanda_owl --settings 50% 60% 70%  # OWL
    python -m benchmarks.studies.llm_pruning_quality --compare-inc --dsnot --settings 50%  # DSnoT: ours vs INC's
    python -m benchmarks.studies.llm_pruning_quality --methods sparse_gpt wanda_update --settings 2:4  # weight update
    python -m benchmarks.studies.llm_pruning_quality --methods sparse_gpt sparse_gpt_plugin sparse_gpt_owl --settings 70%
    python -m benchmarks.studies.llm_pruning_quality --methods magnitude magnitude_owl --settings 70% 50%

Calibration: random windows of the State of the Union speeches; evaluation: the first consecutive windows of Moby
Dick, so the two never overlap (window counts and lengths, evaluation batch and seed from
`recipes/smollm2_wanda.yaml`; the methods and sparsities from settings.yaml). Every (method, sparsity) runs in a
fresh subprocess, so its peak memory (``inc_plugins.perf.memory.PeakRss``) is its own (with --quick, in this
process: the numbers of a quick run mean nothing anyway).

Pruning time excludes the blocks' forward passes (hooks included), as the Wanda paper measures it: what remains is
the pruning metric and the mask/weight update (SparseGPT's Hessian inversions and updates; Wanda's scores and sort).

Writes <out>/llm_pruning_quality.{json,md} (--quick: llm_pruning_quality_quick.*); --compare-inc writes
<out>/wanda_vs_inc.json (with --dsnot: wanda_dsnot_vs_inc.json).
"""

import json
import math
import multiprocessing
import time

import numpy
import torch
from neural_compressor.compression.pruner.wanda.prune import prune_wanda

import inc_plugins
from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.sources import causal_lm
from benchmarks.suites.pruned_models import LLAMA_BLOCKS, magnitude_per_output
from inc_plugins.inc.config_checks import PruningConfigError, check_pruner_settings
from inc_plugins.perf.memory import PeakRss
from inc_plugins.perf.timing import seconds_of
from recipes.perplexity import perplexity
from recipes.schema import load_recipe

STUDY = "llm_pruning_quality"
RECIPE = "smollm2_wanda.yaml"  # calibration and evaluation windows, evaluation batch, seed


class BlockForwardTimer:
    """Total wall time spent inside the model's blocks (their forward passes and any hooks within)."""

    def __init__(self, blocks):
        self.seconds, self._start = 0.0, None
        self._handles = [h for b in blocks for h in (b.register_forward_pre_hook(self._enter),
                                                      b.register_forward_hook(self._exit))]

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _exit(self, *_):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def remove(self):
        for h in self._handles:
            h.remove()


def _entry(method: str, pattern: str, sparsity: float, owl: dict | None = None) -> dict:
    """The INC config entry of a method other than ``magnitude`` (the benchmarks' own per-row magnitude)."""
    # wanda_owl: Wanda with OWL's outlier-weighted block sparsities (``owl``: owl_m / owl_lambda given on the command
    # line; else the plugin's defaults, the paper's M = 5 and lambda = 0.08)
    # wanda_dsnot: Wanda with DSnoT's swaps (INC's prune_wanda(dsnot=True) defaults); magnitude_dsnot: from magnitude's
    # mask (one_shot_magnitude)
    # *_update: the same, then each row's kept weights re-fitted by least squares (update_weights)
    # sparse_gpt_plugin / sparse_gpt_owl: the plugins' SparseGPT (a layer_sparsity key routes sparse_gpt there)
    entries = {"wanda_owl": {"pruning_type": "wanda", "layer_sparsity": "owl", **(owl or {})},
               "wanda_dsnot": {"pruning_type": "wanda", "dsnot": True},
               "sparse_gpt_plugin": {"pruning_type": "sparse_gpt", "layer_sparsity": "uniform"},
               "sparse_gpt_owl": {"pruning_type": "sparse_gpt", "layer_sparsity": "owl", **(owl or {})},
               "magnitude_owl": {"pruning_type": "one_shot_magnitude", "layer_sparsity": "owl", **(owl or {})},
               "magnitude_dsnot": {"pruning_type": "one_shot_magnitude", "dsnot": True}}
    base = method.removesuffix("_update")
    entry = entries.get(base, {"pruning_type": base}) | ({"update_weights": True} if base != method else {})
    return {**entry, "pattern": pattern, "target_sparsity": sparsity, "op_names": [LLAMA_BLOCKS]}


def not_applicable(method: str, pattern: str, sparsity: float) -> str | None:
    """Why the pruner refuses this method at this pattern (e.g. OWL with N:M), or None."""
    if method == "magnitude":
        return None
    try:
        check_pruner_settings(_entry(method, pattern, sparsity))
    except PruningConfigError as error:
        return str(error)
    return None


def _prune(model, method: str, pattern: str, sparsity: float, calibration, owl: dict | None = None) -> None:
    if method == "magnitude":
        magnitude_per_output(model, LLAMA_BLOCKS, pattern, sparsity)
        return
    config = inc_plugins.pruning_config(pruning_configs=[_entry(method, pattern, sparsity, owl)])
    inc_plugins.prepare_pruning(model, config, dataloader=calibration)


def _load(settings: dict):
    source = causal_lm(settings["quick"])
    calibration = source.calibration_windows(settings["calib_windows"], settings["calib_len"], settings["seed"])
    evaluation = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])
    return source.model, [(window[None],) for window in calibration], evaluation


def run_one(method: str, sparsity_name: str, settings: dict) -> dict:
    """One configuration, meant to run in its own process."""
    torch.manual_seed(settings["seed"])
    model, calibration, evaluation = _load(settings)
    result = {"method": method, "setting": sparsity_name}
    if method != "dense":
        pattern, sparsity = settings["sparsities"][sparsity_name]
        timer = BlockForwardTimer(model.model.layers)
        with PeakRss() as peak:
            total = seconds_of(lambda: _prune(model, method, pattern, sparsity, calibration, settings.get("owl")))
        timer.remove()
        linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        result |= {
            "total_seconds": total,
            "prune_seconds": total - timer.seconds,
            "block_forward_seconds": timer.seconds,
            "peak_rss_mb": peak.peak_mb,
            "peak_rss_increase_mb": peak.increase_mb,
            "peak_memory_measure": peak.method,
            "sparsity": sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears),
        }
    result["perplexity"] = perplexity(model, evaluation, batch_size=settings["eval_batch"])
    return result


def run_inc_prune_wanda(sparsity_name: str, settings: dict) -> dict:
    """INC 3.7.1's own `prune_wanda` on the same model and data: wall time and a fingerprint of every mask."""
    model, calibration, _ = _load(settings)
    pattern, sparsity = settings["sparsities"][sparsity_name]
    n, m = (int(v) for v in pattern.split(":")) if ":" in pattern else (0, 0)
    # INC's calibration helper reads `dataloader.batch_size`: the same windows, one per batch, as a DataLoader
    windows = torch.utils.data.TensorDataset(torch.cat([batch[0] for batch in calibration]))
    loader = torch.utils.data.DataLoader(windows, batch_size=1)
    seconds = seconds_of(lambda: prune_wanda(model, loader, sparsity_ratio=sparsity, prune_n=n, prune_m=m,
                                             nsamples=len(calibration), dsnot=settings["dsnot"]))
    return {"seconds": seconds, "masks": _packed_masks(model)}


def run_our_wanda(sparsity_name: str, settings: dict) -> dict:
    model, calibration, _ = _load(settings)
    pattern, sparsity = settings["sparsities"][sparsity_name]
    method = "wanda_dsnot" if settings["dsnot"] else "wanda"
    seconds = seconds_of(lambda: _prune(model, method, pattern, sparsity, calibration))
    return {"seconds": seconds, "masks": _packed_masks(model)}


def _packed_masks(model) -> dict[str, bytes]:
    """Each Linear's mask (weight != 0), a bit per weight: small enough to send back from the child process."""
    return {name: numpy.packbits((m.weight != 0).numpy()).tobytes()
            for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def compare_with_inc(sparsity_name: str, settings: dict) -> dict:
    """Ours vs INC's `prune_wanda`, each in a fresh process, same model and calibration windows."""
    inc = run_isolated("inc_prune_wanda", sparsity_name, settings)
    ours = run_isolated("our_wanda", sparsity_name, settings)
    if "error" in inc or "error" in ours:
        return {"setting": sparsity_name, "inc": inc, "ours": ours}
    differing = sorted(name for name in ours["masks"] if ours["masks"][name] != inc["masks"].get(name))
    weights = equal = 0
    for name, packed in ours["masks"].items():
        mine, theirs = (numpy.unpackbits(numpy.frombuffer(b, dtype=numpy.uint8)) for b in (packed, inc["masks"][name]))
        weights += mine.size  # packbits pads to whole bytes with zeros in both: the padding agrees
        equal += int((mine == theirs).sum())
    return {"setting": sparsity_name, "dsnot": settings["dsnot"], "inc_seconds": inc["seconds"],
            "our_seconds": ours["seconds"], "speedup_vs_inc": inc["seconds"] / ours["seconds"],
            "layers": len(ours["masks"]), "layers_with_different_masks": differing,
            "mask_agreement": equal / weights}


def _run(method: str, sparsity_name: str, settings: dict) -> dict:
    runners = {"inc_prune_wanda": run_inc_prune_wanda, "our_wanda": run_our_wanda}
    try:
        return (runners[method](sparsity_name, settings) if method in runners
                else run_one(method, sparsity_name, settings))
    except Exception as err:  # reported in the table, not swallowed
        return {"method": method, "setting": sparsity_name, "error": f"{type(err).__name__}: {err}"}


def _child(queue, method, sparsity_name, settings):
    queue.put(_run(method, sparsity_name, settings))


def run_isolated(method: str, sparsity_name: str, settings: dict) -> dict:
    """One configuration in a fresh process (spawned: its peak memory is its own). With --quick, in this process:
    a spawned process re-imports torch, transformers and INC, which takes longer than a quick run itself."""
    if settings["quick"]:
        return _run(method, sparsity_name, settings)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, method, sparsity_name, settings))
    process.start()
    result = queue.get()
    process.join()
    return result


def markdown(results: dict) -> str:
    rows = results["results"]
    dense = next(r for r in rows if r["method"] == "dense")
    s = results["settings"]
    lines = [f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
             f"{machine_line(results)}", "", f"Dense perplexity: {dense['perplexity']:.2f}", "",
             "| sparsity | method | perplexity | pruning time (s) | total time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            continue
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['method']} | failed: {r['error']} | | | |")
            continue
        if "not_applicable" in r:
            continue  # (the JSON says why)
        ppl = r["perplexity"]
        lines.append(f"| {r['setting']} | {r['method']} | {ppl:.2f} | {r['prune_seconds']:.2f} | "
                     f"{r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} |" if math.isfinite(ppl) else
                     f"| {r['setting']} | {r['method']} | inf | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--calib-windows", type=int, help="default: the recipe's calibration samples")
    parser.add_argument("--calib-len", type=int, help="default: the recipe's")
    parser.add_argument("--eval-windows", type=int, help="default: the recipe's")
    parser.add_argument("--eval-len", type=int, help="default: the recipe's")
    parser.add_argument("--eval-batch", type=int, help="default: the recipe's evaluation batch size")
    parser.add_argument("--seed", type=int, help="default: the recipe's")
    parser.add_argument("--methods", nargs="+",
                        choices=("magnitude", "magnitude_owl", "magnitude_dsnot", "sparse_gpt", "sparse_gpt_plugin",
                                 "sparse_gpt_owl", "wanda", "wanda_owl", "wanda_dsnot", "wanda_update",
                                 "wanda_owl_update", "wanda_dsnot_update"))
    parser.add_argument("--settings", dest="sparsities", nargs="+",
                        help="sparsity settings by name, from settings.yaml (50%%, 2:4, 4:8, 60%%, 70%%; default: "
                             "all)")
    parser.add_argument("--owl-m", type=float, help="the *_owl methods' owl_m (default: the plugin's, 5)")
    parser.add_argument("--owl-lambda", type=float, help="the *_owl methods' owl_lambda (default: the plugin's, 0.08)")
    parser.add_argument("--compare-inc", action="store_true",
                        help="instead: time our Wanda against INC's prune_wanda and compare their masks")
    parser.add_argument("--dsnot", action="store_true", help="with --compare-inc: both with DSnoT")
    args = parser.parse_args(argv)
    recipe = load_recipe(RECIPE)
    stage, corpus = recipe.pruning[0], recipe.corpus
    settings = {"calib_windows": stage.calibration_samples, "calib_len": corpus.calibration_seq_len,
                "eval_windows": corpus.evaluation_windows, "eval_len": corpus.evaluation_seq_len,
                "eval_batch": recipe.evaluation.batch_size, "seed": stage.seed, **study_settings(STUDY, args.quick)}
    given = {"calib_windows": args.calib_windows, "calib_len": args.calib_len, "eval_windows": args.eval_windows,
             "eval_len": args.eval_len, "eval_batch": args.eval_batch, "seed": args.seed, "methods": args.methods}
    settings.update({key: value for key, value in given.items() if value is not None})
    settings["quick"] = args.quick
    settings["dsnot"] = args.dsnot
    owl = {"owl_m": args.owl_m, "owl_lambda": args.owl_lambda}
    settings["owl"] = {key: value for key, value in owl.items() if value is not None}
    names = args.sparsities or list(settings["sparsities"])
    unknown = [name for name in names if name not in settings["sparsities"]]
    if unknown:
        parser.error(f"--settings {unknown}: choose from {', '.join(settings['sparsities'])}")

    if args.compare_inc:
        name = "wanda_dsnot_vs_inc" if args.dsnot else "wanda_vs_inc"
        run = StudyRun(STUDY, args.quick, args.out, argv, name=name)
        comparisons = [compare_with_inc(name, settings) for name in names]
        run.write({"settings": settings, "comparisons": comparisons})
        print(json.dumps(comparisons, indent=2))
        return 0
    run = StudyRun(STUDY, args.quick, args.out, argv)
    results = [run_isolated("dense", "dense", settings)]
    for name in names:
        for method in settings["methods"]:
            reason = not_applicable(method, *settings["sparsities"][name])
            results.append({"method": method, "setting": name, "not_applicable": reason} if reason
                           else run_isolated(method, name, settings))
            print(json.dumps(results[-1]), flush=True)
    written = run.write({"settings": settings, "results": results}, markdown)
    print(markdown(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
