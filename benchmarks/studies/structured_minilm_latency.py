"""What the structured methods of structured_minilm buy in speed: latency of each method's slimmed MiniLM-L6.

    python -m benchmarks.studies.structured_minilm             # first: each method's kept heads and neurons per block
    python -m benchmarks.studies.structured_minilm_latency     # alone, on a quiet machine (about 6 minutes)
    python -m benchmarks.studies.structured_minilm_latency --quick   # after structured_minilm --quick, in seconds

A slimmed encoder's latency is a function of its shape (the heads and FFN neurons each block keeps): the weights'
values do not change a dense kernel's work. So each method of <out>/structured_minilm.json is timed as the
fine-tuned MiniLM of its recipe slimmed to the kept counts structured_minilm recorded for it (the first heads and
neurons of each block; `inc_plugins.models.surgery_transformers.slim_model`); methods that kept the same counts (a
method with and without bias compensation) are one form, timed once. Every form runs on the backends of
settings.yaml (`inc_plugins.perf.backends`) at each shape, on random token ids (seeded), all forms of one shape in
each round (`benchmarks.studies.measures.backend_forms_latency`); speed-ups against dense eager fp32 and against
dense on the same backend. The accuracies are structured_minilm's, of the methods' own slimmed models.

Writes <out>/structured_minilm_latency.{json,md} (--quick: structured_minilm_latency_quick.*).
"""

from __future__ import annotations

import copy
import json
import logging

import torch

from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.measures import backend_forms_latency
from benchmarks.studies.sources import text_classification_task
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.backends import BACKENDS
from recipes.schema import load_recipe

STUDY = "structured_minilm_latency"
PRUNE_STUDY = "structured_minilm"
DENSE = "dense"


def shape_key(row: dict) -> str:
    """A name for the shape a method's slimmed model has: its kept heads and neurons per block."""
    return f"heads {row['kept_heads']}, neurons {row['kept_neurons']}"


def slimmed_to(dense: torch.nn.Module, kept_heads: list[int], kept_neurons: list[int]) -> torch.nn.Module:
    """A copy of `dense` slimmed to keep the first `kept_heads[i]` heads and `kept_neurons[i]` FFN neurons of block
    i: the shape (and so the latency) of any model slimmed to those counts."""
    config = dense.config
    heads = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    neurons = torch.zeros(config.num_hidden_layers, config.intermediate_size)
    for block, (n_heads, n_neurons) in enumerate(zip(kept_heads, kept_neurons)):
        heads[block, :n_heads], neurons[block, :n_neurons] = 1, 1
    return slim_model(copy.deepcopy(dense), heads, neurons).eval()


def forms_of(pruned: dict) -> dict[str, list[str]]:
    """Each distinct slimmed shape of structured_minilm's methods (failed ones left out) -> the methods with it."""
    forms: dict[str, list[str]] = {}
    for name, row in pruned["methods"].items():
        if "error" not in row:
            forms.setdefault(shape_key(row), []).append(name)
    return forms


def measure(run: StudyRun, settings: dict, pruned: dict) -> dict:
    recipe = load_recipe(pruned["settings"]["recipe"])
    dense, *_ = text_classification_task(recipe, run.quick)
    forms = forms_of(pruned)
    models = {DENSE: dense.eval()}
    for key, methods in forms.items():
        row = pruned["methods"][methods[0]]
        models[key] = slimmed_to(dense, row["kept_heads"], row["kept_neurons"])
    backends = [b for b in settings["backends"] if BACKENDS[b].availability().available]
    shapes = []
    for shape in backend_forms_latency(models, backends, settings["shapes"], dense.config.vocab_size,
                                       settings["warmup"], settings["repeats"],
                                       after_shape=lambda shape: run.mark(f"after_{shape}")):
        timed = shape.pop("timed")
        eager_fp32 = timed[(DENSE, "eager-fp32")]["median_s"] if "eager-fp32" in backends else None
        rows = []
        for (form, backend), stats in timed.items():
            same_backend = timed[(DENSE, backend)]["median_s"] / stats["median_s"]
            for method in ([DENSE] if form == DENSE else forms[form]):
                rows.append({"method": method, "backend": backend, **stats,
                             "parameters": sum(p.numel() for p in models[form].parameters()),
                             "speedup_vs_dense_same_backend": same_backend,
                             "speedup_vs_dense_eager_fp32": eager_fp32 / stats["median_s"] if eager_fp32 else None})
        shapes.append({**shape, "timings": rows})
    return {"benchmark": STUDY,
            "settings": {"quick": run.quick, **settings, "backends_unavailable": sorted(set(settings["backends"])
                                                                                       - set(backends))},
            "pruned": {"results": f"{PRUNE_STUDY}{'_quick' if run.quick else ''}.json",
                       "target": pruned["settings"]["target"], "dense": pruned["dense"],
                       "methods": {name: {key: row[key] for key in ("accuracy", "f1", "removed_fraction",
                                                                    "kept_heads", "kept_neurons")}
                                   for name, row in pruned["methods"].items() if "error" not in row}},
            "threads": torch.get_num_threads(), "shapes": shapes}


def markdown(results: dict) -> str:
    pruned, s = results["pruned"], results["settings"]
    accuracy = {DENSE: pruned["dense"]["accuracy"], **{n: m["accuracy"] for n, m in pruned["methods"].items()}}
    lines = [f"# Latency of MiniLM-L6 slimmed by each structured method ({100 * pruned['target']:.0f}% of head+FFN "
             f"MACs removed){' (quick: synthetic, meaningless)' if s['quick'] else ''}", "",
             f"Each method's slimmed shape (kept heads and FFN neurons per block, from {pruned['results']}; methods "
             f"with the same counts share one timing) on the fine-tuned MiniLM; median of {s['repeats']} interleaved "
             f"rounds after {s['warmup']} warm-up calls, {results['threads']} threads. " + machine_line(results), ""]
    for shape in results["shapes"]:
        loads = shape["load_average"]
        lines += [f"## {shape['batch']} x {shape['seq_len']} tokens (1-minute load average "
                  f"{loads['before'][0]:.2f} before, {loads['after'][0]:.2f} after)", "",
                  "| method | backend | parameters | ms | vs dense, same backend | vs dense eager fp32 | dev accuracy |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for t in sorted(shape["timings"], key=lambda t: (t["backend"], -t["median_s"])):
            vs_fp32 = f"{t['speedup_vs_dense_eager_fp32']:.2f}x" if t["speedup_vs_dense_eager_fp32"] else "n/a"
            lines.append(f"| {t['method']} | {t['backend']} | {t['parameters'] / 1e6:.2f}M | "
                         f"{1000 * t['median_s']:.1f} | {t['speedup_vs_dense_same_backend']:.2f}x | {vs_fp32} | "
                         f"{accuracy[t['method']]:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog="Full run alone on 2 cores: about 6 minutes (dense and four "
                                                 "slimmed forms on four backends at two shapes).")
    args = parser.parse_args(argv)
    settings = study_settings(STUDY, args.quick)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    source = args.out / f"{PRUNE_STUDY}{'_quick' if args.quick else ''}.json"
    if not source.is_file():
        raise SystemExit(f"error: {source} does not exist: run python -m benchmarks.studies.{PRUNE_STUDY}"
                         f"{' --quick' if args.quick else ''} first (with the same --out)")
    pruned = json.loads(source.read_text())
    if not pruned.get("complete"):
        raise SystemExit(f"error: {source} is from a run that did not finish: run {PRUNE_STUDY} again")
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    results = run.write(measure(run, settings, pruned), markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
