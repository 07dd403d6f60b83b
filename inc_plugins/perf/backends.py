"""Inference backends behind one small interface: `backend.prepare(model, example_inputs)` returns `run(inputs)`.

The one registry of the project's backends: the benchmark suites, the recipes' `benchmark:` stage and the latency
tables (`inc_plugins.perf.layer_latency`, which records a backend's `name`) all pick from `BACKENDS`.

Every backend has a `name`, a `dtype`, the `settings` it applies (recorded with each measurement) and an
`availability()` that says whether it can run in this environment and, if not, why. A backend that cannot run is
reported as unavailable with that reason; `prepare` refuses it with `BackendUnavailable` instead of running
something else.

`run(inputs)` takes the model's keyword inputs (`input_ids`, `attention_mask`) and returns the logits as an fp32
tensor, so outputs of every backend can be compared with eager fp32.

The int8 backends (`openvino-int8-fp32`, `openvino-int8-bf16`: static int8 matmuls by NNCF, the other operations in
fp32 or bf16) quantize the model in `prepare`, calibrated on the `calibration` batches it is given (the recipe's
quantize-stage samples, so the timed graph is the one that was evaluated) or else on the timed inputs themselves: an
int8 graph's speed does not depend on its ranges, its accuracy does, and accuracy is measured elsewhere.

`prepare_module(module)` prepares one module (a transformer layer) to be called with its own arguments, for
backends that can time a lone layer (`LAYER_BACKENDS`). Only eager fp32 can so far: inductor would compile one code
object per layer size, and past dynamo's recompile limit (8) silently fall back to eager, so an inductor layer
backend must call `torch._dynamo.reset()` per size (and keep warm-up >= 1 so compilation is not timed); OpenVINO
exports whole token models only.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import openvino as ov
import torch
from torch import nn

from inc_plugins.deploy.int8_nncf import quantize_ir_int8
from inc_plugins.deploy.openvino_conversion import convert_to_openvino
from inc_plugins.deploy.openvino_model import OpenVINOTokenModel

from .machine import cpu_description

Runner = Callable[[dict], torch.Tensor]
Calibration = list[dict]  # model-input batches ({name: [batch, sequence] tensor}) an int8 backend calibrates on


class BackendUnavailable(RuntimeError):
    """Raised by `Backend.prepare` for a backend that cannot run here; the message says why."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not; or, when available, what provides it (package versions)


@dataclass(frozen=True)
class Backend:
    name: str  # e.g. "inductor-freezing"
    dtype: str  # "fp32" or "bf16" (of an int8 backend: of the operations left in floating point)
    settings: dict = field(hash=False)
    check: Callable[[], Availability] = field(hash=False, repr=False)
    # (model, example inputs, calibration batches or None) -> runner; only int8 backends read the calibration
    build: Callable[[nn.Module, dict, Calibration | None], Runner] = field(hash=False, repr=False)
    # one module -> a callable with the module's own signature; None: this backend runs whole token models only
    build_module: Callable[[nn.Module], Callable[..., object]] | None = field(default=None, hash=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.dtype}"

    def availability(self) -> Availability:
        return self.check()

    def prepare(self, model: nn.Module, example_inputs: dict, calibration: Calibration | None = None) -> Runner:
        """A callable that runs `model` on this backend; compiling/exporting (and, for int8, quantizing on
        `calibration`, default the example) happens here, for the example's shapes."""
        availability = self.availability()
        if not availability.available:
            raise BackendUnavailable(f"backend {self.id} is unavailable: {availability.reason}")
        return self.build(model.eval(), example_inputs, calibration)

    def prepare_module(self, module: nn.Module) -> Callable[..., object]:
        """A callable that runs `module` (e.g. one transformer layer) on this backend with its own arguments."""
        if self.build_module is None:
            raise BackendUnavailable(f"backend {self.id} runs whole token models only, not a single module; "
                                     f"layer backends: {', '.join(LAYER_BACKENDS)}")
        availability = self.availability()
        if not availability.available:
            raise BackendUnavailable(f"backend {self.id} is unavailable: {availability.reason}")
        return self.build_module(module.eval())


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _torch_available() -> Availability:
    return Availability(True, f"torch {torch.__version__}")


def native_bf16(flags: dict[str, bool]) -> Availability:
    """bf16 runs anywhere through autocast, but without AVX512-BF16 or AMX-BF16 it is emulated and slow: refuse it
    then, so no emulated number is ever reported as a bf16 result."""
    present = [flag for flag in ("avx512_bf16", "amx_bf16") if flags.get(flag)]
    if not present:
        return Availability(False, "this CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated")
    return Availability(True, f"torch {torch.__version__}, native bf16 ({', '.join(present)})")


@cache
def _bf16_available() -> Availability:
    return native_bf16(cpu_description()["flags"])


def _all_of(*checks: Callable[[], Availability]) -> Callable[[], Availability]:
    def check() -> Availability:
        results = [c() for c in checks]
        missing = [r.reason for r in results if not r.available]
        return Availability(not missing, "; ".join(missing) if missing else "; ".join(r.reason for r in results))

    return check


