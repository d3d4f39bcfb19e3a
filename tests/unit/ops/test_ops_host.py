"""The host's batched paged attention (what serves on CPU) and the per-sequence reference against
float64 attention over the exactly dequantized cache, to one bf16 rounding step of the output."""

import pytest
import torch

from maia_serving.ops import host
from maia_serving.ops.fp8 import paged_attention_ref, reshape_and_cache_ref
from tests.utils.attention_float64 import assert_within_one_bf16_step, bf16_step_violations, paged_attention_float64
from tests.utils.paged_batch import CASES as BATCHES
from tests.utils.paged_batch import flat_plan, host_attention, paged_batch

CASES = {**BATCHES, "one_decode": [(1, 37)]}  # a batch of one token: the index tensors' edge


def _batch(pairs, kv_cache_dtype, group, seed, block_size=16, num_kv_heads=2, head_dim=40):
    return paged_batch(
        pairs,
        kv_cache_dtype,
        group,
        seed,
        torch.tensor([0.02, 0.05])[:num_kv_heads],
        torch.tensor(0.03),
        block_size,
        num_kv_heads,
        head_dim,
    )


@pytest.fixture(params=["native", "torch", "ref"])
def attention(request):
    """The host path through the C++ kernel or the torch ops, and the per-sequence reference."""
    if request.param == "ref":
        return paged_attention_ref
    request.getfixturevalue(f"{request.param}_host_path")
    return host_attention


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_attention_is_float64_attention_rounded_once_to_bf16(attention, case, kv_cache_dtype, group):
    args = _batch(CASES[case], kv_cache_dtype, group, seed=len(case) * group)
    assert_within_one_bf16_step(attention(*args), *paged_attention_float64(*args))


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_a_one_percent_scale_or_output_error_exceeds_the_tolerance(kv_cache_dtype):
    """The tolerance above is tight enough to matter: a V scale 1% off (as a stale calibration
    would give) or a 1% bias of the output puts most elements outside it; a K scale 1% off, which
    moves the output only through the softmax, over a fifth of them (about 0.3-0.4 here)."""
    args = _batch(CASES["chunked_and_prefix_hit"], kv_cache_dtype, 2, seed=3)
    ref, err = paged_attention_float64(*args)
    k_scale, v_scale = args[-2:]
    wrong = {  # name: (output, the least fraction of elements outside the tolerance)
        "v_scale": (host_attention(*args[:-1], v_scale * 1.01), 0.5),
        "output": ((host_attention(*args).double() * 1.01).bfloat16(), 0.5),
        "k_scale": (host_attention(*args[:-2], k_scale * 1.01, v_scale), 0.2),
    }
    for name, (out, least) in wrong.items():
        assert bf16_step_violations(out, ref, err).double().mean() > least, name


def test_large_prefill_falls_back_to_the_reference(monkeypatch, torch_host_path):
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 10)
    args = _batch(CASES["prefill"], "auto", 2, seed=1)
    torch.testing.assert_close(host_attention(*args), paged_attention_ref(*args), atol=0, rtol=0)


def _refuse(*args, **kwargs):
    raise AssertionError("the batched path must not fall back to the reference")


def test_the_fallback_hands_the_reference_every_argument(monkeypatch, torch_host_path):
    """FP8 with per-head K and per-tensor V scales, not causal: the fallback is the reference, exactly."""
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 0)
    args = _batch(CASES["chunked_and_prefix_hit"], "fp8_e4m3", 2, seed=5)
    torch.testing.assert_close(
        host_attention(*args, causal=False), paged_attention_ref(*args, causal=False), atol=0, rtol=0
    )


def test_a_batch_at_the_score_limit_is_still_batched(monkeypatch, torch_host_path):
    """2 sequences x 4 heads x 7 padded queries x 48 keys = 2688 padded scores."""
    args = _batch([(7, 7), (5, 48)], "auto", 2, seed=6)
    query, _, _, block_tables, seq_lens, qsl = args[:6]
    plan = lambda: flat_plan(block_tables, seq_lens, qsl, query.shape[0], 4, 16)  # noqa: E731
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 2688)
    assert plan().batched
    monkeypatch.setattr(host, "paged_attention_ref", _refuse)
    assert_within_one_bf16_step(host_attention(*args), *paged_attention_float64(*args))
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 2687)
    assert not plan().batched


def test_not_causal_attends_every_key_of_its_own_sequence_only():
    args = _batch([(4, 20), (1, 33), (5, 48)], "auto", 2, seed=7)
    torch.testing.assert_close(
        host_attention(*args, causal=False), paged_attention_ref(*args, causal=False), atol=0, rtol=2**-7
    )


def test_blocks_smaller_than_the_kv_heads_are_read_whole():
    """The block size is the cache's dim 1, not its number of KV heads (dim 2)."""
    args = _batch([(3, 9), (1, 14)], "auto", 1, seed=8, block_size=2, num_kv_heads=4)
    assert_within_one_bf16_step(host_attention(*args), *paged_attention_float64(*args))


def test_defaults_are_a_bf16_causal_cache_and_the_result_lands_in_out():
    query, key_cache, value_cache, block_tables, seq_lens, qsl, scale = _batch(CASES["prefill"], "auto", 2, 9)[:7]
    out = torch.full_like(query, 7.0)
    result = host_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale, out=out)
    assert result is out
    expected = paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale)
    torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
    plan = flat_plan(block_tables, seq_lens, qsl, query.shape[0], query.shape[1], 16)
    assert torch.equal(plan.mask[0, :9, :9], torch.ones(9, 9, dtype=torch.bool).triu(1))


