"""An ONNX graph as a torch module: its weights are the module's buffers (``.to("maia")`` moves them, ``.to(dtype)``
casts the floating ones), its nodes run in the file's order as the torch calls of ``ops``.

Values are placed as an ONNX runtime places them: what derives from the graph's inputs or weights runs on the
module's device; shapes (``Shape``'s output), the constants that only feed shape arithmetic, and the nodes that
compute on those alone stay on the host, so a model's shape bookkeeping is not priced as accelerator work. A value
is dropped after its last use, so the device holds at its peak what a runtime would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from maia_serving.onnx_import.ops import DTYPES, OPS, Op, Unsupported, linear

DEFAULT_DOMAINS = ("", "ai.onnx")
# A node that reads only constants this small (and host values) is shape arithmetic: it runs on the host.
HOST_CONSTANT_MAX = 64


class Run(NamedTuple):
    """Where a forward pass runs: the device of its inputs, the float type of its weights."""

    device: torch.device
    dtype: torch.dtype


@dataclass
class Node:
    name: str
    op_type: str
    op: Op
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    on_host: bool = False
    frees: list[str] = field(default_factory=list)  # values whose last use is this node

    def where(self) -> str:
        return f"node {self.name or '(unnamed)'} ({self.op_type}, opset {self.attrs['_opset']})"


def tensor(proto: Any) -> torch.Tensor:
    """An ONNX TensorProto as a torch tensor (bf16 and FP8 through their bits: numpy has no such types)."""
    from onnx import numpy_helper

    dtype = DTYPES.get(proto.data_type)
    if dtype is None:
        raise Unsupported(f"tensor {proto.name!r} of ONNX type {proto.data_type}")
    array = numpy_helper.to_array(proto)
    if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = torch.from_numpy(array.view(f"uint{dtype.itemsize * 8}").copy())
        return bits.view(dtype)
    return torch.from_numpy(array.copy()).to(dtype)


def _attributes(proto: Any) -> dict[str, Any]:
    from onnx import helper

    attrs = {}
    for attr in proto.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif hasattr(value, "data_type"):  # a TensorProto
            value = tensor(value)
        attrs[attr.name] = value
    return attrs


def unsupported(model: Any) -> list[str]:
    """Each operator of ``model`` this importer does not run, with its opset and how many nodes use it."""
    opsets = {o.domain: o.version for o in model.opset_import}
    found: dict[str, int] = {}
    for proto in model.graph.node:
        domain = proto.domain or ""
        opset = opsets.get(domain, opsets.get("", 0))
        op = OPS.get(proto.op_type) if domain in DEFAULT_DOMAINS else None
        if op is None or opset < op.since:
            qualified = f"{domain}::{proto.op_type}" if domain not in DEFAULT_DOMAINS else proto.op_type
            key = f"{qualified} (opset {opset}" + (f"; runs from opset {op.since})" if op else ")")
            found[key] = found.get(key, 0) + 1
    return [f"{key}: {count} node{'s' if count > 1 else ''}" for key, count in found.items()]


LINEAR = Op(linear)


def _fuse_linear(nodes: list[Node], constants: dict[str, torch.Tensor], outputs: set[str]) -> list[Node]:
    """Each MatMul by a 2-D weight whose only reader is an Add of a matching 1-D bias, as one node (``linear``):
    what an exporter splits an ``nn.Linear`` into, and a runtime joins again."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    fused: dict[int, Node] = {}  # id of the Add -> the node replacing the pair
    for node in nodes:
        weight = constants.get(node.inputs[1]) if node.op_type == "MatMul" else None
        product = node.outputs[0] if weight is not None else ""
        if weight is None or weight.dim() != 2 or product in outputs or len(readers.get(product, [])) != 1:
            continue
        add = readers[product][0]
        bias = next((n for n in add.inputs if n != product), "")
        if add.op_type != "Add" or bias not in constants or constants[bias].shape != (weight.shape[1],):
            continue
        fused[id(add)] = Node(
            f"{node.name}+{add.name}",
            "MatMul+Add",
            LINEAR,
            [node.inputs[0], node.inputs[1], bias],
            add.outputs,
            dict(node.attrs),
        )
        fused[id(node)] = fused[id(add)]
    kept: list[Node] = []
    for node in nodes:
        replacement = fused.get(id(node), node)
        if replacement is not node and node.op_type == "MatMul":
            continue  # the pair runs where its Add was: after both its inputs exist
        kept.append(replacement)
    return kept


