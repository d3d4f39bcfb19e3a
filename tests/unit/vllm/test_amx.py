"""The worker asks for the AMX tile state through torch's private helpers: both must still exist, and where the CPU
lists AMX the request must be granted (otherwise vLLM's CPU attention dies with "Illegal instruction")."""

import torch

from maia_serving.vllm import worker


def test_the_amx_request_is_made_and_granted_where_the_cpu_lists_amx():
    assert callable(torch.cpu._is_amx_tile_supported) and callable(torch.cpu._init_amx)
    worker._allow_amx()
    if torch.cpu._is_amx_tile_supported():
        assert torch.cpu._init_amx()
