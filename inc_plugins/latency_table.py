"""Latency lookup tables of one Transformer layer on this CPU, for the latency-constrained mask search: the command.

    python -m inc_plugins.latency_table measure --model minilm-l6 --batch-size 8 --seq-len 128
    python -m inc_plugins.latency_table show ~/.cache/inc-plugins/latency/<file>.json

What a table holds and how it is checked against a machine: ``inc_plugins.perf.latency_table``; how it is measured:
``inc_plugins.perf.layer_latency``. This module is the command, and the one import path for code that uses tables
(it names the functions of both).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from inc_plugins.assets import ASSETS, asset_path
from inc_plugins.perf.backends import LAYER_BACKENDS
from inc_plugins.perf.latency_table import (
    FORMAT_VERSION,
    LatencyTable,
    LatencyTableMismatchError,
    check_machine,
    current_machine,
    default_table_path,
    load_latency_table,
    save_latency_table,
)
from inc_plugins.perf.layer_latency import describe_model, measure_latency_table
from inc_plugins.perf.synthetic import synthetic_bert_config, synthetic_llama_config

__all__ = ["FORMAT_VERSION", "LatencyTable", "LatencyTableMismatchError", "check_machine", "current_machine",
           "default_table_path", "describe_model", "load_latency_table", "measure_latency_table", "main",
           "save_latency_table"]

SYNTHETIC_CONFIGS = {"tiny-bert": synthetic_bert_config, "tiny-llama": synthetic_llama_config}


def _model_for_measuring(name: str, attn_implementation: str) -> nn.Module:
    """A one-layer model with `name`'s architecture and random weights (latency does not depend on the values).

    name: an asset ("minilm-l6", "smollm2-135m"), a synthetic tiny architecture ("tiny-bert", "tiny-llama":
    ``inc_plugins.perf.synthetic``), or a directory holding a transformers config.json.
    """
    if name in SYNTHETIC_CONFIGS:
        config = SYNTHETIC_CONFIGS[name]()
    elif name in ASSETS:
        directory = asset_path(name)
        ggufs = sorted(directory.glob("*.gguf"))
        config = AutoConfig.from_pretrained(directory, gguf_file=ggufs[0].name) if ggufs else AutoConfig.from_pretrained(directory)
    elif Path(name).is_dir():
        config = AutoConfig.from_pretrained(name)
    else:
        raise SystemExit(f"unknown model {name!r}: give an asset ({', '.join(ASSETS)}), "
                         f"{', '.join(SYNTHETIC_CONFIGS)} or a directory")
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    return AutoModel.from_config(config, attn_implementation=attn_implementation).eval()


def _width_range(text: str) -> range:
    """'FIRST:LAST' -> range(FIRST, LAST + 1), both >= 1."""
    first, _, last = text.partition(":")
    if not (first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST with 1 <= FIRST <= LAST (e.g. 64:192), got {text!r}")
    return range(int(first), int(last) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inc_plugins.latency_table", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="measure a table for one layer of a model on this machine")
    measure.add_argument("--model", required=True,
                         help=f"asset name, {' or '.join(SYNTHETIC_CONFIGS)} (synthetic), or a model directory")
    measure.add_argument("--batch-size", type=int, default=1)
    measure.add_argument("--seq-len", type=int, default=128)
    measure.add_argument("--backend", default="eager", choices=sorted(LAYER_BACKENDS))
    measure.add_argument("--repeats", type=int, default=10)
    measure.add_argument("--warmup", type=int, default=2)
    measure.add_argument("--head-step", type=int, default=1, help="measure every k-th head (kv group) count")
    measure.add_argument("--neuron-step", type=int, default=64, help="measure every k-th FFN neuron count")
    measure.add_argument("--neuron-widths", type=_width_range, default=(), metavar="FIRST:LAST",
                         help="also measure every FFN neuron count from FIRST to LAST (the steps that width_multiple "
                              "'auto' reads, e.g. 64:192)")
    measure.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    measure.add_argument("--attn-implementation", default="sdpa", choices=("eager", "sdpa"))
    measure.add_argument("--output", type=Path, default=None, help="default: the per-machine file in the cache")
    show = commands.add_parser("show", help="summarise a table and check it against this machine")
    show.add_argument("path", type=Path)
    show.add_argument("--threads", type=int, default=None, help="compare against this thread count")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "show":
        table = load_latency_table(args.path)
        print(json.dumps({"machine": table.machine, "model": table.model}, indent=1))
        print(f"heads 0..{len(table.head_latency) - 1}: {table.head_latency[0] * 1e3:.3f} .. "
              f"{table.head_latency[-1] * 1e3:.3f} ms; neurons 0..{len(table.neuron_latency) - 1}: "
              f"+{table.neuron_latency[-1] * 1e3:.3f} ms at full width")
        try:
            check_machine(table, current_machine(table.machine.get("backend", "eager")))
            print("matches this machine")
        except LatencyTableMismatchError as error:
            print(f"does not match this machine: {error}")
        return 0

    model = _model_for_measuring(args.model, args.attn_implementation)
    table = measure_latency_table(
        model, batch_size=args.batch_size, seq_len=args.seq_len, backend=args.backend, repeats=args.repeats,
        warmup=args.warmup, head_step=args.head_step, neuron_step=args.neuron_step, neuron_widths=args.neuron_widths,
    )
    print(save_latency_table(table, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
