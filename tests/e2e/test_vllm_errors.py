"""Clear errors before the engine starts: unknown profile, a model that does not fit."""

import json
import shutil

import pytest

from maia_serving.launch import Server, ServerFailed, free_port, vllm_serve_cmd

ENGINE_ENV = {"VLLM_CPU_CI_ENV": "1"}


def _fails(cmd, port, log) -> str:
    with pytest.raises(ServerFailed) as err:
        Server(cmd, port, log, env=ENGINE_ENV, timeout_s=240).start()
    return str(err.value)


def test_unknown_profile_names_the_known_ones(demo_model, logs_dir):
    port = free_port()
    cmd = vllm_serve_cmd(demo_model, port, "--additional-config", '{"maia_profile": "maia300"}',
                         "--enforce-eager")
    msg = _fails(cmd, port, logs_dir / "unknown-profile.log")
    assert "unknown device profile 'maia300'" in msg and "maia100" in msg


def test_model_that_does_not_fit_says_what_would(demo_model, tmp_path, logs_dir):
    """A Llama-3-70B-shaped config (no weights needed: sizing happens before loading)."""
    from maia_serving.emulator.model_shape import load_model_shape

    big = tmp_path / "llama70b-shape"
    shutil.copytree(demo_model, big)
    config = json.loads((big / "config.json").read_text())
    shape = load_model_shape("llama-3-70b")
    config.update(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                  num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                  num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
                  max_position_embeddings=8192)
    (big / "config.json").write_text(json.dumps(config))
    port = free_port()
    cmd = vllm_serve_cmd(big, port, "--additional-config", '{"maia_profile": "maia100"}', "--enforce-eager",
                         "--max-model-len", "8192")
    msg = _fails(cmd, port, logs_dir / "no-fit.log")
    assert "does not fit on maia100" in msg
    assert "--tensor-parallel-size 4" in msg
