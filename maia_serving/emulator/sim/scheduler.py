"""The continuous-batching policy of vLLM v1's scheduler, on token counts alone.

What ``vllm/v1/core/sched/scheduler.py`` and its KV cache manager decide each step, so the
simulator batches as the live engine would (no engine is imported):

1. Running requests first, in the order they were admitted: each takes what it still has
   to compute (a decode: 1 token; a prefill: the rest of its prompt), cut to what is left
   of the step's token budget (``max_num_batched_tokens``): chunked prefill.
2. KV blocks of ``block_size`` tokens are allocated as tokens are scheduled. When a running
   request cannot get its blocks, the last admitted running request is preempted
   (recompute: its blocks are freed, its computed tokens reset, and it goes back to the
   front of the waiting queue), until the request fits or was itself preempted.
3. Only in a step that preempted nothing, waiting requests are admitted first come, first
   served, while budget is left, fewer than ``max_num_seqs`` run and their blocks are free;
   the last one admitted may get only a chunk of its prompt.
4. A request whose computed tokens reach its length (prompt plus the tokens generated so
   far) samples one token; at ``output_len`` tokens it finishes and frees its blocks.

With pipeline parallelism vLLM v1 keeps up to ``pipeline_parallel_size`` batches in flight (the engine
core's batch queue, ``EngineCore.step_with_batch_queue``): it schedules the next batch while earlier ones
run, from the requests that are not in one of them. A request in flight is skipped here until its batch
is accounted (``update``) and is never the one preempted. vLLM also pipelines a long prompt's next chunk
before the previous one returns; here a prefill waits for its chunk, the one difference.

TensorRT-LLM's default admission (``policy="trtllm-no-evict"``, its ``CapacitySchedulerPolicy.GUARANTEED_NO_EVICT``),
to replay measurements of that engine: a waiting request is admitted only when the blocks for its prompt and all
of its output tokens are free, and takes them all at once, so a running request never needs another block and is
never preempted; step 2 never happens. Under a KV limit it runs fewer requests at once than vLLM's policy does,
which admits on the prompt's blocks alone.

Prefix caching (vLLM v1's default): every full block that gets scheduled is cached under
the identity of its tokens; a request admitted with nothing computed (new, or preempted)
reuses its longest run of cached leading blocks, short of its last token, which is always
computed. A cached block nobody holds stays reusable until a new block needs its memory.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from maia_serving.emulator.sim.workload import Request

POLICIES = ("vllm", "trtllm-no-evict")


@dataclass(frozen=True)
class SchedulerConfig:
    """vLLM's scheduling limits; ``num_blocks`` comes from the memory plan."""

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    policy: str = "vllm"  # or "trtllm-no-evict": admission reserves a request's every block (module docstring)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler policy {self.policy!r}: known ones are {', '.join(POLICIES)}")
        limits = {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        bad = [f"{k}={v}" for k, v in limits.items() if v < 1]
        if bad:
            raise ValueError(f"scheduler limits must be >= 1, got {', '.join(bad)}")


class ScheduledStep(NamedTuple):
    """One step's batch: per scheduled request, its id, the tokens it adds and its context length
    after them (what CostModel.cost_of prices); and the requests preempted to make room.
    A NamedTuple, not a frozen dataclass: one is made every step, at half the cost."""

    request_ids: tuple[int, ...]
    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]
    preempted: tuple[int, ...]


class StepOutput(NamedTuple):
    """After a step: the requests that sampled a token, and those of them that finished."""

    sampled: tuple[int, ...]
    finished: tuple[int, ...]


