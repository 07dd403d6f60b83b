"""FFN widths in multiples of m on a decoder: mask_search's width_multiple on SmolLM2-135M, perplexity and decode speed.

    python -m benchmarks.studies.width_multiple_smollm2 --step prune --fisher-cache runs/kwon_smollm2_fisher.safetensors
    python -m benchmarks.studies.width_multiple_smollm2 --step latency   # alone, on a quiet machine
    python -m benchmarks.studies.width_multiple_smollm2 --quick          # every step on a tiny synthetic Llama

Issue #16 item 5, the decoder counterpart of the width_multiple study (MiniLM, where the multiples bought no speed).
A decode step at batch 1 reads every weight once per token, so its speed follows the bytes of weights read, and an
FFN width that suits the matmul kernels might matter where a prefill over many tokens hides it.

* prune step: SmolLM2-135M-Instruct (the `smollm2-135m` asset) pruned by key/value group and FFN neuron with Kwon et
  al.'s search only (rearrangement and tuning off, steps unchecked: the variant recommended for decoders, as
  kwon_bias_smollm2 and structured_generation run it) at settings.yaml's fraction of the head+FFN FLOPs, once per
  width multiple m (every block keeps a multiple of m FFN neurons, chosen inside the search). The Fisher pass is
  kwon_smollm2's (256 SOTU windows of 128 tokens, batches of 8, seed 0) and is read from ``--fisher-cache``, the
  file kwon_bias_smollm2 writes (same identity: ``kwon_bias_smollm2.fisher_identity``). Each result is folded
  (``fold_kwon_result``), slimmed (``slim_model``) and saved (``save_slimmed``). Recorded per m: perplexity of the
  slimmed model (the first 8 windows of 512 tokens of Moby Dick, as kwon_smollm2), parameters, FLOPs removed, kept
  key/value groups and neurons per block, the masked-vs-slimmed logit difference on the first evaluation window,
  the slimmed model's greedy tokens after the decode prompt, and the bytes of weights a decode step reads
  (``measures.weight_bytes_per_token``, at the width of each timed backend's weights) with the ideal decode
  speedup they give against dense and against m = 1.
* latency step: dense and every m, per backend of settings.yaml (eager fp32; eager bf16-weights: the model cast to
  bf16, no autocast), the models interleaved within each round, with structured_generation's timers: prefill of
  1 x 128 tokens (``time_prefill``) and decode of 128 new tokens after the 128-token prompt, batch 1, greedy, KV
  cache (``time_decode``: the decode part of one generate call, 127 steps). Speed-ups against m = 1 and against
  dense on the same backend, and measured / ideal. On fp32 the timed tokens must be the prune step's.

Writes <out>/width_multiple_smollm2.{json,md} (--quick: width_multiple_smollm2_quick.*).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, claim_models_dir,
                                       machine_line, prune_step_results, steps_models_dir, study_parser,
                                       study_settings)
from benchmarks.studies.fisher_cache import cached_mask_gradients
from benchmarks.studies.kwon_bias_smollm2 import fisher_identity
from benchmarks.studies.kwon_smollm2 import calibration_batches, perplexity_of, summary
from benchmarks.studies.sources import CausalLMSource, causal_lm
from benchmarks.studies.structured_generation import (backend_availability, backend_weight_bytes, first_difference,
                                                      greedy_new_tokens, models_for, parameters_of, time_decode,
                                                      time_prefill)
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.machine import load_average
from inc_plugins.post_training import KwonSettings, collect_mask_gradients, fold_kwon_result, prune_post_training
from recipes.schema import load_recipe

STUDY = "width_multiple_smollm2"
RECIPE = "smollm2_wanda.yaml"  # the calibration and evaluation text settings every SmolLM2 recipe shares
DENSE = "dense"
# the backends whose decode bytes the prune step records (structured_generation.backend_weight_bytes)
DECODE_BACKENDS = ("eager-fp32", "eager-bf16-weights")
# what --step latency reads from settings.yaml at its own run (the prompt and new tokens stay the prune step's: its
# greedy tokens are what the timed fp32 generations must give)
TIMING_KEYS = ("backends", "prefill_seq_len", "prefill_warmup", "prefill_repeats", "decode_warmup", "decode_repeats")


def model_name(multiple: int) -> str:
    return f"m{multiple}"


def decode_bytes(model) -> dict:
    """{backend: bytes of weights one decode step reads}."""
    return {backend: backend_weight_bytes(model, backend) for backend in DECODE_BACKENDS}


# ---------------------------------------------------------------------------------------------------- prune step


def prune_step(run: StudyRun, source: CausalLMSource, settings: dict, models_dir: Path,
               fisher_cache: Path | None) -> dict:
    """Dense measurements, the (cached) Fisher pass, then one search per width multiple: fold, slim, check,
    measure, save. The results are written, marked incomplete, after each model."""
    torch.manual_seed(settings["seed"])
    model = source.model.eval()
    structure = mask_structure(model)
    samples = calibration_batches(source, settings["calibration_samples"], settings["calibration_len"],
                                  settings["calibration_batch"], settings["seed"])
    evaluation = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])
    prompt = evaluation[:1, : settings["prompt_tokens"]]
    results = {"benchmark": STUDY, "steps": ["prune"],
               "settings": settings | {"structure": vars(structure) | {"n_head_units": structure.n_head_units}},
               "dense": {"perplexity": perplexity_of(model, evaluation), "parameters": parameters_of(model),
                         "greedy_tokens": greedy_new_tokens(model, prompt, settings["new_tokens"]),
                         "decode_weight_bytes": decode_bytes(model)},
               "models": []}
    print(f"dense perplexity {results['dense']['perplexity']:.2f}", flush=True)

    start = time.perf_counter()
    cached = fisher_cache is not None and fisher_cache.is_file()
    gradients = cached_mask_gradients(fisher_cache, fisher_identity(source.description, settings),
                                      lambda: collect_mask_gradients(model, samples))
    results["fisher_seconds"] = round(time.perf_counter() - start, 1)
    results["fisher_source"] = f"read from {fisher_cache}" if cached else "computed in this run"
    run.write_progress(results)

    for multiple in settings["multiples"]:
        kwon = KwonSettings(settings["fraction"], rearrange=False, tune=False, check_steps=False,
                            width_multiple=multiple)
        start = time.perf_counter()
        result = prune_post_training(model, samples, kwon, gradients=gradients)
        seconds = time.perf_counter() - start
        pruned = copy.deepcopy(model)
        fold_kwon_result(pruned, result)
        with torch.no_grad():
            masked_logits = pruned(input_ids=evaluation[:1], use_cache=False).logits
            slimmed = slim_model(pruned, (result.head_mask != 0).float(), (result.neuron_mask != 0).float()).eval()
            difference = (slimmed(input_ids=evaluation[:1], use_cache=False).logits - masked_logits).abs().max().item()
        bytes_read = decode_bytes(slimmed)
        row = {"name": model_name(multiple), "width_multiple": result.width_multiple,
               "perplexity": perplexity_of(slimmed, evaluation), "parameters": parameters_of(slimmed),
               "search_call_seconds": round(seconds, 1), "max_abs_logit_difference_masked_vs_slimmed": difference,
               "search": summary(result, structure),
               "greedy_tokens": greedy_new_tokens(slimmed, prompt, settings["new_tokens"]),
               "decode_weight_bytes": bytes_read,
               "ideal_decode_speedup": {backend: results["dense"]["decode_weight_bytes"][backend] / count
                                        for backend, count in bytes_read.items()}}
        save_slimmed(slimmed, models_dir / row["name"])
        results["models"].append(row)
        print(f"{row['name']}: perplexity {row['perplexity']:.2f}, {row['search']['flops_removed']:.2%} FLOPs removed, "
              f"kept neurons {row['search']['kept_neurons']}, search call {seconds:.0f} s", flush=True)
        run.mark(f"after_{row['name']}")
        run.write_progress(results)
        del pruned, slimmed
    m1 = next((row for row in results["models"] if row["width_multiple"] == 1), None)
    for row in results["models"]:
        row["ideal_decode_speedup_vs_m1"] = None if m1 is None else {
            backend: m1["decode_weight_bytes"][backend] / count for backend, count in row["decode_weight_bytes"].items()}
    results["prune_step_load_average"] = dict(run.load_averages, end=load_average())
    results["prune_step_run"] = run.record()
    return results


# -------------------------------------------------------------------------------------------------- latency step


def latency_step(source: CausalLMSource, results: dict, models_dir: Path) -> dict:
    """Loads the saved slimmed models and times them against dense and m = 1 (see the module docstring)."""
    wall = time.perf_counter()
    s = results["settings"]
    rows = {row["name"]: row for row in results["models"]}
    models = {DENSE: source.model.eval(), **{name: load_slimmed(models_dir / name) for name in rows}}
    evaluation = source.evaluation_windows(s["eval_windows"], s["eval_len"])
    prompt = evaluation[:1, : s["prompt_tokens"]]
    prefill_ids = evaluation[:1, : s["prefill_seq_len"]]
    expected = {DENSE: results["dense"]["greedy_tokens"], **{name: row["greedy_tokens"] for name, row in rows.items()}}
    bytes_read = {DENSE: results["dense"]["decode_weight_bytes"],
                  **{name: row["decode_weight_bytes"] for name, row in rows.items()}}
    m1 = model_name(1) if model_name(1) in rows else None
    latency = {"threads": torch.get_num_threads(), "load_average": {"start": load_average()}, "backends": {}}
    for backend in s["backends"]:
        available, reason = backend_availability(backend)
        entry = latency["backends"][backend] = {"available": available, "reason": reason}
        if not available:
            continue
        print(f"[{backend}]", flush=True)
        backend_models = models_for(models, backend)
        prefill = time_prefill(backend_models, backend, prefill_ids, s["prefill_warmup"], s["prefill_repeats"])
        decode = time_decode(backend_models, backend, prompt, s["new_tokens"], s["decode_warmup"],
                             s["decode_repeats"], max_compile_s=float("inf"))
        for name, timing in decode.items():
            timing["prefill"] = prefill[name]
            timing["speedup_vs_dense"] = decode[DENSE]["median_decode_s"] / timing["median_decode_s"]
            timing["speedup_vs_m1"] = decode[m1]["median_decode_s"] / timing["median_decode_s"] if m1 else None
            timing["prefill_speedup_vs_dense"] = prefill[DENSE]["median_ms"] / prefill[name]["median_ms"]
            timing["prefill_speedup_vs_m1"] = prefill[m1]["median_ms"] / prefill[name]["median_ms"] if m1 else None
            timing["ideal_speedup_vs_dense"] = bytes_read[DENSE][backend] / bytes_read[name][backend]
            timing["of_ideal"] = timing["speedup_vs_dense"] / timing["ideal_speedup_vs_dense"]
            timing["tokens_equal_to_prune_step"] = timing["tokens"] == expected[name]
            timing["first_difference_from_prune_step"] = first_difference(timing["tokens"], expected[name])
        entry["decode"] = decode
        latency["load_average"][f"after_{backend}"] = load_average()
    latency["load_average"]["end"] = load_average()
    latency["seconds"] = round(time.perf_counter() - wall, 1)
    return {**results, "steps": ["prune", "latency"], "latency": latency}


# ------------------------------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    s, dense = results["settings"], results["dense"]
    loads = results["prune_step_load_average"]
    seen = ", ".join(f"{values[0]:.2f} {point.replace('_', ' ')}" for point, values in loads.items() if values)
    backends = list(DECODE_BACKENDS)
    lines = [
        "# width_multiple on a decoder: FFN widths in multiples of m on SmolLM2-135M (issue #16 item 5)", "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"{s['model']}, Kwon et al.'s search only (rearrangement and tuning off, steps unchecked) at "
        f"{100 * s['fraction']:.0f}% of the head+FFN FLOPs (MACs at {s['calibration_len']} tokens), once per m; "
        f"Fisher pass on {s['calibration_samples']} SOTU windows of {s['calibration_len']} tokens (batches of "
        f"{s['calibration_batch']}, seed {s['seed']}; {results['fisher_source']}); perplexity of the slimmed model on "
        f"the first {s['eval_windows']} windows of {s['eval_len']} tokens of Moby Dick.", "",
        f"Prune step: {machine_line({'run': results['prune_step_run']}, loads=False)} 1-minute load average {seen}.", "",
        f"Dense: perplexity {dense['perplexity']:.2f}, {dense['parameters'] / 1e6:.2f}M parameters, "
        f"{dense['decode_weight_bytes']['eager-fp32'] / 1e6:.1f} MB of fp32 weights read per generated token.", "",
        "| model | perplexity | FLOPs removed | parameters | kept kv groups | kept neurons | ideal decode speedup vs "
        "dense (fp32 / bf16 weights) | vs m = 1 (fp32) | masked vs slimmed logits | search call s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["models"]:
        search, ideal = row["search"], row["ideal_decode_speedup"]
        vs_m1 = row["ideal_decode_speedup_vs_m1"]
        lines.append(
            f"| m = {row['width_multiple']} | {row['perplexity']:.2f} | {100 * search['flops_removed']:.4f}% | "
            f"{row['parameters'] / 1e6:.2f}M | {search['kept_kv_groups']}/{search['total_kv_groups']} | "
            f"{search['kept_neurons']}/{search['total_neurons']} | "
            f"{' / '.join(f'{ideal[b]:.4f}x' for b in backends)} | "
            f"{'' if vs_m1 is None else f'{vs_m1[backends[0]]:.4f}x'} | "
            f"{row['max_abs_logit_difference_masked_vs_slimmed']:.1e} | {row['search_call_seconds']:.0f} |")
    lines += ["", "Kept FFN neurons per block (of "
              f"{s['structure']['n_neurons']}) and key/value groups per block (of {s['structure']['n_head_units']}):", ""]
    for row in results["models"]:
        search = row["search"]
        lines.append(f"- m = {row['width_multiple']}: neurons {search['kept_neurons_per_layer']}; kv groups "
                     f"{search['kept_kv_groups_per_layer']}")
    latency = results.get("latency")
    if latency is None:
        lines += ["", "**Prune step only**: latency not measured yet (`--step latency`, alone on a quiet machine)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"## Latency ({machine_line(results, loads=False)} {latency['threads']} threads; 1-minute load average "
                  + ", ".join(f"{values[0]:.2f} {point.replace('_', ' ')}"
                              for point, values in latency["load_average"].items() if values) + ")", "",
              f"Prefill: one forward of 1 x {s['prefill_seq_len']} tokens, median of {s['prefill_repeats']} interleaved "
              f"rounds after {s['prefill_warmup']} warm-up. Decode: batch 1, {s['prompt_tokens']}-token prompt, "
              f"{s['new_tokens']} new tokens, greedy, KV cache, median of {s['decode_repeats']} interleaved rounds after "
              f"{s['decode_warmup']} warm-up. Ideal: dense / model bytes of weights read per token on the backend."]
    for backend, entry in latency["backends"].items():
        if not entry["available"]:
            lines += ["", f"**{backend}**: not available: {entry['reason']}"]
            continue
        lines += ["", f"### {backend}", "",
                  "| model | prefill ms | vs m = 1 | vs dense | decode tokens/s | vs m = 1 | vs dense | ideal vs dense | "
                  "measured / ideal | tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, timing in entry["decode"].items():
            checks = ["same every round" if timing["same_tokens_every_round"] else "DIFFER between rounds",
                      "= prune step" if timing["tokens_equal_to_prune_step"]
                      else f"!= prune step from token {timing['first_difference_from_prune_step']}"]
            vs_m1 = (timing["prefill_speedup_vs_m1"], timing["speedup_vs_m1"])
            lines.append(
                f"| {name} | {timing['prefill']['median_ms']:.1f} | "
                f"{'' if vs_m1[0] is None else f'{vs_m1[0]:.3f}x'} | {timing['prefill_speedup_vs_dense']:.3f}x | "
                f"{timing['tokens_per_s']:.2f} | {'' if vs_m1[1] is None else f'{vs_m1[1]:.3f}x'} | "
                f"{timing['speedup_vs_dense']:.3f}x | {timing['ideal_speedup_vs_dense']:.3f}x | "
                f"{100 * timing['of_ideal']:.0f}% | {'; '.join(checks)} |")
    lines += ["", f"Latency step: {latency['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__, epilog=(
        "On 2 cores: the prune step about 3 minutes with a filled --fisher-cache (else 16 more for the Fisher pass): "
        "per m a search call, a perplexity of 8 x 512 tokens and a greedy generation; the latency step about 5 "
        "minutes (4 models x 6 generations of 128 tokens and 11 prefills on each of 2 backends)."))
    add_step_arguments(parser, STUDY, "perplexity")
    parser.add_argument("--multiples", type=int, nargs="+", help="width multiples to prune with (default: settings)")
    parser.add_argument("--fisher-cache", type=Path,
                        help="file of the mask gradients (kwon_bias_smollm2's): read when it exists (and was written "
                             "for these settings), else written after the Fisher pass")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args(argv)
    check_step_arguments(parser, args)
    quick = args.quick
    recipe = load_recipe(RECIPE)
    kwon = study_settings("kwon_smollm2", quick)  # its calibration and, for --quick, its evaluation sizes
    settings = {"calibration_len": recipe.corpus.calibration_seq_len, "eval_windows": recipe.corpus.evaluation_windows,
                "eval_len": recipe.corpus.evaluation_seq_len, "seed": recipe.pruning[0].seed,
                **{key: kwon[key] for key in ("calibration_samples", "calibration_batch", "calibration_len",
                                              "eval_windows", "eval_len") if key in kwon},
                **study_settings(STUDY, quick)}
    if args.multiples:
        settings["multiples"] = args.multiples
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    run = StudyRun(STUDY, quick, args.out, argv)
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}-models-") as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = prune_step_results(run, "models", "pruned model")
            # the timing settings of this invocation replace those the prune step recorded
            results["settings"].update({key: settings[key] for key in TIMING_KEYS})
        else:
            claim_models_dir(models_dir)
            source = causal_lm(quick)
            results = prune_step(run, source, {"quick": quick, "model": source.description, **settings}, models_dir,
                                 args.fisher_cache)
            if args.step == "prune":
                run.write(results, markdown)
                print(f"wrote {run.stem}.{{json,md}} (prune step only); time it with --step latency")
                return 0
            del source  # the timing loads the dense model afresh, as a separate --step latency would
        results = latency_step(causal_lm(quick), results, models_dir)
    print(markdown(run.write(results, markdown)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
