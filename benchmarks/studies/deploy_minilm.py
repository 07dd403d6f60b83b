"""From dense MiniLM to pruned int8: dev accuracy, size on disk and latency of every deployable form of the model.

    python -m benchmarks.studies.deploy_minilm --step prune     # models, IRs and dev accuracy (no timing)
    python -m benchmarks.studies.deploy_minilm --step latency   # alone, on a quiet machine
    python -m benchmarks.studies.deploy_minilm --quick          # every step on the synthetic BERT, in seconds

Issue #17's measurement. Models: the fine-tuned MiniLM-L6 of recipes/minilm_deploy.yaml (dense) and, for each
fraction of settings.yaml, that recipe's pruning stage (mask_search, the full method) with its target replaced by the
fraction, slimmed; the `retrained` and `distilled` ones ([fraction, epochs]) are fine-tuned after pruning (pruned
weights held at zero; on the labels, or on the dense model's outputs: knowledge distillation) before they are slimmed:
deeper pruning that a one-shot search alone would pay for in accuracy. Each model runs on the backends of settings.yaml (`inc_plugins.perf.backends`): eager fp32, eager
bf16 (autocast), OpenVINO fp32 and bf16, and OpenVINO int8 (NNCF static int8 on the recipe's quantize settings: 300
training samples, seed 0), whose float parts run in fp32 or bf16.

* prune step: dev accuracy and F1 of every (model, backend) form. The OpenVINO forms are evaluated as they are
  exported (free batch and sequence length), quantized on the same samples as the latency step's int8 backends;
  sizes on disk of the safetensors, the IR and the int8 IR.
* latency step: every (model, backend) at each shape of settings.yaml (random token ids, seeded), all of one shape
  timed in turn within each round (`inc_plugins.perf.timing`), so load that comes and goes hits all of them alike;
  speed-ups against dense eager fp32 at that shape. The CPU features that ran are recorded (AVX-512 VNNI / BF16, AMX
  if any; OpenVINO's own view of the CPU).

The issue's target: pruned + int8 on the best backend >= 8x faster than dense eager fp32 at 32 x 128, within 1 point
of dense accuracy. Writes <out>/deploy_minilm.{json,md} (--quick: deploy_minilm_quick.*).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import openvino as ov
import torch
from torch import nn

import inc_plugins
from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, claim_models_dir,
                                       machine_line, prune_step_results, steps_models_dir, study_parser,
                                       study_settings)
from benchmarks.studies.measures import backend_forms_latency
from benchmarks.studies.sources import text_classification_task
from inc_plugins.deploy import convert_to_openvino, load_openvino
from inc_plugins.deploy.int8_nncf import quantize_ir_int8
from inc_plugins.deploy.openvino_export import IR_FILE, write_openvino_ir
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.perf.backends import BACKENDS
from inc_plugins.perf.machine import cpu_description, load_average
from inc_plugins.perf.timing import median_ratio
from recipes.pruning_stage import calibration_inputs, run_pruning_stage
from recipes.schema import load_recipe
from recipes.text_classification import epochs_to_steps, evaluate, tokenized_batches

STUDY = "deploy_minilm"
RECIPE = "minilm_deploy.yaml"
DENSE = "dense"
# what a resumed prune step must share with the one it continues (the models it adds may differ)
RESUMABLE_SETTINGS = ("calibration_samples", "quantize_samples", "backends", "dev_examples")
BASELINE = (DENSE, "eager-fp32")  # what every speed-up is measured against
TARGET_SPEEDUP, TARGET_POINTS = 8, 0.01  # the target: >= 8x dense eager fp32, within 1 point of its accuracy
IR_WEIGHTS = Path(IR_FILE).with_suffix(".bin").name  # beside the IR's graph
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


class _BackendModel(nn.Module):
    """An eager backend's runner (`inc_plugins.perf.backends`, shape-free) called like the model, for evaluation."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.run(inputs))


