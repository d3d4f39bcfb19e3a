"""The simulator's scheduler on hand-built traces: each step's batch worked out by hand from vLLM v1's
policy (blocks of 4 tokens to keep the counts small)."""

import pytest

from maia_serving.emulator.sim.scheduler import BlockPool, Scheduler, SchedulerConfig
from maia_serving.emulator.sim.workload import Request


def config(**overrides) -> SchedulerConfig:
    settings = {
        "num_blocks": 100,
        "block_size": 4,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 100,
        "enable_prefix_caching": False,
    }
    return SchedulerConfig(**{**settings, **overrides})


def req(input_len: int, output_len: int, prefix_id: str | None = None, prefix_len: int = 0) -> Request:
    return Request(0.0, input_len, output_len, prefix_id, prefix_len)


def run(scheduler: Scheduler, steps: int | None = None) -> list[tuple]:
    """(ids, new tokens, contexts, preempted, sampled, finished) of each step until idle."""
    out = []
    while scheduler.has_work and (steps is None or len(out) < steps):
        step = scheduler.schedule()
        assert step.request_ids, "stuck: work left but nothing scheduled"
        result = scheduler.update(step)
        out.append(
            (step.request_ids, step.new_tokens, step.context_lens, step.preempted, result.sampled, result.finished)
        )
    return out


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    scheduler = Scheduler(config(max_num_batched_tokens=8))
    scheduler.add(req(20, 3))
    assert run(scheduler) == [
        ((0,), (8,), (8,), (), (), ()),
        ((0,), (8,), (16,), (), (), ()),
        ((0,), (4,), (20,), (), (0,), ()),  # the prompt's last chunk samples the first token
        ((0,), (1,), (21,), (), (0,), ()),
        ((0,), (1,), (22,), (), (0,), (0,)),  # 3 tokens out: the last one's KV is never computed
    ]
    assert scheduler.pool.num_used == 0


def test_running_requests_decode_first_and_the_rest_of_the_budget_prefills():
    scheduler = Scheduler(config(max_num_batched_tokens=8))
    scheduler.add(req(4, 5))
    scheduler.add(req(10, 2))
    assert run(scheduler, 3) == [
        ((0, 1), (4, 4), (4, 4), (), (0,), ()),  # b gets what a's prompt left of the budget
        ((0, 1), (1, 6), (5, 10), (), (0, 1), ()),  # a decodes before b's chunk
        ((0, 1), (1, 1), (6, 11), (), (0, 1), (1,)),
    ]


def test_no_more_than_max_num_seqs_run_at_once():
    scheduler = Scheduler(config(max_num_seqs=2))
    for _ in range(3):
        scheduler.add(req(4, 2))
    assert [step[0] for step in run(scheduler)] == [(0, 1), (0, 1), (2,), (2,)]


def test_a_request_admitted_while_others_decode_joins_the_next_step():
    scheduler = Scheduler(config())
    scheduler.add(req(4, 3))
    first = run(scheduler, 1)
    scheduler.add(req(6, 1))
    assert first + run(scheduler) == [
        ((0,), (4,), (4,), (), (0,), ()),
        ((0, 1), (1, 6), (5, 6), (), (0, 1), (1,)),
        ((0,), (1,), (6,), (), (0,), (0,)),
    ]


@pytest.mark.parametrize("caching", [False, True])
def test_when_blocks_run_out_the_last_admitted_request_is_preempted_and_recomputes(caching):
    """4 blocks: a holds 2 and b 1; a's decode takes the last free one, so b, needing one more, is
    preempted. It can come back only when a finishes: then it recomputes its prompt and its one
    output token (5 tokens), or with prefix caching only the token after its cached first block."""
    scheduler = Scheduler(config(num_blocks=4, enable_prefix_caching=caching))
    scheduler.add(req(8, 5))
    scheduler.add(req(4, 6))
    steps = run(scheduler)
    recompute = ((1,), (1,), (5,)) if caching else ((1,), (5,), (5,))
    assert steps[:6] == [
        ((0, 1), (8, 4), (8, 4), (), (0, 1), ()),
        ((0,), (1,), (9,), (1,), (0,), ()),  # b preempted; no admission in a step that preempted
        ((0,), (1,), (10,), (), (0,), ()),  # b waits: it needs 2 blocks, 1 is free
        ((0,), (1,), (11,), (), (0,), ()),
        ((0,), (1,), (12,), (), (0,), (0,)),
        (*recompute, (), (1,), ()),  # b's second token
    ]
    assert [step[2] for step in steps[6:]] == [(6,), (7,), (8,), (9,)]
    assert steps[-1][5] == (1,)
    assert scheduler.num_preemptions == 1


