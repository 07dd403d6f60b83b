"""Generation speed of SmolLM2-135M after structured pruning (FLAP, Wanda-sp, structured magnitude, Kwon et al.'s
mask search): perplexity, prefill latency and decode tokens/s of the slimmed models against the dense one.

    python -m benchmarks.studies.structured_generation --step prune     # pruning and perplexity (run it under nice)
    python -m benchmarks.studies.structured_generation --step latency   # the timing, alone on a quiet machine
    python -m benchmarks.studies.structured_generation --quick          # every step on a tiny synthetic Llama

Prune step. SmolLM2-135M-Instruct (the `smollm2-135m` asset: 30 blocks, 3 key/value groups of 3 query heads,
1536 FFN neurons, input embedding tied to the LM head) pruned by key/value group and FFN neuron at each fraction of
the head+FFN FLOPs (MACs at the calibration length, 128 tokens, as every structured type counts them):

* flap, wanda_sp and structured_magnitude: the registered pruning types, run as a recipe runs them
  (``recipes.pruning_stage.prune_with_batches`` -> ``inc_plugins.prepare_pruning``) with the pruning stage of
  `recipes/smollm2_flap.yaml` (flap) or `recipes/smollm2_wanda_sp.yaml` (wanda_sp; structured_magnitude with its
  type changed, as in docs/results/structured_baselines.md), only `target_sparsity` changed; the calibration
  windows are drawn as the recipe draws them (its corpus, the stage's count, length and seed);
* mask_search: Kwon et al.'s search only (rearrangement and mask tuning off: on SmolLM2 they did not help, see
  benchmarks/results/kwon_smollm2.md, where the search alone was the best variant) by
  ``inc_plugins.post_training.prune_post_training``, the function the "mask_search" type runs, and its masks folded
  in as that type folds them. The Fisher pass depends on neither the fraction nor the switches, so it runs once on
  kwon_smollm2's calibration (256 windows, batches of 8) and every fraction reuses it (``gradients=``); pruning
  seconds = that pass + the search call, as in kwon_smollm2;
* each pruned model is slimmed (``inc_plugins.slim``: key/value groups and neurons physically removed) and saved
  under ``--models-dir``; recorded: perplexity of the slimmed model (the recipes' Moby Dick windows), parameters,
  pruning seconds, the units kept per block, the masked-vs-slimmed logit difference on the first evaluation window,
  and the slimmed model's greedy generation (32 new tokens, KV cache, after the 128-token prompt of the evaluation
  text the decode timing uses), which must be the masked model's greedy generation too: each token must be the
  masked model's argmax given the tokens before it (``greedy_disagreement``: one forward without cache, which costs
  what 2 of the 32 decode steps cost and checks the cache path against a cache-free one);
* the ideal decode speedup: a decode step at batch 1 reads every weight once per generated token, so it is bound by
  weight bytes, not FLOPs. Ideal = dense bytes of weights read per token / the pruned model's (``measures.
  weight_bytes_per_token``: every Linear incl. the LM head, the tied embedding counted once as the LM head, plus the
  embedding row the lookup reads; KV cache reads, about 1% here, left out), in the dtype the matmuls run in: 4 bytes
  in fp32, 2 in bf16 autocast (its weight-cast cache holds the bf16 copies for a whole generate call; checked with
  torch's profiler: under no_grad each decode step casts no weight again, under inference_mode it recasts all) and
  2 with bf16 weights (the embedding row too).

Latency step (reads the prune step's JSON and models; time it alone). Dense vs every model of ``latency_models``,
interleaved (every round times every model once, in a rotating order: ``inc_plugins.perf.timing``):

* prefill: one forward of 1 x 128 and 8 x 128 tokens of the evaluation text, use_cache off, eager fp32, eager bf16
  (autocast: fp32 weights, bf16 matmuls) and eager bf16-weights (the models cast to bf16, as ``torch_dtype=
  torch.bfloat16`` loads them; no autocast, whose per-operation casts and cache lookups are a fixed cost per decode
  step that pruning does not shrink); bf16 only where the CPU has native bf16 (``inc_plugins.perf.backends.
  native_bf16``);
* decode: ``generate`` at batch 1, the 128-token prompt, exactly 128 new tokens (min_new_tokens: no early stop),
  greedy, KV cache. Only the decode part is timed, inside the same generate call: a streamer (``measures.TokenClock``)
  notes when each token comes out, and decode seconds = last token - first token (the first comes from the prefill),
  over 127 decode steps. That times real ``generate`` (its sampling loop and cache updates included) without
  subtracting two noisy medians or re-implementing the loop. Backends: the eager ones (dynamic cache), and
  inductor fp32: transformers' own compiled decode (``cache_implementation="static"``, ``torch.compile`` of the
  forward with fullgraph and static shapes; the prefill runs eager), each model compiled by its first, untimed call
  (a backend where a model's compile takes longer than ``max_compile_s`` is dropped, saying so); inductor-freezing
  bf16-weights: the same with the weights cast to bf16 and inductor's freezing, which folds the weights into the
  graph and prepacks each Linear's for oneDNN (without it a bf16 Linear at batch 1 runs the slower unpacked kernel:
  decode_step_costs). Compiling one SmolLM2 decode costs about a minute of CPU on 2 cores, so the compiled backends
  time dense and the ``compiled_models`` only (models of identical layer sizes, e.g. wanda_sp and
  structured_magnitude, share a compile);
* every timed generation's tokens are recorded and checked: the same in every round; on fp32 backends, the same as
  the prune step's (its first 32, checked there against the masked model) and as eager fp32's; each the model's
  own greedy choice (``greedy_disagreement``: one forward of prompt + tokens without cache, under the backend's
  autocast). bf16 agreement with fp32 is reported, not required.
* measured decode speedup = dense decode seconds / the model's (medians); measured / ideal (issue #16's target: >=
  85%). Also the paired speedup: the median over rounds of dense / model seconds of the same round, which a slow
  phase of the machine that hits one round of one model's sample but not the other's cannot skew as much;
* per backend, a line through (weight bytes read per step, median seconds per step) of all timed models
  (``measures.per_token_cost_fit``): its intercept is the per-step cost that pruning does not shrink, which bounds the
  decode speedup below the bytes ratio.

Writes <out>/structured_generation.{json,md} (--quick: structured_generation_quick.*).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from transformers import CompileConfig

import inc_plugins
from benchmarks.studies.common import (StudyRun, add_step_arguments, check_step_arguments, machine_line,
                                       prune_step_results, steps_models_dir, study_parser, study_settings)
from benchmarks.studies.measures import TokenClock, compile_limits_for, per_token_cost_fit, weight_bytes_per_token
from benchmarks.studies.sources import CausalLMSource, causal_lm
from inc_plugins.atomic import write_text
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.models.structure_masks import fold_structure_masks, group_head_mask, mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.perf.backends import native_bf16
from inc_plugins.perf.machine import cpu_description, load_average
from inc_plugins.perf.timing import interleaved_seconds, median_ratio, summary
from inc_plugins.post_training import KwonSettings, collect_mask_gradients, masked_macs, prune_post_training, unit_costs
from recipes.perplexity import perplexity
from recipes.pruning_stage import prune_with_batches
from recipes.schema import PruningStage, load_recipe

STUDY = "structured_generation"
# method: (recipe whose pruning stage it runs, the pruning_type put in that stage)
RECIPE_STAGES = {"flap": ("smollm2_flap.yaml", "flap"), "wanda_sp": ("smollm2_wanda_sp.yaml", "wanda_sp"),
                 "structured_magnitude": ("smollm2_wanda_sp.yaml", "structured_magnitude")}
METHODS = (*RECIPE_STAGES, "mask_search")
CORPUS_RECIPE = "smollm2_flap.yaml"  # the corpus and evaluation settings every SmolLM2 recipe shares
BACKENDS = ("eager-fp32", "eager-bf16", "eager-bf16-weights", "inductor-fp32", "inductor-freezing-bf16-weights")
BYTES = {"float32": 4, "bfloat16": 2}  # per weight element, in the dtype the matmuls run in
BACKEND_DTYPE = {"eager-fp32": "float32", "eager-bf16": "bfloat16", "eager-bf16-weights": "bfloat16",
                 "inductor-fp32": "float32", "inductor-freezing-bf16-weights": "bfloat16"}
AUTOCAST_BACKENDS = ("eager-bf16",)  # fp32 weights, matmuls in bf16 under torch.autocast
# weights stored in bf16 (torch_dtype=bfloat16), no autocast
CAST_BACKENDS = ("eager-bf16-weights", "inductor-freezing-bf16-weights")
# transformers compiles the decode forward itself once a static cache is asked for; on CPU only with this flag
STATIC_DECODE_COMPILE = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode="default")
STATIC_DECODE_COMPILE._compile_all_devices = True
# torch.compile takes a mode or options, not both ("default" mode is no options)
FROZEN_DECODE_COMPILE = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode=None,
                                      options={"freezing": True})
FROZEN_DECODE_COMPILE._compile_all_devices = True
DECODE_COMPILE = {"inductor-fp32": STATIC_DECODE_COMPILE, "inductor-freezing-bf16-weights": FROZEN_DECODE_COMPILE}


def model_name(method: str, fraction: float) -> str:
    return f"{method}_{round(100 * fraction)}"


# ---------------------------------------------------------------------------------------------------- prune step


def recipe_stage(method: str, fraction: float, overrides: dict) -> PruningStage:
    """The shipped recipe's pruning stage for `method` with `target_sparsity` = `fraction` (and `overrides`)."""
    recipe_name, pruning_type = RECIPE_STAGES[method]
    stage = load_recipe(recipe_name).pruning[0]
    return PruningStage.model_validate({**stage.model_dump(exclude_none=True), "pruning_type": pruning_type,
                                        "target_sparsity": fraction, **overrides})


