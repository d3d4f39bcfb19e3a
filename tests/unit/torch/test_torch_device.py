"""torch.device("maia") as PyTorch's own APIs see it: the device module, the chips, HBM accounting and
out-of-memory, copies, seeds, and the traps of an out-of-tree device named like a built-in one."""

import copy
import io
import pickle

import pytest
import torch

import maia_serving.torch  # noqa: F401  (the device, where autoload left it out: an engine's process)
from maia_serving.emulator.hardware import load_profile

MAIA200 = load_profile("maia200")


def test_the_device_is_pytorchs_accelerator():
    assert torch.accelerator.current_accelerator().type == "maia"
    assert torch.maia.is_available()
    assert torch.maia.device_count() == MAIA200.network.node_chips == 4
    assert torch.maia.get_device_name(0) == "Microsoft Maia 200"
    assert torch.maia.mem_get_info()[1] == MAIA200.hbm_capacity_bytes
    # torch.accelerator.get_memory_info answers the same in a fresh interpreter (test_torch_autoload); here a
    # vLLM module another test imported may have replaced it (vllm/v1/worker/cpu/shm.py does, for its CPU worker).


def test_tensor_is_maia_is_pytorchs_builtin_property_not_ours():
    """`Tensor.is_maia` answers for PyTorch's built-in MAIA key, not for PrivateUse1: test device.type."""
    t = torch.ones(2, device="maia")
    assert t.device.type == "maia" and t.device.index == 0
    assert t.is_maia is False


def test_operators_give_the_cpus_values():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    got = ((a.to("maia") @ b.to("maia")).relu() * 2 - 1).softmax(-1)
    assert got.device.type == "maia"
    assert torch.equal(got.cpu(), ((a @ b).relu() * 2 - 1).softmax(-1))


def test_views_share_memory_and_in_place_writes_land():
    x = torch.zeros(4, 6, device="maia")
    view = x.t()[1:3]
    view.add_(1)
    x[0].fill_(5)
    want = torch.zeros(4, 6)
    want.t()[1:3].add_(1)
    want[0].fill_(5)
    assert torch.equal(x.cpu(), want)
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_out_arguments_grow_on_the_chip():
    out = torch.empty(0, device="maia")
    before = torch.maia.memory_allocated()
    torch.add(torch.ones(3, 4, device="maia"), 1, out=out)
    assert out.shape == (3, 4) and out.device.type == "maia"
    assert torch.equal(out.cpu(), torch.full((3, 4), 2.0))
    assert torch.maia.memory_allocated() >= before + 3 * 4 * 4


def test_memory_statistics_are_the_bytes_allocated():
    torch.maia.reset_peak_memory_stats()
    base = torch.maia.memory_allocated()
    a = torch.empty(1000, dtype=torch.float32, device="maia")
    b = torch.empty(250, dtype=torch.bfloat16, device="maia")
    assert torch.maia.memory_allocated() == base + 4000 + 500
    c = a * 2  # a CPU kernel's result, adopted by the chip
    assert torch.maia.memory_allocated() == base + 4000 + 500 + 4000
    del a, b, c
    assert torch.maia.memory_allocated() == base
    assert torch.maia.max_memory_allocated() == base + 8500
    stats = torch.maia.memory_stats()
    assert stats["allocated_bytes.all.current"] == base
    assert stats["reserved_bytes.all.current"] == torch.maia.memory_reserved() == base
    torch.maia.reset_peak_memory_stats()
    assert torch.maia.max_memory_allocated() == base
    assert "Capacity (HBM)" in torch.maia.memory_summary() and "216.00 GiB" in torch.maia.memory_summary()


def test_each_chip_holds_its_own_memory():
    base0, base1 = torch.maia.memory_allocated(0), torch.maia.memory_allocated(1)
    x = torch.ones(256, device="maia:1")
    assert torch.maia.memory_allocated(1) == base1 + 1024
    assert torch.maia.memory_allocated(0) == base0
    y = x.to("maia:0")
    assert y.device == torch.device("maia:0") and torch.maia.memory_allocated(0) == base0 + 1024
    with torch.maia.device(1):
        z = torch.zeros(8, device="maia")
    assert z.device == torch.device("maia:1")
    assert torch.maia.current_device() == 0


