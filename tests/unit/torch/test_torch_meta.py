"""``meta_profile``: a forward recorded on the meta device is priced as the maia device prices the same forward
run for real: the live device is the oracle, on each built-in model's small config."""

import json

import pytest
import torch

from maia_serving import zoo
from maia_serving.cli.main import main
from maia_serving.tools.profile_model import load_example, profile_model
from maia_serving.torch.meta import LiveBytes, meta_profile


@pytest.mark.parametrize("name,shape", [("yolov8n", 64), ("vit-tiny-16", 32), ("unet-tiny", 16), ("llama-tiny", 16)])
def test_a_meta_forward_is_priced_as_the_live_one(maia100, name, shape):
    torch.manual_seed(0)
    (live,), measured = profile_model(load_example(name, 2, shape), [maia100])
    (meta,), recorded = profile_model(load_example(name, 2, shape, meta=True), [maia100], meta=True)
    assert recorded.outputs is None and measured.outputs is not None
    assert meta.flops == live.flops > 0
    assert recorded.resident_bytes == measured.resident_bytes
    assert meta.peak_memory_bytes == live.peak_memory_bytes
    # Llama's dtype casts are recorded as _to_copy where the device records its copies: a few launches apart.
    assert meta.latency_ms == pytest.approx(live.latency_ms, rel=0.02)
    assert {t.op.partition(".")[0] for t in meta.top_ops[:3]} == {t.op.partition(".")[0] for t in live.top_ops[:3]}


def test_attention_is_the_devices_fused_operator_not_the_math_fallback():
    with torch.device("meta"):
        example = zoo.builtin("vit-tiny-16").build(1, 32)
    with torch.no_grad(), meta_profile() as run:
        example.module(*example.inputs)
    ops = [s[0] for s in run.signatures]
    assert ops.count("aten::_scaled_dot_product_fused_attention_overrideable.default") == 12
    assert not any(op.startswith(("aten::bmm", "aten::_safe_softmax", "aten::view", "aten::empty")) for op in ops)


def test_storages_are_held_until_their_last_tensor_dies():
    memory = LiveBytes(resident=1000)
    a = torch.empty(100, dtype=torch.uint8, device="meta")
    memory.track([a], inputs=set())
    view = a[10:]
    memory.track([view], inputs={a.untyped_storage()._cdata})
    b = torch.empty(50, dtype=torch.uint8, device="meta")
    memory.track([b], inputs=set())
    assert memory.current == memory.peak == 1150
    del a
    assert memory.current == 1150  # the view holds the storage
    del view
    assert memory.current == 1050
    resident = torch.empty(10, device="meta")
    memory.track([resident[1:]], inputs={resident.untyped_storage()._cdata})
    assert memory.current == 1050 and memory.peak == 1150


def test_an_8b_model_is_priced_without_holding_it(capsys):
    """Llama-3-8B's prefill of 512 tokens: 2 FLOPs a parameter a token but the embedding's (a lookup), plus
    attention's; 16 GB of BF16 weights; seconds and no host memory to speak of."""
    from maia_serving.zoo.llama import config_of

    config = config_of("llama-3-8b")
    embedding = config["vocab_size"] * config["hidden_size"]
    argv = ["profile", "--model", "llama-3-8b", "--meta", "--input-shape", "512", "--json"]
    assert main([*argv, "--profile", "maia100", "h100-sxm"]) == 0
    maia, h100 = json.loads(capsys.readouterr().out)
    params = zoo.builtin("llama-3-8b").published_params
    attention = 4 * 512 * 512 * config["hidden_size"] * config["num_hidden_layers"] / 2  # causal: half the pairs
    assert maia["fits"] and maia["flops"] == pytest.approx(2 * (params - embedding) * 512 + attention, rel=0.01)
    assert 2 * params < maia["peak_memory_bytes"] < 2 * params * 1.1
    assert maia["flops"] == h100["flops"] and h100["latency_ms"] < maia["latency_ms"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-tiny", "--meta", "--train"], "--meta records a forward"),
        (["--model", "llama-tiny", "--meta", "--dtype", "fp8"], "--meta records a forward"),
        (["--model", "llama-tiny", "--meta", "--trace", "t.json"], "--meta runs nothing"),
    ],
)
def test_what_meta_cannot_do_is_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
