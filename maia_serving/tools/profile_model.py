"""`maia-serving profile`: a model run once on the maia device, its operators then priced on each profile asked for.

One run records every operator with its shapes (maia_serving.torch's ledger) and the memory the chip held at its
peak; the same record priced on Maia 100, Maia 200 or an H100 says what one forward (or training step) takes
there, where the time goes and whether it fits. The run's node is sized to hold anything the host can, so a model
too large for a profile is measured, not cut short, and told what would fit.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.formats.units import format_bytes
from maia_serving.ops.fp8 import TORCH_DTYPES
from maia_serving.tools.fp8_model import Fp8Error, compare, to_fp8
from maia_serving.zoo import Example, builtin, main_output

TOP_OPS = 10


@dataclass(frozen=True)
class TopOp:
    op: str
    calls: int
    time_ms: float
    share: float
    bound: str


@dataclass(frozen=True)
class Measured:
    """What the run on maia saw, independent of the profile: its operators (a finished ``profile`` block), the
    chip memory at the peak, the weights' (and optimizer state's) share of it, the outputs."""

    block: Any  # maia_serving.torch.profile
    peak_memory_bytes: int
    resident_bytes: int  # weights, inputs (and gradients and optimizer state when training) before the step
    outputs: Any
    unit: str
    batch: int


@dataclass(frozen=True)
class ProfileReport:
    """One profile's answer (``--json`` writes these keys)."""

    profile: str
    fits: bool
    error: str | None
    latency_ms: float
    throughput_per_s: float
    peak_memory_bytes: int
    hbm_bytes: int
    flops: float
    bytes: float
    top_ops: list[TopOp]
    where: str
    fp8_error: Fp8Error | None = None  # --dtype fp8: its outputs against BF16's on the same input

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_example(spec: str, batch: int, shape: int | None, meta: bool = False) -> Example:
    """A built-in name, an ONNX file, or ``module:callable`` returning ``(module, inputs)`` (inputs: a tensor or a
    tuple); with ``meta``, built on PyTorch's meta device (shapes only, no memory)."""
    if meta and spec.endswith(".onnx"):  # the file's weights are read, then left: shapes are what is priced
        example = load_example(spec, batch, shape)
        inputs = tuple(t.to("meta") for t in example.inputs)
        return replace(example, module=example.module.to("meta"), inputs=inputs)
    if meta:
        with torch.device("meta"):
            return load_example(spec, batch, shape)
    if spec.endswith(".onnx"):
        from maia_serving import onnx_import

        graph = onnx_import.load(spec)
        inputs, batch = onnx_import.example_inputs(graph, batch, shape)
        return Example(graph.eval(), inputs, "inputs", batch)
    if ":" not in spec:
        return builtin(spec).build(batch, shape)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
    try:
        made = factory()
    except Exception as exc:  # the user's code: any failure is theirs to see
        raise ValueError(f"--model {spec}: {attr}() raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
        raise ValueError(f"--model {spec}: {attr}() must return (nn.Module, example input), not {type(made).__name__}")
    module, inputs = made
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    return Example(module.eval(), inputs, "inputs", first.shape[0] if first is not None and first.dim() else 1)


def _to(value: Any, device: str, dtype: torch.dtype) -> Any:
    """Tensors to ``device``; floating ones in ``dtype`` (token ids and masks keep theirs); in tuples, lists and
    dicts (a model output's fields) too. Anything else is dropped (None): a KV cache object, say, would keep
    its maia tensors alive."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value if isinstance(value, (int, float, bool, str)) or value is None else None


def measuring_node(profile: DeviceProfile) -> contextlib.AbstractContextManager[DeviceProfile]:
    """The maia node sized as ``profile`` but with room for whatever the host holds: the run measures the peak
    rather than stop at a capacity, and each profile's capacity is compared with it afterwards. The node is
    sized as it was before, after (``measure`` hands the module back on the CPU)."""
    import maia_serving.torch as maia

    return maia.sized_as(replace(profile, hbm_capacity_bytes=float(2**50)))


def measure(example: Example, dtype: torch.dtype, train: bool = False, cast: bool = True) -> Measured:
    """Run ``example`` once on maia:0 (forward; with ``train``, forward, backward and an AdamW step) with its
    inputs in ``dtype``, and its module too unless ``cast`` is False (an FP8 module keeps its codes); the module
    is back on the CPU afterwards."""
    module = (example.module.to(dtype) if cast else example.module).to("maia")
    try:
        return _run(module, example, dtype, train)
    finally:
        module.to("cpu")


def _run(module: nn.Module, example: Example, dtype: torch.dtype, train: bool) -> Measured:
    import maia_serving.torch as maia

    inputs = _to(example.inputs, "maia", dtype)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=False) if train else None
    torch.maia.synchronize()
    if optimizer is not None:  # the optimizer's state exists from the first step on: make it before the peak
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    resident = torch.maia.memory_allocated()
    torch.maia.reset_peak_memory_stats()
    with maia.profile() as block:
        if optimizer is None:
            with torch.no_grad():
                outputs = module(*inputs)
        else:
            outputs = module(*inputs)
            main_output(outputs).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    peak = torch.maia.max_memory_allocated()
    with torch.no_grad():  # the copy keeps no graph: its AccumulateGrad nodes would hold the maia parameters
        on_host = _to(outputs, "cpu", torch.float32)
    return Measured(block, peak, resident, on_host, example.unit, example.batch)


def save_outputs(path: Path, example: Example, measured: Measured) -> None:
    """``--save-outputs``: the run's outputs as named float32 arrays (an ONNX graph's by its output names, a model
    output's by its fields, others ``output`` or ``output_0``, ``output_1``...) and the inputs they came from
    (``input:NAME``), in one ``.npz``: what another runtime's outputs are compared with."""
    import numpy as np

    names = getattr(example.module, "output_names", None)
    value = measured.outputs
    if isinstance(value, torch.Tensor):
        items = [(names[0] if names else "output", value)]
    elif isinstance(value, dict):  # transformers' and diffusers' outputs are dicts
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = [(names[i] if names else f"output_{i}", v) for i, v in enumerate(value)]
    arrays = {k: v.numpy() for k, v in items if isinstance(v, torch.Tensor)}
    input_names = getattr(example.module, "input_names", None) or [f"{i}" for i in range(len(example.inputs))]
    for name, given in zip(input_names, example.inputs, strict=True):
        arrays[f"input:{name}"] = (given.float() if given.is_floating_point() else given).numpy()
    with path.open("wb") as file:  # np.savez would add ".npz" to a name without it
        np.savez(file, **arrays)


def measure_meta(example: Example, dtype: torch.dtype) -> Measured:
    """``example`` (built on the meta device) recorded as the maia device would run its forward, without running
    it: the operators and the peak memory, no outputs."""
    from maia_serving.torch.meta import meta_profile

    module = example.module.to(dtype)
    inputs = _to(example.inputs, "meta", dtype)
    held = [*module.parameters(), *module.buffers(), *(t for t in inputs if isinstance(t, torch.Tensor))]
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in held}
    resident = sum(storages.values())
    with torch.no_grad(), meta_profile(resident) as run:
        module(*inputs)
    return Measured(run, run.peak_bytes, resident, None, example.unit, example.batch)


