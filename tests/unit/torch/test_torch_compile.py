"""torch.compile on maia: the `maia` backend runs the captured graph on the device, priced as in eager mode;
the default backend (Inductor), which has no code generator for maia, fails with one message that says what
to use instead."""

import pytest
import torch

import maia_serving.torch as maia_torch


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to("maia")


def test_the_maia_backend_runs_the_graph_on_the_device_and_prices_it():
    net, x = model(), torch.randn(3, 16, device="maia")
    compiled = torch.compile(net, backend="maia")
    with maia_torch.profile() as prof:
        got = compiled(x)
    assert got.device.type == "maia" and torch.equal(got.cpu(), net(x).cpu())
    assert sum(op.flops for op in prof.ops) == 2 * 3 * (16 * 32 + 32 * 4)


def test_the_default_backend_says_what_to_use_instead():
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"Inductor.*maia is not one.*backend='maia'"):
        torch.compile(model())(torch.randn(3, 16, device="maia"))
    torch._dynamo.reset()
    assert torch.equal(model()(torch.ones(1, 16, device="maia")).cpu(), model()(torch.ones(1, 16, device="maia")).cpu())
