"""A serving run on the emulated device without an engine: a discrete-event simulation.

workload -> scheduler (vLLM v1's policy) -> ``CostModel.cost_of`` per step (exactly what the
live engines are charged) -> clock -> per-request figures. Time moves by each step's
emulated cost; requests that arrive during a step join the queue when it ends, and an idle
device jumps to the next arrival. A request's first token comes at the end of the step
that completes its prefill, as the live clock counts it (clock.RequestTiming).

Pipeline parallelism follows vLLM v1's batch queue (``EngineCore.step_with_batch_queue``): the engine
keeps up to ``pp`` batches in flight, scheduling the next one, from requests not already in flight, as
soon as the queue has room, and otherwise waits for the oldest batch and accounts its tokens. A batch
runs through the stages in order (``StepCost.stages``, with ``StepCost.hops`` between them); a stage
works on one batch at a time, so a batch waits at a stage still busy with the one before it. A batch's
latency is the sum over its stages (plus any wait); with enough requests to fill the queue, batches
leave the pipeline one per slowest stage's time, which bounds the throughput. With ``pp = 1`` a step
runs alone: the queue holds one batch.

Data parallelism (``--data-parallel-size D``) runs D replicas, each an engine with its own scheduler and KV
cache: the requests are dealt to them in turn (vLLM's front end sends each to the least-loaded replica;
with requests of like lengths the two agree), and each replica is simulated on its share with the same cost
model, which prices its MoE layers as if every replica ran a batch of the same shape (the replicas step
together through them). The figures cover every request; the step log and KV figures are the first
replica's, the others' being alike.

A client limit (``--max-concurrency N``, as ``vllm bench serve`` takes it: how concurrency sweeps are measured)
holds a request back until fewer than N are in flight (sent, not finished): at an infinite rate, a closed loop of
N clients each sending its next request when its last one ends. A request held back is sent when a slot opens,
and its TTFT and E2E count from then, as the benchmark's client times them.

The serving front end (``FrontEnd``: the HTTP request, tokenization, the hand-off to the engine, each token's way
back) is one worker beside the engine (front_end.py): a request reaches the scheduler when the worker has taken
its input in, and each token reaches its client when the worker has streamed it, so TTFT, TPOT and E2E are the
client's. ``RequestTiming.front_end_s`` keeps the front end's share of each TTFT, which the report gives apart from
the device's. Requests reach the scheduler in the order they were sent.

With ``--enable-eplb`` the experts start where vLLM's EPLB puts them before it has measured any load (its
initial map) and are balanced from its first rearrangement on, ``step_interval / 4`` steps into the run
(``ServingConfig.eplb_first_rearrangement``): a run shorter than that is served by the initial map
throughout, as a fresh vLLM server would serve it. The rearrangement itself is not charged: vLLM moves the
weights asynchronously by default (``use_async``), beside the steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from maia_serving.emulator.cost.model import CostModel, StepCost
from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.hardware import NO_FRONT_END, DeviceProfile, FrontEnd
from maia_serving.emulator.memory import ServingConfig, served_model
from maia_serving.emulator.model_shape import ModelShape
from maia_serving.emulator.sim.front_end import FrontEndQueue
from maia_serving.emulator.sim.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from maia_serving.emulator.sim.workload import Request


@dataclass(frozen=True)
class StepLog:
    """Every step as columns: when it began (on the first stage), how long until it left the last, its
    batch, the queue, the KV blocks it held, its work (``StepCost.total_s``: every stage's and send's time,
    waits aside) and the communication in it."""

    start_s: tuple[float, ...]
    step_s: tuple[float, ...]
    num_tokens: tuple[int, ...]
    num_seqs: tuple[int, ...]
    num_waiting: tuple[int, ...]
    kv_blocks_used: tuple[int, ...]
    work_s: tuple[float, ...]
    comm_s: tuple[float, ...]


@dataclass(frozen=True)
class Simulation:
    """What happened on one device: every step, and every request's timing in arrival order."""

    device: str
    requests: tuple[Request, ...]
    timings: tuple[RequestTiming, ...]
    steps: StepLog
    kv_cache_blocks: int
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    kv_cache_tokens: int = 0
    kv_bytes_per_token: float = 0.0  # one chip's, at the KV format's stored size (simulate_device sets it)
    replicas: int = 1  # data-parallel replicas: steps and KV are the first one's (module docstring)
    eplb_initial_steps: int | None = None  # steps priced at EPLB's initial expert map (None: no EPLB)