def test_a_step_that_preempts_admits_no_one():
    """b's second chunk needs a block that a holds, so b is preempted; the block it frees would take b's
    first 3 tokens again in the same step, but vLLM admits nothing in a step that preempted."""
    scheduler = Scheduler(config(num_blocks=2, max_num_batched_tokens=4))
    scheduler.add(req(2, 2))
    scheduler.add(req(5, 1))
    assert [step[:4] for step in run(scheduler)] == [
        ((0, 1), (2, 2), (2, 2), ()),
        ((0,), (1,), (3,), (1,)),
        ((1,), (4,), (4,), ()),
        ((1,), (1,), (5,), ()),
    ]


def test_a_preempted_request_starts_again_from_nothing():
    """b's 4 computed tokens are forgotten: back, it needs blocks for its 5 tokens from scratch (2 of 2),
    not for 4 + 5."""
    scheduler = Scheduler(config(num_blocks=2))
    scheduler.add(req(2, 2))
    scheduler.add(req(4, 2))
    assert [step[:4] for step in run(scheduler)] == [
        ((0, 1), (2, 4), (2, 4), ()),
        ((0,), (1,), (3,), (1,)),
        ((1,), (5,), (5,), ()),
    ]


def test_preemption_takes_the_most_recent_request_first_and_requeues_in_arrival_order():
    """Three requests fill 3 of 3 blocks; a's decode needs a fourth: c (last admitted) goes first, then b."""
    scheduler = Scheduler(config(num_blocks=3))
    for _ in range(3):
        scheduler.add(req(4, 3))
    run(scheduler, 1)
    step = scheduler.schedule()
    assert (step.request_ids, step.preempted) == ((0,), (2, 1))
    assert [seq.rid for seq in scheduler._waiting] == [1, 2]


def test_a_shared_prefix_is_reused_in_whole_blocks_and_the_last_token_is_always_computed():
    scheduler = Scheduler(config(enable_prefix_caching=True))
    scheduler.add(req(10, 1, "sys", 8))  # caches blocks 0 and 1 of "sys" as they are scheduled
    scheduler.add(req(12, 1, "sys", 8))  # same step: reuses both, computes 4
    scheduler.add(req(12, 1, "sys", 4))  # shares only block 0
    scheduler.add(req(8, 1, "sys", 8))  # all 8 cached, but its last token must be computed: reuses 1 block
    scheduler.add(req(12, 1, "other", 8))
    (step,) = run(scheduler)
    assert step[1:3] == ((10, 4, 8, 4, 12), (10, 12, 12, 8, 12))
    assert (scheduler.prefix_cache_hit_tokens, scheduler.prefix_cache_queried_tokens) == (16, 54)


def test_a_hit_is_a_run_of_leading_blocks():
    """Block 1 of the prefix is cached, block 0 is not: nothing to reuse, block 1 follows tokens not cached."""
    scheduler = Scheduler(config(enable_prefix_caching=True))
    scheduler.pool.take(1)
    scheduler.pool.cache(("sys", 1))
    scheduler.add(req(12, 1, "sys", 8))
    assert run(scheduler)[0][1] == (12,)


def test_without_prefix_caching_nothing_is_reused():
    scheduler = Scheduler(config())
    scheduler.add(req(12, 1, "sys", 8))
    scheduler.add(req(12, 1, "sys", 8))
    assert run(scheduler)[0][1] == (12, 12)
    assert scheduler.prefix_cache_queried_tokens == 0