def _ir(model: nn.Module, example: dict, quantize_on: list[dict] | None) -> ov.Model:
    """The model as the recipe's export stage writes it (free shapes), int8 as its quantize stage makes it when
    `quantize_on` is given. (The timed backends leave out token_type_ids, all zeros here: the same computation.)"""
    converted = convert_to_openvino(model, example)
    return converted if quantize_on is None else quantize_ir_int8(converted, quantize_on)


def _bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def accuracy_of_forms(name: str, model: nn.Module, backends: list[str], dev: list[dict], calibration: list[dict],
                      models_dir: Path) -> dict:
    """{backend id: dev metrics (or why it cannot run here)} of `model`, and the sizes of its files on disk (the
    IRs are written to `models_dir`)."""
    example = {key: tensor[:2] for key, tensor in dev[0].items() if key != "labels"}
    float_ir, int8_ir = _ir(model, example, None), None
    write_openvino_ir(float_ir, models_dir / f"{name}_ir")
    forms = {}
    for backend_id in backends:
        availability = BACKENDS[backend_id].availability()
        if not availability.available:
            forms[backend_id] = {"available": False, "reason": availability.reason}
            continue
        backend = BACKENDS[backend_id]
        if backend.name == "eager":
            evaluated = _BackendModel(backend.prepare(model, example))
        elif "quantization" in backend.settings:
            if int8_ir is None:
                int8_ir = _ir(model, example, calibration)
                write_openvino_ir(int8_ir, models_dir / f"{name}_int8_ir")
            evaluated = load_openvino(models_dir / f"{name}_int8_ir", backend.dtype)  # the IR as written
        else:
            evaluated = load_openvino(models_dir / f"{name}_ir", backend.dtype)
        forms[backend_id] = {"available": True, **evaluate(evaluated, dev, desc=f"{name} {backend_id}")}
        print(f"{name} {backend_id}: accuracy {forms[backend_id]['accuracy']:.4f}", flush=True)
    # whole directories, and the IRs' weights files alone (the .xml, the graph, is most of a tiny model's IR)
    sizes = {"safetensors": _bytes(models_dir / name), "openvino_ir": _bytes(models_dir / f"{name}_ir"),
             "openvino_ir_bin": (models_dir / f"{name}_ir" / IR_WEIGHTS).stat().st_size}
    if int8_ir is not None:
        sizes["openvino_int8_ir"] = _bytes(models_dir / f"{name}_int8_ir")
        sizes["openvino_int8_ir_bin"] = (models_dir / f"{name}_int8_ir" / IR_WEIGHTS).stat().st_size
    return {"forms": forms, "bytes": sizes, "parameters": sum(p.numel() for p in model.parameters())}


