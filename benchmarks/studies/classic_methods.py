"""The classic pruning methods on real data: scikit-learn's digits (8x8 images) and the MiniLM sentiment task.

    python -m benchmarks.studies.classic_methods slimming          # network slimming (Liu et al. 2017) + latency
    python -m benchmarks.studies.classic_methods trimming          # network trimming (Hu et al. 2016), MLP and CNN
    python -m benchmarks.studies.classic_methods lottery           # lottery tickets (Frankle and Carbin 2019)
    python -m benchmarks.studies.classic_methods particle_filter   # particle-filter pruning (Anwar et al. 2017)
    python -m benchmarks.studies.classic_methods minilm_trimming   # trimming of MiniLM's GELU FFN (an extension)
    python -m benchmarks.studies.classic_methods slimming trimming lottery particle_filter --quick   # in seconds

Every pruning decision goes through INC (``inc_plugins.prepare_pruning`` with a ``WeightPruningConfig``, INC's
training callbacks for the L1 sparsity training, INC's ``magnitude`` pruner for the lottery rounds); the procedures
are in ``recipes/classic_stages.py``. Each method reads its training, pruning and data settings from its shipped
recipe (``recipes/digits_*.yaml``, ``recipes/minilm_network_trimming.yaml``) and what it sweeps (fractions, grids,
iterations, rounds, seeds) from settings.yaml. Digits: one stratified split (seed 0: 1,079 train / 359 validation /
359 test images); the validation images feed APoZ and the particle filter's misclassification rate, test accuracy
is reported. Each digits method runs over ``--seeds`` (model initialisation and training order) and reports the mean
and the range, because one test image is 0.28 points. ``--quick`` replaces the digits by 64/32/32 random images.
MiniLM trimming (``benchmarks/studies/minilm_trimming.py``) runs on the cached fine-tuned MiniLM of ``make demo``
(fine-tuned first when the cache is empty); with ``--quick`` on the synthetic tiny BERT, a synthetic tokenizer and
random labelled sentences, so it needs no cache.

Writes <out>/classic_<method>.{json,md,png} (``--quick``: classic_<method>_quick.*).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.studies.common import StudyRun, figure, machine_line, save_figure, study_parser, study_settings
from benchmarks.studies.measures import interleaved_latency
from benchmarks.studies.minilm_trimming import trimming_on_ffn
from benchmarks.studies.sources import digits_split, text_classification_task
from recipes import classic_stages as cs
from recipes.image_classification import train_settings
from recipes.schema import load_recipe
from recipes.vision_models import build_digits_model, macs_per_image

STUDY = "classic_methods"
METHODS = ("slimming", "trimming", "lottery", "particle_filter", "minilm_trimming")
RECIPES = {"slimming": "digits_network_slimming.yaml", "trimming": "digits_network_trimming.yaml",
           "lottery": "digits_lottery_ticket.yaml", "particle_filter": "digits_particle_filter.yaml",
           "minilm_trimming": "minilm_network_trimming.yaml"}
LATENCY_WARMUP = 5


# ------------------------------------------------------------------------------------------------------ helpers


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def fmt(entry: dict, digits: int = 4) -> str:
    """mean [min, max] of a spread, or a single value."""
    if entry["min"] == entry["max"]:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def header(title: str, results: dict) -> list[str]:
    metric = ("" if results["method"] == "minilm_trimming" else
              f" Test accuracy on {results['split']['test']} digits images: mean [min, max] over seeds.")
    data = "model and data" if results["method"] == "minilm_trimming" else "images"
    quick = f"**QUICK SMOKE RUN: tiny synthetic {data}, not a measurement.** " if results["run"]["quick"] else ""
    return [f"# {title}", "", f"{quick}`{results['run']['command']}` ({results['run']['seconds']:.0f} s). Seeds "
            f"{results['seeds']}. {machine_line(results)}{metric}", ""]


def with_epochs(settings: cs.TrainSettings, epochs: int | None) -> cs.TrainSettings:
    """`settings` with `epochs` when given (--quick shortens the recipes' trainings)."""
    return settings if epochs is None else replace(settings, epochs=epochs)


def latency_batch(split, size: int) -> torch.Tensor:
    """`size` test images (repeated as needed): the batch every latency comparison times."""
    return split.test_images.repeat(1 + size // len(split.test_labels), 1, 1, 1)[:size]


def one_thread_latency(models: dict, batch: torch.Tensor, repeats: int) -> dict:
    """``interleaved_latency`` on one thread: on a shared 2-core machine a second thread mostly measures the other
    jobs. torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return interleaved_latency(models, batch, warmup=LATENCY_WARMUP, repeats=repeats)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ network slimming


def run_slimming(seeds: list[int], s: dict, quick: bool) -> dict:
    recipe = load_recipe(RECIPES["slimming"])
    stage = recipe.pruning[0]
    split = digits_split(recipe.data, quick)
    l1 = stage.l1
    train = with_epochs(train_settings(recipe.train), s.get("train_epochs"))
    finetune = with_epochs(train_settings(stage.retrain), s.get("finetune_epochs"))
    fractions, scopes, latency_scope = s["fractions"], s["scopes"], s["latency_scope"]
    architecture, widths = recipe.model.architecture, recipe.model.widths
    runs, latency_models = [], {}
    for seed in seeds:
        plain = build_digits_model(architecture, widths, seed=seed)
        cs.sparsity_train(plain, split, replace(train, seed=train.seed + seed), 0.0)
        model = build_digits_model(architecture, widths, seed=seed)
        cs.sparsity_train(model, split, replace(train, seed=train.seed + seed), l1)
        run = {"seed": seed, "dense_plain_accuracy": cs.accuracy_on_test(plain, split),
               "dense_sparsity_trained_accuracy": cs.accuracy_on_test(model, split),
               "bn_scales": cs.bn_scale_summary(model), "pruned": []}
        print(f"seed {seed}: dense {run['dense_plain_accuracy']:.4f}, L1-trained "
              f"{run['dense_sparsity_trained_accuracy']:.4f}, scales {run['bn_scales']}", flush=True)
        for scope in scopes:
            for fraction in fractions:
                result = cs.slim_by_bn_scales(model, fraction, split, scope)
                slimmed = result.slimmed
                pruned_accuracy = cs.accuracy_on_test(slimmed, split)
                cs.train_digits(slimmed, split, replace(finetune, seed=finetune.seed + seed))
                row = {"scope": scope, "fraction": fraction, "widths": slimmed.widths(),
                       "channels_remaining": sum(slimmed.widths()) / sum(model.widths()),
                       "parameters": sum(p.numel() for p in slimmed.parameters()),
                       "macs_per_image": macs_per_image(slimmed), "accuracy_pruned": pruned_accuracy,
                       "accuracy_finetuned": cs.accuracy_on_test(slimmed, split),
                       "max_abs_logit_difference_slimmed_vs_masked": result.max_abs_difference}
                run["pruned"].append(row)
                print(f"  {scope} {fraction}: widths {row['widths']} pruned {pruned_accuracy:.4f} fine-tuned "
                      f"{row['accuracy_finetuned']:.4f} (slim vs mask {result.max_abs_difference:.1e})", flush=True)
                if seed == seeds[0] and scope == latency_scope:
                    latency_models[str(fraction)] = slimmed
        run["dense_parameters"] = sum(p.numel() for p in model.parameters())
        run["dense_macs_per_image"] = macs_per_image(model)
        run["dense_widths"] = model.widths()
        if seed == seeds[0]:
            latency_models = {"dense": model, **latency_models}
        runs.append(run)

    timed = one_thread_latency(latency_models, latency_batch(split, s["latency_batch"]), s["latency_repeats"])
    dense = timed["dense"]["median_s"]
    latency = {name: {**t, "speedup_vs_dense": dense / t["median_s"]} for name, t in timed.items()}
    return {"settings": {"recipe": RECIPES["slimming"], "l1": l1, "train": asdict(train), "finetune": asdict(finetune),
                         "fractions": fractions, "scopes": list(scopes), "latency_batch": s["latency_batch"],
                         "latency_threads": 1, "latency_models": f"seed {seeds[0]}, {latency_scope} scope, fine-tuned"},
            "split": split.sizes(), "runs": runs, "latency": latency}


# ------------------------------------------------------------------------------------------------ network slimming


def _aggregate_slimming(results: dict) -> list[dict]:
    rows = []
    for scope in results["settings"]["scopes"]:
        for fraction in results["settings"]["fractions"]:
            cells = [row for run in results["runs"] for row in run["pruned"]
                     if row["scope"] == scope and row["fraction"] == fraction]
            rows.append({"scope": scope, "fraction": fraction,
                         "channels_remaining": spread([c["channels_remaining"] for c in cells]),
                         "widths": [c["widths"] for c in cells],
                         "parameters": spread([c["parameters"] for c in cells]),
                         "macs": spread([c["macs_per_image"] for c in cells]),
                         "accuracy_pruned": spread([c["accuracy_pruned"] for c in cells]),
                         "accuracy_finetuned": spread([c["accuracy_finetuned"] for c in cells]),
                         "max_diff": max(c["max_abs_logit_difference_slimmed_vs_masked"] for c in cells)})
    return rows


def slimming_markdown(results: dict) -> str:
    runs = results["runs"]
    dense_params, dense_macs = runs[0]["dense_parameters"], runs[0]["dense_macs_per_image"]
    lines = header("Network slimming (Liu et al. 2017) on digits", results)
    lines += [f"CNN widths {runs[0]['dense_widths']} (conv3x3-BN-ReLU x3, {dense_params:,} parameters, "
              f"{dense_macs:,} MACs per image). Sparsity training: SGD with L1 = {results['settings']['l1']} on the BN "
              f"scales through INC's `bn_l1` regularizer; INC `network_slimming` prunes, `slim()` removes the channels, "
              f"then {results['settings']['finetune']['epochs']} epochs of fine-tuning.", "",
              f"Dense accuracy, plain training: {fmt(spread([r['dense_plain_accuracy'] for r in runs]))}; with the L1 "
              f"sparsity training: {fmt(spread([r['dense_sparsity_trained_accuracy'] for r in runs]))}.", "",
              "| scope | channels pruned | channels remaining | widths (per seed) | parameters | MACs/image "
              "| accuracy pruned | accuracy fine-tuned |", "|---|---|---|---|---|---|---|---|"]
    for row in _aggregate_slimming(results):
        lines.append(f"| {row['scope']} | {pct(row['fraction'])} | {pct(row['channels_remaining']['mean'])} "
                     f"| {' '.join(str(w) for w in row['widths'])} | {row['parameters']['mean'] / dense_params:.0%} "
                     f"| {row['macs']['mean'] / dense_macs:.0%} | {fmt(row['accuracy_pruned'])} "
                     f"| {fmt(row['accuracy_finetuned'])} |")
    max_diff = max(row["max_diff"] for row in _aggregate_slimming(results))
    lines += ["", f"Slimmed vs masked logits on the test images: max abs difference {max_diff:.1e} (the slimmed "
              f"network computes what the masked one does).", "",
              f"Latency, batch {results['settings']['latency_batch']} images, eager fp32, 1 thread, median [quartiles] "
              f"of {next(iter(results['latency'].values()))['repeats']} repeats, every model once in turn per repeat "
              f"({results['settings']['latency_models']}):", "",
              "| model | widths | MACs/image | latency | speedup | ideal (MACs ratio) |", "|---|---|---|---|---|---|"]
    scope = results["settings"]["latency_models"].split(", ")[1].split()[0]
    sizes = {str(row["fraction"]): row for row in runs[0]["pruned"] if row["scope"] == scope}
    sizes["dense"] = {"macs_per_image": dense_macs, "widths": runs[0]["dense_widths"]}
    for name, timing in results["latency"].items():
        label = "dense (unslimmed)" if name == "dense" else f"slimmed, {pct(float(name))} pruned"
        macs = sizes[name]["macs_per_image"]
        lines.append(f"| {label} | {sizes[name]['widths']} | {macs:,} | {1e3 * timing['median_s']:.2f} ms "
                     f"[{1e3 * timing['q1_s']:.2f}, {1e3 * timing['q3_s']:.2f}] | {timing['speedup_vs_dense']:.2f}x "
                     f"| {dense_macs / macs:.2f}x |")
    return "\n".join(lines) + "\n"


def slimming_plot(results: dict, path: Path) -> None:
    fig, ax = figure(figsize=(6, 4))
    for scope, marker in (("global", "o"), ("local", "s")):
        rows = [r for r in _aggregate_slimming(results) if r["scope"] == scope]
        x = [r["channels_remaining"]["mean"] for r in rows]
        ax.plot(x, [r["accuracy_finetuned"]["mean"] for r in rows], marker=marker, label=f"{scope}, fine-tuned")
        ax.plot(x, [r["accuracy_pruned"]["mean"] for r in rows], marker=marker, linestyle=":",
                label=f"{scope}, before fine-tuning")
    dense = statistics.fmean(r["dense_plain_accuracy"] for r in results["runs"])
    ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set(xlabel="channels remaining", ylabel="test accuracy", title="Network slimming, digits CNN", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ network trimming


def run_trimming(seeds: list[int], s: dict, quick: bool) -> dict:
    recipe = load_recipe(RECIPES["trimming"])  # the MLP, its training and the trimming stage
    stage = recipe.pruning[0]
    split = digits_split(recipe.data, quick)
    settings = {
        "digits_mlp": (with_epochs(train_settings(recipe.train), s.get("train_epochs")),
                       with_epochs(train_settings(stage.retrain), s.get("finetune_epochs"))),
        "digits_cnn": (cs.TrainSettings(**s["cnn_train"]), cs.TrainSettings(**s["cnn_finetune"])),
    }
    widths = {recipe.model.architecture: recipe.model.widths}
    fraction, iterations = stage.target_sparsity, s["iterations"]
    runs, latency = [], {}
    batch = latency_batch(split, s["latency_batch"])
    for architecture, (train, finetune) in settings.items():
        for seed in seeds:
            dense = build_digits_model(architecture, widths.get(architecture), seed=seed)
            cs.train_digits(dense, split, replace(train, seed=train.seed + seed))
            run = {"architecture": architecture, "seed": seed, "dense_widths": dense.widths(),
                   "dense_accuracy": cs.accuracy_on_test(dense, split),
                   "dense_parameters": sum(p.numel() for p in dense.parameters())}
            chains = cs.iterative_trimming(dense, split, fraction, iterations,
                                           replace(finetune, seed=finetune.seed + seed))
            for control, steps in (("apoz", chains.apoz), ("random", chains.random)):
                run[control] = [asdict(step) for step in steps]
                print(f"{architecture} seed {seed} {control}: " + ", ".join(
                    f"{step.widths} {step.accuracy_pruned:.3f}->{step.accuracy_finetuned:.3f}" for step in steps), flush=True)
            if seed == seeds[0]:  # the trimmed network is physically smaller: time it
                final = chains.apoz_model
                timed = one_thread_latency({"dense": dense, "trimmed": final}, batch, s["latency_repeats"])
                latency[architecture] = {"dense": timed["dense"], "trimmed": timed["trimmed"],
                                         "widths": final.widths(), "macs_ratio": macs_per_image(dense) /
                                         macs_per_image(final),
                                         "speedup": timed["dense"]["median_s"] / timed["trimmed"]["median_s"]}
            runs.append(run)
    return {"settings": {"recipe": RECIPES["trimming"], "fraction_per_iteration": fraction, "iterations": iterations,
                         "train": {k: asdict(v[0]) for k, v in settings.items()},
                         "finetune": {k: asdict(v[1]) for k, v in settings.items()}},
            "split": split.sizes(), "runs": runs, "latency": latency}


def _trimming_rows(results: dict, architecture: str) -> list[dict]:
    runs = [r for r in results["runs"] if r["architecture"] == architecture]
    rows = []
    for i in range(results["settings"]["iterations"]):
        row = {"iteration": i + 1, "widths": runs[0]["apoz"][i]["widths"],
               "remaining": runs[0]["apoz"][i]["remaining_fraction"],
               "parameters": runs[0]["apoz"][i]["parameters"] / runs[0]["dense_parameters"]}
        for control in ("apoz", "random"):
            row[f"{control}_pruned"] = spread([r[control][i]["accuracy_pruned"] for r in runs])
            row[f"{control}_finetuned"] = spread([r[control][i]["accuracy_finetuned"] for r in runs])
        apoz = [r["apoz"][i]["mean_apoz_pruned"] for r in runs if r["apoz"][i]["mean_apoz_pruned"] is not None]
        row["mean_apoz_pruned"] = statistics.fmean(apoz) if apoz else None
        rows.append(row)
    return rows


def trimming_markdown(results: dict) -> str:
    s = results["settings"]
    lines = header("Network trimming (Hu et al. 2016) on digits", results)
    lines += [f"Each iteration: INC `network_trimming` measures APoZ (fraction of zero ReLU outputs) on the "
              f"{results['split']['val']} validation images and prunes {pct(s['fraction_per_iteration'])} of the remaining channels/neurons of "
              f"every hidden layer (the highest APoZ), they are removed physically, and the smaller network is "
              f"fine-tuned from its surviving weights. Control: the same counts chosen at random, same fine-tuning.", ""]
    for architecture in ("digits_mlp", "digits_cnn"):
        runs = [r for r in results["runs"] if r["architecture"] == architecture]
        lines += [f"## {architecture} (widths {runs[0]['dense_widths']}), dense accuracy "
                  f"{fmt(spread([r['dense_accuracy'] for r in runs]))}", "",
                  "| iteration | widths | channels remaining | parameters | mean APoZ of pruned | APoZ: pruned "
                  "| APoZ: fine-tuned | random: pruned | random: fine-tuned |", "|---|---|---|---|---|---|---|---|---|"]
        for row in _trimming_rows(results, architecture):
            apoz = "" if row["mean_apoz_pruned"] is None else f"{row['mean_apoz_pruned']:.3f}"
            lines.append(f"| {row['iteration']} | {row['widths']} | {pct(row['remaining'])} | {row['parameters']:.0%} "
                         f"| {apoz} | {fmt(row['apoz_pruned'])} | {fmt(row['apoz_finetuned'])} "
                         f"| {fmt(row['random_pruned'])} | {fmt(row['random_finetuned'])} |")
        lines.append("")
    lines += [f"Latency of the final trimmed networks (seed {results['seeds'][0]}) against the dense ones, batch 256, "
              f"eager fp32, 1 thread, median of {next(iter(results['latency'].values()))['dense']['repeats']} "
              f"interleaved repeats:", "", "| network | trimmed widths | dense | trimmed | speedup | ideal (MACs ratio) |",
              "|---|---|---|---|---|---|"]
    for architecture, t in results["latency"].items():
        lines.append(f"| {architecture} | {t['widths']} | {1e3 * t['dense']['median_s']:.2f} ms "
                     f"| {1e3 * t['trimmed']['median_s']:.2f} ms | {t['speedup']:.2f}x | {t['macs_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def trimming_plot(results: dict, path: Path) -> None:
    fig, axes = figure(1, 2, figsize=(10, 4))
    for ax, architecture in zip(axes, ("digits_mlp", "digits_cnn")):
        rows = _trimming_rows(results, architecture)
        x = [r["remaining"] for r in rows]
        for control, color in (("apoz", "C0"), ("random", "C1")):
            ax.plot(x, [r[f"{control}_finetuned"]["mean"] for r in rows], marker="o", color=color,
                    label=f"{control}, fine-tuned")
            ax.plot(x, [r[f"{control}_pruned"]["mean"] for r in rows], marker="o", color=color, linestyle=":",
                    label=f"{control}, before fine-tuning")
        ax.set(xlabel="hidden channels/neurons remaining", ylabel="test accuracy", title=f"trimming, {architecture}",
               ylim=(0, 1.02))
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ lottery tickets


def run_lottery(seeds: list[int], s: dict, quick: bool) -> dict:
    recipe = load_recipe(RECIPES["lottery"])
    stage = recipe.pruning[0]
    split = digits_split(recipe.data, quick)
    train = with_epochs(train_settings(recipe.train), s.get("train_epochs"))
    rounds, fraction, rewinds = s["rounds"], stage.prune_fraction, s["rewinds"]
    runs = []
    for rewind in rewinds:
        for seed in seeds:
            start = time.perf_counter()
            result = cs.lottery_tickets(recipe.model.architecture, split, train, rounds, fraction, rewind_to=rewind,
                                        seed=seed, scope=stage.scope, output_layer_rate=stage.output_layer_rate,
                                        widths=recipe.model.widths)
            runs.append({"rewind_to": rewind, "seed": seed, "seconds": time.perf_counter() - start,
                         "rounds": [{"round": r.round, "remaining_fraction": r.remaining_fraction,
                                     "ticket_accuracy": r.ticket_accuracy, "random_accuracy": r.random_accuracy}
                                    for r in result]})
            print(f"rewind {rewind} seed {seed}: " + ", ".join(
                f"{r.remaining_fraction:.3f}:{r.ticket_accuracy:.3f}/{r.random_accuracy}" for r in result), flush=True)
    return {"settings": {"recipe": RECIPES["lottery"],
                         "architecture": "digits_mlp (64-300-100-10, LeNet-300-100 with 64 inputs)",
                         "train": asdict(train), "rounds": rounds, "prune_fraction": fraction,
                         "output_layer_rate": stage.output_layer_rate, "scope": stage.scope, "rewinds": list(rewinds)},
            "split": split.sizes(), "runs": runs}


def _lottery_rows(results: dict, rewind: str) -> list[dict]:
    runs = [r for r in results["runs"] if r["rewind_to"] == rewind]
    rows = []
    for i in range(results["settings"]["rounds"] + 1):
        rows.append({"round": i, "remaining": runs[0]["rounds"][i]["remaining_fraction"],
                     "ticket": spread([r["rounds"][i]["ticket_accuracy"] for r in runs]),
                     "random": None if i == 0 else spread([r["rounds"][i]["random_accuracy"] for r in runs])})
    return rows


def lottery_markdown(results: dict) -> str:
    s = results["settings"]
    lines = header("Lottery tickets (Frankle and Carbin 2019) on digits", results)
    lines += [f"{s['architecture']}, Adam lr {s['train']['learning_rate']}, {s['train']['epochs']} epochs per "
              f"training. Each round INC's `magnitude` pruner removes {pct(s['prune_fraction'])} of the remaining "
              f"weights of each layer ({pct(s['output_layer_rate'])} of the output layer, as the paper does), the "
              f"survivors are rewound and retrained (the winning ticket); the control re-initialises the same mask "
              f"randomly and trains it the same way, in the same run.", ""]
    for rewind in s["rewinds"]:
        label = "the initial weights" if rewind == "init" else f"the weights after {rewind.split(':')[1]} steps"
        lines += [f"## Rewinding to {label} (`rewind_to: {rewind}`)", "",
                  "| round | weights remaining | winning ticket | random re-init | ticket - random |",
                  "|---|---|---|---|---|"]
        for row in _lottery_rows(results, rewind):
            random = "" if row["random"] is None else fmt(row["random"])
            gap = "" if row["random"] is None else f"{100 * (row['ticket']['mean'] - row['random']['mean']):+.1f} pts"
            lines.append(f"| {row['round']} | {pct(row['remaining'])} | {fmt(row['ticket'])} | {random} | {gap} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def lottery_plot(results: dict, path: Path) -> None:
    fig, ax = figure(figsize=(6, 4))
    for rewind, color in zip(results["settings"]["rewinds"], ("C0", "C2")):
        rows = _lottery_rows(results, rewind)
        x = [r["remaining"] for r in rows]
        ax.plot(x, [r["ticket"]["mean"] for r in rows], marker="o", color=color, label=f"ticket, rewind {rewind}")
        ax.plot(x[1:], [r["random"]["mean"] for r in rows[1:]], marker="x", color=color, linestyle=":",
                label=f"random re-init ({rewind} masks)")
    ax.set(xscale="log", xlabel="weights remaining", ylabel="test accuracy", title="Lottery tickets, digits MLP")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ particle filter


def run_particle_filter(seeds: list[int], s: dict, quick: bool) -> dict:
    recipe = load_recipe(RECIPES["particle_filter"])
    stage = recipe.pruning[0]
    split = digits_split(recipe.data, quick)
    train = with_epochs(train_settings(recipe.train), s.get("train_epochs"))
    retrain = with_epochs(train_settings(stage.retrain), s.get("retrain_epochs"))
    search = {"num_particles": s.get("num_particles", stage.num_particles),
              "iterations": s.get("iterations", stage.iterations)}
    grid = [tuple(cell) for cell in s["grid"]]
    runs = []
    for seed in seeds:
        dense = build_digits_model(recipe.model.architecture, recipe.model.widths, seed=seed)
        cs.train_digits(dense, split, replace(train, seed=train.seed + seed))
        run = {"seed": seed, "dense_accuracy": cs.accuracy_on_test(dense, split), "settings": []}
        for granularity, sparsity in grid:
            row = {"granularity": granularity, "target_sparsity": sparsity}
            seeded_retrain = replace(retrain, seed=retrain.seed + seed)
            pf = cs.particle_filter_pruning(dense, split, granularity, sparsity, seeded_retrain, stride=stage.stride,
                                            seed=seed, **search)
            rnd = cs.random_pattern_pruning(dense, split, granularity, sparsity, seeded_retrain, stride=stage.stride,
                                            seed=seed)
            for name, outcome in (("particle_filter", pf), ("random", rnd)):
                row[name] = {"sparsity": outcome.sparsity, "accuracy_pruned": outcome.accuracy_pruned,
                             "accuracy_retrained": outcome.accuracy_retrained, "search_seconds": outcome.search_seconds,
                             "evaluations": outcome.evaluations}
            run["settings"].append(row)
            print(f"seed {seed} {granularity} {sparsity}: PF {pf.accuracy_pruned:.3f}->{pf.accuracy_retrained:.3f} "
                  f"random {rnd.accuracy_pruned:.3f}->{rnd.accuracy_retrained:.3f} ({pf.search_seconds:.1f} s, "
                  f"{pf.evaluations} evaluations)", flush=True)
        runs.append(run)
    return {"settings": {"recipe": RECIPES["particle_filter"], "train": asdict(train), "retrain": asdict(retrain),
                         "search": search, "grid": grid,
                         "layers": "features.1.0 and features.3.0 (the first conv stays dense)",
                         "stride": stage.stride, "weighting": "linear (1 - MCR)",
                         "mcr_on": f"{split.sizes()['val']} validation images"},
            "split": split.sizes(), "runs": runs}


def _pf_rows(results: dict) -> list[dict]:
    rows = []
    for i, (granularity, sparsity) in enumerate(results["settings"]["grid"]):
        cells = [run["settings"][i] for run in results["runs"]]
        row = {"granularity": granularity, "target": sparsity,
               "sparsity": statistics.fmean(c["particle_filter"]["sparsity"] for c in cells),
               "search_seconds": statistics.fmean(c["particle_filter"]["search_seconds"] for c in cells),
               "evaluations": statistics.fmean(c["particle_filter"]["evaluations"] for c in cells)}
        for name in ("particle_filter", "random"):
            row[f"{name}_pruned"] = spread([c[name]["accuracy_pruned"] for c in cells])
            row[f"{name}_retrained"] = spread([c[name]["accuracy_retrained"] for c in cells])
        rows.append(row)
    return rows


def pf_markdown(results: dict) -> str:
    s = results["settings"]
    lines = header("Particle-filter structured pruning (Anwar et al. 2017) on digits", results)
    lines += [f"Digits CNN (widths 32, 64, 128), trained {s['train']['epochs']} epochs; dense accuracy "
              f"{fmt(spread([r['dense_accuracy'] for r in results['runs']]))}. INC `particle_filter` prunes "
              f"{s['layers']} one layer at a time: {s['search']['num_particles']} particles, "
              f"{s['search']['iterations']} iterations, weights {s['weighting']} on the {s['mcr_on']}, stride "
              f"{s['stride']} for intra-kernel patterns; then {s['retrain']['epochs']} epochs of retraining with the "
              f"pattern held (channel patterns removed physically). Control: a random pattern of the same kind and "
              f"size, same retraining.", "",
              "| granularity | target | weight sparsity | PF: pruned | PF: retrained | random: pruned "
              "| random: retrained | search time |", "|---|---|---|---|---|---|---|---|"]
    for row in _pf_rows(results):
        lines.append(f"| {row['granularity']} | {pct(row['target'])} | {pct(row['sparsity'])} "
                     f"| {fmt(row['particle_filter_pruned'])} | {fmt(row['particle_filter_retrained'])} "
                     f"| {fmt(row['random_pruned'])} | {fmt(row['random_retrained'])} "
                     f"| {row['search_seconds']:.1f} s ({row['evaluations']:.0f} evaluations) |")
    return "\n".join(lines) + "\n"


def pf_plot(results: dict, path: Path) -> None:
    rows = _pf_rows(results)
    fig, ax = figure(figsize=(7, 4))
    labels = [f"{r['granularity']}\n{pct(r['sparsity'])}" for r in rows]
    x = range(len(rows))
    width = 0.2
    for offset, (key, label) in enumerate((("particle_filter_pruned", "PF, pruned"),
                                           ("random_pruned", "random, pruned"),
                                           ("particle_filter_retrained", "PF, retrained"),
                                           ("random_retrained", "random, retrained"))):
        ax.bar([i + (offset - 1.5) * width for i in x], [r[key]["mean"] for r in rows], width, label=label)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(ylabel="test accuracy", title="Particle-filter structured pruning, digits CNN", ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ MiniLM trimming (GELU)


def run_minilm_trimming(s: dict, quick: bool) -> dict:
    """The fine-tuned MiniLM of ``minilm_sentiment.yaml`` from the fine-tune cache (fine-tuned first when it is
    empty); ``quick``: the synthetic tiny BERT, tokenizer and sentences of ``sources.text_classification_task``."""
    recipe = load_recipe(RECIPES["minilm_trimming"])
    stages = recipe.pruning  # Hu et al.'s iterations: each stage trims further from the previous fine-tuned model
    first = stages[0]
    task = load_recipe("minilm_sentiment.yaml")  # the model, data and fine-tune the trimming recipe shares
    model, tokenizer, train_examples, dev_examples = text_classification_task(task, quick)
    return trimming_on_ffn(model, tokenizer, train_examples, dev_examples,
                           fractions=s.get("fractions", [stage.target_sparsity for stage in stages]),
                           finetune_steps=s.get("finetune_steps", first.retrain_steps),
                           calibration_samples=s.get("calibration_samples", first.calibration_samples),
                           dev_size=s["dev_size"], threshold=first.apoz_threshold, max_length=task.data.max_length,
                           seed=first.seed, batch_size=first.batch_size, learning_rate=first.learning_rate)


def minilm_lines(result: dict, quick: bool = False) -> list[str]:
    s = result["settings"]
    model = ("The synthetic tiny BERT (random weights) on random synthetic sentences" if quick else
             "The fine-tuned MiniLM sentiment classifier (the `make demo` model)")
    lines = [f"## Transformer variant: MiniLM-L6 FFN neurons (GELU, APoZ threshold {s['threshold']}: an extension "
             f"of the paper)", "",
             f"{model}; APoZ counts |GELU output| <= "
             f"{s['threshold']} as zero, over the real tokens of {s['calibration_samples']} training sentences. Hu et "
             f"al.'s iterations: each one, INC `network_trimming` prunes the FFN neurons (`intermediate.dense` rows) "
             f"with the highest APoZ in every layer of the previous iteration's fine-tuned model, up to the cumulative "
             f"fraction, then {s['finetune_steps']} fine-tuning steps (batch {s['batch_size']}, lr "
             f"{s['learning_rate']}) with the pruned neurons held at zero. Control: the same count of random neurons, "
             f"on a chain of its own. Dev accuracy on {result['dev_examples']} examples; dense "
             f"{result['dense_accuracy']:.4f}.", "",
             "| iteration | FFN neurons pruned | APoZ: pruned | APoZ: fine-tuned | random: pruned | random: fine-tuned |",
             "|---|---|---|---|---|---|"]

    def tuned(value):
        return "not run" if value is None else f"{value:.4f}"

    for row in result["rows"]:
        lines.append(f"| {row['iteration']} | {pct(row['fraction'])} | {row['apoz']['accuracy_pruned']:.4f} "
                     f"| {tuned(row['apoz']['accuracy_finetuned'])} | {row['random']['accuracy_pruned']:.4f} "
                     f"| {tuned(row['random']['accuracy_finetuned'])} |")
    lines += ["", f"APoZ distribution of the dense model's FFN neurons at threshold {s['threshold']}: "
              f"{result['apoz_quantiles']} (quantiles 10/50/90%).", ""]
    return lines


def minilm_plot(results: dict, path: Path) -> None:
    result = results["minilm"]
    fig, ax = figure(figsize=(6, 4))
    x = [1 - r["fraction"] for r in result["rows"]]
    for control, color in (("apoz", "C0"), ("random", "C1")):
        if result["settings"]["finetune_steps"] > 0:
            ax.plot(x, [r[control]["accuracy_finetuned"] for r in result["rows"]], marker="o", color=color,
                    label=f"{control}, fine-tuned")
        ax.plot(x, [r[control]["accuracy_pruned"] for r in result["rows"]], marker="o", color=color, linestyle=":",
                label=f"{control}, before fine-tuning")
    ax.axhline(result["dense_accuracy"], color="grey", linestyle="--", label="dense")
    ax.set(xlabel="FFN neurons remaining", ylabel="dev accuracy", title="Trimming MiniLM FFN (GELU threshold)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- main

RUNNERS = {
    "slimming": (run_slimming, slimming_markdown, slimming_plot),
    "trimming": (run_trimming, trimming_markdown, trimming_plot),
    "lottery": (run_lottery, lottery_markdown, lottery_plot),
    "particle_filter": (run_particle_filter, pf_markdown, pf_plot),
}


def minilm_markdown(results: dict) -> str:
    return "\n".join(header("Network trimming of MiniLM's FFN", results)
                     + minilm_lines(results["minilm"], results["run"]["quick"]))


def main(argv=None) -> int:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("methods", nargs="+", metavar="method", choices=(*METHODS, "all"),
                        help=f"one or more of {', '.join(METHODS)}, or all")
    parser.add_argument("--seeds", type=int, nargs="+", help="model/training seeds (digits; default: settings.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = study_settings(STUDY, args.quick)
    seeds = args.seeds or settings["seeds"]
    for method in METHODS if "all" in args.methods else dict.fromkeys(args.methods):
        run = StudyRun(STUDY, args.quick, args.out, argv, name=f"classic_{method}")
        if method == "minilm_trimming":
            results = {"minilm": run_minilm_trimming(settings[method], args.quick)}
            results["seeds"] = [results["minilm"]["settings"]["seed"]]
            markdown_fn, plot_fn = minilm_markdown, minilm_plot
        else:
            runner, markdown_fn, plot_fn = RUNNERS[method]
            results = runner(seeds, settings[method], args.quick)
            results["seeds"] = seeds
        run.write({"method": method, **results}, markdown_fn, plot_fn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