class OnnxGraph(nn.Module):
    """``model`` (an onnx.ModelProto) run node by node; ``forward`` takes the graph's inputs in order and returns
    its output (a tuple where there are several)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        missing = unsupported(model)
        if missing:
            raise Unsupported("operators this importer does not run: " + "; ".join(missing))
        graph = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        constants = {init.name: tensor(init) for init in graph.initializer}
        self.nodes: list[Node] = []
        for index, proto in enumerate(graph.node):
            attrs = _attributes(proto)
            attrs["_opset"] = opsets.get(proto.domain or "", opsets.get("", 0))
            attrs["_outputs"] = len(proto.output)
            node = Node(
                proto.name or f"#{index}", proto.op_type, OPS[proto.op_type], [*proto.input], [*proto.output], attrs
            )
            if proto.op_type == "Constant":  # an attribute, not a computation: a constant from the start
                constants[proto.output[0]] = node.op.run([], attrs)  # type: ignore[assignment]
                continue
            if proto.op_type == "Identity" and proto.input[0] in constants:  # another name for a weight
                constants[proto.output[0]] = constants[proto.input[0]]
                continue
            self.nodes.append(node)
        self.output_names = [o.name for o in graph.output]
        self.nodes = _fuse_linear(self.nodes, constants, set(self.output_names))
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.input_types = {i.name: i.type.tensor_type for i in graph.input if i.name not in constants}
        self._place(constants)
        self._plan_frees()

    def _place(self, constants: dict[str, torch.Tensor]) -> None:
        """Which nodes run on the host (all their data inputs host values), and so which constants the device
        holds (those a device node reads as data: the module's buffers) and which the host keeps."""
        on_device = set(self.input_names)
        device_constants: set[str] = set()
        for node in self.nodes:
            data = [n for i, n in enumerate(node.inputs) if n and i not in node.op.host_inputs]
            reads_device = any(n in on_device for n in data)
            reads_weight = any(n in constants and constants[n].numel() > HOST_CONSTANT_MAX for n in data)
            node.on_host = node.op_type == "Shape" or not (reads_device or reads_weight)
            if not node.on_host:
                on_device.update(node.outputs)
                device_constants.update(n for n in data if n in constants)
        self._host_values = {n for node in self.nodes if node.on_host for n in node.outputs}
        self._device_names: dict[str, str] = {}
        for index, name in enumerate(sorted(device_constants)):
            self._device_names[name] = f"c{index}"
            self.register_buffer(f"c{index}", constants[name])
        # The host keeps the rest (never moved), and small ones the device holds too: a shape or an axis a host
        # node reads. A weight is not kept twice.
        self._host = {
            name: value
            for name, value in constants.items()
            if name not in device_constants or value.numel() <= HOST_CONSTANT_MAX
        }

    def _constant(self, name: str, on_host: bool) -> torch.Tensor:
        """A constant where the reader wants it: the host's copy, or the module's buffer (the device's)."""
        if name not in self._device_names or (on_host and name in self._host):
            return self._host[name]
        return getattr(self, self._device_names[name])  # type: ignore[no-any-return]

    def _plan_frees(self) -> None:
        last: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.inputs:
                last[name] = index
        keep = set(self.output_names)
        for name, index in last.items():
            if name and name not in keep and name not in self._host and name not in self._device_names:
                self.nodes[index].frees.append(name)

    def float_dtype(self) -> torch.dtype:
        """The float type the weights are in (the run's ``--dtype``): the type a Cast to a float gives."""
        return next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float32)

    def _value(self, env: dict[str, Any], name: str, node: Node, position: int, run: Run) -> Any:
        """Input ``position`` of ``node``. A value the host computed that a device node reads as data moves to
        the run's device, a floating one in the run's float type, as a runtime uploads it."""
        if not name:
            return None
        if name in env:
            value = env[name]
            if not node.on_host and name in self._host_values and position not in node.op.host_inputs:
                value = value.to(run.device, dtype=run.dtype if value.is_floating_point() else value.dtype)
            return value
        return self._constant(name, node.on_host or position in node.op.host_inputs)

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"the graph takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), not {len(inputs)}"
            )
        env: dict[str, Any] = dict(zip(self.input_names, inputs, strict=True))
        run = Run(inputs[0].device if inputs else torch.device("cpu"), self.float_dtype())
        for node in self.nodes:
            args = [self._value(env, name, node, i, run) for i, name in enumerate(node.inputs)]
            device_cast = node.op_type == "Cast" and not node.on_host
            attrs = {**node.attrs, "_float": run.dtype} if device_cast else node.attrs
            try:
                out = node.op.run(args, attrs)
            except Unsupported as exc:
                raise Unsupported(f"{node.where()}: {exc}") from exc
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ValueError(f"{node.where()} failed: {exc}") from exc
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            for name, value in zip(node.outputs, outputs, strict=False):
                if name:
                    env[name] = value
            for name in node.frees:
                env.pop(name, None)
        found = [env[n] if n in env else self._constant(n, on_host=False) for n in self.output_names]
        return found[0] if len(found) == 1 else tuple(found)