def stage_calibration(source: CausalLMSource, stage: PruningStage, seq_len: int) -> list[tuple]:
    """The stage's calibration batches as a causal-LM recipe draws them (``recipes.tasks.CausalLMTask.prune``):
    `calibration_samples` random windows of the calibration text with the stage's seed, in batches of its size."""
    windows = source.calibration_windows(stage.calibration_samples, seq_len, stage.seed)
    return [(batch,) for batch in windows.split(stage.batch_size)]


def kwon_calibration(source: CausalLMSource, settings: dict) -> list[dict]:
    """kwon_smollm2's labelled batches (labels = the inputs: next-token loss for the Fisher pass)."""
    windows = source.calibration_windows(settings["kwon_calibration_samples"], settings["calibration_len"],
                                         settings["seed"])
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
            for chunk in windows.split(settings["kwon_calibration_batch"])]


def greedy_new_tokens(model, prompt: torch.Tensor, new_tokens: int, **generate_kwargs) -> list[int]:
    """The `new_tokens` tokens greedy decoding with the KV cache appends to `prompt` [1, prompt_len]. Not under
    inference_mode: there bf16 autocast casts every weight again at each step (its cast cache works under the
    no_grad that generate sets, for weights that require grad)."""
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id(model),
                            **generate_kwargs)
    return output[0, prompt.shape[1]:].tolist()


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else (eos_ids(model) or [0])[0]


