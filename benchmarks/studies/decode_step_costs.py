"""Where a decode step's time goes, and why slimmed SmolLM2 models fall short of the bytes ideal in bf16 (issue #16).

    python -m benchmarks.studies.decode_step_costs            # alone, on a quiet machine
    python -m benchmarks.studies.decode_step_costs --quick    # every part on tiny shapes and the synthetic Llama

structured_generation times the decode of slimmed SmolLM2-135M models near the ideal speedup (dense / pruned bytes of
weights read per generated token) in fp32 but further from it in bf16 (benchmarks/results/structured_generation.md).
A decode step at batch 1 is a chain of matrix-vector products (one per Linear) plus work that no weight count
shrinks (attention over the cache, norms, rotary embeddings, activations, cache updates, sampling, Python dispatch).
Three measurements split it:

* kernels: one Linear at batch 1 ([1, in] x [out, in]) per shape of settings (SmolLM2's layers, dense and
  slimmed), dtype (fp32; bf16 where the CPU has native bf16) and form: eager (``F.linear``, what eager decode runs)
  and prepacked (oneDNN's ``_linear_pointwise`` on a weight reordered once, what inductor's freezing compiles a
  Linear to). The weights are read from memory as in decode, where each is read once per step: every sweep calls
  the Linear on each of several copies of the weight that together exceed the caches (``kernel_stream_mb``).
  Microseconds per call (median of the sweeps) and the rate; per dtype and form a line through (weight bytes,
  seconds per call) over the shapes (``measures.per_token_cost_fit``): its intercept is a per-call floor that a
  narrower layer cannot go under;
* operators: torch.profiler over the decode steps of a generate call (``DecodeProfiler`` starts it when the
  prefill's token comes out and stops it when generate ends) of SmolLM2-135M dense, its uniform slim (below) and the
  structured_generation models of settings' ``saved_models`` that ``--models-dir`` holds, per backend (eager fp32,
  eager bf16 weights). The profiled wall time per step splits into the operators' self CPU time by kind, matmul
  (every Linear's operators, their dispatch included), attention (scaled_dot_product_*; the tiny Llama of --quick
  runs eager attention, whose products count as matmul) and other operators (norms, rotary embeddings,
  activations, cache updates, sampling), and the time outside any operator (generate's Python loop); dense / model
  per part (medians of ``profile_rounds`` interleaved profiled calls) beside the bytes ratio. The same models'
  decode is also timed unprofiled (structured_generation's ``time_decode``, interleaved rounds), since the
  profiler adds a cost per operator;
* scale: random-weight Llama models of settings' ``scale_shapes`` (SmolLM2-135M's layout and Llama-3.2-1B's), dense
  vs their uniform slim, decode timed as structured_generation times it, measured / ideal per backend. Random weights
  measure time only, never quality.

The uniform slim (``slim_uniformly``): every block keeps its first round(keep x groups) key/value groups (at least
one) and its first FFN neurons, round(keep x neurons) rounded to a multiple of ``neuron_multiple``; slimmed by
``slim_model``, as every pruned model here.

Writes <out>/decode_step_costs.{json,md} (--quick: decode_step_costs_quick.*).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from benchmarks.studies.measures import per_token_cost_fit
from benchmarks.studies.sources import causal_lm
from benchmarks.studies.structured_generation import (CAST_BACKENDS, backend_availability, backend_weight_bytes,
                                                      greedy_new_tokens, models_for, parameters_of, time_decode)
from inc_plugins.models.saving import load_slimmed
from inc_plugins.models.structure_masks import expand_head_mask, mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.synthetic import seeded_model
from inc_plugins.perf.timing import interleaved_seconds, median_ratio, seconds_of, summary

STUDY = "decode_step_costs"
PARTS = ("kernels", "operators", "scale")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMS = ("eager", "prepacked")
# self CPU time of these operators is a Linear's: its matmul kernel and the dispatch around it
MATMUL_OPERATORS = frozenset({"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm",
                              "mkldnn::_linear_pointwise"})
# a decode step's time: operators by kind, and the wall time between operators (generate's Python loop)
PART_NAMES = ("matmul", "attention", "other_operators", "outside_operators")
UNIFORM = "uniform"  # the name of every uniform slim in the results


# ------------------------------------------------------------------------------------------------------ kernels


def form_availability(dtype: str, form: str) -> tuple[bool, str]:
    # a dtype runs where structured_generation's eager backend of that dtype does (bf16: only natively)
    available, reason = backend_availability("eager-bf16-weights" if dtype == "bfloat16" else "eager-fp32")
    if available and form == "prepacked" and not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    return available, reason


def streamed_linear_seconds(rows: int, columns: int, dtype: torch.dtype, form: str, stream_bytes: int,
                            sweeps: int) -> dict:
    """Seconds per call of one Linear [1, columns] x [rows, columns] in `form`, the weight read from memory: each
    sweep calls it once on each of enough copies of the weight to read `stream_bytes` (at least 2 copies)."""
    generator = torch.Generator().manual_seed(0)
    weight_bytes = rows * columns * torch.empty((), dtype=dtype).element_size()
    copies = max(2, math.ceil(stream_bytes / weight_bytes))
    weights = [torch.randn(rows, columns, generator=generator).to(dtype) for _ in range(copies)]
    x = torch.randn(1, columns, generator=generator).to(dtype)
    if form == "prepacked":  # what inductor's freezing does to a Linear's weight, for batch size 1
        weights = [torch.ops.mkldnn._reorder_linear_weight(weight, 1) for weight in weights]

        def call(weight):
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    else:
        def call(weight):
            return F.linear(x, weight)

    def sweep():
        for weight in weights:
            call(weight)

    sweep()  # warm-up: first-call setup of the kernel
    timed = summary([seconds_of(sweep) / copies for _ in range(sweeps)])
    return {"weight_bytes": weight_bytes, "copies": copies, "median_us": 1e6 * timed["median_s"],
            "min_us": 1e6 * timed["min_s"], "gb_per_s": weight_bytes / timed["median_s"] / 1e9}


def kernels_part(settings: dict) -> dict:
    """{dtype: {form: {available, reason[, shapes: {"<out>x<in>": timing}, fit: per-call floor and rate]}}}."""
    stream_bytes = int(settings["kernel_stream_mb"] * 1e6)
    measured = {}
    for dtype in DTYPES:
        for form in FORMS:
            available, reason = form_availability(dtype, form)
            entry = measured.setdefault(dtype, {})[form] = {"available": available, "reason": reason}
            if not available:
                continue
            shapes = entry["shapes"] = {}
            for rows, columns in settings["kernel_shapes"]:
                shapes[f"{rows}x{columns}"] = streamed_linear_seconds(rows, columns, DTYPES[dtype], form,
                                                                      stream_bytes, settings["kernel_sweeps"])
            print(f"[kernels] {dtype} {form}: " + ", ".join(f"{shape} {timing['median_us']:.1f} us"
                                                           for shape, timing in shapes.items()), flush=True)
            fit = per_token_cost_fit([timing["median_us"] / 1e6 for timing in shapes.values()],
                                     [timing["weight_bytes"] for timing in shapes.values()])
            entry["fit"] = {"floor_us": 1000 * fit["fixed_ms"], "gb_per_s": fit["gb_per_s"], "r2": fit["r2"]}
    return measured


# ---------------------------------------------------------------------------------------------------- operators


class DecodeProfiler:
    """A ``generate(streamer=...)`` streamer that runs torch's profiler over the decode steps only: generate hands it
    the prompt, then each new token as soon as it is chosen, so the profiler starts when the prefill's token comes
    out (its second call) and stops when generate ends; ``wall_seconds`` is the time in between."""

    def __init__(self):
        self.calls = 0
        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self.wall_seconds = 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.profiler.start()
            self.wall_seconds = -time.perf_counter()

    def end(self) -> None:
        self.wall_seconds += time.perf_counter()
        self.profiler.stop()

    @property
    def decode_steps(self) -> int:
        return self.calls - 2


def operator_part_of(name: str) -> str:
    if name in MATMUL_OPERATORS:
        return "matmul"
    return "attention" if "scaled_dot_product" in name else "other_operators"


def profiled_decode(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Ms per decode step by part (``PART_NAMES``: operators' self CPU time by kind, and the rest of the wall time,
    spent outside operators) and in all (the profiled wall time), from one profiled generate call."""
    streamer = DecodeProfiler()
    greedy_new_tokens(model, prompt, new_tokens, streamer=streamer, disable_compile=True)
    parts = dict.fromkeys(PART_NAMES, 0.0)
    for event in streamer.profiler.key_averages():
        parts[operator_part_of(event.key)] += event.self_cpu_time_total / 1000 / streamer.decode_steps
    wall_ms = 1000 * streamer.wall_seconds / streamer.decode_steps
    parts["outside_operators"] = wall_ms - sum(parts.values())
    return {"decode_steps": streamer.decode_steps, "ms_per_step": parts, "profiled_ms_per_step": wall_ms}


