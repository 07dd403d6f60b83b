"""LLM pruning quality: perplexity, pruning time and peak memory of magnitude, SparseGPT and Wanda on SmolLM2-135M.

    python -m benchmarks.llm_pruning_quality                       # the README table (about an hour on 2 cores)
    python -m benchmarks.llm_pruning_quality --calib-windows 8     # a quick look
    python -m benchmarks.llm_pruning_quality --compare-inc --settings 50% 2:4   # ours vs INC's prune_wanda

Calibration: random windows of the State of the Union speeches; evaluation: the first consecutive windows of Moby
Dick, so the two never overlap. Every (method, sparsity) runs in a fresh subprocess, so its peak memory is its own.

Pruning time excludes the blocks' forward passes (hooks included), as the Wanda paper measures it: what remains is
the pruning metric and the mask/weight update (SparseGPT's Hessian inversions and updates; Wanda's scores and sort).
"""

import argparse
import hashlib
import json
import math
import multiprocessing
import platform
import re
import time
from pathlib import Path

import torch

SETTINGS = {"50%": ("1x1", 0.5), "2:4": ("2:4", 0.5), "4:8": ("4:8", 0.5), "60%": ("1x1", 0.6)}
METHODS = ("magnitude", "sparse_gpt", "wanda")
DEFAULT_OUT = Path("benchmarks/results/llm_pruning_quality.json")


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


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


def magnitude_per_output(model, pattern: str, sparsity: float) -> None:
    """Baseline: |W| ranked within each output row (or within each group of M inputs for N:M)."""
    from inc_plugins.algorithms.nm_mask import nm_mask
    from inc_plugins.algorithms.wanda import per_output_mask

    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            scores = module.weight.detach().abs()
            if ":" in pattern:
                n, m = (int(v) for v in pattern.split(":"))
                keep = nm_mask(scores, n, m)
            else:
                keep = per_output_mask(scores, sparsity)
            module.weight.data[~keep] = 0


def _prune(model, method: str, pattern: str, sparsity: float, calibration) -> None:
    import inc_plugins

    if method == "magnitude":
        magnitude_per_output(model, pattern, sparsity)
        return
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": method, "pattern": pattern, "target_sparsity": sparsity, "op_names": ["model.layers"]}
    ])
    inc_plugins.prepare_pruning(model, config, dataloader=calibration)


def _load(args):
    from recipes.model_sources import load_causal_lm
    from recipes.text_corpora import moby_dick_text, sotu_text, token_windows

    model, tokenizer = load_causal_lm("smollm2-135m")
    calibration = token_windows(tokenizer, sotu_text(), args.calib_windows, args.calib_len, seed=args.seed)
    evaluation = token_windows(tokenizer, moby_dick_text(), args.eval_windows, args.eval_len)
    return model, [(window[None],) for window in calibration], evaluation


def run_one(method: str, setting: str, args) -> dict:
    """One configuration, meant to run in its own process."""
    from recipes.perplexity import perplexity

    torch.manual_seed(args.seed)
    model, calibration, evaluation = _load(args)
    result = {"method": method, "setting": setting}
    if method != "dense":
        pattern, sparsity = SETTINGS[setting]
        timer = BlockForwardTimer(model.model.layers)
        _reset_peak_rss()
        rss_before = _peak_rss_mb()
        start = time.perf_counter()
        _prune(model, method, pattern, sparsity, calibration)
        total = time.perf_counter() - start
        timer.remove()
        linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        result |= {
            "total_seconds": total,
            "prune_seconds": total - timer.seconds,
            "block_forward_seconds": timer.seconds,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_increase_mb": _peak_rss_mb() - rss_before,
            "sparsity": sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears),
        }
    result["perplexity"] = perplexity(model, evaluation, batch_size=args.eval_batch)
    return result