def prune_step(run: StudyRun, recipe, settings: dict, models_dir: Path, previous: dict | None = None) -> dict:
    """Prunes and slims at each fraction, saves the models under `models_dir`, measures every form's accuracy.
    `previous`: the results of an earlier prune step with the same settings (`--resume`): its models whose
    directories are still in `models_dir` are kept, the others are made."""
    dense, tokenizer, train_examples, dev_examples = text_classification_task(recipe, run.quick)
    dev_examples = dev_examples[: settings["dev_examples"]] if settings["dev_examples"] else dev_examples
    dev = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    calibration = quantize_calibration(recipe, settings, tokenizer, train_examples)
    template = recipe.pruning[0].model_copy(update={"calibration_samples": settings["calibration_samples"]})
    results = {"benchmark": STUDY,
               "settings": {"quick": run.quick, "recipe": RECIPE, **settings, "dev_examples": len(dev_examples),
                            "quantize_samples": sum(len(b["input_ids"]) for b in calibration),
                            "data_note": "movie-snippet sentiment, SST-2-like, not official SST-2"},
               "models": {}}
    if previous is not None:
        changed = [key for key in RESUMABLE_SETTINGS if previous["settings"].get(key) != results["settings"][key]]
        if changed:
            raise SystemExit(f"error: --resume: the earlier prune step ran with other {', '.join(changed)}")
        results["models"] = {name: model for name, model in previous["models"].items() if (models_dir / name).is_dir()}
        results["resumed_models"] = list(results["models"])
    if DENSE not in results["models"]:
        dense.save_pretrained(models_dir / DENSE, safe_serialization=True)
        results["models"][DENSE] = accuracy_of_forms(DENSE, dense, settings["backends"], dev, calibration, models_dir)
    for name, fraction, retrain_steps, temperature in pruned_models(settings, len(train_examples),
                                                                    template.batch_size):
        if name in results["models"] and made_as(results["models"][name], fraction, retrain_steps, temperature):
            continue  # resumed
        model = copy.deepcopy(dense)
        stage = template.model_copy(update={"target_sparsity": fraction, "retrain_steps": retrain_steps,
                                            "distillation_temperature": temperature,
                                            "learning_rate": recipe.finetune.learning_rate})
        outcome = run_pruning_stage(model, stage, tokenizer, train_examples, recipe.data.max_length)
        model = inc_plugins.slim(model, outcome.result)
        for stale in (name, f"{name}_ir", f"{name}_int8_ir"):  # what an earlier run left of this model
            shutil.rmtree(models_dir / stale, ignore_errors=True)
        save_slimmed(model, models_dir / name)
        results["models"][name] = {"target": fraction, "prune_seconds": outcome.report["prune_seconds"],
                                   "flops_removed": outcome.report["mask_search"]["removed_fraction"],
                                   "retrain": outcome.report.get("retrain"),
                                   **accuracy_of_forms(name, model, settings["backends"], dev, calibration, models_dir)}
        run.write_progress(results)
    results["prune_step_load_average"] = dict(run.load_averages, end=load_average())
    return results


def made_as(model: dict, fraction: float, retrain_steps: int, temperature: float | None) -> bool:
    """Whether a pruned model's results say it was made with these settings (a resumed prune step keeps it)."""
    retrain = model.get("retrain") or {}
    return ((model.get("target"), retrain.get("steps", 0), retrain.get("distillation_temperature"))
            == (fraction, retrain_steps, temperature))


def pruned_models(settings: dict, n_train: int, batch_size: int) -> list[tuple[str, float, int, float | None]]:
    """(name, fraction, retrain steps, distillation temperature) of each pruned model: the one-shot `fractions`,
    then each [fraction, epochs] of `retrained` and `distilled`, fine-tuned after pruning for that many epochs of the
    training set with every pruned weight held at zero (the recipe's `retrain_steps`, at its fine-tune learning
    rate), on the labels or on the dense model's outputs at `distillation_temperature`."""
    steps = lambda epochs: epochs_to_steps(epochs, math.ceil(n_train / batch_size))  # noqa: E731
    name = lambda fraction: f"pruned_{round(100 * fraction)}"  # noqa: E731
    return ([(name(f), f, 0, None) for f in settings["fractions"]]
            + [(f"{name(f)}_retrained_{e:g}ep", f, steps(e), None) for f, e in settings["retrained"]]
            + [(f"{name(f)}_distilled_{e:g}ep", f, steps(e), settings["distillation_temperature"])
               for f, e in settings["distilled"]])


def quantize_calibration(recipe, settings: dict, tokenizer, train_examples) -> list[dict]:
    """The quantize stage's calibration batches of the recipe (its samples, seed and batch size)."""
    stage = recipe.quantize.model_copy(update={"calibration_samples": settings["quantize_samples"]})
    return calibration_inputs(stage, tokenizer, train_examples, recipe.data.max_length)