def operators_part(source, settings: dict, models_dir: Path | None) -> dict:
    """Per backend: each model's unprofiled decode timing, its profiled parts, and dense / model per part."""
    models = {"dense": source.model.eval(), UNIFORM: slim_uniformly(copy.deepcopy(source.model), settings)}
    saved = [name for name in settings["saved_models"] if models_dir is not None and (models_dir / name).is_dir()]
    models.update({name: load_slimmed(models_dir / name).eval() for name in saved})
    prompt = source.evaluation_windows(1, settings["prompt_tokens"])[:1]
    result = {"models": list(models), "not_saved": [name for name in settings["saved_models"] if name not in saved],
              "backends": {}}
    for backend in settings["operator_backends"]:
        available, reason = backend_availability(backend)
        entry = result["backends"][backend] = {"available": available, "reason": reason}
        if not available:
            continue
        backend_models = models_for(models, backend)
        timed = time_decode(backend_models, backend, prompt, settings["new_tokens"], settings["decode_warmup"],
                            settings["decode_repeats"], math.inf)
        profiles = {name: [] for name in backend_models}  # profiled calls, interleaved as the timed ones
        interleaved_seconds([lambda name=name: profiles[name].append(
            profiled_decode(backend_models[name], prompt, settings["new_tokens"])) for name in backend_models],
            0, settings["profile_rounds"])
        dense_bytes = backend_weight_bytes(backend_models["dense"], backend)
        rows = entry["models"] = {}
        for name, model in backend_models.items():
            row = rows[name] = {
                "decode_steps": profiles[name][0]["decode_steps"],
                "ms_per_step": {part: statistics.median(p["ms_per_step"][part] for p in profiles[name])
                                for part in PART_NAMES},
                "profiled_ms_per_step": statistics.median(p["profiled_ms_per_step"] for p in profiles[name]),
                "profiled_rounds": profiles[name]}
            row["unprofiled_ms_per_step"] = 1000 * timed[name]["median_decode_s"] / timed[name]["decode_steps"]
            row["decode_s_per_round"] = timed[name]["decode_s_per_round"]
            row["ideal_speedup"] = dense_bytes / backend_weight_bytes(model, backend)
        dense = rows["dense"]
        for row in rows.values():
            row["speedup"] = dense["unprofiled_ms_per_step"] / row["unprofiled_ms_per_step"]
            row["paired_speedup"] = median_ratio(dense["decode_s_per_round"], row["decode_s_per_round"])
            row["of_ideal"] = row["speedup"] / row["ideal_speedup"]
            row["part_speedup"] = {part: dense["ms_per_step"][part] / row["ms_per_step"][part]
                                   for part in PART_NAMES if row["ms_per_step"][part] > 0}
            row["share_of_step"] = {part: row["ms_per_step"][part] / row["profiled_ms_per_step"]
                                    for part in PART_NAMES}
        print(f"[operators] {backend}: " + ", ".join(
            f"{name} {row['unprofiled_ms_per_step']:.1f} ms/step (matmul {row['ms_per_step']['matmul']:.1f})"
            for name, row in rows.items()), flush=True)
    return result


