"""MaiaAttnBackend over SGLang's token-to-KV pool against plain attention on what the pool holds.

The pool is what SGLang allocates (``[slots, kv_heads, head_dim]`` per layer, uint8 codes
for FP8); requests own scattered slots through ``req_to_token``. The check is independent
of maia_serving.ops: per request, gather the cached K/V by slot, dequantize them exactly with
the layer's scales (FP8 codes by the OCP spec formula) and attend in float64 with the causal
offset of the prefix; the backend's bf16 output must be within one bf16 rounding step of that
(tests/utils/attention_float64.py derives the bound).
"""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from maia_serving.sglang.attention import MaiaAttnBackend, config_window, dropped_window_warning
from tests.utils.attention_float64 import assert_within_one_bf16_step, causal_attention_float64, dequantize_exact

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 1
STORE = {"auto": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class Pool:
    """SGLang's MHATokenToKVPool as the backend sees it."""

    def __init__(self, slots: int, dtype: torch.dtype):
        store = torch.uint8 if dtype.itemsize == 1 else dtype
        self.k = torch.zeros(slots, KV_HEADS, HEAD_DIM, dtype=store)
        self.v = torch.zeros_like(self.k)
        self.dtype = dtype

    def get_key_buffer(self, layer_id):
        return self.k.view(self.dtype)

    def get_value_buffer(self, layer_id):
        return self.v.view(self.dtype)


def make_backend(kv: str, page_size: int, slots: int, req_to_token: torch.Tensor, **config):
    hf_config = SimpleNamespace(
        to_dict=lambda: {"num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, **config}
    )
    runner = SimpleNamespace(
        device=torch.device("cpu"),
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=Pool(slots, STORE[kv]),
        page_size=page_size,
        kv_cache_dtype=STORE[kv],
        model_config=SimpleNamespace(model_path="unused", hf_config=hf_config),
    )
    return MaiaAttnBackend(runner)


def layer(k_scale=None, v_scale=None):
    return SimpleNamespace(
        layer_id=0,
        tp_q_head_num=HEADS,
        tp_k_head_num=KV_HEADS,
        qk_head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        scaling=HEAD_DIM**-0.5,
        is_cross_attention=False,
        sliding_window_size=-1,
        logit_cap=0.0,
        k_scale_float=k_scale,
        v_scale_float=v_scale,
    )


def assign_slots(lens: list[int], page_size: int, max_len: int) -> torch.Tensor:
    """Each request gets whole pages, scattered over the pool (page 0 stays SGLang's padding)."""
    gen = torch.Generator().manual_seed(0)
    pages = (torch.randperm(64, generator=gen) + 1).tolist()
    table = torch.zeros(len(lens), max_len, dtype=torch.int32)
    for r, n in enumerate(lens):
        for pos in range(n):
            if pos % page_size == 0:
                page = pages.pop()
            table[r, pos] = page * page_size + pos % page_size
    return table


def expected(q, backend, lyr, req_to_token, prefix, new, kv, window=None):
    """Float64 attention over the pool's entries and its error budget, ``[tokens, heads, head_dim]``;
    ``window`` in HF's and vLLM's terms (keys seen, the query's own included)."""
    pool = backend.token_to_kv_pool
    out, err, start = [], [], 0
    for r, (p, n) in enumerate(zip(prefix, new)):
        slots = req_to_token[r, : p + n].long()
        k = dequantize_exact(pool.k[slots], lyr.k_scale_float, kv)
        v = dequantize_exact(pool.v[slots], lyr.v_scale_float, kv)
        o, e = causal_attention_float64(
            q[start : start + n].double().view(n, HEADS, HEAD_DIM), k, v, lyr.scaling, window
        )
        out.append(o)
        err.append(e)
        start += n
    return torch.cat(out), torch.cat(err)


@pytest.mark.parametrize("kv,scales", [("auto", (None, None)), ("fp8_e4m3", (0.02, 0.03)), ("fp8_e5m2", (0.5, 0.25))])
@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_then_decode_match_attention_over_the_pool(kv, scales, page_size):
    torch.manual_seed(0)
    prefix, new = [0, 5, 3], [4, 3, 1]  # a prefill, a prefix hit, a chunked continuation
    req_to_token = assign_slots([p + n + 1 for p, n in zip(prefix, new)], page_size, 16)
    slots = 65 * page_size + page_size
    backend = make_backend(kv, page_size, slots, req_to_token)
    lyr = layer(*scales)
    # The cached prefixes, written as an earlier step would have.
    pre = sum(prefix)
    if pre:
        k0, v0 = torch.randn(pre, KV_HEADS * HEAD_DIM), torch.randn(pre, KV_HEADS * HEAD_DIM)
        loc = torch.cat([req_to_token[r, :p] for r, p in enumerate(prefix)])
        batch = SimpleNamespace(
            forward_mode=ForwardMode.EXTEND,
            batch_size=3,
            req_pool_indices=torch.arange(3),
            seq_lens=torch.tensor(prefix),
            seq_lens_cpu=torch.tensor(prefix),
            extend_seq_lens_cpu=prefix,
            out_cache_loc=loc,
        )
        rows = [r for r, p in enumerate(prefix) if p]
        batch.req_pool_indices, batch.batch_size = torch.tensor(rows), len(rows)
        batch.seq_lens = batch.seq_lens_cpu = torch.tensor([prefix[r] for r in rows])
        batch.extend_seq_lens_cpu = [prefix[r] for r in rows]
        backend.init_forward_metadata(batch)
        backend.forward_extend(torch.randn(pre, HEADS * HEAD_DIM).bfloat16(), k0.bfloat16(), v0.bfloat16(), lyr, batch)

    total = sum(new)
    q = torch.randn(total, HEADS * HEAD_DIM).bfloat16()
    k, v = torch.randn(total, KV_HEADS * HEAD_DIM).bfloat16(), torch.randn(total, KV_HEADS * HEAD_DIM).bfloat16()
    seq = [p + n for p, n in zip(prefix, new)]
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=3,
        req_pool_indices=torch.arange(3),
        seq_lens=torch.tensor(seq),
        seq_lens_cpu=torch.tensor(seq),
        extend_seq_lens_cpu=new,
        out_cache_loc=torch.cat([req_to_token[r, p : p + n] for r, (p, n) in enumerate(zip(prefix, new))]),
    )
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q, k, v, lyr, batch)
    assert out.shape == (total, HEADS * HEAD_DIM) and out.dtype == torch.bfloat16
    assert_within_one_bf16_step(
        out.view(total, HEADS, HEAD_DIM), *expected(q, backend, lyr, req_to_token, prefix, new, kv)
    )

    # One decode step for all three: one query each over everything cached so far.
    q1 = torch.randn(3, HEADS * HEAD_DIM).bfloat16()
    k1, v1 = torch.randn(3, KV_HEADS * HEAD_DIM).bfloat16(), torch.randn(3, KV_HEADS * HEAD_DIM).bfloat16()
    seq1 = [s + 1 for s in seq]
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=3,
        req_pool_indices=torch.arange(3),
        seq_lens=torch.tensor(seq1),
        seq_lens_cpu=torch.tensor(seq1),
        out_cache_loc=torch.stack([req_to_token[r, s] for r, s in enumerate(seq)]),
    )
    backend.init_forward_metadata(batch)
    out1 = backend.forward_decode(q1, k1, v1, lyr, batch)
    assert_within_one_bf16_step(
        out1.view(3, HEADS, HEAD_DIM), *expected(q1, backend, lyr, req_to_token, seq, [1, 1, 1], kv)
    )