def test_the_result_does_not_depend_on_torchs_default_dtype():
    args = _batch(CASES["decode"], "fp8_e4m3", 2, seed=10)
    expected = host_attention(*args)
    torch.set_default_dtype(torch.float64)
    try:
        torch.testing.assert_close(host_attention(*args), expected, atol=0, rtol=0)
    finally:
        torch.set_default_dtype(torch.float32)


def test_an_empty_batch_plans_nothing_and_returns_zeros():
    query, key_cache, value_cache, block_tables, seq_lens, qsl, scale = _batch([(1, 5)], "auto", 1, seed=11)[:7]
    empty = (query[:0], key_cache, value_cache, block_tables[:0], seq_lens[:0], qsl[:1], scale)
    plan = flat_plan(*empty[3:6], 0, 2, 16)
    assert (plan.num_seqs, plan.max_q, plan.max_len) == (0, 0, 0)
    assert host_attention(*empty).shape == (0, 2, 40)


def test_a_given_max_query_len_sets_the_padding():
    """The engine knows the step's longest query; the plan pads to it without reading q_lens back."""
    _, _, _, block_tables, seq_lens, qsl = _batch([(3, 9), (1, 14)], "auto", 1, seed=12)[:6]
    assert flat_plan(block_tables, seq_lens, qsl, 4, 2, 16, max_query_len=8).max_q == 8


@pytest.mark.parametrize("case", ["decode", "chunked_and_prefix_hit"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("window", [1, 5, 16, 48])
def test_sliding_window_is_float64_windowed_attention_rounded_once(attention, case, kv_cache_dtype, window):
    """Windows of one key (a query sees only itself), inside a page, one page, every key."""
    args = _batch(CASES[case], kv_cache_dtype, 2, seed=window)
    assert_within_one_bf16_step(
        attention(*args, sliding_window=window), *paged_attention_float64(*args, sliding_window=window)
    )


def test_the_window_bites_and_sees_the_query_itself():
    """Off by one matters: a window of W sees the W keys ending at the query's own (vLLM's
    ``(W - 1, 0)``), so W = 1 returns the query token's own value and W = 16 differs from
    full attention for contexts longer than 16."""
    args = _batch([(1, 37), (3, 20)], "auto", 1, seed=13)
    query, key_cache, value_cache, block_tables = args[:4]
    own = torch.stack(
        [value_cache[block_tables[0, 36 // 16], 36 % 16]]
        + [value_cache[block_tables[1, t // 16], t % 16] for t in (17, 18, 19)]
    )
    torch.testing.assert_close(host_attention(*args, sliding_window=1), own, atol=0, rtol=0)
    windowed, full = host_attention(*args, sliding_window=16), host_attention(*args)
    assert (windowed - full).abs().amax() > 0.05
    plan = flat_plan(*args[3:6], query.shape[0], query.shape[1], 16, sliding_window=16)
    assert plan.mask[0, 0].logical_not().nonzero().flatten().tolist() == list(range(21, 37))


def test_a_plan_serves_only_its_own_window():
    args = _batch(CASES["decode"], "auto", 1, seed=14)
    query, _, _, block_tables, seq_lens, qsl = args[:6]
    plan = flat_plan(block_tables, seq_lens, qsl, query.shape[0], query.shape[1], 16, sliding_window=8)
    assert_within_one_bf16_step(
        host_attention(*args, plan=plan, sliding_window=8), *paged_attention_float64(*args, sliding_window=8)
    )
    with pytest.raises(ValueError, match="plan each window apart"):
        host_attention(*args, plan=plan)


def test_the_fallback_keeps_the_window(monkeypatch, torch_host_path):
    monkeypatch.setattr(host, "MAX_BATCHED_SCORES", 0)
    args = _batch(CASES["chunked_and_prefix_hit"], "auto", 2, seed=15)
    torch.testing.assert_close(
        host_attention(*args, sliding_window=6), paged_attention_ref(*args, sliding_window=6), atol=0, rtol=0
    )


@pytest.mark.parametrize(
    "kv_cache_dtype,cache_dtype",
    [("auto", torch.bfloat16), ("auto", torch.float32), ("fp8_e4m3", torch.uint8), ("fp8_e5m2", torch.uint8)],
)
def test_the_cache_write_is_the_references_on_both_host_paths(kv_cache_dtype, cache_dtype, host_kernel):
    """The write in one C++ call (an FP8 cache, or one of the rows' dtype) and the reference's torch ops (a
    cast to another dtype, or no native module) store the reference's bytes: keys and values apart, each head
    with its own scale, each row at its slot."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(3, 2, 40, generator=gen).to(torch.bfloat16)
    v = (torch.randn(3, 2, 40, generator=gen) * 4).to(torch.bfloat16)
    slots = torch.tensor([5, 17, 40])
    fp8 = kv_cache_dtype.startswith("fp8")
    scales = (torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])) if fp8 else (None, None)
    got, expected = ([torch.zeros(4, 16, 2, 40, dtype=cache_dtype) for _ in range(2)] for _ in range(2))
    host.reshape_and_cache_host(k, v, *got, slots, kv_cache_dtype, *scales)
    reshape_and_cache_ref(k, v, *expected, slots, kv_cache_dtype, *scales)
    for mine, want in zip(got, expected, strict=True):
        assert want.any() and torch.equal(mine, want)