@torch.no_grad()
def greedy_disagreement(model, prompt: torch.Tensor, tokens: list[int]) -> int | None:
    """The first of `tokens` (generated after `prompt` [1, prompt_len]) that is not `model`'s greedy choice, read
    from one forward of prompt + tokens without cache (end-of-sequence excluded, as min_new_tokens excludes it);
    None: greedy decoding by `model` gives exactly `tokens`, since each greedy token is that argmax given the ones
    before it."""
    ids = torch.cat([prompt, torch.tensor([tokens])], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt.shape[1] - 1 : -1].float()
    logits[:, eos_ids(model)] = float("-inf")
    return first_difference(logits.argmax(dim=-1).tolist(), tokens)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def backend_weight_bytes(model, backend: str) -> int:
    """Bytes of weights one decode step on `backend` reads (``weight_bytes_per_token``): the matmuls' weights in the
    backend's dtype; the embedding row in fp32 under autocast (the lookup is not autocast), else in that dtype."""
    size = BYTES[BACKEND_DTYPE[backend]]
    return weight_bytes_per_token(model, size, BYTES["float32"] if backend in AUTOCAST_BACKENDS else size)


def decode_bytes(model) -> dict:
    """{dtype: bytes of weights read per generated token} with fp32 weights, the matmuls in fp32 or bf16 autocast."""
    return {"float32": backend_weight_bytes(model, "eager-fp32"), "bfloat16": backend_weight_bytes(model, "eager-bf16")}


def parameters_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_masked(method: str, fraction: float, model, source: CausalLMSource, settings: dict, kwon: dict):
    """(pruned copy of `model` with the removed units zeroed, head_mask, neuron_mask, pruning seconds, slim):
    `slim(masked)` removes the zeroed units in place. `kwon` caches mask_search's calibration and Fisher pass."""
    masked = copy.deepcopy(model)
    if method in RECIPE_STAGES:
        stage = recipe_stage(method, fraction, settings["stage_overrides"])
        batches = stage_calibration(source, stage, settings["calibration_len"])
        outcome = prune_with_batches(masked, stage, calibration=batches, n_calibration=stage.calibration_samples)
        result = outcome.result
        return (masked, result.head_mask, result.neuron_mask, outcome.report["prune_seconds"],
                lambda pruned: inc_plugins.slim(pruned, result))
    if "gradients" not in kwon:
        kwon["samples"] = kwon_calibration(source, settings)
        start = time.perf_counter()
        kwon["gradients"] = collect_mask_gradients(model, kwon["samples"])
        kwon["fisher_seconds"] = round(time.perf_counter() - start, 1)
        print(f"Fisher pass: {kwon['fisher_seconds']} s", flush=True)
    start = time.perf_counter()
    search = prune_post_training(model, kwon["samples"], KwonSettings(fraction, rearrange=False, tune=False),
                                 gradients=kwon["gradients"])
    seconds = kwon["fisher_seconds"] + time.perf_counter() - start
    fold_structure_masks(masked, search.head_mask, search.neuron_mask)  # as the mask_search type leaves the model
    return (masked, search.head_mask, search.neuron_mask, round(seconds, 1),
            lambda pruned: slim_model(pruned, (search.head_mask != 0).float(), (search.neuron_mask != 0).float()))


