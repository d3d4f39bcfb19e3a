"""vllm/device.py: the emulated device from vLLM's config, priced as the served model or a proxy shape."""

import json
from types import SimpleNamespace

import pytest

from maia_serving import envs
from maia_serving.vllm.device import build_device, host_plan

DEMO = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}


def _vllm_config(additional: dict, **parallel) -> SimpleNamespace:
    """A stand-in of vLLM's config serving the demo shape, one rank unless ``parallel`` says otherwise."""
    layout = {
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "data_parallel_size": 1,
        "enable_expert_parallel": False,
        "all2all_backend": "allgather_reducescatter",
        **parallel,
    }
    return SimpleNamespace(
        model_config=SimpleNamespace(
            hf_config=SimpleNamespace(to_dict=lambda: dict(DEMO)),
            dtype="torch.bfloat16",
            served_model_name="demo",
            model="m",
            max_model_len=512,
        ),
        parallel_config=SimpleNamespace(**layout),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048, max_num_seqs=64),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=128, gpu_memory_utilization=0.92),
        additional_config=additional,
    )


def test_the_vllm_adapter_prices_the_proxy_and_names_the_setting(monkeypatch):
    """vllm/device.py on a stand-in of vLLM's config: maia_model wins over the environment, and an
    error names the spelling the user gave."""
    monkeypatch.delenv(envs.MAIA_SERVING_MODEL, raising=False)
    config = _vllm_config({"maia_profile": "maia200", "maia_model": "llama-3-8b"})
    device = build_device(config)
    assert (device.plan.model, device.plan.profile) == ("llama-3-8b", "maia200")
    assert host_plan(config, device).model == "demo"
    config.additional_config["maia_model"] = "nope"
    with pytest.raises(ValueError, match="^--additional-config maia_model='nope': no model config"):
        build_device(config)
    del config.additional_config["maia_model"]
    assert build_device(config).plan.model == "demo"
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "nope")
    with pytest.raises(ValueError, match="^MAIA_SERVING_MODEL='nope': no model config"):
        build_device(config)


def test_the_vllm_adapter_prices_replicas_and_expert_parallelism_as_vllm_is_given_them():
    """-dp 2 -ep --all2all-backend deepep_low_latency reach the cost model; vLLM's ParallelConfig has the fields."""
    from vllm.config import ParallelConfig

    from maia_serving.emulator.cost.layout import Parallel

    assert {"data_parallel_size", "enable_expert_parallel", "all2all_backend"} <= set(vars(ParallelConfig()))
    config = _vllm_config(
        {"maia_profile": "maia200", "maia_model": "mixtral-8x7b"},
        data_parallel_size=2,
        enable_expert_parallel=True,
        all2all_backend="deepep_low_latency",
    )
    assert build_device(config).cost_model.parallel == Parallel(dp=2, ep=True, all2all="deepep_low_latency")
    config.parallel_config.data_parallel_size = 1  # one replica: the backend is never used, so never checked
    config.parallel_config.all2all_backend = "mori_low_latency"
    assert build_device(config).cost_model.parallel == Parallel(ep=True)


def test_the_vllm_adapter_routes_the_proxy_as_maia_expert_load_counts(monkeypatch, tmp_path):
    """maia_expert_load (else MAIA_SERVING_EXPERT_LOAD) reaches the cost model; a bad file or a dense model is
    refused naming the spelling the user gave."""
    monkeypatch.delenv(envs.MAIA_SERVING_EXPERT_LOAD, raising=False)
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"source": "a hot expert", "layers": [80, 20, 20, 20, 20, 20, 10, 10]}))
    config = _vllm_config({"maia_profile": "maia200", "maia_model": "mixtral-8x7b", "maia_expert_load": str(load)})
    routed = build_device(config).cost_model.model.moe
    assert routed.load.source == "a hot expert" and routed.load.shares[0][0] == pytest.approx(2 * 80 / 200)
    del config.additional_config["maia_expert_load"]
    assert build_device(config).cost_model.model.moe.load is None  # uniform by default
    monkeypatch.setenv(envs.MAIA_SERVING_EXPERT_LOAD, str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="^MAIA_SERVING_EXPERT_LOAD='.*none.json': --expert-load .*no such file"):
        build_device(config)
    config.additional_config.update(maia_model="llama-3-8b", maia_expert_load=str(load))
    with pytest.raises(ValueError, match="^--additional-config maia_expert_load=.*llama-3-8b has no routed experts"):
        build_device(config)
