"""`profile --dtype fp8`: a model's linear and convolution layers in FP8 E4M3, to see what FP8 buys on each chip
and what it costs in accuracy before anyone quantizes the model for real.

The scheme is vLLM's default FP8 (``--quantization fp8``): weights quantized once with one scale per tensor,
activations quantized on the fly with one scale per tensor (their absolute maximum over 448, E4M3's largest
value), the GEMM on FP8 operands accumulating in FP32 and writing BF16. Everything else (norms, activations,
attention) stays BF16. On maia the GEMMs are ``_scaled_mm`` and the convolutions FP8 ``convolution`` calls, so
the device prices them at the chip's FP8 peak with a byte an operand; the values are computed on the host from
the FP8 codes, so the outputs carry FP8's rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maia_serving.ops.fp8 import FP8_FORMATS
from maia_serving.zoo import main_output

E4M3 = FP8_FORMATS["e4m3"]


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as FP8 E4M3 codes and the FP32 scale they are multiplied by: amax / 448 (1 for an all-zero one),
    computed in FP32. On maia the device's ``maia_fp8::quantize``: the two kernels vLLM runs for it (the
    scale's reduction, the codes' write), not the half-dozen elementwise operators written out here."""
    if t.device.type == "maia":
        codes, scale = torch.ops.maia_fp8.quantize(t)
        return codes, scale
    values = t.detach().float()
    amax = values.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3.max_value, torch.ones_like(amax))
    return (values / scale).to(E4M3.torch_dtype), scale


def _hold(layer: nn.Module, weight: torch.Tensor) -> None:
    """``weight`` as FP8 codes (``codes``) and their scale (``weight_scale``), buffers that move with the layer;
    ``weight`` itself stays an empty meta tensor of its shape and type, for library code that reads a layer's
    ``weight.dtype`` (transformers' ViT casts its pixels to its patch projection's)."""
    codes, scale = quantize(weight.detach())
    layer.register_buffer("codes", codes)
    layer.register_buffer("weight_scale", scale)
    layer.weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an FP8 weight: ``_scaled_mm`` of the quantized input and weight, the bias in the
    GEMM's epilogue."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        _hold(self, linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize(x)
        flat = codes.reshape(-1, x.shape[-1])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(flat, self.codes.t(), scale, self.weight_scale, bias=bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.codes.shape[0])


class Fp8Conv(nn.Module):
    """``nn.Conv1d/2d/3d`` with an FP8 weight: the convolution of the FP8 input and weight (BF16 out), then the
    scales and the bias (two operators, the product of the scales and one multiply-add: a fused kernel's epilogue
    would save them)."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"--dtype fp8: a convolution with padding {conv.padding!r}/{conv.padding_mode}")
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())
        _hold(self, conv.weight)
        self.fn: Callable[..., torch.Tensor] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize(x)
        out = self.fn(codes, self.codes, None, self.stride, self.padding, self.dilation, self.groups)
        scale = scale * self.weight_scale
        if self.bias is None:
            return (out * scale).to(x.dtype)
        bias = self.bias.to(out.dtype).reshape(1, -1, *([1] * (out.dim() - 2)))
        return torch.addcmul(bias, out, scale.to(out.dtype)).to(x.dtype)


def to_fp8(module: nn.Module) -> int:
    """Replace, in place, each ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``module`` (already in BF16) by its FP8
    form; how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Fp8Linear(child))
            count += 1
        elif type(child) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            setattr(module, name, Fp8Conv(child))
            count += 1
        else:
            count += to_fp8(child)
    return count


@dataclass(frozen=True)
class Fp8Error:
    """FP8's outputs against BF16's on the same input: the largest and the mean absolute difference, each over
    the BF16 outputs' largest and mean magnitude (not elementwise: a near-zero output would make any
    difference infinite), and the share of top-1 classes that agree where the model has class scores."""

    max_rel: float
    mean_rel: float
    top1_agreement: float | None


def compare(reference: Any, quantized: Any, scores: Callable[[Any], torch.Tensor] | None) -> Fp8Error:
    """``quantized`` (the FP8 run's outputs) against ``reference`` (BF16's), both on the host in FP32."""
    ref, got = main_output(reference), main_output(quantized)
    diff = (got - ref).abs()
    top1 = None
    if scores is not None:
        top1 = (scores(quantized).argmax(-1) == scores(reference).argmax(-1)).float().mean().item()
    return Fp8Error(
        max_rel=(diff.max() / ref.abs().max().clamp(min=1e-30)).item(),
        mean_rel=(diff.mean() / ref.abs().mean().clamp(min=1e-30)).item(),
        top1_agreement=top1,
    )