# -------------------------------------------------------------------------------------------------------- scale


def slim_uniformly(model, settings: dict):
    """Slims `model` in place so that every block keeps the same units (see the module docstring); returns it."""
    structure = mask_structure(model)
    groups = max(1, round(settings["keep"] * structure.n_head_units))
    multiple = settings["neuron_multiple"]
    neurons = max(multiple, multiple * round(settings["keep"] * structure.n_neurons / multiple))
    group_mask = torch.zeros(structure.n_layers, structure.n_head_units)
    group_mask[:, :groups] = 1
    neuron_mask = torch.zeros(structure.n_layers, structure.n_neurons)
    neuron_mask[:, :neurons] = 1
    return slim_model(model, expand_head_mask(group_mask, structure), neuron_mask).eval()


def layout_models(shape: dict, settings: dict, backend: str) -> dict:
    """{"dense", UNIFORM}: a random-weight Llama of `shape` (LlamaConfig keys; settings' seed) and its uniform slim,
    as `backend` runs them. Built afresh for each backend, slim first, so that at most the two fp32 models are in
    memory at once (a 1B layout is 5 GB in fp32)."""
    def build():
        return seeded_model(settings["seed"], lambda: LlamaForCausalLM(LlamaConfig(**shape)))

    models = {UNIFORM: slim_uniformly(build(), settings)}
    models = {"dense": build(), **models}
    if backend in CAST_BACKENDS:
        for model in models.values():
            model.to(torch.bfloat16)
    return models


