"""Simulate a batch on the emulated device, without an engine.

A static batch: ``num_seqs`` prompts of ``prompt_len`` tokens arrive together, are
prefilled in chunks of at most ``max_num_batched_tokens`` tokens, then decode
``output_len`` tokens each in lockstep. The steps are costed by cost.step_cost, as
the live engines' steps are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from maia_serving.emulator.cost import SINGLE_CHIP, CostModel, Parallel, StepShape
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import ModelShape


@dataclass(frozen=True)
class SimResult:
    profile: str
    num_seqs: int
    prompt_len: int
    output_len: int
    ttft_s: float  # of the last sequence to get its first token
    tpot_s: float
    e2e_s: float
    output_tokens_per_s: float
    prefill_bound: str
    decode_bound: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _prefill_chunks(num_seqs: int, prompt_len: int, budget: int) -> list[StepShape]:
    """Chunked prefill: fill each step's token budget, sequence by sequence."""
    done = [0] * num_seqs
    steps: list[StepShape] = []
    seq = 0
    while seq < num_seqs:
        pairs: list[tuple[int, int]] = []
        room = budget
        while room > 0 and seq < num_seqs:
            take = min(room, prompt_len - done[seq])
            done[seq] += take
            pairs.append((take, done[seq]))
            room -= take
            if done[seq] == prompt_len:
                seq += 1
        steps.append(StepShape.of(pairs))
    return steps


def simulate_batch(profile: DeviceProfile, model: ModelShape, num_seqs: int, prompt_len: int,
                   output_len: int, parallel: Parallel = SINGLE_CHIP, kv_cache_dtype: str = "auto",
                   max_num_batched_tokens: int = 8192) -> SimResult:
    if min(num_seqs, prompt_len, output_len, max_num_batched_tokens) < 1:
        raise ValueError("num_seqs, prompt_len, output_len and the token budget must be >= 1")
    costs = CostModel(profile, model, parallel, kv_cache_dtype)
    prefill = [costs.cost(s) for s in _prefill_chunks(num_seqs, prompt_len, max_num_batched_tokens)]
    ttft = sum(c.total_s for c in prefill)
    decode = [
        costs.cost(StepShape((1,) * num_seqs, (prompt_len + i,) * num_seqs))
        for i in range(1, output_len)
    ]
    decode_s = sum(c.total_s for c in decode)
    e2e = ttft + decode_s
    return SimResult(
        profile=profile.name,
        num_seqs=num_seqs,
        prompt_len=prompt_len,
        output_len=output_len,
        ttft_s=ttft,
        tpot_s=decode_s / (output_len - 1) if output_len > 1 else 0.0,
        e2e_s=e2e,
        output_tokens_per_s=num_seqs * output_len / e2e,
        prefill_bound=prefill[-1].bound,
        decode_bound=decode[-1].bound if decode else "n/a",
    )