def test_tensors_of_two_chips_in_one_operator_is_an_error_that_names_both():
    """PyTorch's own device check answers first for most operators; the fallback's for the rest says what to do."""
    a, b = torch.ones(3, device="maia:0"), torch.ones(3, device="maia:1")
    with pytest.raises(RuntimeError, match=r"maia:0 and maia:1"):
        torch.add(a, b)
    with pytest.raises(RuntimeError, match=r"maia:0 and maia:1"):
        torch.cat([a, b])
    assert torch.equal((a + b.to("maia:0")).cpu(), torch.full((3,), 2.0))  # still usable


def test_a_chip_the_node_does_not_have():
    with pytest.raises(IndexError, match=r"maia:7 does not exist.*4 chip"):
        torch.ones(1, device="maia:7")


def test_out_of_memory_at_the_profiles_capacity(small_hbm):
    keep = torch.empty(600_000, dtype=torch.uint8, device="maia")
    with pytest.raises(torch.OutOfMemoryError) as err:
        torch.empty(600_000, dtype=torch.uint8, device="maia")
    message = str(err.value)
    assert message.startswith("Maia out of memory. Tried to allocate 585.94 KiB.")
    assert "maia:0 (Microsoft Maia 100) has a total capacity of 1.00 MiB of which 438.06 KiB is free" in message
    assert "585.94 KiB is allocated by PyTorch" in message and "empty_cache" in message
    assert torch.maia.memory_stats()["num_ooms"] == 1
    del keep
    torch.maia.empty_cache()
    again = torch.empty(600_000, dtype=torch.uint8, device="maia")  # the device allocates again
    assert torch.maia.memory_allocated() == 600_000
    del again


def test_a_result_past_the_capacity_is_out_of_memory_too(small_hbm):
    x = torch.ones(100_000, device="maia")  # 400 kB
    y = x * 2  # 800 kB in all
    with pytest.raises(torch.OutOfMemoryError):
        x + y  # another 400 kB: past 1 MiB
    del y
    assert torch.equal((x + x).cpu(), torch.full((100_000,), 2.0))
    del x


def test_the_profile_cannot_change_under_live_tensors():
    import maia_serving.torch as maia_torch

    keep = torch.ones(1, device="maia")
    with pytest.raises(RuntimeError, match="holds maia tensors"):
        maia_torch.set_profile("maia100")
    del keep


def test_seeds_make_random_operators_repeat():
    torch.manual_seed(1)
    a = torch.randn(5, device="maia")
    torch.maia.manual_seed(1)
    b = torch.randn(5, device="maia")
    assert torch.equal(a.cpu(), b.cpu())
    assert torch.Generator(device="maia").device.type == "maia"


def test_deepcopy_pickle_and_save_keep_maia_tensors():
    """torch/_tensor.py deep-copies and pickles through clone and .cpu()."""
    t = torch.arange(6.0, device="maia").view(2, 3)
    for clone in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert clone.device.type == "maia" and torch.equal(clone.cpu(), t.cpu())
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    loaded = torch.load(buf)["w"]
    assert loaded.device == t.device and torch.equal(loaded.cpu(), t.cpu())
    buf.seek(0)
    assert torch.load(buf, map_location="cpu")["w"].device.type == "cpu"


def test_float64_is_stored_but_not_multiplied():
    """Printing converts to float64 on the tensor's device, so storing it must work; the matrix units of the
    profile have no FP64, so a GEMM in it says so, and the device stays usable."""
    x = torch.ones(2, 2, dtype=torch.float64, device="maia")
    assert "device='maia:0'" in repr(x * 2)
    with pytest.raises(RuntimeError, match=r"aten::mm in Double on maia.*no Double matrix units.*model\.float\(\)"):
        x @ x
    assert torch.equal((x.float() @ x.float()).cpu(), torch.full((2, 2), 2.0))