def scale_part(settings: dict) -> dict:
    """Per shape of settings: the models' sizes and, per backend, dense and uniform slim decode timed and against
    the ideal."""
    generator = torch.Generator().manual_seed(settings["seed"])
    measured = {}
    for shape_name, shape in settings["scale_shapes"].items():
        prompt = torch.randint(0, shape["vocab_size"], (1, settings["scale_prompt_tokens"]), generator=generator)
        entry = measured[shape_name] = {"shape": shape, "backends": {}}
        for backend in settings["scale_backends"]:
            available, reason = backend_availability(backend)
            timing = entry["backends"][backend] = {"available": available, "reason": reason}
            if not available:
                continue
            models = layout_models(shape, settings, backend)
            entry["parameters"] = {name: parameters_of(model) for name, model in models.items()}
            decode = time_decode(models, backend, prompt, settings["scale_new_tokens"], settings["decode_warmup"],
                                 settings["decode_repeats"], math.inf)
            read = {name: backend_weight_bytes(model, backend) for name, model in models.items()}
            del models
            dense_s, slim_s = decode["dense"], decode[UNIFORM]
            timing.update(
                weight_bytes=read,
                ms_per_step={name: 1000 * d["median_decode_s"] / d["decode_steps"] for name, d in decode.items()},
                decode_s_per_round={name: d["decode_s_per_round"] for name, d in decode.items()},
                speedup=dense_s["median_decode_s"] / slim_s["median_decode_s"],
                paired_speedup=median_ratio(dense_s["decode_s_per_round"], slim_s["decode_s_per_round"]),
                ideal_speedup=read["dense"] / read[UNIFORM])
            timing["of_ideal"] = timing["speedup"] / timing["ideal_speedup"]
            print(f"[scale] {shape_name} {backend}: {timing['ms_per_step']['dense']:.1f} -> "
                  f"{timing['ms_per_step'][UNIFORM]:.1f} ms/step, {timing['speedup']:.3f}x of ideal "
                  f"{timing['ideal_speedup']:.3f}x ({100 * timing['of_ideal']:.0f}%)", flush=True)
    return measured


# ------------------------------------------------------------------------------------------------------- report


