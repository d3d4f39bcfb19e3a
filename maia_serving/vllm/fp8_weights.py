"""FP8 weights on the host: linear layers stored in E4M3 with their scales, computed in the model's dtype.

vLLM's CPU build lists no kernel for FP8 weights with BF16 activations (``_POSSIBLE_WFP8A16_KERNELS`` is
empty for the CPU), so a checkpoint quantized that way (compressed-tensors' FP8 weight-only scheme, as
``maia-serving reshard --weight-dtype fp8`` and llm-compressor's ``FP8`` recipes without activations write
it) fails to build its first linear layer. ``HostFp8WeightKernel`` dequantizes each weight once after
loading (E4M3 value times its scale, rounded once to the model's dtype) and runs the layer on that: the
values a weight-only kernel that dequantizes while it reads (Marlin) multiplies by, with the FP8 weights'
memory kept on the emulated device's books only. Registered by ``MaiaWorker`` in each process that builds
the model; remove when vLLM's CPU build lists a W8A16-FP8 kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.kernels import linear
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import FP8ScaledMMLinearKernel
from vllm.platforms import PlatformEnum


class HostFp8WeightKernel(FP8ScaledMMLinearKernel):
    """Per-channel or per-tensor E4M3 weights, dequantized once; block-scaled ones are left to vLLM."""

    @classmethod
    def is_supported(cls, compute_capability=None):
        return True, None

    @classmethod
    def can_implement(cls, c):
        if c.weight_quant_key.scale.group_shape.is_per_group():
            return False, "block-scaled FP8 weights are not dequantized on the host"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight_name, scale_name, input_scale_name, _ = self.layer_param_names
        # By now vLLM's scheme has transposed the weight to (in, out) and made its scales (out, 1) or one.
        weight, scale = getattr(layer, weight_name), getattr(layer, scale_name).reshape(1, -1)
        dense = (weight.to(torch.float32) * scale.to(torch.float32)).t().contiguous().to(self.config.out_dtype)
        delattr(layer, weight_name)
        layer.register_parameter(weight_name, torch.nn.Parameter(dense, requires_grad=False))
        setattr(layer, input_scale_name, None)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        return F.linear(x, getattr(layer, self.layer_param_names[0]), bias)

    def apply_scaled_mm(self, **kwargs):
        raise NotImplementedError("HostFp8WeightKernel multiplies dequantized weights (apply_weights)")


def register() -> None:
    """Offer the kernel for FP8-weight, BF16-activation layers on the CPU platform (ours is one), once."""
    kernels = linear._POSSIBLE_WFP8A16_KERNELS.setdefault(PlatformEnum.CPU, [])
    if HostFp8WeightKernel not in kernels:
        kernels.insert(0, HostFp8WeightKernel)
