"""Produce the README's benchmark figures in one command: every suite on MiniLM, in the main environment and in
the IPEX environment, then the report.

    python -m benchmarks.suites.readme_figures          # writes benchmarks/results/bench_*.json, bench.md, bench.png

Phases (each a pytest-benchmark run with its own JSON file; `python -m benchmarks.suites.report` reads them
together):

* eager:     eager fp32 and bf16, every variant, the full grid (batch 1/8/32 x seq 64/128);
* compiled:  inductor fp32 and OpenVINO fp32/bf16, every variant, batch 32 x 128;
* costs:     the cost of each pruner, and torch.sparse CSR vs dense matmul;
* ipex:      in the IPEX environment (torch 2.8): eager fp32/bf16 and ipex.optimize fp32/bf16, batch 32 x 128;
* inductor modes: inductor bf16, with freezing and with max-autotune, dense vs slimmed, batch 32 x 128.

It took 15 minutes on the project's 2-core machine (2026-12-01). Run it on a quiet machine, and not under `nice`:
the timings would measure the scheduler. A phase that fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.suites.pruned_models import MINILM_DIR_ENV, finetuned_minilm_dir
from benchmarks.suites.report import main as report

RESULTS_DIR = Path("benchmarks/results")
INFERENCE = "benchmarks/suites/test_inference.py"
PHASES = (  # (name, runs in the IPEX environment, pytest arguments); the slowest to compile last
    ("eager", False, [INFERENCE, "--bench-backends", "eager-fp32,eager-bf16", "--bench-grid", "full"]),
    ("compiled", False, [INFERENCE, "--bench-backends", "inductor-fp32,openvino-fp32,openvino-bf16",
                         "--bench-grid", "32x128"]),
    ("costs", False, ["benchmarks/suites/test_pruning_cost.py", "benchmarks/suites/test_sparse_matmul.py"]),
    ("ipex", True, [INFERENCE, "--bench-backends", "eager-fp32,eager-bf16,ipex-fp32,ipex-bf16", "--bench-grid", "32x128"]),
    ("inductor_modes", False, [INFERENCE, "--bench-backends",
                               "inductor-bf16,inductor-freezing-fp32,inductor-max-autotune-fp32",
                               "--bench-grid", "32x128", "--bench-variants", "dense,slim40"]),
)


def default_ipex_python() -> Path:
    cache = Path(os.environ.get("INC_PLUGINS_CACHE") or Path.home() / ".cache" / "inc-plugins")
    return Path(os.environ.get("IPEX_VENV") or cache / "venv-ipex") / "bin" / "python"


def run_phase(name: str, python: Path, arguments: list[str], out_dir: Path, scale: str) -> Path | None:
    """Runs one phase; returns its JSON file, moved into place only when pytest succeeded."""
    final = out_dir / f"bench_{name}.json"
    partial = out_dir / f".bench_{name}.json.partial"
    command = [str(python), "-m", "pytest", *arguments, "-p", "no:cacheprovider", "-q", "-rs",
               "--bench-scale", scale, "--benchmark-json", str(partial)]
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command)
    print(f"[{name}] exit {done.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        return None
    partial.replace(final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.readme_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--ipex-python", type=Path, default=default_ipex_python(),
                        help="python of the IPEX environment (default: $IPEX_VENV or ~/.cache/inc-plugins/venv-ipex)")
    parser.add_argument("--phases", nargs="+", choices=[p[0] for p in PHASES], default=[p[0] for p in PHASES])
    parser.add_argument("--scale", choices=("tiny", "minilm"), default="minilm", help="tiny: a quick check of this command")
    parser.add_argument("--eager-grid", default="full", help="shapes of the eager phase (--bench-grid; default full)")
    parser.add_argument("--note", help="a sentence for the report's machine section, e.g. how busy the machine was "
                                       "(the load averages at start and end are always reported)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.scale == "minilm" and MINILM_DIR_ENV not in os.environ:
        # the IPEX environment's fine-tune cache key differs (torch 2.8): hand it this environment's model
        if (finetuned := finetuned_minilm_dir()) is not None:
            os.environ[MINILM_DIR_ENV] = str(finetuned)
    written, failed = [], []
    for name, in_ipex_env, arguments in PHASES:
        if name not in args.phases:
            continue
        python = args.ipex_python if in_ipex_env else Path(sys.executable)
        if in_ipex_env and not python.is_file():
            print(f"[{name}] skipped: no IPEX environment at {python} (make ipex-env, or set IPEX_VENV)", flush=True)
            failed.append(name)
            continue
        if name == "eager":
            arguments = [*arguments, "--bench-grid", args.eager_grid]  # the last --bench-grid given wins
        result = run_phase(name, python, arguments, args.out_dir, args.scale)
        (written if result else failed).append(result or name)
    if written:
        report([*map(str, written), "--md", str(args.out_dir / "bench.md"), "--png", str(args.out_dir / "bench.png"),
                *(["--note", args.note] if args.note else [])])
        print(f"wrote {', '.join(map(str, written))}, {args.out_dir / 'bench.md'}, {args.out_dir / 'bench.png'}")
    if failed:
        print(f"phases that failed or did not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
