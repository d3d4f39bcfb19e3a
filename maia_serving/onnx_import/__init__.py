"""ONNX files on the maia device: a graph imported as a torch module whose nodes run as torch operators, so the
device prices them as it prices any model's.

Our own importer rather than onnx2torch or PyTorch's tooling: PyTorch exports ONNX but does not import it, and
onnx2torch imports torchvision, whose PyPI builds are CUDA ones that break the vLLM environment's CPU torch
(scripts/setup-vllm.sh removes them). The operators are written from the ONNX specification; those of the
exports of the built-in YOLO and ViT (both of torch.onnx.export's exporters, opset 20) and the common others of
vision and transformer graphs run; any other is named with its opset when the file is loaded. The oracle is ONNX
Runtime (tests/unit/onnx_import).
"""

from maia_serving.onnx_import.graph import OnnxGraph, example_inputs, load
from maia_serving.onnx_import.ops import Unsupported

__all__ = ["OnnxGraph", "Unsupported", "example_inputs", "load"]
