"""ONNX operators as torch calls: one small function per operator type, written from the ONNX operator
specification (onnx.ai/onnx/operators), each taking the node's inputs (None for an omitted optional one) and its
attributes, returning its outputs.

Each entry says from which opset on it follows the specification (``since``: older versions of some operators
took as attributes what later ones take as inputs; those older forms are read too where noted) and which of its
inputs are *host arguments*: shapes, axes, slice bounds, sizes. An ONNX runtime computes those on the host, not
on the accelerator; so does this one, keeping them as CPU tensors (maia_serving.onnx_import.graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# A node's attributes, and three the importer adds: ``_opset`` (the model's opset for the node's domain),
# ``_outputs`` (how many outputs the node names) and ``_float`` (the run's float type, for Cast).
Attrs = dict[str, Any]
Inputs = list[Any]  # tensors, or None for an omitted optional input


class Unsupported(ValueError):
    """An operator, or a setting of one, this importer does not run."""


@dataclass(frozen=True)
class Op:
    run: Callable[[Inputs, Attrs], Sequence[torch.Tensor] | torch.Tensor]
    since: int = 1
    host_inputs: frozenset[int] = frozenset()


# ONNX TensorProto.DataType -> torch dtype (the types a model's tensors use).
DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
    17: torch.float8_e4m3fn,
    19: torch.float8_e5m2,
}


def ints(value: torch.Tensor | Sequence[int] | None) -> list[int]:
    """A host argument (a tensor of integers, or an attribute's list) as Python integers."""
    if value is None:
        return []
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return Op(lambda x, a: fn(x[0], x[1]))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return Op(lambda x, a: fn(x[0]))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _pads(pads: list[int], spatial: int) -> tuple[list[int], bool]:
    """ONNX pads (all begins, then all ends) as torch's F.pad list (last axis first), and whether they are
    symmetric (then the convolution or pooling pads itself)."""
    pads = pads or [0] * (2 * spatial)
    begins, ends = pads[:spatial], pads[spatial:]
    flat = [p for b, e in zip(reversed(begins), reversed(ends), strict=True) for p in (b, e)]
    return flat, begins == ends


def _no_auto_pad(attrs: Attrs) -> None:
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad={attrs['auto_pad']} (export with explicit pads)")


def conv(x: Inputs, a: Attrs) -> torch.Tensor:
    _no_auto_pad(a)
    data, weight, bias = x[0], x[1], x[2] if len(x) > 2 else None
    spatial = weight.dim() - 2
    pads, symmetric = _pads(ints(a.get("pads")), spatial)
    if not symmetric:
        data, pads = F.pad(data, pads), [0] * (2 * spatial)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(
        data,
        weight,
        bias,
        stride=ints(a.get("strides")) or 1,
        padding=pads[::2][::-1],
        dilation=ints(a.get("dilations")) or 1,
        groups=a.get("group", 1),
    )


def max_pool(x: Inputs, a: Attrs) -> torch.Tensor:
    _no_auto_pad(a)
    kernel = ints(a["kernel_shape"])
    spatial = len(kernel)
    pads, symmetric = _pads(ints(a.get("pads")), spatial)
    data = x[0]
    if not symmetric:
        data, pads = F.pad(data, pads, value=-math.inf), [0] * (2 * spatial)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    return fn(
        data,
        kernel,
        stride=ints(a.get("strides")) or 1,
        padding=pads[::2][::-1],
        dilation=ints(a.get("dilations")) or 1,
        ceil_mode=bool(a.get("ceil_mode", 0)),
    )


def average_pool(x: Inputs, a: Attrs) -> torch.Tensor:
    _no_auto_pad(a)
    kernel = ints(a["kernel_shape"])
    pads, symmetric = _pads(ints(a.get("pads")), len(kernel))
    if not symmetric:
        raise Unsupported("asymmetric pads")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return fn(
        x[0],
        kernel,
        stride=ints(a.get("strides")) or 1,
        padding=pads[::2][::-1],
        ceil_mode=bool(a.get("ceil_mode", 0)),
        count_include_pad=bool(a.get("count_include_pad", 0)),
    )


def resize(x: Inputs, a: Attrs) -> torch.Tensor:
    """Nearest (asymmetric coordinates, floor: torch's ``nearest``) and linear (half-pixel or align-corners)
    resizing of the spatial axes; the other settings are named as unsupported."""
    data = x[0]
    scales = x[2].tolist() if len(x) > 2 and x[2] is not None and x[2].numel() else None
    sizes = ints(x[3]) if len(x) > 3 and x[3] is not None else None
    mode, transform = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if (scales and scales[:2] != [1.0, 1.0]) or (sizes and sizes[:2] != list(data.shape[:2])):
        raise Unsupported("resizing the batch or channel axis")
    if not (sizes or scales):
        raise Unsupported("neither scales nor sizes given")
    kwargs: dict[str, Any] = {"size": sizes[2:]} if sizes else {"scale_factor": (scales or [])[2:]}
    if mode == "nearest" and transform == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor":
        return F.interpolate(data, mode="nearest", **kwargs)
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        linear = {3: "linear", 4: "bilinear", 5: "trilinear"}[data.dim()]
        return F.interpolate(data, mode=linear, align_corners=transform == "align_corners", **kwargs)
    raise Unsupported(f"mode={mode}, coordinate_transformation_mode={transform}")


def gemm(x: Inputs, a: Attrs) -> torch.Tensor:
    left, right = x[0], x[1]
    left = left.t() if a.get("transA", 0) else left
    right = right.t() if a.get("transB", 0) else right
    out = a.get("alpha", 1.0) * (left @ right) if a.get("alpha", 1.0) != 1.0 else left @ right
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2] if a.get("beta", 1.0) != 1.0 else out + x[2]
    return out