class _StepPrices:
    """``CostModel.cost_of``, remembered for small batches: the function is pure, and at low load the
    same shapes recur (every lone request decodes through the same contexts), which would otherwise
    make pricing most of the run's time. Bounded: forgotten whole when full."""

    max_seqs = 8
    max_entries = 1 << 15

    def __init__(self, costs: CostModel):
        self._costs = costs
        self._seen: dict[tuple[tuple[int, ...], tuple[int, ...]], StepCost] = {}

    def __call__(self, new_tokens: tuple[int, ...], context_lens: tuple[int, ...]) -> StepCost:
        if len(new_tokens) > self.max_seqs:
            return self._costs.cost_of(new_tokens, context_lens)
        key = (new_tokens, context_lens)
        cost = self._seen.get(key)
        if cost is None:
            if len(self._seen) >= self.max_entries:
                self._seen.clear()
            cost = self._seen[key] = self._costs.cost_of(new_tokens, context_lens)
        return cost


def through_stages(now_s: float, cost: StepCost, free_s: tuple[float, ...]) -> tuple[float, float, tuple[float, ...]]:
    """A batch submitted at ``now_s`` through the stages, each free from ``free_s``: when it starts on the first,
    when it leaves the last, and when each stage is free again. One stage when the cost has none."""
    stages, hops = cost.stages or (cost.total_s,), cost.hops
    t, free = now_s, []
    for k, busy_s in enumerate(stages):
        end = max(t, free_s[k]) + busy_s
        free.append(end)
        t = end + (hops[k] if k < len(hops) else 0.0)
    return max(now_s, free_s[0]), free[-1], tuple(free)


def simulate(
    requests: list[Request],
    costs: CostModel,
    config: SchedulerConfig,
    device: str = "",
    initial: tuple[int, CostModel] | None = None,
    max_concurrency: int | None = None,
    front_end: FrontEnd = NO_FRONT_END,
) -> Simulation:
    """Run ``requests`` (sorted by arrival) to completion under vLLM v1's policy, each step priced
    by ``costs``, up to ``costs.parallel.pp`` batches in flight; with ``initial`` (steps, cost model), the
    first that many steps by that one instead (EPLB's experts before it first rearranges them); with
    ``max_concurrency``, at most that many requests in flight; each request and token through ``front_end``'s
    one worker (module docstring)."""
    if any(b.arrival_s < a.arrival_s for a, b in zip(requests, requests[1:])):
        raise ValueError("requests must be sorted by arrival time")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    scheduler = Scheduler(config)
    price = _StepPrices(costs)
    initial_steps, initial_price = (initial[0], _StepPrices(initial[1])) if initial else (0, price)
    depth = costs.parallel.pp
    timings = [RequestTiming(arrival_s=r.arrival_s) for r in requests]
    # The step log's columns (StepLog).
    start_s: list[float] = []
    step_s: list[float] = []
    num_tokens: list[int] = []
    num_seqs: list[int] = []
    num_waiting: list[int] = []
    kv_used: list[int] = []
    work_s: list[float] = []
    comm_s: list[float] = []
    free_s = (0.0,) * depth
    in_flight: deque[tuple[float, ScheduledStep]] = deque()
    now_s = 0.0
    front = FrontEndQueue(front_end, requests, timings, max_concurrency)
    while front.has_work or scheduler.has_work:
        for index in front.ready(now_s):
            scheduler.add(requests[index])
        step = scheduler.schedule() if len(in_flight) < depth and scheduler.has_work else None
        if step and step.request_ids:
            cost = (price if len(start_s) >= initial_steps else initial_price)(step.new_tokens, step.context_lens)
            total = cost.total_s
            if cost.stages:
                start, end, free_s = through_stages(now_s, cost, free_s)
            else:  # one stage: through_stages' answer without its loop (most simulations, every step)
                start = now_s if now_s > free_s[0] else free_s[0]
                end = start + total
                free_s = (end,)
            start_s.append(start)
            step_s.append(end - start)
            num_tokens.append(sum(step.new_tokens))
            num_seqs.append(len(step.request_ids))
            num_waiting.append(scheduler.num_waiting)
            kv_used.append(scheduler.pool.num_used)
            work_s.append(total)
            comm_s.append(cost.comm_s)
            in_flight.append((end, step))
            if len(in_flight) < depth:
                continue  # the batch queue has room: schedule the next batch now
        if in_flight:
            end, done = in_flight.popleft()
            now_s = max(now_s, end)
            out = scheduler.update(done)  # ids are the order of add(): the requests' order
            front.step(now_s, out.sampled, out.finished)
        elif not scheduler.has_work:
            ready_s = front.next_ready_s()  # idle until the next request reaches the scheduler
            assert ready_s is not None, "nothing to run and nothing on its way, with requests left to send"
            now_s = max(now_s, ready_s)
        else:
            raise AssertionError("a scheduler with work and nothing in flight scheduled nothing")
    return Simulation(
        device=device,
        requests=tuple(requests),
        timings=tuple(timings),
        steps=StepLog(
            tuple(start_s),
            tuple(step_s),
            tuple(num_tokens),
            tuple(num_seqs),
            tuple(num_waiting),
            tuple(kv_used),
            tuple(work_s),
            tuple(comm_s),
        ),
        kv_cache_blocks=config.num_blocks,
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queried_tokens=scheduler.prefix_cache_queried_tokens,
        prefix_cache_hit_tokens=scheduler.prefix_cache_hit_tokens,
        kv_cache_tokens=config.num_blocks * config.block_size,
        eplb_initial_steps=min(initial_steps, len(start_s)) if initial else None,
    )


