"""MaiaCommunicator on a real (one-rank, gloo) process group: every collective still runs and is
recorded with its bytes and group; a stage's tally rides with the tensors it sends and leaves them
before the next stage's model sees them. Two-rank groups and real stages: tests/e2e/test_collectives.py."""

import pytest
import torch
import torch.distributed as dist
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

from maia_serving.serving.collectives import CollectiveTally
from maia_serving.vllm import communicator as comm_module
from maia_serving.vllm.communicator import RELAY_KEY, MaiaCommunicator
from tests.utils.launch import free_port


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def tally(monkeypatch):
    fresh = CollectiveTally()
    monkeypatch.setattr(comm_module, "TALLY", fresh)
    return fresh


@pytest.fixture
def comm(group):
    return MaiaCommunicator(group, torch.device("cpu"), group, unique_name="test")


def test_each_collective_runs_and_is_recorded_with_its_bytes(comm, tally):
    x = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    reduced = comm.all_reduce(x)
    assert torch.equal(reduced, x)
    assert reduced.data_ptr() != x.data_ptr()  # out of place, as vLLM's custom op declares it
    assert torch.equal(comm.all_gather(x, dim=-1), x)
    assert torch.equal(comm.gather(x, dst=0, dim=-1), x)
    comm.all_reduce(x)
    assert sorted(tally.take()) == [(0, 1, 24, 2, 0), (1, 1, 24, 1, 0), (2, 1, 24, 1, 0)]


def test_a_stage_relays_its_tally_inside_the_tensors_it_sends(comm, tally, monkeypatch):
    """The host's transport (vLLM's shared-memory send of a tensor dict) replaced by a queue."""
    wire = []
    monkeypatch.setattr(CpuCommunicator, "send_tensor_dict", lambda self, tensors, dst: wire.append(tensors))
    monkeypatch.setattr(CpuCommunicator, "recv_tensor_dict", lambda self, src: wire.pop(0))
    hidden = torch.ones(5, 8, dtype=torch.bfloat16)
    comm.all_reduce(hidden.clone())
    sent = {"hidden_states": hidden, "residual": hidden}
    comm.send_tensor_dict(sent, dst=1)
    assert set(sent) == {"hidden_states", "residual"}  # the caller's dict is left alone
    assert tally.rows() == []  # shipped with the tensors
    assert wire[0][RELAY_KEY].dtype == torch.int64
    received = comm.recv_tensor_dict(src=0)
    assert set(received) == {"hidden_states", "residual"}
    assert sorted(tally.take()) == [(0, 1, 80, 1, 0), (4, 2, 160, 1, 0)]


def test_a_dict_without_a_relay_arrives_as_sent(comm, tally, monkeypatch):
    monkeypatch.setattr(CpuCommunicator, "recv_tensor_dict", lambda self, src: {"hidden_states": torch.ones(2)})
    assert set(comm.recv_tensor_dict(src=0)) == {"hidden_states"}
    assert tally.rows() == []


def test_a_steps_output_takes_the_tally_and_the_shared_empty_output_is_left_alone(tally, monkeypatch):
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    from maia_serving.vllm import worker

    monkeypatch.setattr(worker, "TALLY", tally)
    tally.record("all_reduce", 2, 100)
    assert worker._with_collectives(EMPTY_MODEL_RUNNER_OUTPUT) is EMPTY_MODEL_RUNNER_OUTPUT
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, worker.OUTPUT_ATTR)
    assert worker._with_collectives(None) is None  # a stage before the last returns nothing
    output = worker._with_collectives(ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}))
    assert output.maia_collectives == [(0, 2, 100, 1, 0)]
    assert tally.rows() == []
