"""calibrate-kv on a tiny random Llama: recorded absmax, scales, written files, errors."""

import json

import pytest
import torch
from safetensors import safe_open

from maia_serving.cli.main import main
from maia_serving.ops import dequantize_fp8_ref, quantize_fp8_ref
from maia_serving.tools.calibrate_kv import (
    SCALES_SHARD,
    SGLANG_SCALES,
    SIDECAR,
    absmax_to_scale,
    calibrate_kv,
    collect_absmax,
    kv_cache_quantization_config,
)
from maia_serving.tools.training.tokenizer import stdlib_files, train_tokenizer

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 16


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(300, stdlib_files(2))
    tiny_llama(len(tokenizer)).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text(stdlib_files(3)[2].read_text()[:20_000])
    return path


def post_rope_kv_absmax(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer, per-head absmax of K after RoPE, K before RoPE and V, rebuilt from the
    layers' own pieces: input norm, k/v projections and the rotary embedding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        positions = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(hidden[0], positions)
        k_rope, k_raw, v_all = [], [], []
        for i, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hidden[i])
            k = layer.self_attn.k_proj(x).view(1, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
            _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
            for out, t in ((k_rope, k_rot), (k_raw, k), (v_all, v)):
                out.append(t.abs().amax(dim=(0, 2, 3)))
    return k_rope, k_raw, v_all


def test_recorded_absmax_is_post_rope_keys_and_values():
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    result = collect_absmax(model, ids, seq_len=16, progress=False)  # chunks of 16, 16, 8 tokens

    chunks = [post_rope_kv_absmax(model, torch.tensor([ids[i : i + 16]])) for i in (0, 16, 32)]
    assert result.num_tokens == 40 and len(result.k_absmax) == NUM_LAYERS
    for layer in range(NUM_LAYERS):
        k_rope = torch.stack([c[0][layer] for c in chunks]).amax(0)
        k_raw = torch.stack([c[1][layer] for c in chunks]).amax(0)
        v = torch.stack([c[2][layer] for c in chunks]).amax(0)
        torch.testing.assert_close(result.k_absmax[layer], k_rope, rtol=1e-6, atol=0)
        torch.testing.assert_close(result.v_absmax[layer], v, rtol=1e-6, atol=0)
        assert result.k_absmax[layer].shape == (NUM_KV_HEADS,)
        assert not torch.allclose(result.k_absmax[layer], k_raw)  # RoPE changed them: the test can tell


@pytest.mark.parametrize("fmt, fp8_max", [("e4m3", 448.0), ("e5m2", 57344.0)])
def test_scale_maps_absmax_onto_the_formats_largest_value(fmt, fp8_max):
    absmax = torch.tensor([fp8_max, 0.0, 2 * fp8_max, 3.5])
    scale = absmax_to_scale(absmax, fmt)
    assert scale.dtype == torch.float32
    assert scale.tolist() == [1.0, 1.0, 2.0, pytest.approx(3.5 / fp8_max)]  # zero absmax -> 1.0

    x = torch.tensor([[[-3.5, 1.0, 0.25]]])  # [tokens=1, kv_heads=1, head_dim=3]; |x| max 3.5
    codes = quantize_fp8_ref(x, absmax_to_scale(torch.tensor([3.5]), fmt), fmt)
    back = dequantize_fp8_ref(codes, absmax_to_scale(torch.tensor([3.5]), fmt), fmt)
    assert back[0, 0, 0].item() == pytest.approx(-3.5)  # the max lands on +-fp8_max, exactly representable


def test_non_finite_absmax_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        absmax_to_scale(torch.tensor([1.0, float("inf")]), "e4m3")


def test_calibrate_kv_writes_scales_config_and_sidecar(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "calibrated"
    result = calibrate_kv(tiny_model_dir, [data_file], out, max_tokens=500, seq_len=64, progress=False)
    assert result.num_tokens == 500

    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["format"] == "e4m3" and sidecar["strategy"] == "per_head"
    assert sorted(sidecar["layers"]) == ["0", "1"]
    with (
        safe_open(out / "model.safetensors", framework="pt") as f,
        safe_open(tiny_model_dir / "model.safetensors", framework="pt") as src,
    ):
        assert set(f.keys()) - set(src.keys()) == {
            f"model.layers.{i}.self_attn.{kv}_scale" for i in range(NUM_LAYERS) for kv in "kv"
        }
        for name in src.keys():
            assert torch.equal(f.get_tensor(name), src.get_tensor(name))
        for i in range(NUM_LAYERS):
            per_head = sidecar["layers"][str(i)]
            assert per_head["k"] == pytest.approx((result.k_absmax[i] / 448.0).tolist())
            assert len(per_head["k"]) == len(per_head["v"]) == NUM_KV_HEADS
            for kv in "kv":
                scale = f.get_tensor(f"model.layers.{i}.self_attn.{kv}_scale")
                assert scale.dtype == torch.float32 and scale.shape == (1,)
                assert scale.item() == sidecar["per_tensor"][str(i)][kv] == max(per_head[kv])

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == kv_cache_quantization_config()
    assert config["quantization_config"]["kv_cache_scheme"] == {
        "num_bits": 8,
        "type": "float",
        "strategy": "tensor",
        "dynamic": False,
        "symmetric": True,
    }
    assert config["vocab_size"] == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}

    # SGLang's --quantization-param-path file: one scale per layer covering K and V, TP rank 0.
    sglang = json.loads((out / SGLANG_SCALES).read_text())
    assert sglang["model_type"] == config["model_type"]
    assert sglang["kv_cache"]["dtype"] == "float8_e4m3fn"
    assert sglang["kv_cache"]["scaling_factor"]["0"] == {
        str(i): max(sidecar["per_tensor"][str(i)].values()) for i in range(NUM_LAYERS)
    }


def test_e5m2_calibration_declares_no_kv_cache_scheme(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "e5m2"
    result = calibrate_kv(tiny_model_dir, [data_file], out, max_tokens=200, fmt="e5m2", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] is None  # vLLM 0.32 refuses fp8_e5m2 with one
    assert json.loads((out / SIDECAR).read_text())["format"] == "e5m2"
    assert not (out / SGLANG_SCALES).exists()  # SGLang reads that file for E4M3 only
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_scale").item() == pytest.approx(
            result.k_absmax[0].max().item() / 57344.0
        )


def test_sharded_checkpoint_gets_a_scales_shard(tiny_model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tiny_model_dir / name).read_bytes())
    out = tmp_path / "out"
    calibrate_kv(sharded, [data_file], out, max_tokens=100, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.1.self_attn.v_scale"] == SCALES_SHARD
    assert all((out / shard).exists() for shard in set(index.values()))


def test_missing_data_file_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration data file.*nope.txt"):
        calibrate_kv(tiny_model_dir, [tmp_path / "nope.txt"], tmp_path / "out", progress=False)


def test_model_dir_without_config_is_a_clear_error(data_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        calibrate_kv(tmp_path, [data_file], tmp_path / "out", progress=False)


def test_cli_reports_errors_and_runs(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(["calibrate-kv", "--model", str(tmp_path), "--data", str(data_file), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert (
        main(
            [
                "calibrate-kv",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data_file),
                "--out",
                str(tmp_path / "cli"),
                "--max-tokens",
                "128",
                "--format",
                "e5m2",
            ]
        )
        == 0
    )
    assert "calibrated e5m2 KV-cache scales on 128 tokens" in capsys.readouterr().out
    assert (tmp_path / "cli" / SIDECAR).exists()