def _malformed(model: Any) -> str:
    """What makes ``model`` no graph a runtime could run, or "". onnx.checker is not the test: it refuses files
    ONNX Runtime runs (an output declared without a shape, say)."""
    if not model.graph.node or not model.opset_import:
        return "no graph: no nodes or no opset"
    defined = {v.name for v in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for proto in model.graph.node:
        missing = [n for n in proto.input if n not in defined]
        if missing:
            return (
                f"node {proto.name or proto.op_type} reads {missing[0]!r}, which no input, weight or earlier node gives"
            )
        defined.update(proto.output)
    absent = [o.name for o in model.graph.output if o.name not in defined]
    return f"output {absent[0]!r} is computed by no node" if absent else ""


def load(path: str | Path) -> OnnxGraph:
    """The ONNX file at ``path`` as a module; ValueError saying what is wrong with a file that is not a valid
    model, and naming each operator (with its opset) this importer does not run."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, external data missing: all the file's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a valid ONNX model ({first})") from exc
    problem = _malformed(model)
    if problem:
        raise ValueError(f"{path}: not a valid ONNX model ({problem})")
    try:
        return OnnxGraph(model)
    except Unsupported as exc:
        raise Unsupported(f"{path}: {exc}") from exc


def example_inputs(graph: OnnxGraph, batch: int, side: int | None) -> tuple[tuple[torch.Tensor, ...], int]:
    """One batch of random inputs of the graph's declared types and shapes, and the batch: its first named
    (dynamic) axis is ``batch``; a fixed one is the batch (``batch`` must be 1, the default, or equal it); other
    named axes take ``side`` (the image side or sequence length), which must then be given."""
    inputs = []
    batches = set()
    for name in graph.input_names:
        kind = graph.input_types[name]
        dtype = DTYPES.get(kind.elem_type)
        if dtype is None:
            raise Unsupported(f"input {name!r} of ONNX type {kind.elem_type}")
        dims: list[int] = []
        for axis, dim in enumerate(kind.shape.dim):
            if dim.HasField("dim_value"):
                if axis == 0:
                    batches.add(dim.dim_value)
                if axis == 0 and batch != 1 and dim.dim_value != batch:
                    raise ValueError(
                        f"input {name!r} has a fixed batch of {dim.dim_value}, not --batch-size {batch}: export it "
                        "with a dynamic first axis (torch.onnx.export's dynamic_shapes) to run other batch sizes"
                    )
                dims.append(dim.dim_value)
            elif axis == 0:
                dims.append(batch)
                batches.add(batch)
            elif side is None:
                raise ValueError(
                    f"input {name!r} axis {axis} ({dim.dim_param or 'unnamed'}) has no fixed size: pass --input-shape"
                )
            else:
                dims.append(side)
        inputs.append(torch.rand(dims).to(dtype) if dtype.is_floating_point else torch.zeros(dims, dtype=dtype))
    return tuple(inputs), max(batches, default=1)
