"""ONNX files on maia, with ONNX Runtime as the oracle: the built-in YOLO and ViT exported by torch.onnx.export
(each of its two exporters) and run by `maia-serving profile` give ORT's outputs; single operators, each built
from the ONNX specification's examples of its settings, give ORT's; the files and settings it cannot run are
named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maia_serving import onnx_import, zoo
from maia_serving.cli.main import main


def _ort(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


class Logits(torch.nn.Module):
    """transformers' output object as the plain tensor an ONNX graph returns."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """YOLOv8n through the default (dynamo) exporter, the ViT through the TorchScript one, whose graphs carry
    the shape arithmetic (Shape, Gather, Concat, Reshape) the other folds away; both with a dynamic batch."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    yolo = zoo.builtin("yolov8n").build(2, 64)
    torch.onnx.export(
        yolo.module, yolo.inputs, root / "yolo.onnx", dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    vit = zoo.builtin("vit-tiny-16").build(2, 32)
    torch.onnx.export(
        Logits(vit.module), vit.inputs, root / "vit.onnx", dynamo=False, input_names=["pixels"],
        dynamic_axes={"pixels": {0: "batch"}},
    )  # fmt: skip
    return {"yolo": root / "yolo.onnx", "vit": root / "vit.onnx"}


@pytest.mark.parametrize("name,batch", [("yolo", 3), ("vit", 2)])
def test_profile_of_an_exported_model_gives_onnx_runtimes_outputs(exported, capsys, tmp_path, name, batch):
    saved = tmp_path / "out.npz"
    argv = ["profile", "--model", str(exported[name]), "--dtype", "fp32", "--batch-size", str(batch)]
    status = main([*argv, "--profile", "maia100", "--json", "--save-outputs", str(saved)])
    assert status == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["flops"] > 0 and report["top_ops"]
    arrays = dict(np.load(saved))
    inputs = {k.removeprefix("input:"): v for k, v in arrays.items() if k.startswith("input:")}
    assert [v.shape[0] for v in inputs.values()] == [batch]
    model = onnx.load(str(exported[name]))
    expected = _ort(exported[name], inputs)
    for output, want in zip(model.graph.output, expected, strict=True):
        np.testing.assert_allclose(arrays[output.name], want, rtol=1e-4, atol=1e-4)


def _priced(example: zoo.Example):
    from maia_serving.emulator.hardware import load_profile
    from maia_serving.tools.profile_model import profile_model

    (report,), _ = profile_model(example, [load_profile("maia100")])
    return report


def test_the_graph_is_priced_as_the_module_it_was_exported_from(exported):
    """The same FLOPs on the device: the exporter's shape arithmetic runs on the host, as a runtime runs it, and
    its Linear layers (MatMul + Add) are joined again. YOLO's graph costs what its module does (BatchNorm folded
    into the convolutions, SiLU written as Sigmoid and Mul); the ViT's more, its attention being the MatMul and
    Softmax nodes the exporter wrote, not the module's fused attention."""
    from maia_serving.tools.profile_model import load_example

    torch.manual_seed(0)
    yolo_graph = _priced(load_example(str(exported["yolo"]), 2, None))
    yolo = _priced(load_example("yolov8n", 2, 64))
    assert yolo_graph.flops == pytest.approx(yolo.flops, rel=0.02)
    assert yolo_graph.latency_ms == pytest.approx(yolo.latency_ms, rel=0.15)
    vit_graph = _priced(load_example(str(exported["vit"]), 2, None))
    vit = load_example("vit-tiny-16", 2, 32)
    vit = _priced(zoo.Example(Logits(vit.module), vit.inputs, vit.unit, vit.batch))
    assert vit_graph.flops == pytest.approx(vit.flops, rel=0.02)
    assert vit.latency_ms < vit_graph.latency_ms < 2 * vit.latency_ms
    ops = {t.op: t.calls for t in vit_graph.top_ops}
    assert ops["aten::addmm.out"] == 72  # 12 layers of q, k, v, o, fc1, fc2: the classifier is a Gemm


def test_shape_arithmetic_stays_on_the_host(exported):
    graph = onnx_import.load(exported["vit"])
    host = {n.op_type for n in graph.nodes if n.on_host}
    device = {n.op_type for n in graph.nodes if not n.on_host}
    assert {"Shape", "Gather", "Unsqueeze"} <= host
    assert {"MatMul", "LayerNormalization", "Softmax", "Conv"} <= device
    assert all(b.numel() > 1 for b in graph.buffers() if b.is_floating_point() and b.dim() > 1)
    # A weight is held once, by the module (so on the device), not also by the host.
    assert not [n for n in graph._device_names if n in graph._host and graph._host[n].numel() > 64]


# Single-operator graphs: (op, inputs {name: array}, attributes, opset, how many outputs).
rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
A = rng.standard_normal((3, 5)).astype(np.float32)
B = rng.standard_normal((4, 5)).astype(np.float32)
I64 = np.int64
CASES = {
    "conv-asymmetric-pads": ("Conv", {"x": X, "w": W}, {"pads": [0, 1, 2, 1], "strides": [2, 1]}, 17, 1),
    "conv-groups-dilation": (
        "Conv", {"x": X[:, :2], "w": W[:2, :1]}, {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}, 17, 1
    ),
    "maxpool-ceil": ("MaxPool", {"x": X}, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 17, 1),
    "maxpool-asymmetric": ("MaxPool", {"x": X}, {"kernel_shape": [2, 2], "pads": [1, 0, 0, 1]}, 17, 1),
    "averagepool": ("AveragePool", {"x": X}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 17, 1),
    "globalaveragepool": ("GlobalAveragePool", {"x": X}, {}, 17, 1),
    "gemm-trans-alpha-beta": (
        "Gemm", {"a": A.T.copy(), "b": B, "c": np.ones(4, np.float32)},
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 17, 1,
    ),
    "softmax-opset11-flattens": ("Softmax", {"x": X}, {"axis": 1}, 11, 1),
    "softmax-opset13": ("Softmax", {"x": X}, {"axis": 1}, 13, 1),
    "logsoftmax": ("LogSoftmax", {"x": X}, {"axis": -1}, 13, 1),
    "slice-negative-steps": (
        "Slice", {"x": X, "s": np.array([-5, 1], I64), "e": np.array([2**62, -1], I64),
                  "a": np.array([2, -1], I64), "st": np.array([2, 3], I64)}, {}, 13, 1,
    ),
    "split-attr-opset11": ("Split", {"x": X}, {"axis": 2, "split": [3, 4]}, 11, 2),
    "split-input": ("Split", {"x": X, "s": np.array([2, 4], I64)}, {"axis": -1}, 13, 2),
    "split-num-outputs-uneven": ("Split", {"x": X}, {"axis": 2, "num_outputs": 3}, 18, 3),
    "unsqueeze-attr-opset11": ("Unsqueeze", {"x": A}, {"axes": [0, -1]}, 11, 1),
    "squeeze-input": ("Squeeze", {"x": X[:, :1], "a": np.array([1], I64)}, {}, 13, 1),
    "reducemean-attr-opset13": ("ReduceMean", {"x": X}, {"axes": [1, 3], "keepdims": 0}, 13, 1),
    "reducesum-input-opset18": ("ReduceSum", {"x": X, "a": np.array([-1], I64)}, {}, 18, 1),
    "reducemax-all": ("ReduceMax", {"x": X}, {"keepdims": 1}, 18, 1),
    "resize-nearest-sizes": (
        "Resize", {"x": X, "roi": None, "sc": None, "sz": np.array([2, 3, 14, 18], I64)},
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 13, 1,
    ),
    "resize-linear-half-pixel": (
        "Resize", {"x": X, "roi": None, "sc": np.array([1, 1, 2, 1.5], np.float32)},
        {"mode": "linear"}, 13, 1,
    ),
    "resize-linear-align-corners": (
        "Resize", {"x": X, "roi": None, "sc": None, "sz": np.array([2, 3, 9, 4], I64)},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13, 1,
    ),
    "div-integers-truncate": ("Div", {"a": np.array([7, -7, 9], I64), "b": np.array([2, 2, -4], I64)}, {}, 13, 1),
    "gather-negative-indices": ("Gather", {"x": X, "i": np.array([[-1, 0], [1, -2]], I64)}, {"axis": 2}, 13, 1),
    "gather-scalar": ("Gather", {"x": A, "i": np.array(-1, I64)}, {"axis": 1}, 13, 1),
    "flatten": ("Flatten", {"x": X}, {"axis": 2}, 13, 1),
    "clip-inputs": ("Clip", {"x": X, "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, {}, 13, 1),
    "batchnorm": (
        "BatchNormalization",
        {"x": X, "s": np.array([1, 2, 3], np.float32), "b": np.array([0, 1, -1], np.float32),
         "m": np.array([0.1, 0.2, 0.3], np.float32), "v": np.array([1, 0.5, 2], np.float32)},
        {"epsilon": 1e-3}, 15, 1,
    ),
    "layernorm-axis": (
        "LayerNormalization", {"x": X, "s": rng.standard_normal((7, 6)).astype(np.float32)}, {"axis": 2}, 17, 1
    ),
    "where-broadcast": ("Where", {"c": X[0, 0] > 0, "a": X, "b": np.full((1, 6), 0.5, np.float32)}, {}, 13, 1),
    "expand-bidirectional": ("Expand", {"x": A[:, :1], "s": np.array([2, 1, 5], I64)}, {}, 13, 1),
    "tile": ("Tile", {"x": A, "r": np.array([2, 3], I64)}, {}, 13, 1),
    "pad-reflect": ("Pad", {"x": X, "p": np.array([0, 0, 1, 2, 0, 0, 2, 1], I64)}, {"mode": "reflect"}, 13, 1),
    "pad-constant-value": (
        "Pad", {"x": X, "p": np.array([0, 1, 0, 0, 0, 0, 0, 3], I64), "v": np.array(1.5, np.float32)}, {}, 13, 1
    ),
    "transpose-default-reverses": ("Transpose", {"x": X}, {}, 13, 1),
    "reshape-zero-copies": ("Reshape", {"x": X, "s": np.array([0, -1, 6], I64)}, {}, 13, 1),
    "range": ("Range", {"a": np.array(1, I64), "b": np.array(10, I64), "c": np.array(3, I64)}, {}, 13, 1),
    "constantofshape": (
        "ConstantOfShape", {"s": np.array([2, 3], I64)},
        {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [2.5])}, 13, 1,
    ),
    "gelu-tanh": ("Gelu", {"x": X}, {"approximate": "tanh"}, 20, 1),
    "hardsigmoid": ("HardSigmoid", {"x": X}, {"alpha": 0.3, "beta": 0.4}, 13, 1),
    "max-variadic": ("Max", {"a": X, "b": X[:, :1], "c": np.zeros((1, 6), np.float32)}, {}, 13, 1),
    "cast-to-float": ("Cast", {"x": np.array([1, 2, 3], I64)}, {"to": TensorProto.FLOAT}, 13, 1),
}  # fmt: skip


def _single(op: str, inputs: dict[str, np.ndarray], attrs: dict, opset: int, outputs: int) -> onnx.ModelProto:
    """One node whose inputs are the graph's inputs (not initializers: ORT would fold a constant graph); None
    for an omitted optional input."""
    values = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.asarray(v).shape)
        for k, v in inputs.items()
        if v is not None
    ]
    names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, [k if v is not None else "" for k, v in inputs.items()], names, **attrs)
    untyped = [helper.make_empty_tensor_value_info(n) for n in names]
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(helper.make_graph([node], op, values, untyped), opset_imports=opsets, ir_version=9)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph  # the outputs' types, by ONNX
    typed = {v.name: v for v in [*inferred.value_info, *inferred.output] if v.type.HasField("tensor_type")}
    del model.graph.output[:]
    model.graph.output.extend(typed[n] for n in names)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_each_operator_gives_onnx_runtimes_result(case, tmp_path):
    op, inputs, attrs, opset, outputs = CASES[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(_single(op, inputs, attrs, opset, outputs), str(path))
    feeds = {k: np.asarray(v) for k, v in inputs.items() if v is not None}
    expected = _ort(path, feeds)
    graph = onnx_import.load(path)
    with torch.no_grad():
        got = graph(*(torch.from_numpy(v.copy()) for v in feeds.values()))
    got = got if isinstance(got, tuple) else (got,)
    for mine, want in zip(got, expected, strict=True):
        assert tuple(mine.shape) == want.shape
        np.testing.assert_allclose(mine.numpy(), want, rtol=1e-5, atol=1e-5)


def _save(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_an_operator_it_does_not_run_is_named_with_its_opset(tmp_path, capsys):
    boxes = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 4])
    scores = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1, 4])
    nodes = [
        helper.make_node("NonMaxSuppression", ["b", "s"], ["i"]),
        helper.make_node("FusedGemm", ["s", "s"], ["j"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes, "g", [boxes, scores], [helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9
    )
    path = _save(tmp_path, model)
    saved = tmp_path / "out.npz"
    assert main(["profile", "--model", str(path), "--save-outputs", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "NonMaxSuppression (opset 17): 1 node" in err and "com.microsoft::FusedGemm (opset 1)" in err
    assert not saved.exists()


def test_a_setting_it_does_not_run_names_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    sc = helper.make_tensor("sc", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "sc"], ["y"], name="up", mode="cubic")
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [sc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    graph = onnx_import.load(_save(tmp_path, model))
    with pytest.raises(onnx_import.Unsupported, match=r"node up \(Resize, opset 17\): mode=cubic"):
        graph(torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x08\x07garbage that is no protobuf", "not a valid ONNX model"),
        (b"", "not a valid ONNX model"),
    ],
)
def test_a_bad_file_is_exit_2_and_nothing_is_written(tmp_path, capsys, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    saved, plot = tmp_path / "out.npz", tmp_path / "p.png"
    assert main(["profile", "--model", str(path), "--save-outputs", str(saved), "--plot", str(plot)]) == 2
    assert message in capsys.readouterr().err
    assert not saved.exists() and not plot.exists()


def test_a_missing_file_and_a_training_step_are_clear_errors(tmp_path, exported, capsys):
    assert main(["profile", "--model", str(tmp_path / "none.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert main(["profile", "--model", str(exported["vit"]), "--train"]) == 2
    assert "an ONNX file holds an inference graph" in capsys.readouterr().err


def test_input_axes_the_file_fixes_or_leaves_open(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, "height", "width"])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = _save(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    assert main(["profile", "--model", str(path), "--batch-size", "8"]) == 2
    assert "fixed batch of 4, not --batch-size 8" in capsys.readouterr().err
    assert main(["profile", "--model", str(path)]) == 2
    assert "axis 2 (height) has no fixed size: pass --input-shape" in capsys.readouterr().err
    graph = onnx_import.load(path)
    inputs, batch = onnx_import.example_inputs(graph, 1, 16)
    assert batch == 4 and inputs[0].shape == (4, 3, 16, 16)


def test_values_are_freed_after_their_last_use(exported):
    """The device holds at its peak what a runtime would: each intermediate dropped once read for the last time."""
    graph = onnx_import.load(exported["yolo"])
    freed = [name for node in graph.nodes for name in node.frees]
    assert len(freed) == len(set(freed)) > len(graph.nodes) / 2
    assert not set(freed) & set(graph.output_names)


def test_host_floats_join_the_device_in_the_runs_float_type(tmp_path):
    """A float the host computes (a ConstantOfShape) read by a device MatMul in a BF16 run is uploaded as BF16,
    the weights' type; a Cast to float on the device gives the run's type too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel().tolist())
    s = helper.make_tensor("s", TensorProto.INT64, [2], [3, 3])
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1])
        ),
        helper.make_node("MatMul", ["x", "ones"], ["m"]),
        helper.make_node("MatMul", ["m", "w"], ["n"]),
        helper.make_node("Cast", ["n"], ["y"], to=TensorProto.FLOAT),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "g", [x], [out], [w, s])
    path = _save(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    module = onnx_import.load(path).to(torch.bfloat16)
    assert [n.on_host for n in module.nodes] == [True, False, False, False]
    inputs = torch.rand(2, 3)
    with torch.no_grad():
        y = module(inputs.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    expected = _ort(path, {"x": inputs.numpy()})[0]
    np.testing.assert_allclose(y.float().numpy(), expected, rtol=2e-2)


@pytest.mark.parametrize("name", ["yolo", "vit"])
def test_a_graph_recorded_on_meta_is_priced_as_its_live_run(exported, name):
    """`profile model.onnx --meta`: the graph's shape arithmetic is the host's on both, so the device's
    operators, FLOPs and memory are the live run's."""
    from maia_serving.emulator.hardware import load_profile
    from maia_serving.tools.profile_model import load_example, profile_model

    live = _priced(load_example(str(exported[name]), 2, None))
    example = load_example(str(exported[name]), 2, None, meta=True)
    (meta,), _ = profile_model(example, [load_profile("maia100")], meta=True)
    assert meta.flops == live.flops
    assert meta.peak_memory_bytes == live.peak_memory_bytes
    assert meta.latency_ms == pytest.approx(live.latency_ms, rel=0.02)