def test_fp8_codes_in_the_pool_are_the_reference_quantization():
    from maia_serving.ops.fp8 import quantize_fp8_ref

    req_to_token = assign_slots([3], 1, 4)
    backend = make_backend("fp8_e4m3", 1, 80, req_to_token)
    k, v = torch.randn(3, KV_HEADS * HEAD_DIM) * 30, torch.randn(3, KV_HEADS * HEAD_DIM)
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        req_pool_indices=torch.arange(1),
        seq_lens=torch.tensor([3]),
        seq_lens_cpu=torch.tensor([3]),
        extend_seq_lens_cpu=[3],
        out_cache_loc=req_to_token[0, :3],
    )
    backend.init_forward_metadata(batch)
    backend.forward_extend(torch.randn(3, HEADS * HEAD_DIM), k, v, layer(0.05, 0.01), batch)
    slots = req_to_token[0, :3].long()
    pool = backend.token_to_kv_pool
    assert torch.equal(pool.k[slots], quantize_fp8_ref(k.view(3, KV_HEADS, HEAD_DIM), 0.05, "e4m3"))
    assert torch.equal(pool.v[slots], quantize_fp8_ref(v.view(3, KV_HEADS, HEAD_DIM), 0.01, "e4m3"))


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("size", [0, 2, 5])
def test_a_sliding_window_layer_sees_its_last_size_plus_one_keys(page_size, size):
    """SGLang's ``sliding_window_size`` is exclusive (its models pass HF's window - 1; the torch-native
    backend masks keys before ``q - size``): a prefill and a decode against float64 attention over the
    last size + 1 keys, next to a full-attention layer of the same step."""
    torch.manual_seed(size)
    lens = [9, 4]
    req_to_token = assign_slots([n + 1 for n in lens], page_size, 16)
    backend = make_backend("auto", page_size, 65 * page_size + page_size, req_to_token)
    windowed, full = layer(), layer()
    windowed.sliding_window_size = size
    q, k, v = (torch.randn(sum(lens), h * HEAD_DIM).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=2,
        req_pool_indices=torch.arange(2),
        seq_lens=torch.tensor(lens),
        seq_lens_cpu=torch.tensor(lens),
        extend_seq_lens_cpu=lens,
        out_cache_loc=torch.cat([req_to_token[r, :n] for r, n in enumerate(lens)]),
    )
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q, k, v, windowed, batch)
    assert_within_one_bf16_step(
        out.view(-1, HEADS, HEAD_DIM), *expected(q, backend, windowed, req_to_token, [0, 0], lens, "auto", size + 1)
    )
    out_full = backend.forward_extend(q, None, None, full, batch, save_kv_cache=False)
    assert_within_one_bf16_step(
        out_full.view(-1, HEADS, HEAD_DIM), *expected(q, backend, full, req_to_token, [0, 0], lens, "auto")
    )

    q1, k1, v1 = (torch.randn(2, h * HEAD_DIM).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))
    seq1 = [n + 1 for n in lens]
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=2,
        req_pool_indices=torch.arange(2),
        seq_lens=torch.tensor(seq1),
        seq_lens_cpu=torch.tensor(seq1),
        out_cache_loc=torch.stack([req_to_token[r, n] for r, n in enumerate(lens)]),
    )
    backend.init_forward_metadata(batch)
    out1 = backend.forward_decode(q1, k1, v1, windowed, batch)
    assert_within_one_bf16_step(
        out1.view(2, HEADS, HEAD_DIM), *expected(q1, backend, windowed, req_to_token, lens, [1, 1], "auto", size + 1)
    )