def prune_one(method: str, fraction: float, model, source: CausalLMSource, settings: dict, kwon: dict,
              evaluation: torch.Tensor, prompt: torch.Tensor, models_dir: Path) -> dict:
    """Prunes, generates with the masked model, slims, checks, measures and saves one model; returns its row."""
    structure = mask_structure(model)
    masked, head_mask, neuron_mask, seconds, slim = prune_masked(method, fraction, model, source, settings, kwon)
    masked.eval()
    with torch.no_grad():
        masked_logits = masked(input_ids=evaluation[:1], use_cache=False).logits
        slimmed = slim(copy.deepcopy(masked)).eval()
        logit_difference = (slimmed(input_ids=evaluation[:1], use_cache=False).logits - masked_logits).abs().max().item()
    slimmed_tokens = greedy_new_tokens(slimmed, prompt, settings["check_tokens"])
    masked_disagrees_at = greedy_disagreement(masked, prompt, slimmed_tokens)
    del masked
    units = group_head_mask(head_mask, structure) != 0
    neurons = neuron_mask != 0
    seq_len = settings["calibration_len"]
    row = {
        "name": model_name(method, fraction), "method": method, "target": fraction,
        "flops_removed": 1 - masked_macs(structure, units, neurons, seq_len) / unit_costs(structure, seq_len).dense,
        "perplexity": perplexity(slimmed, evaluation, batch_size=settings["eval_batch"]),
        "parameters": parameters_of(slimmed), "prune_seconds": seconds,
        "kept_kv_groups_per_layer": units.sum(dim=1).tolist(), "kept_neurons_per_layer": neurons.sum(dim=1).tolist(),
        "masked_vs_slimmed": {"max_abs_logit_difference_first_window": logit_difference,
                              "greedy_tokens_equal": masked_disagrees_at is None,
                              "first_token_difference": masked_disagrees_at},
        "greedy_tokens": slimmed_tokens, "decode_weight_bytes": decode_bytes(slimmed),
    }
    save_slimmed(slimmed, models_dir / row["name"])
    return row


def pruning_order(settings: dict) -> list[tuple[str, float]]:
    """Every (method, fraction), those the latency step times first (the compiled backend's, then the others), so
    that a prune step stopped early has already saved what the timing needs."""
    jobs = [(method, fraction) for method in settings["methods"] for fraction in settings["fractions"]]
    first = [*(settings["compiled_models"] or []), *(settings["latency_models"] or [])]
    return sorted(jobs, key=lambda job: first.index(model_name(*job)) if model_name(*job) in first else len(first))


PRUNE_SETTINGS = ("model", "methods", "fractions", "calibration_len", "eval_windows", "eval_len", "eval_batch", "seed",
                  "kwon_calibration_samples", "kwon_calibration_batch", "stage_overrides", "prompt_tokens",
                  "check_tokens")


def prune_step(run: StudyRun, source: CausalLMSource, settings: dict, models_dir: Path,
               previous: dict | None = None) -> dict:
    """Dense measurements, then every method at every fraction in ``pruning_order``; the results are written,
    marked incomplete, after each model. `previous`: the results of a stopped prune step with the same settings,
    whose saved models are kept (``--resume``)."""
    wall = time.perf_counter()
    torch.manual_seed(settings["seed"])
    model = source.model.eval()
    evaluation = source.evaluation_windows(settings["eval_windows"], settings["eval_len"])
    prompt = evaluation[:1, : settings["prompt_tokens"]]
    structure = mask_structure(model)
    results = {"benchmark": STUDY,
               "settings": settings | {"structure": vars(structure) | {"n_head_units": structure.n_head_units}}}
    if previous is not None:
        changed = [key for key in PRUNE_SETTINGS if previous["settings"].get(key) != settings.get(key)]
        if changed:
            raise SystemExit(f"error: --resume: the stopped prune step ran with other {', '.join(changed)}")
        kept = [row for row in previous["models"] if (models_dir / row["name"]).is_dir()]
        results |= {"dense": previous["dense"], "models": kept, "resumed_models": [row["name"] for row in kept]}
        results |= {key: previous[key] for key in ("fisher_seconds",) if key in previous}
    else:
        results |= {"dense": {"perplexity": perplexity(model, evaluation, batch_size=settings["eval_batch"]),
                              "parameters": parameters_of(model),
                              "tied_embeddings": bool(model.config.tie_word_embeddings),
                              "greedy_tokens": greedy_new_tokens(model, prompt, settings["check_tokens"]),
                              "decode_weight_bytes": decode_bytes(model)},
                    "models": []}
    print(f"dense perplexity {results['dense']['perplexity']:.2f}", flush=True)
    kwon: dict = {}
    done = {row["name"] for row in results["models"]}
    for method, fraction in pruning_order(settings):
        if model_name(method, fraction) in done:
            continue
        row = prune_one(method, fraction, model, source, settings, kwon, evaluation, prompt, models_dir)
        row["ideal_decode_speedup"] = {dtype: results["dense"]["decode_weight_bytes"][dtype] / count
                                       for dtype, count in row["decode_weight_bytes"].items()}
        results["models"].append(row)
        if "fisher_seconds" in kwon:
            results["fisher_seconds"] = kwon["fisher_seconds"]
        print(f"{row['name']}: perplexity {row['perplexity']:.2f}, {row['flops_removed']:.2%} FLOPs removed, "
              f"{row['prune_seconds']:.1f} s, greedy tokens masked == slimmed: "
              f"{row['masked_vs_slimmed']['greedy_tokens_equal']}", flush=True)
        run.mark(f"after_{row['name']}")
        write_prune_progress(run, results)
    results["prune_step_seconds"] = round(time.perf_counter() - wall, 1)
    write_prune_progress(run, results)
    return results