def _where(top: list[TopOp]) -> str:
    """One line: the leading operators' shares and what bounds them."""
    if not top:
        return "no operator ran on maia"
    return ", ".join(f"{t.op.removeprefix('aten::').partition('.')[0]} {t.share:.0%} ({t.bound})" for t in top[:3])


def _shortfall(measured: Measured, profile: DeviceProfile, dtype: str) -> str:
    """What a model that does not fit needs, and what to try on one chip (a single forward is not split)."""
    capacity = profile.hbm_capacity_bytes
    need = measured.peak_memory_bytes
    per_item = max(need - measured.resident_bytes, 0) / max(measured.batch, 1)
    room = capacity - measured.resident_bytes
    hint = []
    if per_item and room > per_item and measured.batch > 1:
        hint.append(f"--batch-size {int(room // per_item)} fits")
    elif room <= 0:
        hint.append("the weights alone do not fit")
    if dtype == "fp32":
        hint.append("--dtype bf16 halves the weights and activations")
    elif dtype in ("bf16", "fp16"):
        hint.append("--dtype fp8 halves the linear and convolution weights")
    return (
        f"needs {format_bytes(need)} at its peak ({format_bytes(measured.resident_bytes)} resident), "
        f"{profile.name} has {format_bytes(capacity)}" + (f": {'; '.join(hint)}" if hint else "")
    )


def report(measured: Measured, profile: DeviceProfile, dtype: str) -> ProfileReport:
    """``measured`` priced on ``profile``."""
    summaries = measured.block.key_averages(on=profile)
    latency = sum(s.time_s for s in summaries)
    top = [
        TopOp(s.op, s.calls, s.time_s * 1e3, s.time_s / latency if latency else 0.0, s.bound)
        for s in summaries[:TOP_OPS]
    ]
    fits = measured.peak_memory_bytes <= profile.hbm_capacity_bytes
    return ProfileReport(
        profile=profile.name,
        fits=fits,
        error=None if fits else _shortfall(measured, profile, dtype),
        latency_ms=latency * 1e3,
        throughput_per_s=measured.batch / latency if latency else 0.0,
        peak_memory_bytes=measured.peak_memory_bytes,
        hbm_bytes=int(profile.hbm_capacity_bytes),
        flops=sum(s.flops for s in summaries),
        bytes=sum(s.bytes for s in summaries),
        top_ops=top,
        where=_where(top),
    )


def profile_model(
    example: Example, profiles: list[DeviceProfile], dtype: str = "bf16", train: bool = False, meta: bool = False
) -> tuple[list[ProfileReport], Measured]:
    """``example`` measured once (``dtype``: bf16, fp16, fp32, or fp8: its linear and convolution layers in FP8,
    measured after a BF16 run whose outputs it is compared with; ``meta``: an example built on the meta device,
    its forward recorded, not run), reported on each of ``profiles``; and the measurement."""
    if meta:
        if train or dtype == "fp8":
            raise ValueError(f"--meta records a forward in bf16, fp16 or fp32, not {'--train' if train else 'fp8'}")
        measured = measure_meta(example, TORCH_DTYPES[dtype])
        return [report(measured, p, dtype) for p in profiles], measured
    error = None
    with measuring_node(profiles[0]):
        if dtype == "fp8":
            if train:
                raise ValueError("--dtype fp8 prices inference: FP8 training is not modelled (use --dtype bf16)")
            reference = measure(example, torch.bfloat16)
            if not to_fp8(example.module):
                raise ValueError("--dtype fp8: the model has no nn.Linear or nn.Conv layer to run in FP8")
            measured = measure(example, torch.bfloat16, cast=False)
            error = compare(reference.outputs, measured.outputs, example.scores)
        else:
            measured = measure(example, TORCH_DTYPES[dtype], train)
    return [replace(report(measured, p, dtype), fp8_error=error) for p in profiles], measured