def _logits(output) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    return logits.float()


# ------------------------------------------------------------------------------------------------ eager, inductor


def _eager(autocast: bool) -> Callable[..., Runner]:
    def build(model: nn.Module, example_inputs: dict, calibration: Calibration | None = None) -> Runner:
        def run(inputs: dict) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return _logits(model(**inputs))

        return run

    return build


def _module_as_is(module: nn.Module) -> Callable[..., object]:
    return module


def _inductor(compile_kwargs: dict, autocast: bool) -> Callable[..., Runner]:
    def build(model: nn.Module, example_inputs: dict, calibration: Calibration | None) -> Runner:
        # every model and shape compiles the same forward code objects: past dynamo's recompile limit (8) it would
        # silently fall back to eager, and the benchmark would time eager under an inductor label
        for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 1024))
        compiled = torch.compile(model, backend="inductor", dynamic=False, **compile_kwargs)
        run = _eager(autocast)(compiled, example_inputs)
        run(example_inputs)  # compile now, not inside the first timed call
        return run

    return build


# ------------------------------------------------------------------------------------------------------------ IPEX


@cache
def _ipex_available() -> Availability:
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return Availability(False, f"intel_extension_for_pytorch is not installed in this environment (torch "
                                   f"{torch.__version__}); IPEX 2.8 needs torch 2.8 and lives in its own "
                                   f"environment: make ipex-env, then run the suite with that environment's python")
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as error:  # a torch/IPEX version mismatch fails in many ways at import
        return Availability(False, f"import intel_extension_for_pytorch failed with torch {torch.__version__}: "
                                   f"{type(error).__name__}: {str(error)[:200]}")
    return Availability(True, f"intel_extension_for_pytorch {ipex.__version__}, torch {torch.__version__}")


def _ipex(dtype: torch.dtype) -> Callable[..., Runner]:
    def build(model: nn.Module, example_inputs: dict, calibration: Calibration | None) -> Runner:
        import intel_extension_for_pytorch as ipex

        # ipex.optimize rewrites weights in place (prepacking): work on a copy, the caller's model stays usable
        optimized = ipex.optimize(copy.deepcopy(model), dtype=dtype, inplace=True)
        return _eager(dtype == torch.bfloat16)(optimized, example_inputs)

    return build


# -------------------------------------------------------------------------------------------------------- OpenVINO


def _openvino_available() -> Availability:
    return Availability(True, f"openvino {_version('openvino')}")  # a dependency of the project


@cache
def _openvino_bf16_available() -> Availability:
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        return Availability(False, f"OpenVINO's CPU plugin reports no BF16 capability (has: {', '.join(capabilities)})")
    return Availability(True, f"OpenVINO CPU capabilities: {', '.join(capabilities)}")


def _token_inputs(inputs: dict) -> dict:
    return {name: inputs[name] for name in ("input_ids", "attention_mask")}


def _compiled_runner(converted: ov.Model, precision: str, example_inputs: dict) -> Runner:
    compiled = OpenVINOTokenModel(ov.Core().compile_model(converted, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()}))

    def run(inputs: dict) -> torch.Tensor:
        return compiled(**_token_inputs(inputs)).logits

    run(example_inputs)
    return run


def _openvino(precision: str) -> Callable[..., Runner]:
    def build(model: nn.Module, example_inputs: dict, calibration: Calibration | None) -> Runner:
        # specialised to the timed shape, as the other backends compile for it
        return _compiled_runner(convert_to_openvino(model, _token_inputs(example_inputs), dynamic=False), precision,
                                example_inputs)

    return build


def _openvino_int8(precision: str) -> Callable[..., Runner]:
    def build(model: nn.Module, example_inputs: dict, calibration: Calibration | None) -> Runner:
        tokens = _token_inputs(example_inputs)
        # converted with free shapes, as the quantize stage does (calibration samples differ in length), then fixed to
        # the timed shape like the float backends; a free batch needs an example of at least two rows
        converted = convert_to_openvino(model, {name: tensor.repeat(2, 1) for name, tensor in tokens.items()})
        batches = calibration if calibration is not None else [tokens]
        quantized = quantize_ir_int8(converted, [_token_inputs(batch) for batch in batches])
        quantized.reshape({name: list(tensor.shape) for name, tensor in tokens.items()})
        return _compiled_runner(quantized, precision, example_inputs)

    return build


# -------------------------------------------------------------------------------------------------------- registry

_OPENVINO_EXPORT = ("inc_plugins.deploy.convert_to_openvino (torch.export.export + openvino.convert_model): optimum-intel's from_pretrained export rebuilds "
                    "the model from its config, which cannot describe a slimmed model's per-layer sizes, so every "
                    "model (dense and pruned) takes this one path")

