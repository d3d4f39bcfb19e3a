"""Per-operator prices on maia, each worked by hand from the profile's published figures (Maia 100: 0.8 PFLOP/s
BF16 at 60%, 1.8 TB/s HBM at 75%, 5 us a kernel; PCIe at 32 GB/s; 150 GB/s to each peer) and PyTorch's FLOP
formulas, not from the code under test."""

import json

import pytest
import torch
import torch.nn.functional as F

import maia_serving.torch as maia_torch

FLOPS_PER_S = 0.8e15 * 0.6
BYTES_PER_S = 1.8e12 * 0.75
LAUNCH_S = 5e-6


def priced(block) -> list:
    with maia_torch.profile() as prof:
        block()
    return prof.ops


def only(ops, prefix: str):
    found = [op for op in ops if op.op.startswith(prefix)]
    assert len(found) == 1, [op.op for op in ops]
    return found[0]


def test_a_matmul_is_compute_bound_at_the_bf16_peak(maia100):
    a = torch.randn(2048, 2048, dtype=torch.bfloat16, device="maia")
    b = torch.randn(2048, 2048, dtype=torch.bfloat16, device="maia")
    op = only(priced(lambda: a @ b), "aten::mm")
    assert op.flops == 2 * 2048**3
    assert op.bytes == 3 * 2048 * 2048 * 2
    assert op.bound == "compute"
    assert op.time_s == pytest.approx(2 * 2048**3 / FLOPS_PER_S + LAUNCH_S, rel=1e-12)


def test_a_convolution_counts_pytorchs_flops_and_its_four_tensors(maia100):
    x = torch.randn(1, 3, 32, 32, device="maia")
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to("maia")
    op = only(priced(lambda: conv(x)), "aten::convolution")
    assert op.flops == 2 * (8 * 32 * 32) * (3 * 3 * 3)
    assert op.bytes == 4 * (3 * 32 * 32 + 8 * 3 * 3 * 3 + 8 + 8 * 32 * 32)
    assert op.memory_s > op.compute_s  # its bytes outweigh its FLOPs, and its launch both: launch-bound
    assert op.bound == "launch" and op.launch_s > op.memory_s
    assert op.time_s == pytest.approx(op.bytes / BYTES_PER_S + LAUNCH_S, rel=1e-12)


def test_what_bounds_an_operator():
    """The link a copy crosses, then the launch of a kernel too small to outweigh it, then compute or memory."""
    from maia_serving.torch.pricing import bound

    assert bound(1.0, 2.0, 0.0) == "memory" and bound(2.0, 1.0, 0.0) == "compute"
    assert bound(1.0, 2.0, 0.0, launch_s=3.0) == "launch"
    assert bound(1.0, 2.0, 4.0, launch_s=3.0) == "link"


def test_an_elementwise_op_reads_a_broadcast_dimension_once(maia100):
    x = torch.randn(64, 128, device="maia")
    y = torch.randn(128, device="maia")
    plain = only(priced(lambda: x + y), "aten::add")
    expanded = only(priced(lambda: x + y.expand(64, 128)), "aten::add")
    want = 4 * (64 * 128 + 128 + 64 * 128)
    assert plain.flops == expanded.flops == 0
    assert plain.bytes == expanded.bytes == want
    assert plain.time_s == pytest.approx(want / BYTES_PER_S + LAUNCH_S, rel=1e-12)