def run_inc_prune_wanda(setting: str, args) -> dict:
    """INC 3.7.1's own `prune_wanda` on the same model and data: wall time and a fingerprint of every mask."""
    from neural_compressor.compression.pruner.wanda.prune import prune_wanda

    model, calibration, _ = _load(args)
    pattern, sparsity = SETTINGS[setting]
    n, m = (int(v) for v in pattern.split(":")) if ":" in pattern else (0, 0)
    # INC's calibration helper reads `dataloader.batch_size`: the same windows, one per batch, as a DataLoader
    windows = torch.utils.data.TensorDataset(torch.cat([batch[0] for batch in calibration]))
    loader = torch.utils.data.DataLoader(windows, batch_size=1)
    start = time.perf_counter()
    prune_wanda(model, loader, sparsity_ratio=sparsity, prune_n=n, prune_m=m, nsamples=len(calibration))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "masks": _mask_fingerprints(model)}


def run_our_wanda(setting: str, args) -> dict:
    model, calibration, _ = _load(args)
    pattern, sparsity = SETTINGS[setting]
    start = time.perf_counter()
    _prune(model, "wanda", pattern, sparsity, calibration)
    return {"seconds": time.perf_counter() - start, "masks": _mask_fingerprints(model)}


def _mask_fingerprints(model) -> dict[str, str]:
    return {name: hashlib.sha256((m.weight != 0).numpy().tobytes()).hexdigest()
            for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def compare_with_inc(setting: str, args) -> dict:
    """Ours vs INC's `prune_wanda`, each in a fresh process, same model and calibration windows."""
    inc = run_isolated("inc_prune_wanda", setting, args)
    ours = run_isolated("our_wanda", setting, args)
    if "error" in inc or "error" in ours:
        return {"setting": setting, "inc": inc, "ours": ours}
    differing = sorted(name for name in ours["masks"] if ours["masks"][name] != inc["masks"].get(name))
    return {"setting": setting, "inc_seconds": inc["seconds"], "our_seconds": ours["seconds"],
            "speedup_vs_inc": inc["seconds"] / ours["seconds"], "layers": len(ours["masks"]),
            "layers_with_different_masks": differing}


def _child(queue, method, setting, args):
    runners = {"inc_prune_wanda": run_inc_prune_wanda, "our_wanda": run_our_wanda}
    try:
        queue.put(runners[method](setting, args) if method in runners else run_one(method, setting, args))
    except Exception as err:  # reported in the table, not swallowed
        queue.put({"method": method, "setting": setting, "error": f"{type(err).__name__}: {err}"})


def run_isolated(method: str, setting: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, method, setting, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def machine_info() -> dict:
    from recipes.report import cpu_features

    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_features": cpu_features()}


def markdown_table(results: list[dict]) -> str:
    dense = next(r for r in results if r["method"] == "dense")
    lines = [f"Dense perplexity: {dense['perplexity']:.2f}", "",
             "| sparsity | method | perplexity | pruning time (s) | total time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r["method"] == "dense":
            continue
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['method']} | failed: {r['error']} | | | |")
            continue
        ppl = r["perplexity"]
        lines.append(f"| {r['setting']} | {r['method']} | {ppl:.2f} | {r['prune_seconds']:.2f} | "
                     f"{r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} |" if math.isfinite(ppl) else
                     f"| {r['setting']} | {r['method']} | inf | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_pruning_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--compare-inc", action="store_true",
                        help="instead: time our Wanda against INC's prune_wanda and compare their masks")
    args = parser.parse_args(argv)

    if args.compare_inc:
        comparisons = [compare_with_inc(setting, args) for setting in args.settings]
        from recipes.atomic import write_json

        write_json(args.out.with_name("wanda_vs_inc.json"), {"machine": machine_info(), "comparisons": comparisons})
        print(json.dumps(comparisons, indent=2))
        return 0
    results = [run_isolated("dense", "dense", args)]
    for setting in args.settings:
        for method in args.methods:
            results.append(run_isolated(method, setting, args))
            print(json.dumps(results[-1]), flush=True)
    from recipes.atomic import write_json, write_text

    write_json(args.out, {"machine": machine_info(), "arguments": {k: str(v) for k, v in vars(args).items()},
                          "results": results})
    table = markdown_table(results)
    write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