_INT8 = ("inc_plugins.deploy.quantize_ir_int8 (nncf.quantize, transformer preset: int8 weights per output channel and "
         "int8 activations; VNNI or AMX int8 where the CPU has them), calibrated on the calibration batches passed to "
         "prepare, else on the timed inputs")

BACKENDS: dict[str, Backend] = {b.id: b for b in (
    Backend("eager", "fp32", {}, _torch_available, _eager(autocast=False), build_module=_module_as_is),
    Backend("eager", "bf16", {"autocast": "torch.autocast('cpu', dtype=torch.bfloat16)"},
            _bf16_available, _eager(autocast=True)),
    Backend("inductor", "fp32", {"backend": "inductor", "mode": "default", "dynamic": False},
            _torch_available, _inductor({}, autocast=False)),
    Backend("inductor-freezing", "fp32", {"backend": "inductor", "options": {"freezing": True}, "dynamic": False},
            _torch_available, _inductor({"options": {"freezing": True}}, autocast=False)),
    Backend("inductor-max-autotune", "fp32", {"backend": "inductor", "mode": "max-autotune", "dynamic": False},
            _torch_available, _inductor({"mode": "max-autotune"}, autocast=False)),
    Backend("inductor", "bf16", {"backend": "inductor", "mode": "default", "dynamic": False, "autocast": "bf16"},
            _bf16_available, _inductor({}, autocast=True)),
    Backend("ipex", "fp32", {"ipex.optimize": {"dtype": "float32"}}, _ipex_available, _ipex(torch.float32)),
    Backend("ipex", "bf16", {"ipex.optimize": {"dtype": "bfloat16"}, "autocast": "bf16"},
            _all_of(_ipex_available, _bf16_available), _ipex(torch.bfloat16)),
    Backend("openvino", "fp32", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                 "export": _OPENVINO_EXPORT}, _openvino_available, _openvino("f32")),
    Backend("openvino", "bf16", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                 "export": _OPENVINO_EXPORT}, _openvino_bf16_available, _openvino("bf16")),
    Backend("openvino-int8", "fp32", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                      "export": _OPENVINO_EXPORT, "quantization": _INT8},
            _openvino_available, _openvino_int8("f32")),
    Backend("openvino-int8", "bf16", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                      "export": _OPENVINO_EXPORT, "quantization": _INT8},
            _openvino_bf16_available, _openvino_int8("bf16")),
)}

LAYER_BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(b.name for b in BACKENDS.values() if b.build_module))
"""Backend names that can time a lone transformer layer (a latency table records the name; its dtype is the
model's)."""

# What a plain `pytest benchmarks/` runs: one of each kind. The other inductor modes compile for minutes per model
# and shape on a small machine, so they are asked for by name (or with "all").
DEFAULT_BACKENDS = ("eager-fp32", "eager-bf16", "inductor-fp32", "ipex-fp32", "ipex-bf16", "openvino-fp32",
                    "openvino-bf16")


# "fastest": the first of these that can run here. OpenVINO bf16 and eager bf16 need native bf16 (AVX512-BF16 or
# AMX); eager fp32 runs everywhere.
FASTEST_ORDER = ("openvino-bf16", "eager-bf16", "eager-fp32")


def fastest_backend() -> Backend:
    """The first available backend of FASTEST_ORDER: what a user of this environment would deploy on."""
    return next(BACKENDS[name] for name in FASTEST_ORDER if BACKENDS[name].availability().available)


def select_backends(spec: str) -> list[Backend]:
    """Backends named in a comma-separated `spec` ("all" for every one, "default" for DEFAULT_BACKENDS, "fastest" for
    `fastest_backend()`), in registry order."""
    named = {"all": list(BACKENDS), "default": list(DEFAULT_BACKENDS)}
    names = named.get(spec.strip()) or [name.strip() for name in spec.split(",") if name.strip()]
    names = [fastest_backend().id if name == "fastest" else name for name in names]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"unknown backend(s) {unknown or spec!r}: choose from {', '.join(BACKENDS)}, 'default', "
                         f"'fastest' or 'all'")
    return [BACKENDS[name] for name in BACKENDS if name in names]


def layer_backend(name: str, dtype: str) -> Backend:
    """The backend that times a lone layer of a `dtype` ("fp32", "bf16") model under backend `name` ("eager")."""
    if name not in LAYER_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(LAYER_BACKENDS)}")
    backend = BACKENDS.get(f"{name}-{dtype}")
    if backend is None or backend.build_module is None:
        offered = [b.id for b in BACKENDS.values() if b.name == name and b.build_module]
        raise ValueError(f"backend {name!r} cannot time a {dtype} layer; it times {', '.join(offered)}")
    return backend


def availability_table(backends: list[Backend] | None = None) -> dict[str, dict]:
    """{backend id: {available, reason, dtype, settings}} for machine info and reports."""
    return {b.id: {"available": (a := b.availability()).available, "reason": a.reason, "dtype": b.dtype,
                   "settings": b.settings} for b in (backends or BACKENDS.values())}