def kernels_markdown(kernels: dict) -> list[str]:
    forms = [(dtype, form) for dtype in kernels for form in kernels[dtype]]
    shown = [(dtype, form) for dtype, form in forms if kernels[dtype][form]["available"]]
    lines = ["| layer (out x in) | " + " | ".join(f"{dtype} {form} us (GB/s)" for dtype, form in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for shape in kernels[shown[0][0]][shown[0][1]]["shapes"] if shown else []:
        cells = [kernels[dtype][form]["shapes"][shape] for dtype, form in shown]
        lines.append(f"| {shape.replace('x', ' x ')} | "
                     + " | ".join(f"{cell['median_us']:.1f} ({cell['gb_per_s']:.1f})" for cell in cells) + " |")
    lines.append("")
    for dtype, form in forms:
        entry = kernels[dtype][form]
        if not entry["available"]:
            lines.append(f"- {dtype} {form}: not run: {entry['reason']}")
            continue
        fit = entry["fit"]
        rate = f"{fit['gb_per_s']:.1f} GB/s" if fit["gb_per_s"] else "no rate (slope not positive)"
        lines.append(f"- {dtype} {form}: {fit['floor_us']:.1f} us per call + weight bytes at {rate} (R² "
                     f"{fit['r2']:.2f})")
    return lines


def operators_markdown(operators: dict) -> list[str]:
    lines = []
    if operators["not_saved"]:
        lines += [f"Not profiled (not in --models-dir): {', '.join(operators['not_saved'])}.", ""]
    for backend, entry in operators["backends"].items():
        if not entry["available"]:
            lines += [f"**{backend}**: not run: {entry['reason']}", ""]
            continue
        lines += [f"### {backend}", "",
                  "| model | decode ms/step | speedup (paired) | ideal | measured / ideal | profiled ms/step | "
                  "matmul (dense / model) | attention | other operators | outside operators | matmul share |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in entry["models"].items():
            part = row["ms_per_step"]
            ratio = row["part_speedup"]
            cells = [f"{part[p]:.1f} ({ratio[p]:.2f}x)" if p in ratio else f"{part[p]:.1f}" for p in PART_NAMES]
            lines.append(f"| {name} | {row['unprofiled_ms_per_step']:.1f} | {row['speedup']:.3f}x "
                         f"({row['paired_speedup']:.3f}x) | {row['ideal_speedup']:.3f}x | {100 * row['of_ideal']:.0f}% "
                         f"| {row['profiled_ms_per_step']:.1f} | {' | '.join(cells)} | "
                         f"{100 * row['share_of_step']['matmul']:.0f}% |")
        lines.append("")
    return lines


def scale_markdown(scale: dict) -> list[str]:
    lines = ["| layout (random weights) | parameters dense -> uniform slim | backend | dense ms/step | slim ms/step | "
             "speedup (paired) | ideal | measured / ideal |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for shape_name, entry in scale.items():
        params = entry.get("parameters")
        for backend, timing in entry["backends"].items():
            if not timing["available"]:
                lines.append(f"| {shape_name} | | {backend} | not run: {timing['reason']} | | | | |")
                continue
            steps = timing["ms_per_step"]
            lines.append(f"| {shape_name} | {params['dense'] / 1e6:.1f}M -> {params[UNIFORM] / 1e6:.1f}M | {backend} | "
                         f"{steps['dense']:.1f} | {steps[UNIFORM]:.1f} | {timing['speedup']:.3f}x "
                         f"({timing['paired_speedup']:.3f}x) | {timing['ideal_speedup']:.3f}x | "
                         f"{100 * timing['of_ideal']:.0f}% |")
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Where a decode step's time goes (issue #16)", "",
             f"{'**QUICK SMOKE RUN: tiny shapes and synthetic models, not a measurement.** ' if s['quick'] else ''}"
             f"{machine_line(results)}", ""]
    if "kernels" in results:
        lines += ["## One Linear at batch 1, weights read from memory", "",
                  f"Median of {s['kernel_sweeps']} sweeps over copies of the weight totalling at least "
                  f"{s['kernel_stream_mb']} MB; eager = F.linear, prepacked = oneDNN on a weight reordered once "
                  f"(inductor's freezing). Per form, a line through (weight bytes, time per call) over the shapes:",
                  "", *kernels_markdown(results["kernels"]), ""]
    if "operators" in results:
        lines += [f"## Decode step by operator: {s['model']}", "",
                  f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, greedy, batch 1, KV cache. "
                  f"Decode ms/step: unprofiled, median of {s['decode_repeats']} interleaved rounds after "
                  f"{s['decode_warmup']} warm-up. Profiled: the wall time per step of a profiled generate call, "
                  f"median of {s['profile_rounds']} interleaved rounds (the profiler adds a cost per operator), "
                  f"split into operators' self CPU time (matmul: every Linear's operators; attention: "
                  f"scaled_dot_product_*) and the time outside operators "
                  f"(generate's Python loop). {UNIFORM}: every block keeps round({s['keep']} x groups) "
                  f"key/value groups and round({s['keep']} x neurons) FFN neurons in multiples of "
                  f"{s['neuron_multiple']}.", "", *operators_markdown(results["operators"])]
    if "scale" in results:
        lines += ["## Dense vs uniform slim per layout (random weights: time only)", "",
                  f"{s['scale_prompt_tokens']}-token random prompt, {s['scale_new_tokens']} new tokens, greedy, "
                  f"batch 1, KV cache; median of {s['decode_repeats']} interleaved rounds after "
                  f"{s['decode_warmup']} warm-up.", "", *scale_markdown(results["scale"]), ""]
    lines.append(f"Run: {results['run']['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog=(
        "On 2 cores with the defaults: about 30 minutes (kernels 2, operators 15, scale 12: the 1B layout's fp32 "
        "decode reads 5 GB of weights per token) and 16 GB of memory at peak (the 1B layout's two fp32 models)."))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--models-dir", type=Path, default=Path("runs/structured_generation_models"),
                        help="structured_generation's slimmed models, for the operators part (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    settings = {"quick": args.quick, "parts": args.parts, **study_settings(STUDY, args.quick)}
    results = {"settings": settings}
    start = time.perf_counter()
    if "kernels" in args.parts:
        results["kernels"] = kernels_part(settings)
        run.mark("after_kernels")
    if "operators" in args.parts:
        source = causal_lm(args.quick)
        settings["model"] = source.description
        results["operators"] = operators_part(source, settings, None if args.quick else args.models_dir)
        del source
        run.mark("after_operators")
    if "scale" in args.parts:
        results["scale"] = scale_part(settings)
    print(f"measured in {time.perf_counter() - start:.0f} s", flush=True)
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