def latency_step(run: StudyRun, recipe, results: dict, models_dir: Path) -> dict:
    """Every (model, backend) of the prune step timed at each shape, interleaved."""
    settings = results["settings"]
    dense, tokenizer, train_examples, _ = text_classification_task(recipe, run.quick)
    calibration = quantize_calibration(recipe, settings, tokenizer, train_examples)
    models = {DENSE: dense, **{name: load_slimmed(models_dir / name) for name in results["models"] if name != DENSE}}
    available = [b for b in settings["backends"] if BACKENDS[b].availability().available]
    latency = {"warmup": settings["warmup"], "repeats": settings["repeats"], "threads": torch.get_num_threads(),
               "shapes": []}
    for shape in backend_forms_latency(models, available, settings["shapes"], dense.config.vocab_size,
                                       settings["warmup"], settings["repeats"], calibration,
                                       after_shape=lambda shape: run.mark(f"after_{shape}")):
        timed = shape.pop("timed")
        baseline = timed[BASELINE]
        latency["shapes"].append({**shape, "timings": [
            {"model": name, "backend": backend, **stats,
             "speedup_vs_dense_eager_fp32": baseline["median_s"] / stats["median_s"],
             "paired_speedup_vs_dense_eager_fp32": median_ratio(baseline["samples_s"], stats["samples_s"])}
            for (name, backend), stats in timed.items()]})
    flags = cpu_description()["flags"]
    latency["cpu_features"] = {flag: bool(flags.get(flag)) for flag in INT8_CPU_FLAGS}
    latency["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {**results, "latency": latency}


def target_verdict(results: dict) -> dict | None:
    """The issue's target at the first shape (32 x 128), over the int8 forms of the pruned models: met when one is
    >= 8x faster than dense eager fp32 and within 1 point of its dev accuracy. Names the fastest form, the fastest
    within 1 point and the most accurate at >= 8x (None where there is none), each with its speed-up and accuracy."""
    if "latency" not in results:
        return None
    shape = results["latency"]["shapes"][0]
    dense_accuracy = results["models"][DENSE]["forms"]["eager-fp32"]["accuracy"]
    forms = [{"model": t["model"], "backend": t["backend"], "speedup": t["speedup_vs_dense_eager_fp32"],
              "accuracy": results["models"][t["model"]]["forms"][t["backend"]]["accuracy"]}
             for t in shape["timings"] if t["model"] != DENSE and "int8" in t["backend"]]
    if not forms:
        return None
    within = [f for f in forms if dense_accuracy - f["accuracy"] <= TARGET_POINTS]
    fast = [f for f in forms if f["speedup"] >= TARGET_SPEEDUP]
    return {"shape": f"{shape['batch']} x {shape['seq_len']}", "dense_accuracy": dense_accuracy,
            "fastest": max(forms, key=lambda f: f["speedup"]),
            "fastest_within_1_point": max(within, key=lambda f: f["speedup"]) if within else None,
            "most_accurate_at_8x": max(fast, key=lambda f: (f["accuracy"], f["speedup"])) if fast else None,
            "met": any(f in within for f in fast)}


def _form(form: dict | None) -> str:
    if form is None:
        return "none"
    return f"{form['model']} on {form['backend']}, {form['speedup']:.2f}x, accuracy {form['accuracy']:.4f}"


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [f"# From dense MiniLM to pruned int8: accuracy, size and latency{' (quick: synthetic, meaningless)' if settings['quick'] else ''}",
             "",
             f"MiniLM-L6 fine-tuned on the movie-snippet task ({settings['data_note']}); {settings['dev_examples']} dev "
             f"examples; pruned by recipes/{RECIPE}'s mask_search stage (full method, {settings['calibration_samples']} "
             f"calibration samples) at each target, slimmed (*_retrained_Nep / *_distilled_Nep: fine-tuned for "
             f"N epochs after pruning, pruned weights held at zero, on the labels / on "
             f"the dense model's outputs at temperature {settings.get('distillation_temperature')}); int8: NNCF static quantization on "
             f"{settings['quantize_samples']} training samples. " + machine_line(results), "",
             "## Accuracy and size", "",
             "| model | FLOPs removed | parameters | " + " | ".join(settings["backends"]) + " | safetensors MB | IR MB | int8 IR MB |",
             "|---|---|---|" + "---|" * (len(settings["backends"]) + 3)]
    for name, model in results["models"].items():
        cells = [f"{f['accuracy']:.4f}" if f.get("available") else "n/a" for f in
                 (model["forms"][b] for b in settings["backends"])]
        sizes = model["bytes"]
        lines.append(f"| {name} | {model.get('flops_removed', 0):.1%} | {model['parameters']:,} | " + " | ".join(cells)
                     + f" | {sizes['safetensors'] / 1e6:.1f} | {sizes['openvino_ir'] / 1e6:.1f} | "
                     + (f"{sizes['openvino_int8_ir'] / 1e6:.1f} |" if "openvino_int8_ir" in sizes else "n/a |"))
    latency = results.get("latency")
    if latency is None:
        lines += ["", "Latency: not measured yet (`--step latency`, alone on a quiet machine)."]
        return "\n".join(lines) + "\n"
    features = ", ".join(flag for flag, present in latency["cpu_features"].items() if present) or "none"
    lines += ["", "## Latency (median of the interleaved rounds; speed-up against dense eager fp32 at the same shape: "
                  "ratio of the medians, and paired: the median over rounds of the ratio within a round)",
              "", f"CPU features for int8/bf16: {features}; OpenVINO CPU capabilities: "
                  f"{', '.join(latency['openvino_cpu_capabilities'])}; {latency['threads']} threads, "
                  f"{latency['warmup']} warm-up calls, {latency['repeats']} rounds."]
    for shape in latency["shapes"]:
        loads = shape["load_average"]
        lines += ["", f"### {shape['batch']} x {shape['seq_len']} tokens (1-minute load average {loads['before'][0]:.2f} "
                      f"before, {loads['after'][0]:.2f} after)", "",
                  "| model | backend | ms | speed-up | paired speed-up | dev accuracy |", "|---|---|---|---|---|---|"]
        for timing in sorted(shape["timings"], key=lambda t: -t["median_s"]):
            accuracy = results["models"][timing["model"]]["forms"][timing["backend"]]["accuracy"]
            lines.append(f"| {timing['model']} | {timing['backend']} | {1000 * timing['median_s']:.1f} | "
                         f"{timing['speedup_vs_dense_eager_fp32']:.2f}x | "
                         f"{timing['paired_speedup_vs_dense_eager_fp32']:.2f}x | {accuracy:.4f} |")
    verdict = target_verdict(results)
    if verdict is not None:
        lines += ["", f"Target (pruned + int8 >= {TARGET_SPEEDUP}x dense eager fp32 at {verdict['shape']}, within 1 point "
                      f"of dense accuracy {verdict['dense_accuracy']:.4f}): {'met' if verdict['met'] else 'not met'}. "
                      f"Fastest: {_form(verdict['fastest'])}; fastest within 1 point: "
                      f"{_form(verdict['fastest_within_1_point'])}; most accurate at >= {TARGET_SPEEDUP}x: "
                      f"{_form(verdict['most_accurate_at_8x'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog=(
        "Full run: the prune step about 3 hours on 2 shared cores (ten mask_search runs, eight fine-tunes: four "
        "of one epoch, four of three; 66 evaluations of 2000 examples, 11 int8 quantizations); the latency step 21 "
        "minutes alone (132 conversions and 44 quantizations, then the timed rounds)."))
    parser.add_argument("--resume", action="store_true",
                        help="--step prune: keep the models an earlier prune step saved (same settings), make the ones "
                             "settings.yaml adds or it did not finish")
    add_step_arguments(parser, STUDY, "accuracy")
    args = parser.parse_args(argv)
    check_step_arguments(parser, args)
    recipe = load_recipe(RECIPE)
    settings = {"calibration_samples": recipe.pruning[0].calibration_samples,
                "quantize_samples": recipe.quantize.calibration_samples, **study_settings(STUDY, args.quick)}
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    with tempfile.TemporaryDirectory() as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = prune_step_results(run, "models", "models")
        else:
            claim_models_dir(models_dir, args.resume)
            previous = prune_step_results(run, "models", "models") if args.resume else None
            results = prune_step(run, recipe, settings, models_dir, previous)
        if args.step == "prune":
            run.write(results, markdown)
            print(f"wrote {run.stem}.json (accuracy only); time it with --step latency")
            return 0
        results = latency_step(run, recipe, results, models_dir)
    results["target"] = target_verdict(results)
    print(markdown(run.write(results, markdown)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
