"""`profile --dtype fp8`: the FP8 layers' arithmetic against float64 references of the same codes, the device's
quantization against the host reference bit for bit, the GEMMs priced at the FP8 peak, and the error report."""

import json

import pytest
import torch
from torch import nn

from maia_serving.cli.main import main
from maia_serving.emulator.hardware import load_profile
from maia_serving.tools.fp8_model import Fp8Conv, Fp8Linear, compare, quantize, to_fp8


@pytest.fixture(autouse=True)
def device(maia100):
    import maia_serving.torch  # noqa: F401 (the device)


def test_quantize_is_amax_over_448_and_the_device_gives_the_hosts_codes():
    torch.manual_seed(0)
    x = torch.randn(64, 96, dtype=torch.bfloat16) * 3
    codes, scale = quantize(x)
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(x.float().abs().max().item() / 448)
    assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().max().item() == 448
    on_maia, maia_scale = quantize(x.to("maia"))
    assert on_maia.device.type == "maia"
    assert torch.equal(on_maia.cpu().view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(maia_scale.cpu(), scale)
    zero_codes, zero_scale = quantize(torch.zeros(4, 4, device="maia"))
    assert zero_scale.item() == 1.0 and not zero_codes.cpu().float().any()


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    codes, scale = quantize(t)
    return codes.double() * scale.double()


@pytest.mark.parametrize("on", ["cpu", "maia"])
def test_linear_is_the_float64_product_of_its_codes(on):
    torch.manual_seed(1)
    linear = nn.Linear(40, 24).to(torch.bfloat16)
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)
    expected = _dequantized(x) @ _dequantized(linear.weight).T + linear.bias.double()
    layer = Fp8Linear(linear).to(on)
    got = layer(x.to(on)).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 24)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)  # BF16's rounding of the result


def test_convolution_is_the_float64_convolution_of_its_codes():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2).to(torch.bfloat16)
    x = torch.randn(2, 6, 9, 9, dtype=torch.bfloat16)
    expected = nn.functional.conv2d(_dequantized(x), _dequantized(conv.weight), conv.bias.double(), 2, 1, 1, 2)
    got = Fp8Conv(conv).to("maia")(x.to("maia")).cpu()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


def test_layers_are_replaced_and_library_code_still_reads_the_weights_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(16, 2)))
    model = model.to(torch.bfloat16)
    assert to_fp8(model) == 2
    assert isinstance(model[0], Fp8Conv) and isinstance(model[2][1], Fp8Linear)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].codes.dtype == torch.float8_e4m3fn
    assert to_fp8(nn.Sequential(nn.ReLU())) == 0


def test_the_gemm_is_priced_at_the_chips_fp8_peak():
    """Maia 200's tensor unit runs FP8 at 5 PFLOPS and BF16 on its vector units (338 TFLOPS): the same GEMM's
    compute time is 338/5000 of BF16's where the two run at one share of their peaks; Maia 100 runs both at one
    peak. The operands are a byte each either way."""
    import maia_serving.torch as maia

    torch.manual_seed(3)
    linear = nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    x = torch.randn(128, 512, dtype=torch.bfloat16, device="maia")
    with maia.profile() as bf16:
        linear.to("maia")(x)
    fp8 = Fp8Linear(linear.cpu()).to("maia")
    with maia.profile() as quantized:
        fp8(x)
    del x, linear, fp8

    def gemm(block, chip: str, op: str):
        return next(s for s in block.key_averages(on=load_profile(chip)) if s.op.startswith(op))

    for chip, ratio in (("maia200", 338 / 5000), ("maia100", 1.0)):
        mm, scaled = gemm(bf16, chip, "aten::mm"), gemm(quantized, chip, "aten::_scaled_mm")
        assert scaled.flops == mm.flops == 2 * 128 * 512 * 256
        assert scaled.compute_s / mm.compute_s == pytest.approx(ratio, rel=0.35), chip
    assert mm.bytes == (128 * 512 + 512 * 256 + 128 * 256) * 2
    assert scaled.bytes == 128 * 512 + 512 * 256 + 128 * 256 * 2 + 2 * 4  # FP8 operands, BF16 result, 2 scales


def test_compare_measures_against_the_reference_scale():
    ref = {"logits": torch.tensor([[1.0, 3.0, 2.0], [4.0, -1.0, 0.0]])}
    same = compare(ref, ref, lambda out: out["logits"])
    assert same.max_rel == 0 and same.mean_rel == 0 and same.top1_agreement == 1.0
    moved = {"logits": torch.tensor([[1.0, 3.0, 3.5], [4.0, -1.0, 0.0]])}
    error = compare(ref, moved, lambda out: out["logits"])
    assert error.max_rel == pytest.approx(1.5 / 4)
    assert error.mean_rel == pytest.approx((1.5 / 6) / (11 / 6))
    assert error.top1_agreement == 0.5
    assert compare(ref, moved, None).top1_agreement is None


def test_profile_fp8_reports_its_error_and_halves_the_weights(capsys):
    argv = ["profile", "--model", "vit-tiny-16", "--input-shape", "32", "--batch-size", "2", "--json"]
    assert main([*argv, "--profile", "maia200"]) == 0
    (bf16,) = json.loads(capsys.readouterr().out)
    assert bf16["fp8_error"] is None
    assert main([*argv, "--profile", "maia200", "--dtype", "fp8"]) == 0
    (fp8,) = json.loads(capsys.readouterr().out)
    assert set(fp8["fp8_error"]) == {"max_rel", "mean_rel", "top1_agreement"}
    assert 0 < fp8["fp8_error"]["mean_rel"] < 0.5 and fp8["fp8_error"]["top1_agreement"] is not None
    assert fp8["peak_memory_bytes"] < bf16["peak_memory_bytes"]
    assert "aten::_scaled_mm" in {t["op"] for t in fp8["top_ops"]}
    assert main(["profile", "--model", "vit-tiny-16", "--input-shape", "32", "--dtype", "fp8"]) == 0
    assert "FP8 against BF16 on this input" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-tiny", "--input-shape", "8", "--dtype", "fp8", "--train"], "FP8 training is not modelled"),
        (["--model", "unet-tiny", "--dtype", "fp8", "--profile", "nope"], "nope"),
    ],
)
def test_what_fp8_does_not_do_is_exit_2(capsys, argv, message):
    assert main(["profile", *argv]) == 2
    assert message in capsys.readouterr().err
