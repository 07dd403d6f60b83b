"""Streaming pruning at LLM scale: peak memory and seconds per block of ``inc_plugins.prune_checkpoint`` on a
checkpoint larger than what the process may hold, with the output's sparsity read back tensor by tensor.

    python -m benchmarks.studies.streaming_memory --make-synthetic runs/llama7b_synthetic   # ~13.5 GB bf16, random
    python -m benchmarks.studies.streaming_memory --model runs/llama7b_synthetic            # Wanda 50%, 16 x 128
    python -m benchmarks.studies.streaming_memory --quick                                   # a tiny synthetic model

The 7B-shaped model (hidden 4096, 32 blocks, 32 query / 8 key-value heads, intermediate 14336, vocab 32000) has
random weights (``inc_plugins.perf.synthetic_checkpoint``): it measures memory and time, never quality. Calibration
is random token ids (seeded). The pruning runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own; the
results record the RSS after imports too. Time it alone: nothing else may run beside it.

Writes <out>/streaming_memory.{json,md} (--quick: streaming_memory_quick.*).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from neural_compressor import WeightPruningConfig

import inc_plugins
from benchmarks.studies.common import StudyRun, machine_line, study_parser, study_settings
from inc_plugins.models.safetensors_checkpoint import CheckpointReader
from inc_plugins.perf.memory import peak_rss_bytes
from inc_plugins.perf.synthetic_checkpoint import LLAMA_7B_SHAPE, write_synthetic_llama_checkpoint

STUDY = "streaming_memory"
PRUNED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


def _prune_in_this_process(model: str, output: str, settings: dict) -> dict:
    """Runs in a fresh process (which imports this module first): prune the checkpoint, report memory and time."""
    after_imports = peak_rss_bytes() / 2**20
    vocab = CheckpointReader(model).shape("model.embed_tokens.weight")[0]
    generator = torch.Generator().manual_seed(settings["seed"])
    batches = [(torch.randint(0, vocab, (1, settings["calib_len"]), generator=generator),)
               for _ in range(settings["calib_windows"])]
    config = WeightPruningConfig(pruning_type=settings["pruning_type"], target_sparsity=settings["sparsity"],
                                 pattern=settings["pattern"])
    start = time.perf_counter()
    run = inc_plugins.prune_checkpoint(model, output, config, dataloader=batches)
    return {"seconds": time.perf_counter() - start, "seconds_per_block": run.seconds_per_block,
            "dtype": run.dtype, "peak_rss_mb": peak_rss_bytes() / 2**20, "rss_after_imports_mb": after_imports,
            "layers": len(run.result.layer_sparsity)}


def output_sparsity(output: Path) -> dict:
    """The pruned layers' sparsity read back one tensor at a time (the output is never loaded whole)."""
    reader = CheckpointReader(output)
    zeros = total = 0
    per_layer = []
    for name in reader.names:
        if name.endswith(PRUNED_SUFFIXES):
            tensor = reader.read([name])[name]
            layer_zeros = int((tensor == 0).sum())
            per_layer.append(layer_zeros / tensor.numel())
            zeros, total = zeros + layer_zeros, total + tensor.numel()
    return {"pruned_layers": len(per_layer), "sparsity": zeros / total, "min_layer": min(per_layer),
            "max_layer": max(per_layer), "output_bytes": sum(p.stat().st_size for p in output.iterdir())}


def _markdown(results: dict) -> str:
    r, s = results["run_result"], results["output"]
    per_block = r["seconds_per_block"]
    return "\n".join([
        f"# Streaming pruning: {results['model']['name']}", "",
        f"{results['model']['note']} Command: `{results['run']['command']}`.", "",
        machine_line(results), "",
        "| what | value |", "|---|---|",
        f"| model | {results['model']['parameters'] / 1e9:.2f} B parameters, {results['model']['bytes'] / 2**30:.2f} GiB "
        f"on disk ({r['dtype']}), {results['model']['blocks']} blocks |",
        f"| pruning | {results['settings']['pruning_type']} {results['settings']['sparsity']:.0%} "
        f"({results['settings']['pattern']}), {results['settings']['calib_windows']} x "
        f"{results['settings']['calib_len']} calibration tokens |",
        f"| peak RSS | {r['peak_rss_mb'] / 1024:.2f} GiB (after imports: {r['rss_after_imports_mb'] / 1024:.2f} GiB) |",
        f"| time | {r['seconds']:.0f} s total; per block median {sorted(per_block)[len(per_block) // 2]:.1f} s, "
        f"min {min(per_block):.1f} s, max {max(per_block):.1f} s |",
        f"| output | {s['pruned_layers']} pruned layers read back one tensor at a time: sparsity {s['sparsity']:.4f} "
        f"(per layer {s['min_layer']:.4f}..{s['max_layer']:.4f}); {s['output_bytes'] / 2**30:.2f} GiB |", ""])


def main(argv: list[str] | None = None) -> dict | None:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--model", type=Path, help="checkpoint directory to prune (default with --quick: a tiny "
                                                   "synthetic one)")
    parser.add_argument("--make-synthetic", type=Path, metavar="DIR",
                        help="write the 7B-shaped random-weight bf16 checkpoint into DIR and stop")
    args = parser.parse_args(argv)
    if args.make_synthetic is not None:
        start = time.perf_counter()
        write_synthetic_llama_checkpoint(args.make_synthetic, LLAMA_7B_SHAPE)
        print(f"wrote {args.make_synthetic} in {time.perf_counter() - start:.0f} s")
        return None
    settings = study_settings(STUDY, args.quick)
    run = StudyRun(STUDY, args.quick, args.out, argv)
    with tempfile.TemporaryDirectory(prefix="streaming_memory_") as scratch:
        model = args.model
        if model is None:
            if not args.quick:
                parser.error("--model is required (make the 7B-shaped one with --make-synthetic DIR)")
            model = write_synthetic_llama_checkpoint(Path(scratch) / "model", settings["quick_shape"])
        reader = CheckpointReader(model)
        parameters = sum(torch.Size(reader.shape(n)).numel() for n in reader.names)
        disk = sum((Path(model) / f).stat().st_size for f in {reader.shard_of(n) for n in reader.names})
        output = Path(scratch) / "pruned"
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            result = pool.apply(_prune_in_this_process, (str(model), str(output), settings))
        run.mark("after_pruning")
        synthetic = (Path(model) / "SYNTHETIC.txt").is_file()
        results = {
            "model": {"name": Path(model).name, "parameters": parameters, "bytes": disk,
                      "blocks": len(result["seconds_per_block"]), "synthetic": synthetic,
                      "note": ("Synthetic random weights: memory and time only, never quality." if synthetic
                               else "A real checkpoint.")},
            "settings": settings, "run_result": result, "output": output_sparsity(output)}
    return run.write(results, _markdown)


if __name__ == "__main__":
    main()