def test_logit_soft_cap_is_refused_with_a_clear_error():
    backend = make_backend("auto", 1, 8, torch.zeros(1, 4, dtype=torch.int32))
    lyr = layer()
    lyr.logit_cap = 30.0
    with pytest.raises(NotImplementedError, match="soft-cap"):
        backend.forward_decode(torch.randn(1, HEADS * HEAD_DIM), None, None, lyr, SimpleNamespace())


def test_a_config_window_no_layer_got_is_reported():
    """SGLang's Llama code (its Mistral and Mixtral too) drops config.json's sliding_window: the backend
    says so once, after the first forward pass; a model whose layers carry windows is not reported."""
    assert config_window({"sliding_window": 16}) == 16
    assert config_window({"sliding_window": 4096, "use_sliding_window": False}) is None
    assert "sliding_window=16" in dropped_window_warning(16, {None})
    assert dropped_window_warning(16, {None, 16}) is None


@pytest.mark.parametrize("size,warned", [(-1, True), (15, False)])
def test_the_dropped_window_warning_follows_the_first_forward_pass(caplog, size, warned):
    req_to_token = assign_slots([3], 1, 4)
    backend = make_backend("auto", 1, 80, req_to_token, sliding_window=16)
    lyr = layer()
    lyr.sliding_window_size = size
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        req_pool_indices=torch.arange(1),
        seq_lens=torch.tensor([3]),
        seq_lens_cpu=torch.tensor([3]),
        extend_seq_lens_cpu=[3],
        out_cache_loc=req_to_token[0, :3],
    )
    for _ in range(2):
        backend.init_forward_metadata(batch)
        backend.forward_extend(*(torch.randn(3, h * HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS)), lyr, batch)
    assert ("gives no layer a window" in caplog.text) == warned
    assert caplog.text.count("gives no layer a window") <= 1


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_a_block_scaled_pool_holds_the_mx_references_codes_and_is_read_through_them(fmt, monkeypatch):
    """MAIA_SERVING_KV_CACHE_DTYPE: the pool (BlockScaledKVPool) holds uint8 rows of head_bytes; the
    backend writes the reference's codes and attends over what they decode to."""
    from maia_serving.ops.mx import dequantize_mx_ref, head_bytes, quantize_mx_ref

    monkeypatch.setenv("MAIA_SERVING_KV_CACHE_DTYPE", fmt)
    req_to_token = assign_slots([5], 1, 8)
    backend = make_backend("auto", 1, 80, req_to_token)
    row = head_bytes(fmt, HEAD_DIM)
    pool = backend.token_to_kv_pool
    pool.k = torch.zeros(80, KV_HEADS, row, dtype=torch.uint8)
    pool.v, pool.dtype = torch.zeros_like(pool.k), torch.uint8
    k, v = torch.randn(5, KV_HEADS * HEAD_DIM) * 3, torch.randn(5, KV_HEADS * HEAD_DIM)
    q = torch.randn(5, HEADS * HEAD_DIM).bfloat16()
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        req_pool_indices=torch.arange(1),
        seq_lens=torch.tensor([5]),
        seq_lens_cpu=torch.tensor([5]),
        extend_seq_lens_cpu=[5],
        out_cache_loc=req_to_token[0, :5],
    )
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q, k, v, layer(), batch)
    slots = req_to_token[0, :5].long()
    assert torch.equal(pool.k[slots], quantize_mx_ref(k.view(5, KV_HEADS, HEAD_DIM), fmt))
    assert torch.equal(pool.v[slots], quantize_mx_ref(v.view(5, KV_HEADS, HEAD_DIM), fmt))
    keys, values = (dequantize_mx_ref(c[slots], fmt, HEAD_DIM).double() for c in (pool.k, pool.v))
    ref, err = causal_attention_float64(q.double().view(5, HEADS, HEAD_DIM), keys, values, HEAD_DIM**-0.5)
    assert_within_one_bf16_step(out.view(5, HEADS, HEAD_DIM), ref, err)
