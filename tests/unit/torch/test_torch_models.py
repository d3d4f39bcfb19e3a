"""Real model classes on maia against the same models on the CPU: a CNN (torch.nn) and a transformers Llama,
forward, backward and an optimizer step. Every maia operator runs the CPU's own kernel on the same memory,
so the outputs are equal, not merely close."""

import copy

import pytest
import torch
from torch import nn

import maia_serving.torch as maia_torch


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, groups=2),
        nn.GELU(),
        nn.ConvTranspose2d(16, 8, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(8, 10),
    )


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train_step(model: nn.Module, batch: torch.Tensor, target: torch.Tensor, loss_fn) -> torch.Tensor:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)  # the same dropout mask on both devices
    loss = loss_fn(model(batch), target)
    loss.backward()
    optimizer.step()
    return loss.detach()


def pairs(cpu: nn.Module, maia: nn.Module):
    return zip(cpu.named_parameters(), maia.named_parameters(), strict=True)


def test_a_cnn_infers_and_trains_as_on_the_cpu():
    model = cnn()
    on_maia = copy.deepcopy(model).to("maia")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(on_maia.eval()(x.to("maia")).cpu(), model.eval()(x))
    model.train(), on_maia.train()
    target = torch.randint(0, 10, (4,))
    loss_cpu = train_step(model, x, target, nn.functional.cross_entropy)
    loss_maia = train_step(on_maia, x.to("maia"), target.to("maia"), nn.functional.cross_entropy)
    assert torch.equal(loss_maia.cpu(), loss_cpu)
    for (name, a), (_, b) in pairs(model, on_maia):
        assert b.device.type == "maia"
        assert torch.equal(b.grad.cpu(), a.grad), name
        assert torch.equal(b.detach().cpu(), a.detach()), name  # after the optimizer step
    assert torch.equal(on_maia[1].running_mean.cpu(), model[1].running_mean)


def test_a_transformers_llama_gives_the_cpus_logits_and_tokens():
    model = llama().eval()
    on_maia = copy.deepcopy(model).to("maia")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(on_maia(ids.to("maia")).logits.cpu(), model(ids).logits)
        want = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        got = on_maia.generate(ids[:1].to("maia"), max_new_tokens=6, do_sample=False)
    assert torch.equal(got.cpu(), want)


def test_a_transformers_llama_trains_as_on_the_cpu():
    """Within float rounding: the grouped-query attention's key and value gradients are summed over each
    group in another order than the CPU's autograd sums them. SGD, whose step is linear in the gradient
    (Adam's divides a near-zero gradient by its own size, so rounding there moves a weight by the whole rate)."""
    model = llama().train()
    on_maia = copy.deepcopy(model).to("maia")
    ids = torch.randint(0, 256, (2, 12))
    optim_cpu = torch.optim.SGD(model.parameters(), lr=0.1)
    optim_maia = torch.optim.SGD(on_maia.parameters(), lr=0.1)
    for net, batch, optim in ((model, ids, optim_cpu), (on_maia, ids.to("maia"), optim_maia)):
        torch.manual_seed(1)
        net(batch, labels=batch).loss.backward()
        optim.step()
    for (name, a), (_, b) in pairs(model, on_maia):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_attention_is_one_priced_kernel_forward_and_backward():
    """scaled_dot_product_attention reaches maia's fused kernel (not a bmm / softmax chain), in both directions."""
    model = llama().to("maia")
    ids = torch.randint(0, 256, (1, 8), device="maia")
    with maia_torch.profile() as prof:
        model(ids, labels=ids).loss.backward()
    ops = {op.op for op in prof.ops}
    assert "aten::_scaled_dot_product_fused_attention_overrideable" in ops
    assert "aten::_scaled_dot_product_fused_attention_overrideable_backward" in ops
    assert not {"aten::bmm", "aten::_softmax"} & {op.partition(".")[0] for op in ops}
    assert "aten::convolution_backward" not in ops and any(op.startswith("aten::mm") for op in ops)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run(dtype):
    model = llama().eval().to(dtype)
    on_maia = copy.deepcopy(model).to("maia")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(on_maia(ids.to("maia")).logits.cpu(), model(ids).logits)