def write_prune_progress(run: StudyRun, results: dict) -> None:
    """The prune step's JSON (marked incomplete until the latency step) and Markdown so far, with its run record."""
    results["prune_step_load_average"] = dict(run.load_averages)
    results["prune_step_run"] = run.record()
    run.write_progress(results)
    write_text(run.stem.with_suffix(".md"), markdown(results))


# -------------------------------------------------------------------------------------------------- latency step


def autocast_for(backend: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if backend in AUTOCAST_BACKENDS else nullcontext()


def models_for(models: dict, backend: str) -> dict:
    """The models as `backend` runs them: copies with bf16 weights for a cast backend, else the models."""
    if backend not in CAST_BACKENDS:
        return models
    cast = {}
    for name, model in models.items():
        cast[name] = copy.deepcopy(model).to(torch.bfloat16)
        # generate keeps a static cache on the model (an earlier compiled fp32 decode's) and reuses it whatever the
        # dtype: the copy must make its own
        vars(cast[name]).pop("_cache", None)
    return cast


def backend_availability(backend: str) -> tuple[bool, str]:
    if BACKEND_DTYPE[backend] == "bfloat16":
        available = native_bf16(cpu_description()["flags"])
        return available.available, available.reason
    return True, f"torch {torch.__version__}"


@torch.inference_mode()
def time_prefill(models: dict, backend: str, ids: torch.Tensor, warmup: int, repeats: int) -> dict:
    """{name: summary in ms} of one forward of `ids` [batch, seq_len] (use_cache off) per model, interleaved."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    def forward(model):
        with autocast_for(backend):
            return model(**inputs)

    samples = interleaved_seconds([lambda model=model: forward(model) for model in models.values()], warmup, repeats)
    return {name: {key.replace("_s", "_ms"): 1000 * value if key != "repeats" else value
                   for key, value in summary(seconds).items()} for name, seconds in zip(models, samples)}


def generate_kwargs(backend: str) -> dict:
    if backend in DECODE_COMPILE:
        return {"cache_implementation": "static", "compile_config": DECODE_COMPILE[backend]}
    return {"disable_compile": True}


def time_decode(models: dict, backend: str, prompt: torch.Tensor, new_tokens: int, warmup: int, repeats: int,
                max_compile_s: float) -> dict:
    """{name: decode timing and tokens} of greedy generation per model, interleaved; see the module docstring.
    Compiled backends compile each model in an untimed first call (its seconds recorded)."""
    clocks: dict[str, list[TokenClock]] = {name: [] for name in models}
    tokens: dict[str, list[list[int]]] = {name: [] for name in models}
    results = {name: {} for name in models}

    def generate(name: str) -> None:
        clock = TokenClock()
        with autocast_for(backend):
            tokens[name].append(greedy_new_tokens(models[name], prompt, new_tokens, streamer=clock,
                                                  **generate_kwargs(backend)))
        clocks[name].append(clock)

    if backend.startswith("inductor"):
        compile_limits_for(len(models))
        for name in models:
            start = time.perf_counter()
            generate(name)
            results[name]["first_call_s"] = round(time.perf_counter() - start, 1)
            print(f"  {backend} {name}: first call (compiles) {results[name]['first_call_s']} s", flush=True)
            if results[name]["first_call_s"] > max_compile_s:
                raise TimeoutError(f"compiling {name}'s decode took {results[name]['first_call_s']} s, over "
                                   f"max_compile_s = {max_compile_s}: backend dropped")
        for name in models:
            clocks[name].clear()
            tokens[name].clear()
    interleaved_seconds([lambda name=name: generate(name) for name in models], warmup, repeats)
    for name in models:
        timed = clocks[name][warmup:]
        decode = summary([clock.decode_seconds for clock in timed])
        runs = tokens[name][warmup:]
        results[name].update(
            decode_steps=timed[0].decode_steps, median_decode_s=decode["median_s"], min_decode_s=decode["min_s"],
            max_decode_s=decode["max_s"], repeats=decode["repeats"],
            decode_s_per_round=[clock.decode_seconds for clock in timed],
            tokens_per_s=timed[0].decode_steps / decode["median_s"],
            median_prefill_in_generate_s=summary([clock.prefill_seconds for clock in timed])["median_s"],
            tokens=runs[0], same_tokens_every_round=all(run == runs[0] for run in runs))
    return results


def latency_step(source: CausalLMSource, results: dict, models_dir: Path, latency_models: list[str] | None) -> dict:
    """Loads the saved slimmed models and times them against the dense model (see the module docstring)."""
    wall = time.perf_counter()
    s = results["settings"]
    rows = {row["name"]: row for row in results["models"]}
    names = latency_models if latency_models is not None else list(rows)
    missing = [name for name in names if name not in rows]
    if missing:  # a prune step stopped early: time what it saved
        print(f"not pruned, not timed: {', '.join(missing)}", flush=True)
        names = [name for name in names if name in rows]
    models = {"dense": source.model.eval(), **{name: load_slimmed(models_dir / name) for name in names}}
    for model in models.values():  # bf16 autocast caches its weight casts within a generate call only for weights
        model.requires_grad_(True)  # that require grad: every model alike (generate itself runs under no_grad)
    evaluation = source.evaluation_windows(s["eval_windows"], s["eval_len"])
    prompt = evaluation[:1, : s["prompt_tokens"]]
    expected = {"dense": results["dense"]["greedy_tokens"], **{name: rows[name]["greedy_tokens"] for name in names}}
    latency = {"models": list(models), "not_pruned": missing, "load_average": {"start": load_average()},
               "backends": {}}
    results["latency"] = latency
    for backend in s["backends"]:
        available, reason = backend_availability(backend)
        entry = latency["backends"][backend] = {"available": available, "reason": reason}
        if not available:
            continue
        print(f"[{backend}]", flush=True)
        torch._dynamo.reset()
        backend_models = models_for(models, backend)
        try:
            if not backend.startswith("inductor"):  # prefill: eager only (a compile per model and shape is too slow)
                entry["prefill"] = {}
                for batch in s["prefill_batches"]:
                    ids = torch.cat([evaluation[:, : s["prefill_seq_len"]]] * batch)[:batch]
                    entry["prefill"][f"{batch}x{s['prefill_seq_len']}"] = time_prefill(
                        backend_models, backend, ids, s["prefill_warmup"], s["prefill_repeats"])
            timed = backend_models
            if backend.startswith("inductor") and s["compiled_models"] is not None:  # each compile takes a minute
                timed = {name: backend_models[name] for name in ["dense", *s["compiled_models"]] if name in models}
            entry["decode"] = time_decode(timed, backend, prompt, s["new_tokens"], s["decode_warmup"],
                                          s["decode_repeats"], s["max_compile_s"])
        except Exception as error:  # a backend that fails is a result to record, not a reason to lose the others
            entry["error"] = f"{type(error).__name__}: {error}"
            print(f"{backend} failed: {entry['error']}", flush=True)
            continue
        dense = entry["decode"]["dense"]
        read = {name: backend_weight_bytes(model, backend) for name, model in backend_models.items()}
        for name, timing in entry["decode"].items():
            timing["speedup"] = dense["median_decode_s"] / timing["median_decode_s"]
            timing["ideal_speedup"] = read["dense"] / read[name]
            timing["of_ideal"] = timing["speedup"] / timing["ideal_speedup"]
            timing["paired_speedup"] = median_ratio(dense["decode_s_per_round"], timing["decode_s_per_round"])
            timing["paired_of_ideal"] = timing["paired_speedup"] / timing["ideal_speedup"]
            # the prune step's tokens were checked against the masked model; these are the timed run's
            timing["tokens_equal_to_prune_step"] = timing["tokens"][: len(expected[name])] == expected[name]
            with autocast_for(backend):
                timing["first_token_not_greedy"] = greedy_disagreement(backend_models[name], prompt,
                                                                       timing["tokens"])
            if backend != "eager-fp32" and "decode" in latency["backends"].get("eager-fp32", {}):
                reference = latency["backends"]["eager-fp32"]["decode"][name]["tokens"]
                timing["tokens_equal_to_eager_fp32"] = timing["tokens"] == reference
                timing["first_difference_from_eager_fp32"] = first_difference(timing["tokens"], reference)
        entry["per_token_fit"] = per_token_cost_fit(
            [timing["median_decode_s"] / timing["decode_steps"] for timing in entry["decode"].values()],
            [read[name] for name in entry["decode"]])
    latency["load_average"]["end"] = load_average()
    latency["seconds"] = round(time.perf_counter() - wall, 1)
    return results


# ------------------------------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    s, dense = results["settings"], results["dense"]
    loads = results.get("prune_step_load_average", {})
    seen = ", ".join(f"{values[0]:.2f} {point.replace('_', ' ')}" for point, values in loads.items() if values)
    lines = [
        "# Generation speed of SmolLM2-135M after structured pruning (issue #16)", "",
        f"{'**QUICK SMOKE RUN: tiny synthetic model and data, not a measurement.** ' if s['quick'] else ''}"
        f"{s['model']}. Perplexity: the first {s['eval_windows']} windows of {s['eval_len']} tokens of Moby Dick; "
        f"FLOPs: head+FFN MACs at {s['calibration_len']} tokens. Prune step: 1-minute load average {seen or 'unknown'}."
        f" Decode: {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, greedy, batch 1, KV cache.", "",
        f"Dense: perplexity {dense['perplexity']:.2f}, {dense['parameters'] / 1e6:.2f}M parameters, "
        f"{dense['decode_weight_bytes']['float32'] / 1e6:.1f} MB of fp32 weights read per generated token.", "",
        "## Pruning (slimmed models)", "",
        f"{machine_line({'run': results['prune_step_run']}, loads=False)} "
        + (f"Wall time {results['prune_step_seconds'] / 60:.1f} min" if "prune_step_seconds" in results
           else f"**Not finished: {len(results['models'])} models saved** in {results['prune_step_run']['seconds'] / 60:.1f} min")
        + (f", resumed after {', '.join(results['resumed_models'])}" if results.get("resumed_models") else "")
        + " (pruning seconds: wall time under the load averages above).", "",
        "| model | FLOPs removed | perplexity | parameters | pruning s | kept kv groups | kept neurons | "
        f"slimmed greedy tokens ({s['check_tokens']}) = masked model's | ideal decode speedup (fp32 / bf16) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in results["models"]:
        check = row["masked_vs_slimmed"]
        tokens = ("yes" if check["greedy_tokens_equal"] else f"no (from token {check['first_token_difference']})")
        lines.append(
            f"| {row['name']} | {100 * row['flops_removed']:.2f}% | {row['perplexity']:.2f} | "
            f"{row['parameters'] / 1e6:.2f}M | {row['prune_seconds']:.1f} | {sum(row['kept_kv_groups_per_layer'])} | "
            f"{sum(row['kept_neurons_per_layer'])} | {tokens} (logits {check['max_abs_logit_difference_first_window']:.1e}) | "
            f"{row['ideal_decode_speedup']['float32']:.3f}x / {row['ideal_decode_speedup']['bfloat16']:.3f}x |")
    if "fisher_seconds" in results:
        lines += ["", f"mask_search is the search only (rearrangement and tuning off); its pruning seconds include the "
                      f"one shared Fisher pass ({results['fisher_seconds']:.0f} s)."]
    latency = results.get("latency")
    if latency is None:
        lines += ["", "Latency: not measured yet (`--step latency`)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"## Latency ({machine_line(results, loads=False)} 1-minute load average "
                  f"{latency['load_average']['start'][0]:.2f} at the start of the timing, "
                  f"{latency['load_average']['end'][0]:.2f} at its end)", ""]
    for backend, entry in latency["backends"].items():
        if not entry["available"] or "error" in entry:
            lines += [f"**{backend}**: not run: {entry.get('error', entry['reason'])}", ""]
            continue
        lines += [f"### {backend}", ""]
        prefill = entry.get("prefill", {})
        header = "| model | " + "".join(f"prefill {shape} ms (speedup) | " for shape in prefill)
        header += "decode tokens/s | decode speedup | ideal | measured / ideal | paired speedup (/ ideal) | tokens |"
        lines += [header, "|---|" + "---:|" * (len(prefill) + 5) + "---|"]
        for name, timing in entry["decode"].items():
            cells = [f"{prefill[shape][name]['median_ms']:.1f} ({prefill[shape]['dense']['median_ms'] / prefill[shape][name]['median_ms']:.2f}x)"
                     for shape in prefill]
            checks = ["same every round" if timing["same_tokens_every_round"] else "DIFFER between rounds",
                      "= prune step" if timing["tokens_equal_to_prune_step"] else "!= prune step",
                      "greedy" if timing["first_token_not_greedy"] is None
                      else f"token {timing['first_token_not_greedy']} not greedy"]
            if "tokens_equal_to_eager_fp32" in timing:
                checks.append("= eager fp32" if timing["tokens_equal_to_eager_fp32"]
                              else f"!= eager fp32 from token {timing['first_difference_from_eager_fp32']}")
            compiled = f", compile {timing['first_call_s']:.0f} s" if "first_call_s" in timing else ""
            lines.append(f"| {name} | " + "".join(f"{cell} | " for cell in cells)
                         + f"{timing['tokens_per_s']:.1f} | {timing['speedup']:.3f}x | {timing['ideal_speedup']:.3f}x | "
                         f"{100 * timing['of_ideal']:.0f}% | {timing['paired_speedup']:.3f}x "
                         f"({100 * timing['paired_of_ideal']:.0f}%) | {'; '.join(checks)}{compiled} |")
        fit = entry["per_token_fit"]
        dense = entry["decode"]["dense"]
        fixed_share = fit["fixed_ms"] / (1000 * dense["median_decode_s"] / dense["decode_steps"])
        rate = f"{fit['gb_per_s']:.1f} GB/s" if fit["gb_per_s"] else "no rate (slope not positive)"
        lines += ["", f"Per decode step: {fit['fixed_ms']:.1f} ms fixed + weight bytes at {rate} (line through the "
                      f"models above, R² {fit['r2']:.2f}); the fixed part is {100 * fixed_share:.0f}% of the dense "
                      f"model's step.", ""]
    lines.append(f"Latency step: {latency['seconds'] / 60:.1f} min; prefill median of {s['prefill_repeats']} "
                 f"interleaved rounds after {s['prefill_warmup']} warm-up, decode median of {s['decode_repeats']} "
                 f"after {s['decode_warmup']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = study_parser(
        STUDY, __doc__,
        epilog="Prune step on 2 cores: about 45 minutes (one 16-minute Fisher pass, 9 recipe prunings, 13 perplexity "
               "evaluations, 25 greedy generations). Latency step with the defaults: about 27 minutes.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="pruning types (default: all)")
    parser.add_argument("--fractions", type=float, nargs="+", help="head+FFN FLOPs fractions to remove")
    parser.add_argument("--latency-models", nargs="+",
                        help="pruned models to time against dense, e.g. flap_20 (default: settings.yaml's)")
    parser.add_argument("--compiled-models", nargs="+",
                        help="pruned models the compiled backend times against dense (default: settings.yaml's)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS)
    parser.add_argument("--prefill-repeats", type=int)
    parser.add_argument("--decode-repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--resume", action="store_true",
                        help="--step prune: keep the models a stopped prune step saved (same settings), prune the rest")
    add_step_arguments(parser, STUDY, "perplexity")
    args = parser.parse_args(argv)
    check_step_arguments(parser, args)
    quick = args.quick
    recipe = load_recipe(CORPUS_RECIPE)
    corpus, kwon = recipe.corpus, study_settings("kwon_smollm2", quick)
    settings = {"calibration_len": corpus.calibration_seq_len, "eval_windows": corpus.evaluation_windows,
                "eval_len": corpus.evaluation_seq_len, "eval_batch": recipe.evaluation.batch_size,
                "seed": recipe.pruning[0].seed, "kwon_calibration_samples": kwon["calibration_samples"],
                "kwon_calibration_batch": kwon["calibration_batch"], "stage_overrides": {},
                **study_settings(STUDY, quick)}
    given = {"methods": args.methods, "fractions": args.fractions, "latency_models": args.latency_models,
             "compiled_models": args.compiled_models,
             "backends": args.backends, "prefill_repeats": args.prefill_repeats,
             "decode_repeats": args.decode_repeats}
    settings.update({key: value for key, value in given.items() if value is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    if quick:
        inductor_config.compile_threads = 1  # a smoke run should not fan out compile workers
    logging.basicConfig(level=logging.WARNING)
    run = StudyRun(STUDY, quick, args.out, argv)
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}-models-") as temporary:
        models_dir = steps_models_dir(args, STUDY, temporary)
        if args.step == "latency":
            results = prune_step_results(run, "models", "pruned model")
            # what this invocation says about the timing replaces what the prune step recorded
            results["settings"].update({key: value for key, value in settings.items()
                                        if key not in ("methods", "fractions")})
        else:
            source = causal_lm(quick)
            settings = {"quick": quick, "model": source.description, **settings}
            previous = json.loads(run.stem.with_suffix(".json").read_text()) if args.resume else None
            results = prune_step(run, source, settings, models_dir, previous)
            if args.step == "prune":
                print(f"wrote {run.stem}.{{json,md}} (pruning only); time it with --step latency")
                return 0
            del source  # the timing loads the dense model afresh, as a separate --step latency would
        results = latency_step(causal_lm(quick), results, models_dir, results["settings"]["latency_models"])
    results = run.write(results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