def simulate_device(
    profile: DeviceProfile,
    model: ModelShape,
    serving: ServingConfig,
    requests: list[Request],
    enable_prefix_caching: bool = True,
    max_concurrency: int | None = None,
    front_end: FrontEnd | None = None,
) -> Simulation:
    """``requests`` served by ``model`` on ``profile`` with ``serving``'s settings, priced by the cost model
    of the live engines' EmulatedDevice; NotEnoughMemory (the live engines' message) when it does not fit.
    ``max_concurrency``: the client's limit on requests in flight, dealt among data-parallel replicas as the
    requests are. ``front_end``: the serving front end's time per request (default: the profile's)."""
    device = EmulatedDevice.fit(profile, model, serving)
    longest = max(r.input_len + r.output_len for r in requests)
    if longest > device.plan.max_model_len:
        raise ValueError(
            f"a request of {longest} tokens (input + output) exceeds max_model_len="
            f"{device.plan.max_model_len}; vLLM refuses it: raise --max-model-len or shorten the requests"
        )
    config = SchedulerConfig(
        num_blocks=device.plan.num_blocks,
        block_size=serving.block_size,
        max_num_seqs=serving.max_num_seqs,
        max_num_batched_tokens=serving.max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
        policy=serving.scheduler_policy,
    )
    initial = None
    if serving.enable_eplb:  # vLLM's EPLB starts from its initial map and first rearranges some steps in
        initial = (
            serving.eplb_first_rearrangement,
            CostModel(
                profile,
                served_model(model, serving),
                replace(serving.parallel, eplb_rearranged=False),
                serving.kv_cache_dtype,
                serving.fusions,
            ),
        )
    dp = serving.data_parallel_size
    if max_concurrency is not None and 1 <= max_concurrency < dp:
        raise ValueError(
            f"--max-concurrency {max_concurrency} is below --data-parallel-size {dp}: a replica would get none"
        )
    shares = [requests[i::dp] for i in range(min(dp, len(requests)))]
    limits = [
        None if max_concurrency is None else max_concurrency // dp + (i < max_concurrency % dp) for i in range(dp)
    ]
    sims = [
        simulate(
            share,
            device.cost_model,
            config,
            device=profile.name,
            initial=initial,
            max_concurrency=limit,
            front_end=profile.front_end if front_end is None else front_end,
        )
        for share, limit in zip(shares, limits, strict=False)
    ]
    return replace(merge_replicas(sims), kv_bytes_per_token=device.plan.kv_bytes_per_token)


def merge_replicas(sims: list[Simulation]) -> Simulation:
    """The replicas of a data-parallel run as one: requests dealt in turn (``sims[i]`` served requests
    ``i, i + D, ...``) back in arrival order with their timings; the first replica's steps and KV cache."""
    first = sims[0]
    if len(sims) == 1:
        return first
    order = sorted(
        (
            (req.arrival_s, k * len(sims) + i, req, timing)
            for i, sim in enumerate(sims)
            for k, (req, timing) in enumerate(zip(sim.requests, sim.timings))
        ),
        key=lambda row: row[:2],
    )
    return replace(
        first,
        requests=tuple(row[2] for row in order),
        timings=tuple(row[3] for row in order),
        num_preemptions=sum(s.num_preemptions for s in sims),
        prefix_cache_queried_tokens=sum(s.prefix_cache_queried_tokens for s in sims),
        prefix_cache_hit_tokens=sum(s.prefix_cache_hit_tokens for s in sims),
        replicas=len(sims),
    )