def test_attention_is_one_operator_with_pytorchs_sdpa_flops(maia100):
    q = torch.randn(1, 4, 16, 32, dtype=torch.bfloat16, device="maia")
    k = torch.randn(1, 2, 16, 32, dtype=torch.bfloat16, device="maia")
    v = torch.randn(1, 2, 16, 32, dtype=torch.bfloat16, device="maia")
    ops = priced(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    op = only(ops, "aten::_scaled_dot_product_fused_attention_overrideable")
    pairs = 16 * 17 // 2  # causal: each of the 16 queries sees itself and the keys before it
    assert op.flops == 2 * (2 * 1 * 4 * pairs * 32)  # QK^T and PV, each query head over its group's keys
    assert op.bytes == 2 * (4 + 2 + 2 + 4) * 16 * 32 + 4 * 4 * 16  # q, k, v, out in bf16; logsumexp in fp32
    assert op.time_s == pytest.approx(max(op.flops / FLOPS_PER_S, op.bytes / BYTES_PER_S) + LAUNCH_S, rel=1e-12)


def test_copies_cross_the_link_between_what_they_join(maia100):
    host = torch.ones(2**18)  # 1 MiB
    to_chip = only(priced(lambda: host.to("maia:0")), "aten::_copy_from")
    assert to_chip.bound == "link"
    assert to_chip.time_s == pytest.approx(2e-6 + 2**20 / 32e9, rel=1e-12)
    x = host.to("maia:0")
    across = only(priced(lambda: x.to("maia:1")), "aten::_copy_from")
    assert across.time_s == pytest.approx(5e-6 + 2**20 / 150e9, rel=1e-12)
    back = only(priced(lambda: x.cpu()), "aten::_copy_from")
    assert back.time_s == to_chip.time_s


def test_a_gemm_pays_for_its_partial_tiles_where_the_profile_has_tiling(h100):
    """H100 SXM: 989 TFLOP/s BF16 at 70%, 64 x 128 output tiles on 132 SMs: a 100 x 300 output fills 6 tiles
    of which 100 * 300 / (6 * 64 * 128) is useful."""
    a = torch.randn(100, 200, dtype=torch.bfloat16, device="maia")
    b = torch.randn(200, 300, dtype=torch.bfloat16, device="maia")
    op = only(priced(lambda: a @ b), "aten::mm")
    useful = 100 * 300 / (6 * 64 * 128)
    assert op.compute_s == pytest.approx(2 * 100 * 200 * 300 / (989e12 * 0.7) / useful, rel=1e-9)


def test_each_chip_has_a_clock_that_its_operators_advance(maia100):
    x = torch.randn(256, 256, device="maia:1")
    before = [maia_torch.clock_s(0), maia_torch.clock_s(1)]
    ops = priced(lambda: (x @ x).relu())
    after = [maia_torch.clock_s(0), maia_torch.clock_s(1)]
    assert after[0] == before[0]
    assert after[1] - before[1] == pytest.approx(sum(op.time_s for op in ops), rel=1e-12)
    assert {op.device for op in ops} == {1}


def test_the_profile_table_and_chrome_trace(maia100, tmp_path):
    x = torch.randn(32, 32, device="maia")
    with maia_torch.profile() as prof:
        for _ in range(3):
            x = (x @ x).tanh()
    table = prof.table()
    assert "Operator" in table and "Emulated" in table and "FLOP/B" in table and "Host" in table
    rows = {s.op.partition(".")[0]: s for s in prof.key_averages()}
    assert rows["aten::mm"].calls == 3 and rows["aten::tanh"].calls == 3
    assert prof.total_s == pytest.approx(sum(s.time_s for s in rows.values()), rel=1e-12)
    assert "Emulated total on maia100: " in table
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(path)
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == len(prof.ops) and all(e["dur"] > 0 for e in spans)
    assert spans[1]["ts"] == pytest.approx(spans[0]["ts"] + spans[0]["dur"])


@pytest.mark.parametrize(
    "make,op",
    [
        (lambda: torch.nn.LayerNorm(64), "aten::native_layer_norm"),
        (lambda: torch.nn.GroupNorm(4, 16), "aten::native_group_norm"),
    ],
)
def test_a_norm_is_one_fused_operator_as_on_a_device(maia100, make, op):
    """Not ATen's decomposition for backends without a kernel (a layer norm as a batch norm and an addcmul): the
    host's fused kernel, priced as one operator reading its input once; the CPU's result and gradient."""
    torch.manual_seed(0)
    norm, x = make(), torch.randn(8, 16, 64)
    want = norm(x.requires_grad_())
    want.square().sum().backward()
    x_maia = x.detach().to("maia").requires_grad_()
    norm_maia = norm.to("maia")
    ops = priced(lambda: norm_maia(x_maia).square().sum().backward())
    assert [o.op for o in ops].count(op) == 1, [o.op for o in ops]
    assert not any(o.op.startswith(("aten::native_batch_norm", "aten::var_mean")) for o in ops)
    torch.testing.assert_close(norm_maia(x_maia).cpu(), want)
    torch.testing.assert_close(x_maia.grad.cpu(), x.grad)