def layer_norm(x: Inputs, a: Attrs) -> torch.Tensor:
    data = x[0]
    axis = _axis(a.get("axis", -1), data.dim())
    bias = x[2] if len(x) > 2 else None
    return F.layer_norm(data, data.shape[axis:], x[1], bias, a.get("epsilon", 1e-5))


def batch_norm(x: Inputs, a: Attrs) -> torch.Tensor:
    if a.get("training_mode", 0):
        raise Unsupported("training_mode=1")
    data, scale, bias, mean, var = x[:5]
    return F.batch_norm(data, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def softmax(fn: Callable[..., torch.Tensor]) -> Callable[[Inputs, Attrs], torch.Tensor]:
    def run(x: Inputs, a: Attrs) -> torch.Tensor:
        data = x[0]
        if a.get("_opset", 13) >= 13:
            return fn(data, dim=a.get("axis", -1))
        axis = _axis(a.get("axis", 1), data.dim())  # before opset 13: over the axes from ``axis`` on, flattened
        return fn(data.flatten(axis), dim=axis).reshape(data.shape)

    return run


def reshape(x: Inputs, a: Attrs) -> torch.Tensor:
    shape = ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _axes(x: Inputs, a: Attrs, index: int = 1) -> list[int]:
    """Axes from the input (opset 13 on; 18 on for the reductions) or the attribute (before)."""
    return ints(x[index]) if len(x) > index and x[index] is not None else ints(a.get("axes"))


def unsqueeze(x: Inputs, a: Attrs) -> torch.Tensor:
    data = x[0]
    rank = data.dim() + len(_axes(x, a))
    for axis in sorted(_axis(i, rank) for i in _axes(x, a)):
        data = data.unsqueeze(axis)
    return data


def squeeze(x: Inputs, a: Attrs) -> torch.Tensor:
    axes = _axes(x, a)
    return x[0].squeeze(tuple(_axis(i, x[0].dim()) for i in axes)) if axes else x[0].squeeze()


def slice_(x: Inputs, a: Attrs) -> torch.Tensor:
    data = x[0]
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 1:
            raise Unsupported(f"step {step} (a reversed slice)")
        size = data.shape[_axis(axis, data.dim())]
        index[_axis(axis, data.dim())] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return data[tuple(index)]


def split(x: Inputs, a: Attrs, outputs: int) -> Sequence[torch.Tensor]:
    data, axis = x[0], a.get("axis", 0)
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else ints(a.get("split"))
    if not sizes:
        size = data.shape[axis]
        count = a.get("num_outputs", outputs)
        sizes = [math.ceil(size / count)] * (count - 1)
        sizes.append(size - sum(sizes))
    return torch.split(data, sizes, dim=axis)


def gather(x: Inputs, a: Attrs) -> torch.Tensor:
    data, indices = x[0], x[1]
    axis = _axis(a.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def shape(x: Inputs, a: Attrs) -> torch.Tensor:
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def expand(x: Inputs, a: Attrs) -> torch.Tensor:
    return x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(ints(x[1]))))