class BlockPool:
    """How many KV blocks are free and, with prefix caching, which blocks hold known tokens.

    Counts and cache keys only, no block ids: an empty block is as good as any other. A cached
    block that nobody holds counts as free; it is given up, least recently freed first, only
    when no empty block is left (vLLM's free queue orders every freed block by time, so it may
    evict a cached block somewhat sooner).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.num_free = num_blocks
        self.refs: dict[Hashable, int] = {}  # cached block -> how many requests hold it
        self.evictable: OrderedDict[Hashable, None] = OrderedDict()  # cached, held by none; oldest first

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def take(self, count: int) -> None:
        """``count`` new blocks, evicting cached ones only when no empty block is left."""
        assert count <= self.num_free, "take() beyond the free blocks"
        for _ in range(count - (self.num_free - len(self.evictable))):
            key, _ = self.evictable.popitem(last=False)
            del self.refs[key]
        self.num_free -= count

    def share(self, key: Hashable) -> None:
        """Hold a cached block (a prefix-cache hit)."""
        count = self.refs[key]
        if count == 0:
            del self.evictable[key]
            self.num_free -= 1
        self.refs[key] = count + 1

    def cache(self, key: Hashable) -> bool:
        """Register a held, newly filled block; False if those tokens are cached already (the block
        stays a private copy, as when two requests compute the same prefix in the same steps)."""
        if key in self.refs:
            return False
        self.refs[key] = 1
        return True

    def release(self, key: Hashable | None) -> None:
        """Let go of one block; a cached one stays reusable until its memory is needed."""
        if key is None:
            self.num_free += 1
            return
        count = self.refs[key] - 1
        self.refs[key] = count
        if count == 0:
            self.evictable[key] = None
            self.num_free += 1


class _Seq:
    """A request's progress; mutable, private to the scheduler."""

    __slots__ = ("rid", "request", "num_tokens", "num_computed", "num_output", "blocks", "num_hashed", "in_flight")

    def __init__(self, rid: int, request: Request):
        self.rid = rid
        self.request = request
        self.num_tokens = request.input_len  # prompt plus the tokens sampled so far
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[Hashable | None] = []  # cache key of each held block, None if not cached
        self.num_hashed = 0  # leading blocks already offered to the cache
        self.in_flight = False  # in a scheduled batch not yet accounted (pipeline parallelism)


