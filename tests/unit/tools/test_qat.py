"""qat-kv on a tiny random Llama: the STE, the fake-quant forward, determinism, resume, the
written checkpoint, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from maia_serving.cli.main import main
from maia_serving.ops.mx import MX_FORMATS, dequantize_mx_ref, quantize_mx_ref
from maia_serving.tools.training import qat
from maia_serving.tools.training.qat import (
    QAT_FORMATS,
    QatConfig,
    fake_quantize_kv,
    qat_kv,
    register_qat_attention,
    state_dir,
)
from maia_serving.tools.training.tokenizer import stdlib_files, train_tokenizer

TINY = QatConfig(steps=4, batch_size=2, seq_len=32, save_every=2, eval_windows=2, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(300, stdlib_files(2))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = stdlib_files(3)[2].read_text()
    (path / "heldout.txt").write_text(text[:3_000])
    (path / "calibration.txt").write_text(text[3_000:12_000])
    return path


def run(model_dir, out, cfg=TINY, **kwargs):
    return qat_kv(model_dir, [model_dir / "calibration.txt"], out, cfg, progress=False, **kwargs)


def weights(path):
    return load_file(path / "model.safetensors")


def kv(seed: int = 0) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] with a wide spread, as HF attention hands K/V over."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 5, 32, generator=g) * torch.logspace(-3, 2, 32)


@pytest.mark.parametrize("fmt", [f for f in MX_FORMATS if MX_FORMATS[f].scale == "e8m0"])
def test_fake_quant_forward_is_the_ops_dequant_of_quant(fmt):
    x = kv()
    rows = x.transpose(1, 2)  # the ops' [..., num_kv_heads, head_dim]
    expected = dequantize_mx_ref(quantize_mx_ref(rows, fmt), fmt, 32).transpose(1, 2)
    assert torch.equal(fake_quantize_kv(x, fmt), expected)
    assert not torch.equal(expected, x)


def test_nvfp4_and_fp8_use_a_calibrated_per_tensor_scale():
    x = kv()
    rows = x.transpose(1, 2)
    t = x.abs().max().reshape(1) / (448 * 6)
    nvfp4 = dequantize_mx_ref(quantize_mx_ref(rows, "nvfp4", t), "nvfp4", 32, t).transpose(1, 2)
    assert torch.equal(fake_quantize_kv(x, "nvfp4"), nvfp4)
    from maia_serving.ops.fp8 import dequantize_fp8_ref, quantize_fp8_ref

    s = x.abs().max().reshape(1) / 448
    fp8 = dequantize_fp8_ref(quantize_fp8_ref(rows, s, "e4m3"), s, "e4m3").transpose(1, 2)
    assert torch.equal(fake_quantize_kv(x, "fp8_e4m3"), fp8)


@pytest.mark.parametrize("fmt", QAT_FORMATS)
def test_straight_through_gradient(fmt):
    x = kv().requires_grad_()
    fake_quantize_kv(x, fmt).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # no value is clipped: the scales follow the data


def test_attention_hook_fake_quantizes_post_rope_keys_and_values(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = []
    monkeypatch.setattr(qat, "fake_quantize_kv", lambda x, fmt: seen.append(x) or x)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.arange(6)[None]
    reference = model(input_ids=ids).logits
    model.set_attn_implementation(register_qat_attention("mxfp4"))
    assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-6)  # same mask, same attention
    # K then V per layer, [batch, kv_heads, seq, head_dim]: what the cache stores
    assert [tuple(t.shape) for t in seen] == [(1, 2, 6, 16)] * 4


def test_distillation_loss_is_zero_against_itself_and_lm_loss_is_cross_entropy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = torch.arange(12).reshape(2, 6)
    lr0 = torch.optim.SGD(model.parameters(), lr=0.0)
    assert abs(qat.train_step(model, lr0, batch, 1.0, teacher=model)) < 1e-6  # unquantized student = teacher
    logits = model(input_ids=batch[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert qat.train_step(model, lr0, batch, 1.0) == pytest.approx(ce.item(), rel=1e-6)


def test_deterministic_and_output_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    a = run(tiny_model_dir, tmp_path / "a")
    b = run(tiny_model_dir, tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.loss_after == b.loss_after
    source = weights(tiny_model_dir)
    assert any(not torch.equal(wa[k], source[k]) for k in wa)
    assert all(t.dtype == torch.bfloat16 for t in wa.values())

    out = tmp_path / "a"
    config = json.loads((out / "config.json").read_text())
    assert "maia_kv_qat" not in json.dumps(config) and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config._attn_implementation == "sdpa"
    for name in ("tokenizer.json", "generation_config.json", "heldout.txt", "calibration.txt", "qat.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "qat.json").read_text())
    assert report["format"] == "mxfp4" and report["config"]["steps"] == 4
    assert report["config"]["objective"] == "distill"
    assert set(report["heldout_ppl"]) == {"bf16", "ptq", "qat", "qat_unquantized"}
    assert not state_dir(out).exists()


def test_the_output_is_the_moving_average_of_the_steps_weights(tiny_model_dir, tmp_path, monkeypatch):
    step, trajectory = qat.train_step, []

    def recorded(model, *args):
        if not trajectory:  # the weights the average starts from: the source's
            trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss = step(model, *args)
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss

    monkeypatch.setattr(qat, "train_step", recorded)
    decay = 0.75  # not 0.5, where the two weights of the average are alike
    run(tiny_model_dir, tmp_path / "ema", QatConfig(**{**TINY.__dict__, "ema_decay": decay}))
    average = dict(trajectory[0])
    for weights_after in trajectory[1:]:
        average = {n: torch.lerp(average[n], weights_after[n], 1 - decay) for n in average}
    written, last = weights(tmp_path / "ema"), trajectory[-1]
    assert len(trajectory) == TINY.steps + 1 and written.keys() == average.keys()
    assert all(torch.equal(written[n], average[n].to(torch.bfloat16)) for n in written)
    assert any(not torch.equal(written[n], last[n].to(torch.bfloat16)) for n in written)  # not the last step's


def test_interrupted_run_resumes_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    run(tiny_model_dir, tmp_path / "whole")
    step, calls = qat.train_step, []

    def interrupted(*args):
        if len(calls) == 3:  # steps 0-2 done, the checkpoint holds step 2
            raise KeyboardInterrupt
        calls.append(1)
        return step(*args)

    monkeypatch.setattr(qat, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and (state_dir(tmp_path / "resumed") / qat.STATE_FILE).is_file()
    monkeypatch.setattr(qat, "train_step", step)
    report = run(tiny_model_dir, tmp_path / "resumed")
    assert report.resumed_from_step == 2
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    monkeypatch.setattr(qat, "train_step", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "other")
    with pytest.raises(ValueError, match="different qat-kv run"):
        run(tiny_model_dir, tmp_path / "other", QatConfig(**{**TINY.__dict__, "lr": 1e-3}))


def test_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown KV format 'fp3'.*mxfp4, nvfp4, fp8_e4m3"):
        qat_kv(tiny_model_dir, [tiny_model_dir / "calibration.txt"], tmp_path / "o", QatConfig(fmt="fp3"))
    with pytest.raises(ValueError, match="unknown QAT objective 'mse'; choose one of: distill, lm"):
        run(tiny_model_dir, tmp_path / "o", QatConfig(objective="mse"))
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\)"):
        run(tiny_model_dir, tmp_path / "o", QatConfig(ema_decay=1.0))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run(tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="not found: .*missing.txt"):
        qat_kv(tiny_model_dir, [tmp_path / "missing.txt"], tmp_path / "o", TINY)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        qat_kv(tiny_model_dir, [tmp_path / "empty.txt"], tmp_path / "o", TINY)
    (tmp_path / "short.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match="a training window needs 34: pass more text"):
        qat_kv(tiny_model_dir, [tmp_path / "short.txt"], tmp_path / "o", TINY)
    assert (
        main(
            [
                "qat-kv",
                "--model",
                str(tiny_model_dir),
                "--format",
                "int3",
                "--data",
                str(tiny_model_dir / "calibration.txt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "unknown KV format 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_default_data_is_what_train_model_trained_on():
    from maia_serving.tools.training.qat import training_split_files
    from maia_serving.tools.training.train import TrainConfig, split_files

    files = training_split_files()
    train, heldout = split_files(stdlib_files(), TrainConfig().heldout_every)
    assert files == train and heldout and not set(files) & set(heldout)
