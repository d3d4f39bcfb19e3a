"""EmulatedDevice: what an engine adapter talks to, one per engine.

It holds the profile, the model shape, the memory plan and the clock, charges each
engine step and returns a StepRecord that adapters log and export. Engine-free, so
the vLLM and SGLang adapters charge steps the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.device.clock import EmulatedClock, RequestTiming
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.memory import VLLM_FLAGS, Flags, MemoryPlan, ServingConfig, require_fit, served_model
from maia_serving.emulator.model_shape import ModelShape


@dataclass
class StepRecord:
    """One charged step, as sent to metrics: emulated seconds and the step's shape."""

    step_s: float
    compute_s: float
    memory_s: float
    comm_s: float
    launch_s: float
    bound: str
    num_tokens: int
    num_seqs: int
    now_s: float
    wall_s: float
    kv_blocks_used: int
    kv_blocks_cached: int = 0  # blocks held only by the prefix cache (reusable, not used)
    overhead_s: float = 0.0  # host time the adapter spent charging this step
    num_collectives: int = 0  # the engine's own collectives charged in comm_s (0: comm_s is the cost model's)
    comm_bytes: int = 0  # their bytes, as each was priced
    first_token_ttfts_s: list[float] = field(default_factory=list)
    finished: list[RequestTiming] = field(default_factory=list)


class EmulatedDevice:
    def __init__(
        self,
        profile: DeviceProfile,
        model: ModelShape,
        plan: MemoryPlan,
        parallel: Parallel,
        kv_cache_dtype: str,
        fusions: tuple[str, ...] = (),
    ):
        self.profile = profile
        self.plan = plan
        self.kv_cache_dtype = kv_cache_dtype
        self.cost_model = CostModel(profile, model, parallel, kv_cache_dtype, fusions)
        self.clock = EmulatedClock()

    @classmethod
    def fit(
        cls, profile: DeviceProfile, model: ModelShape, config: ServingConfig, flags: Flags = VLLM_FLAGS
    ) -> EmulatedDevice:
        """The device serving ``model`` with ``config``; NotEnoughMemory (suggesting changes
        as ``flags`` spells them) if it does not fit."""
        plan = require_fit(model, profile, config, flags)
        return cls(profile, served_model(model, config), plan, config.parallel, config.kv_cache_dtype, config.fusions)

    @property
    def kv_block_bytes(self) -> float:
        return self.plan.kv_bytes_per_token * self.plan.config.block_size

    def hbm_used_bytes(self, kv_blocks_used: int) -> float:
        """Emulated HBM in use on one chip: runtime, weights, workspace and live KV blocks."""
        plan = self.plan
        return (
            plan.runtime_reserve_bytes + plan.weight_bytes + plan.workspace_bytes + kv_blocks_used * self.kv_block_bytes
        )

    def arrive(self, request_id: str, age_s: float = 0.0) -> None:
        self.clock.arrive(request_id, age_s)

    def abort(self, request_id: str) -> None:
        self.clock.finish(request_id)

    def charge(
        self,
        new_tokens: tuple[int, ...],
        context_lens: tuple[int, ...],
        tokens_out: dict[str, int],
        finished: list[str],
        kv_blocks_used: int,
        wall_s: float = 0.0,
        collectives: list[tuple[int, int, int, int, int]] | None = None,
    ) -> StepRecord:
        """Charge one step; ``finished`` requests leave the clock with their timings. ``collectives``, the
        calls the engine really made (``maia_serving.serving.collectives`` rows), replace the cost
        model's count of them where given."""
        cost = self.cost_model.cost_of(new_tokens, context_lens)
        if collectives is not None:
            cost = replace(cost, comm_s=self.cost_model.collectives_s(collectives))
        firsts = self.clock.advance(cost.total_s, tokens_out)
        done = [t for rid in finished if (t := self.clock.finish(rid)) is not None]
        return StepRecord(
            step_s=cost.total_s,
            compute_s=cost.compute_s,
            memory_s=cost.memory_s,
            comm_s=cost.comm_s,
            launch_s=cost.launch_s,
            bound=cost.bound,
            num_tokens=sum(new_tokens),
            num_seqs=len(new_tokens),
            now_s=self.clock.now_s,
            wall_s=wall_s,
            kv_blocks_used=kv_blocks_used,
            # advance() returns the requests whose first token this step was: each has its TTFT.
            first_token_ttfts_s=[ttft for t in firsts if (ttft := t.ttft_s) is not None],
            finished=done,
            num_collectives=sum(row[3] for row in collectives or ()),
            comm_bytes=sum(row[2] * row[3] for row in collectives or ()),
        )