class Scheduler:
    """vLLM v1's policy over requests added in arrival order; ids are the order of add()."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pool = BlockPool(config.num_blocks)
        self._seqs: dict[int, _Seq] = {}
        self._running: list[_Seq] = []
        self._waiting: deque[_Seq] = deque()
        self._num_added = 0
        self.num_preemptions = 0
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, request: Request) -> int:
        """Queue an arrived request; ValueError if it could never fit the KV cache alone."""
        bs = self.config.block_size
        peak_blocks = -(-(request.input_len + request.output_len - 1) // bs)
        if peak_blocks > self.config.num_blocks:
            raise ValueError(
                f"a request of {request.input_len} + {request.output_len} tokens needs {peak_blocks} "
                f"KV blocks; the cache has {self.config.num_blocks}"
            )
        rid = self._num_added
        self._num_added += 1
        seq = self._seqs[rid] = _Seq(rid, request)
        self._waiting.append(seq)
        return rid

    def _key(self, seq: _Seq, index: int) -> Hashable:
        """The identity of block ``index``'s tokens: shared prefix ids are strings, request ids ints."""
        request = seq.request
        if request.prefix_id is not None and self.config.block_size * (index + 1) <= request.prefix_len:
            return (request.prefix_id, index)
        return (seq.rid, index)

    def _cache_hits(self, seq: _Seq) -> list[Hashable]:
        """The cached leading blocks of a request with nothing computed, short of its last token."""
        refs, hits = self.pool.refs, []
        for index in range((seq.num_tokens - 1) // self.config.block_size):
            key = self._key(seq, index)
            if key not in refs:
                break
            hits.append(key)
        return hits

    def _cache_full_blocks(self, seq: _Seq, num_tokens: int) -> None:
        full = num_tokens // self.config.block_size
        for index in range(seq.num_hashed, full):
            key = self._key(seq, index)
            if self.pool.cache(key):  # False for a cache hit, already held under its key
                seq.blocks[index] = key
        seq.num_hashed = full

    def _allocate(self, seq: _Seq, hits: list[Hashable], num_new: int, reserve: int = 0) -> bool:
        """Blocks for ``num_new`` more tokens after the computed ones and the ``hits`` (for ``reserve`` tokens in
        all where that is more); False, changing nothing, if too few are free."""
        pool, bs = self.pool, self.config.block_size
        computed = seq.num_computed + len(hits) * bs
        need = -(-max(computed + num_new, reserve) // bs) - len(seq.blocks) - len(hits)
        refs = pool.refs
        if need + sum(1 for key in hits if refs[key] == 0) > pool.num_free:
            return False
        for key in hits:
            pool.share(key)
        seq.blocks.extend(hits)
        if need > 0:
            pool.take(need)
            seq.blocks.extend([None] * need)
        if self.config.enable_prefix_caching and (computed + num_new) // bs > seq.num_hashed:
            self._cache_full_blocks(seq, computed + num_new)
        return True

    def _free(self, seq: _Seq) -> None:
        """Release a request's blocks, last first: vLLM evicts a request's tail before its prefix."""
        for key in reversed(seq.blocks):
            self.pool.release(key)
        seq.blocks = []
        seq.num_hashed = 0

    def _pop_victim(self) -> _Seq:
        """The last admitted running request that is not in flight (``seq``, not in flight, is one)."""
        running = self._running
        index = next(i for i in range(len(running) - 1, -1, -1) if not running[i].in_flight)
        return running.pop(index)

    def _preempt_for(self, seq: _Seq, num_new: int, preempted: list[int]) -> bool:
        """Preempt the last admitted running request until ``seq`` gets its blocks; False if ``seq``
        itself had to go."""
        while not self._allocate(seq, [], num_new):
            victim = self._pop_victim()
            self._free(victim)
            victim.num_computed = 0
            self._waiting.appendleft(victim)
            preempted.append(victim.rid)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True

    def schedule(self) -> ScheduledStep:
        """The next step's batch (empty only when there is nothing to run)."""
        config, bs = self.config, self.config.block_size
        budget = config.max_num_batched_tokens
        ids: list[int] = []
        new: list[int] = []
        ctx: list[int] = []
        preempted: list[int] = []
        running = self._running
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            if seq.in_flight:
                index += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            end = seq.num_computed + num_new
            if end > len(seq.blocks) * bs:
                if not self._preempt_for(seq, num_new, preempted):
                    break
            elif config.enable_prefix_caching and end // bs > seq.num_hashed:
                self._cache_full_blocks(seq, end)
            ids.append(seq.rid)
            new.append(num_new)
            ctx.append(end)
            budget -= num_new
            index += 1
        waiting = self._waiting
        reserve_all = config.policy == "trtllm-no-evict"
        while not preempted and waiting and budget > 0 and len(running) < config.max_num_seqs:
            seq = waiting[0]
            hits = self._cache_hits(seq) if config.enable_prefix_caching else []
            num_new = min(seq.num_tokens - len(hits) * bs, budget)
            reserve = seq.request.input_len + seq.request.output_len - 1 if reserve_all else 0
            if not self._allocate(seq, hits, num_new, reserve):
                break
            if config.enable_prefix_caching:
                self.prefix_cache_queried_tokens += seq.num_tokens
                self.prefix_cache_hit_tokens += len(hits) * bs
            waiting.popleft()
            running.append(seq)
            seq.num_computed = len(hits) * bs
            ids.append(seq.rid)
            new.append(num_new)
            ctx.append(seq.num_computed + num_new)
            budget -= num_new
        for rid in ids:
            self._seqs[rid].in_flight = True
        return ScheduledStep(tuple(ids), tuple(new), tuple(ctx), tuple(preempted))

    def update(self, step: ScheduledStep) -> StepOutput:
        """Account a step that ran: computed tokens advance, finished prefills and decodes sample."""
        seqs = self._seqs
        sampled: list[int] = []
        finished: list[int] = []
        for rid, num_new in zip(step.request_ids, step.new_tokens):
            seq = seqs[rid]
            seq.in_flight = False
            seq.num_computed += num_new
            if seq.num_computed == seq.num_tokens:
                seq.num_output += 1
                seq.num_tokens += 1
                sampled.append(rid)
                if seq.num_output == seq.request.output_len:
                    finished.append(rid)
                    self._free(seq)
                    del seqs[rid]
        if finished:
            self._running = [seq for seq in self._running if seq.rid in seqs]
        return StepOutput(tuple(sampled), tuple(finished))