def concat(x: Inputs, a: Attrs) -> torch.Tensor:
    return torch.cat(x, dim=a["axis"])


def cast(x: Inputs, a: Attrs) -> torch.Tensor:
    target = DTYPES.get(a["to"])
    if target is None:
        raise Unsupported(f"cast to ONNX type {a['to']}")
    if target.is_floating_point and "_float" in a:
        target = a["_float"]  # on the device, a float is the run's float type (--dtype), as the weights are
    return x[0].to(target)


def constant_of_shape(x: Inputs, a: Attrs) -> torch.Tensor:
    value = a.get("value")
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1)
    return torch.full(ints(x[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)


def constant(x: Inputs, a: Attrs) -> torch.Tensor:
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(list(a[key]), dtype=dtype)
    if "value" in a:
        return a["value"]
    raise Unsupported(f"a Constant with {', '.join(a) or 'no value'}")


def range_(x: Inputs, a: Attrs) -> torch.Tensor:
    start, limit, delta = (v.item() for v in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype)


def clip(x: Inputs, a: Attrs) -> torch.Tensor:
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    low = low.item() if isinstance(low, torch.Tensor) else low
    high = high.item() if isinstance(high, torch.Tensor) else high
    return x[0].clamp(low, high)


def reduce(fn: Callable[..., torch.Tensor]) -> Callable[[Inputs, Attrs], torch.Tensor]:
    def run(x: Inputs, a: Attrs) -> torch.Tensor:
        axes = _axes(x, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return fn(x[0], dim=tuple(axes), keepdim=keep)

    return run


def transpose(x: Inputs, a: Attrs) -> torch.Tensor:
    perm = ints(a.get("perm")) or list(range(x[0].dim()))[::-1]
    return x[0].permute(perm)


def flatten(x: Inputs, a: Attrs) -> torch.Tensor:
    axis = _axis(a.get("axis", 1), x[0].dim())
    return x[0].reshape(math.prod(x[0].shape[:axis]), -1)


def gelu(x: Inputs, a: Attrs) -> torch.Tensor:
    return F.gelu(x[0], approximate=a.get("approximate", "none"))


def where(x: Inputs, a: Attrs) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


def tile(x: Inputs, a: Attrs) -> torch.Tensor:
    return x[0].repeat(ints(x[1]))


def pad(x: Inputs, a: Attrs) -> torch.Tensor:
    mode = a.get("mode", "constant")
    pads = ints(x[1]) if len(x) > 1 else ints(a.get("pads"))
    if len(x) > 3 and x[3] is not None:
        raise Unsupported("the axes input")
    value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else a.get("value", 0.0)
    rank = x[0].dim()
    flat, _ = _pads(pads, rank)
    while len(flat) > 2 and flat[-2:] == [0, 0]:  # torch pads the trailing axes only: drop the leading zeros
        flat = flat[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise Unsupported(f"mode={mode}")
    return F.pad(x[0], flat, mode=torch_mode, value=value if mode == "constant" else None)


def linear(x: Inputs, a: Attrs) -> torch.Tensor:
    """A MatMul by a weight and the Add of a bias after it, as one ``addmm`` (the importer fuses the pair, as
    ONNX Runtime's basic graph optimizations and torch's ``nn.Linear`` both do)."""
    data, weight, bias = x[0], x[1], x[2]
    if data.dim() < 2:
        return data @ weight + bias
    flat = data.reshape(-1, data.shape[-1])
    return torch.addmm(bias, flat, weight).reshape(*data.shape[:-1], weight.shape[1])


def div(x: Inputs, a: Attrs) -> torch.Tensor:
    """Integers divide truncating, as ONNX's Div does (torch's ``/`` gives a float)."""
    left, right = x[0], x[1]
    integer = not (left.is_floating_point() or right.is_floating_point())
    return torch.div(left, right, rounding_mode="trunc") if integer else torch.div(left, right)


def matmul(x: Inputs, a: Attrs) -> torch.Tensor:
    return torch.matmul(x[0], x[1])


OPS: dict[str, Op] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add),
    "And": _binary(torch.logical_and),
    "AveragePool": Op(average_pool, 11),
    "BatchNormalization": Op(batch_norm, 9),
    "Cast": Op(cast, 6),
    "Clip": Op(clip, 6, frozenset({1, 2})),
    "Concat": Op(concat, 4),
    "Constant": Op(constant, 9),
    "ConstantOfShape": Op(constant_of_shape, 9, frozenset({0})),
    "Conv": Op(conv),
    "Div": Op(div),
    "Equal": _binary(torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Expand": Op(expand, 8, frozenset({1})),
    "Flatten": Op(flatten, 9),
    "Gather": Op(gather),
    "Gelu": Op(gelu, 20),
    "Gemm": Op(gemm, 7),
    "GlobalAveragePool": _unary(lambda t: t.mean(dim=tuple(range(2, t.dim())), keepdim=True)),
    "Greater": _binary(torch.gt),
    "HardSigmoid": Op(lambda x, a: (x[0] * a.get("alpha", 0.2) + a.get("beta", 0.5)).clamp(0, 1), 6),
    "HardSwish": _unary(F.hardswish),
    "Identity": _unary(lambda t: t),
    "IsInf": _unary(torch.isinf),
    "IsNaN": _unary(torch.isnan),
    "LayerNormalization": Op(layer_norm, 17),
    "LeakyRelu": Op(lambda x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)), 6),
    "Less": _binary(torch.lt),
    "Log": _unary(torch.log),
    "LogSoftmax": Op(softmax(torch.log_softmax)),
    "MatMul": Op(matmul),
    "Max": Op(lambda x, a: torch.stack(torch.broadcast_tensors(*x)).amax(0), 8),
    "MaxPool": Op(max_pool, 8),
    "Min": Op(lambda x, a: torch.stack(torch.broadcast_tensors(*x)).amin(0), 8),
    "Mul": _binary(torch.mul),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or),
    "Pad": Op(pad, 2, frozenset({1, 2, 3})),
    "Pow": _binary(torch.pow),
    "Range": Op(range_, 11, frozenset({0, 1, 2})),
    "Reciprocal": _unary(torch.reciprocal),
    "ReduceMax": Op(reduce(torch.amax), 1, frozenset({1})),
    "ReduceMean": Op(reduce(torch.mean), 1, frozenset({1})),
    "ReduceSum": Op(reduce(torch.sum), 1, frozenset({1})),
    "Relu": _unary(torch.relu),
    "Reshape": Op(reshape, 5, frozenset({1})),
    "Resize": Op(resize, 11, frozenset({1, 2, 3})),
    "Shape": Op(shape),
    "Sigmoid": _unary(torch.sigmoid),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Slice": Op(slice_, 10, frozenset({1, 2, 3, 4})),
    "Softmax": Op(softmax(torch.softmax)),
    "Split": Op(lambda x, a: split(x, a, a["_outputs"]), 2, frozenset({1})),
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": Op(squeeze, 1, frozenset({1})),
    "Sub": _binary(torch.sub),
    "Tanh": _unary(torch.tanh),
    "Tile": Op(tile, 6, frozenset({1})),
    "Transpose": Op(transpose),
    "Unsqueeze": Op(unsqueeze, 1, frozenset({1})),
    "Where": Op(where, 9),
}
