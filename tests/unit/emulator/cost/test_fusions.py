"""Kernel fusions beyond vLLM's own, by hand on Llama-3-8B (hidden 4096, MLP width 14336, BF16) and Mixtral."""

import pytest

from maia_serving.emulator import ServingConfig, load_model_shape, load_profile
from maia_serving.emulator.cost.model import CostModel, StepShape
from maia_serving.emulator.cost.terms import op_terms


def _terms(model: str, *fusions: str) -> dict:
    return {t.name: t for t in op_terms(load_model_shape(model), fusions=fusions)}


def test_rotary_inside_the_attention_kernel_moves_no_bytes_and_launches_nothing():
    plain, fused = _terms("llama-3-8b"), _terms("llama-3-8b", "qkv_rotary")
    assert plain["rotary"].bytes[0] == 32 * 2 * (4096 + 1024) * 2  # q and k read and written, 32 layers
    assert fused["rotary"].bytes == (0.0,) * 8 and fused["rotary"].launches == 0
    assert fused["rotary"].flops == plain["rotary"].flops
    assert {n: t for n, t in fused.items() if n != "rotary"} == {n: t for n, t in plain.items() if n != "rotary"}


@pytest.mark.parametrize("model,prefix", [("llama-3-8b", ""), ("mixtral-8x7b", "experts.")])
def test_silu_in_the_gate_up_epilogue_writes_the_width_once(model, prefix):
    """Per row the gate-up GEMM read 4096 inputs and wrote 2 x 14336 outputs (2 B each): 65,536 B; fused it writes
    14336: 36,864 B; SiLU-and-mul's own 3 x 14336 x 2 B are gone with its kernel, its FLOPs kept."""
    plain, fused = _terms(model), _terms(model, "gate_up_silu")
    up, silu = f"{prefix}gate_up_proj", f"{prefix}silu_and_mul"
    rows = plain[up].gemm_rows[0]
    assert plain[up].bytes[0] == pytest.approx(32 * 65536 * rows)
    assert fused[up].bytes[0] == pytest.approx(32 * 36864 * rows)
    assert fused[up].bytes[7] == plain[up].bytes[7]  # the weights read as before
    assert fused[silu].bytes == (0.0,) * 8 and fused[silu].launches == 0
    assert fused[silu].flops == plain[silu].flops


def test_fusions_only_make_a_step_cheaper_and_an_unknown_one_is_refused():
    m200, llama = load_profile("maia200"), load_model_shape("llama-3-8b")
    step = StepShape.of([(512, 512)] * 4 + [(1, 900)] * 32)
    costs = [
        CostModel(m200, llama, fusions=f).cost(step).total_s
        for f in ((), ("qkv_rotary",), ("qkv_rotary", "gate_up_silu"))
    ]
    assert costs[0] > costs[1] > costs[2]
    with pytest.raises(ValueError, match="unknown fusion rope; known: qkv_rotary, gate_up_silu"):
        ServingConfig(fusions=("rope",))


def test_simulate_takes_the_fusions_and_says_so(capsys):
    from maia_serving.cli.main import main

    code = main(
        [
            "simulate",
            "--model",
            "llama-3-8b",
            "--device",
            "h100-sxm",
            "--fusions",
            "qkv_rotary",
            "--num-prompts",
            "4",
            "--input-len",
            "128",
            "--output-len",
            "4",
        ]
    )
    assert code == 0 and "tp=1, pp=1, fused: qkv_rotary" in capsys.readouterr().out