def test_cached_blocks_outlive_their_request_and_go_tail_first_when_memory_is_needed():
    scheduler = Scheduler(config(num_blocks=4, enable_prefix_caching=True))
    scheduler.add(req(8, 1, "p", 8))
    run(scheduler)
    pool = scheduler.pool
    assert (pool.num_free, list(pool.evictable)) == (4, [("p", 1), ("p", 0)])  # freed tail first
    scheduler.add(req(12, 1))  # needs 3 blocks: 2 empty ones and the least recently freed cached one
    run(scheduler)
    assert ("p", 0) in pool.evictable and ("p", 1) not in pool.refs
    scheduler.add(req(9, 1, "p", 8))
    assert run(scheduler)[0][1:3] == ((5,), (9,))  # block 0 survived; block 1 is recomputed


def test_a_block_filled_by_decoding_is_cached_too():
    scheduler = Scheduler(config(enable_prefix_caching=True))
    scheduler.add(req(6, 3))  # the prompt fills block 0; the second decode fills block 1 (8 tokens)
    run(scheduler)
    assert list(scheduler.pool.evictable) == [(0, 1), (0, 0)]


def test_a_cache_hit_on_a_held_block_shares_it():
    pool = BlockPool(4)
    pool.take(1)
    assert pool.cache("k")
    assert not pool.cache("k")  # the same tokens computed twice: the second block stays private
    pool.share("k")
    assert (pool.num_free, pool.refs["k"]) == (3, 2)
    pool.release("k")
    pool.release("k")
    assert (pool.num_free, list(pool.evictable)) == (4, ["k"])
    pool.share("k")  # a hit on a block nobody holds takes it off the free count
    assert (pool.num_free, list(pool.evictable)) == (3, [])


def test_kv_blocks_follow_the_tokens_computed():
    scheduler = Scheduler(config(max_num_batched_tokens=6))
    scheduler.add(req(9, 4))
    used = []
    while scheduler.has_work:
        scheduler.update(scheduler.schedule())
        used.append(scheduler.pool.num_used)
    # contexts 6, 9, 10, 11, 12 -> 2, 3, 3, 3 blocks; the request then finishes and frees them
    assert used == [2, 3, 3, 3, 0]


def test_a_request_that_could_never_fit_is_refused():
    scheduler = Scheduler(config(num_blocks=2))
    scheduler.add(req(4, 5))  # 8 tokens of KV at most: 2 blocks
    with pytest.raises(ValueError, match="needs 3 KV blocks; the cache has 2"):
        scheduler.add(req(4, 6))


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        SchedulerConfig(num_blocks=1, max_num_seqs=0)


def test_trtllm_admission_reserves_every_block_a_request_will_hold_and_never_preempts():
    """TensorRT-LLM's GUARANTEED_NO_EVICT on 4 blocks of 4 tokens, three requests of 4 prompt and 5 output tokens
    (hand-worked: 4 + 5 - 1 = 8 tokens of KV at most, 2 blocks each). vLLM's policy admits all three on one block
    each and preempts when their decodes need a second; TensorRT-LLM's admits two (2 + 2 = 4 blocks, all taken at
    once), holds the third until one finishes, and preempts nothing."""
    for policy, admitted, preempts in (("vllm", (0, 1, 2), True), ("trtllm-no-evict", (0, 1), False)):
        scheduler = Scheduler(config(num_blocks=4, policy=policy))
        for _ in range(3):
            scheduler.add(req(4, 5))
        steps = run(scheduler)
        assert steps[0][0] == admitted
        assert any(step[3] for step in steps) is preempts
        assert sum(len(step[5]) for step in steps) == 3
    scheduler = Scheduler(config(num_blocks=4, policy="trtllm-no-evict"))
    for _ in range(3):
        scheduler.add(req(4, 5))
    scheduler.update(scheduler.schedule())
    assert scheduler.pool.num_used == 4  # both admitted requests hold all their blocks from their first step
    first_done = next(i for i, step in enumerate(run(scheduler), 1) if step[5])
    assert first_done == 4  # a 5-token output: prefill (1st token) + 4 decodes; the third joins after


def test_an_unknown_scheduler_policy_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known ones are vllm, trtllm-no-evict"):
        SchedulerConfig(num_blocks=1, policy="sglang")
