"""MaiaAttentionImpl.forward as vLLM calls it, on vLLM's KV page layout, with a layer's scales.

vLLM hands the backend one layer's pages ``[blocks, kv_heads, block_size, 2 * head_size]`` (a
token's key then its value on the last axis) and the attention layer, which carries the calibrated
per-tensor scales ``_k_scale`` / ``_v_scale``. Two steps (prefills, then a decode, a chunked
continuation and a new request) check that the bytes written are the reference quantization with
the layer's scales, and that the output is float64 attention over those bytes, dequantized with
the same scales, to one bf16 rounding step (tests/utils/attention_float64.py).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config

from maia_serving.ops.batch import PagedBatch
from maia_serving.ops.fp8 import quantize_fp8_ref
from maia_serving.ops.host import plan_paged_attention
from maia_serving.vllm.attention import MaiaAttentionImpl, MaiaAttentionMetadata
from tests.utils.attention_float64 import assert_within_one_bf16_step, paged_attention_float64

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 10
FP8 = {"fp8": "e4m3", "fp8_e5m2": "e5m2"}
# (request, tokens already cached, new tokens) per step; request 2 arrives in the second step.
STEPS = [[(0, 0, 20), (1, 0, 5)], [(0, 20, 1), (1, 5, 3), (2, 0, 2)]]


def _metadata(
    step: list[tuple[int, int, int]], block_table: torch.Tensor, sliding_window: int | None = None
) -> MaiaAttentionMetadata:
    """What MaiaMetadataBuilder.build gives the layers for this step on a host (its group's window)."""
    q_lens = torch.tensor([n for _, _, n in step])
    seq_lens = torch.tensor([p + n for _, p, n in step], dtype=torch.int32)
    query_start_loc = torch.zeros(len(step) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    pos = torch.cat([torch.arange(p, p + n) for _, p, n in step])
    rows = torch.repeat_interleave(torch.arange(len(step)), q_lens)
    slots = block_table[rows, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    num_tokens, max_q = int(q_lens.sum()), int(q_lens.max())
    batch = PagedBatch(block_table, seq_lens, query_start_loc, max_q, sliding_window)
    plan = plan_paged_attention(batch, num_tokens, HEADS, BLOCK_SIZE)
    return MaiaAttentionMetadata(num_actual_tokens=num_tokens, slot_mapping=slots, batch=replace(batch, plan=plan))


def _step_tensors(gen: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
    """A step's bf16 query, key (wider than 1, as real keys are) and value, and its output buffer."""
    query = torch.randn(n, HEADS, HEAD_SIZE, generator=gen).bfloat16()
    key = (torch.randn(n, KV_HEADS, HEAD_SIZE, generator=gen) * 3).bfloat16()
    value = torch.randn(n, KV_HEADS, HEAD_SIZE, generator=gen).bfloat16()
    return query, key, value, torch.empty(n, HEADS, HEAD_SIZE, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "window", "plan_window"),
    [
        ("auto", None, None),
        ("fp8", None, None),
        ("fp8_e5m2", None, None),
        ("auto", 8, 8),  # a sliding-window layer on its group's plan
        ("fp8", 8, None),  # a sliding-window layer in a group planned without one: it plans for itself
    ],
)
def test_forward_writes_with_the_layer_scales_and_attends_to_one_bf16_step(kv_cache_dtype, window, plan_window):
    gen = torch.Generator().manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        impl = MaiaAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, KV_HEADS, None, window, kv_cache_dtype)
    # Calibrated scales as vLLM keeps them: 0-d float32 tensors (and their floats) on the layer.
    layer = SimpleNamespace(
        layer_name="model.layers.0.self_attn.attn",
        _k_scale=torch.tensor(0.03),
        _v_scale=torch.tensor(0.011),
        _k_scale_float=0.03,
        _v_scale_float=0.011,
    )
    fmt = FP8.get(kv_cache_dtype)
    kv_cache = torch.zeros(
        NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, dtype=torch.uint8 if fmt else torch.bfloat16
    )
    # The token-major key and value views the layout defines (not the backend's own split).
    pages = kv_cache.permute(0, 2, 1, 3)
    key_cache, value_cache = pages[..., :HEAD_SIZE], pages[..., HEAD_SIZE:]
    block_table = torch.randperm(NUM_BLOCKS, generator=gen)[:6].view(3, 2).to(torch.int32)

    for step in STEPS:
        requests = [r for r, _, _ in step]
        meta = _metadata(step, block_table[requests], plan_window)
        n = meta.num_actual_tokens
        query, key, value, output = _step_tensors(gen, n)
        impl.forward(layer, query, key, value, kv_cache, meta, output)

        blocks, rows = meta.slot_mapping // BLOCK_SIZE, meta.slot_mapping % BLOCK_SIZE
        for cache, x, scale in ((key_cache, key, layer._k_scale), (value_cache, value, layer._v_scale)):
            written = quantize_fp8_ref(x, scale, fmt) if fmt else x
            assert torch.equal(cache[blocks, rows], written), "cache bytes are not the reference quantization"
        ref, err = paged_attention_float64(
            query,
            key_cache,
            value_cache,
            meta.batch.block_tables,
            meta.batch.seq_lens,
            meta.batch.query_start_loc,
            impl.scale,
            kv_cache_dtype,
            layer._k_scale,
            layer._v_scale,
            sliding_window=window,
        )
        assert_within_one_bf16_step(output, ref, err)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp6", "mxfp4"])
def test_a_block_scaled_cache_is_written_and_read_as_the_mx_references(fmt):
    """The platform records the format in additional_config (vLLM's own dtype stays auto); the page
    holds each head row's head_bytes for K then V, as customize_spec sized it."""
    from maia_serving.ops.mx import head_bytes, paged_attention_mx_ref, quantize_mx_ref

    gen = torch.Generator().manual_seed(1)
    with set_current_vllm_config(VllmConfig(additional_config={"maia_kv_cache_dtype": fmt})):
        impl = MaiaAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, KV_HEADS, None, None, "auto")
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    row = head_bytes(fmt, HEAD_SIZE)
    kv_cache = torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * row, dtype=torch.uint8)
    pages = kv_cache.permute(0, 2, 1, 3)
    key_cache, value_cache = pages[..., :row], pages[..., row:]
    block_table = torch.randperm(NUM_BLOCKS, generator=gen)[:6].view(3, 2).to(torch.int32)
    for step in STEPS:
        meta = _metadata(step, block_table[[r for r, _, _ in step]])
        n = meta.num_actual_tokens
        query, key, value, output = _step_tensors(gen, n)
        impl.forward(layer, query, key, value, kv_cache, meta, output)

        blocks, rows = meta.slot_mapping // BLOCK_SIZE, meta.slot_mapping % BLOCK_SIZE
        assert torch.equal(key_cache[blocks, rows], quantize_mx_ref(key, fmt))
        assert torch.equal(value_cache[blocks, rows], quantize_mx_ref(value, fmt))
        expected = paged_attention_mx_ref(
            query,
            key_cache,
            value_cache,
            meta.batch.block_tables,
            meta.batch.seq_lens,
            meta.batch.query_start_loc,
            impl.scale,
            fmt,
        )
        torch.testing.assert_close(output, expected, atol=0, rtol=2**-7)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "mode"), [("fp8", "per_head"), ("nvfp4", "per_tensor"), ("nvfp4", "per_head")]
)
def test_scales_from_the_calibrated_sidecar_are_what_the_cache_is_written_with(
    kv_cache_dtype, mode, tmp_path, monkeypatch
):
    """Per-head FP8 scales and NVFP4's tensor scales come from calibrate-kv's sidecar (amax / 448 per KV
    head, so NVFP4's t is that / 6, per head or the layer's largest), for this layer and TP rank."""
    import json

    import vllm.distributed

    from maia_serving.ops.mx import head_bytes, quantize_mx_ref
    from maia_serving.serving import kv_scales

    k_heads, v_heads = [0.02, 0.05], [0.03, 0.01]
    layers = {"0": {"k": [0.5, 0.5], "v": [0.5, 0.5]}, "1": {"k": k_heads, "v": v_heads}}  # layer 1 is read
    (tmp_path / kv_scales.SIDECAR).write_text(json.dumps({"format": "e4m3", "layers": layers}))
    monkeypatch.setenv("MAIA_SERVING_KV_SCALES", mode)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)
    block_scaled = kv_cache_dtype == "nvfp4"
    config = VllmConfig(additional_config={"maia_kv_cache_dtype": "nvfp4"} if block_scaled else {})
    with set_current_vllm_config(config):
        impl = MaiaAttentionImpl(
            HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, KV_HEADS, None, None, "auto" if block_scaled else kv_cache_dtype
        )
    impl.model_dir, impl.model_dims = str(tmp_path), (2, KV_HEADS)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    row = head_bytes("nvfp4", HEAD_SIZE) if block_scaled else HEAD_SIZE
    kv_cache = torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * row, dtype=torch.uint8)
    pages = kv_cache.permute(0, 2, 1, 3)
    gen = torch.Generator().manual_seed(2)
    meta = _metadata(STEPS[0], torch.arange(6, dtype=torch.int32).view(3, 2)[:2])
    query, key, value, output = _step_tensors(gen, meta.num_actual_tokens)
    impl.forward(layer, query, key, value, kv_cache, meta, output)

    blocks, rows = meta.slot_mapping // BLOCK_SIZE, meta.slot_mapping % BLOCK_SIZE
    for cache, x, heads in ((pages[..., :row], key, k_heads), (pages[..., row:], value, v_heads)):
        if block_scaled:
            t = torch.tensor(heads) * (448 / (6 * 448))  # the calibrated amax (scale x 448) / (6 x 448)
            t = t if mode == "per_head" else float(t.max())
            expected = quantize_mx_ref(x, "nvfp4", t)
        else:
            expected = quantize_fp8_ref(x, torch.tensor(heads), "e4m3")
        assert torch.equal(cache[blocks, rows], expected)
