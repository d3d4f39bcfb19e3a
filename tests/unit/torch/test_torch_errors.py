"""What a user gets wrong on maia, each a clear error naming the operator and what to do, and the device usable
after it: an operator the host has no CPU kernel for, a dtype the profile's matrix units lack, a chip the node
does not have, two chips in one operator (test_torch_device), out of memory (test_torch_device)."""

import pytest
import torch

import maia_serving.torch  # noqa: F401  (the device, where autoload left it out: an engine's process)


def still_usable() -> None:
    x = torch.ones(3, device="maia")
    assert torch.equal((x * 2).cpu(), torch.full((3,), 2.0))


def test_an_operator_without_a_cpu_kernel_names_itself_and_the_way_around():
    grid = torch.zeros(1, 4, 4, 2, device="maia")
    with pytest.raises(NotImplementedError, match=r"aten::cudnn_grid_sampler has no CPU kernel.*\.cpu\(\)"):
        torch.ops.aten.cudnn_grid_sampler(torch.ones(1, 1, 4, 4, device="maia"), grid)
    still_usable()


def test_a_factory_operator_without_a_cpu_kernel_too():
    with pytest.raises(NotImplementedError, match="aten::_cudnn_init_dropout_state has no CPU kernel"):
        torch.ops.aten._cudnn_init_dropout_state(0.5, True, 0, dtype=torch.uint8, device="maia")
    still_usable()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_matrix_units_refuse_a_dtype_the_profile_has_none_for(dtype):
    a = torch.ones(4, 4, dtype=dtype, device="maia")
    with pytest.raises(RuntimeError, match=r"aten::mm in \w+ on maia: the Microsoft Maia 200 has no"):
        torch.mm(a, a)
    conv = torch.nn.Conv2d(1, 1, 3).to(device="maia", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"aten::convolution in Double on maia"):
        conv(torch.ones(1, 1, 5, 5, dtype=torch.float64, device="maia"))
    assert torch.equal((a + a).cpu(), torch.full((4, 4), 2, dtype=dtype))  # elementwise ops run
    still_usable()


def test_a_chip_index_past_the_node_in_every_device_api():
    with pytest.raises(IndexError, match="maia:4 does not exist"):
        torch.maia.set_device(4)
    with pytest.raises(IndexError, match="maia:9 does not exist"):
        torch.maia.memory_allocated(9)
    with pytest.raises(ValueError, match="expected a maia device, got cpu"):
        torch.maia.memory_allocated("cpu")
    still_usable()


def test_a_block_that_fails_inside_sized_as_shows_its_own_error():
    """The node cannot be resized while the failed block's tensor lives on in the traceback: the block's error is
    the one raised, not the resize's; once that tensor is gone the node is resized as usual."""
    from maia_serving.torch import backend, sized_as

    def fail_holding_a_tensor() -> None:
        held = torch.ones(4, device="maia")  # noqa: F841 (kept alive by this frame, in the traceback)
        raise ValueError("the block's own")

    before = backend.profile().name
    with pytest.raises(ValueError, match="the block's own"):
        with sized_as("maia100") as node:
            assert node.name == "maia100"
            fail_holding_a_tensor()
    assert backend.profile().name == "maia100"  # the failed block's node, as documented
    with sized_as("h100-sxm"):
        still_usable()
    maia_serving.torch.set_profile(before)
