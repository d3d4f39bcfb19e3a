"""MaiaCommunicator: vLLM's CPU communicator, counting each collective for the emulated interconnect.

Every collective still runs on the host (shared memory, or gloo), as on vLLM's CPU platform; each
call is also recorded, with its bytes and group, in this process's tally
(``maia_serving.serving.collectives``). The worker (``maia_serving.vllm.worker``) ships the tally
of a step with the step's output, and the scheduler charges each call on the emulated interconnect.

Pipeline stages relay their tally downstream inside the tensors they send, under ``RELAY_KEY``, and
the receiving stage takes it out before the model sees the tensors: the last stage, whose first
tensor-parallel rank hands vLLM the step's output, so holds the calls of every stage. Only the
sender records a transfer.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

from maia_serving.serving.collectives import CollectiveTally
from maia_serving.serving.collectives import tensor_bytes as _nbytes

TALLY = CollectiveTally()
RELAY_KEY = "maia_serving.collectives"
OUTPUT_ATTR = "maia_collectives"  # the tally's attribute on a step's ModelRunnerOutput


class MaiaCommunicator(CpuCommunicator):
    def all_reduce(self, input_):
        """Out of place, as vLLM's custom op declares it (the CPU communicator reduces into its input:
        under a compiled graph, where the op may not alias or mutate its input, that gave wrong tokens)."""
        out = super().all_reduce(input_.clone())
        TALLY.record("all_reduce", self.world_size, _nbytes(input_))
        return out

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        out = super().all_gather(input_, dim)
        TALLY.record("all_gather", self.world_size, _nbytes(out))
        return out

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        out = super().gather(input_, dst, dim)
        TALLY.record("gather", self.world_size, self.world_size * _nbytes(input_))
        return out

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        out = super().reduce_scatter(input_, dim)
        TALLY.record("reduce_scatter", self.world_size, _nbytes(input_))
        return out

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        super().send(tensor, dst)
        TALLY.record("send", 2, _nbytes(tensor), self.rank_in_group)

    def send_tensor_dict(self, tensor_dict: dict[str, torch.Tensor | Any], dst: int) -> None:
        TALLY.record(
            "send", 2, sum(_nbytes(t) for t in tensor_dict.values() if isinstance(t, torch.Tensor)), self.rank_in_group
        )
        relay = torch.tensor(TALLY.take(), dtype=torch.int64).reshape(-1, 5)
        return super().send_tensor_dict({**tensor_dict, RELAY_KEY: relay}, dst)

    def recv_tensor_dict(self, src: int) -> dict[str, torch.Tensor | Any]:
        tensor_dict = super().recv_tensor_dict(src)
        relay = tensor_dict.pop(RELAY_KEY, None)
        if relay is not None:
            TALLY.merge(relay.tolist())
        return tensor_dict
