"""Llama-3-8B on one Maia 100, and three of its steps priced by hand from the profile's figures.

The golden steps are the reference for the cost path the engines call (``EmulatedDevice.charge``
-> ``CostModel.cost_of``) and for the emulated clock: worked out here from the model's
dimensions and the roofline, not from the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from maia_serving.emulator import DeviceProfile, ModelShape, load_model_shape, load_profile

# Maia 100 (profiles/maia100.yaml): 0.8 PFLOP/s BF16 at 60%, 1.8 TB/s HBM at 75%, 5 us per kernel.
FLOPS_PER_S = 0.8e15 * 0.6
BYTES_PER_S = 1.8e12 * 0.75
# Per layer two norms (each residual add is fused into the norm after it, vLLM's fused_add_rms_norm, so it
# is no kernel of its own) and seven other kernels; embedding, final norm, LM head: 9 * 32 + 3 = 291 kernels.
# Maia 100's profile has no host-launch, graph or step-overhead figures: launch time is only this.
LAUNCH_S = (9 * 32 + 3) * 5e-6

# Llama-3-8B: hidden 4096, 32 layers, 32 query and 8 KV heads of 128, MLP 14336, vocab 128256, BF16.
# Per token and layer, the four GEMMs (qkv 4096x6144, o 4096x4096, gate_up 4096x28672, down 14336x4096):
GEMM_FLOPS_PER_TOKEN = 32 * 2 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
GEMM_IO_BYTES_PER_TOKEN = 32 * 2 * ((4096 + 6144) + (4096 + 4096) + (4096 + 28672) + (14336 + 4096))
GEMM_WEIGHT_BYTES = 32 * 2 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
ATTENTION_FLOPS_PER_PAIR = 32 * 4 * 32 * 128  # QK^T and PV, 2 FLOPs each, per head and layer
# K and V of 8 heads of 128 in BF16 per layer: read for every context token, written for every new one,
# plus reading q and writing the output (32 heads of 128).
KV_BYTES_PER_CONTEXT_TOKEN = 32 * 2 * 8 * 128 * 2
ATTENTION_IO_BYTES_PER_TOKEN = 32 * (2 * 8 * 128 * 2 + 2 * 32 * 128 * 2)
# Element-wise kernels per token: two RMSNorms (read, write), rotary on q and k, SiLU-and-mul
# (read 2 x 14336, write 14336), two residual adds (two reads, one write); and the embedding gather.
ELEMENTWISE_BYTES_PER_TOKEN = 32 * 2 * (2 * 2 * 4096 + 2 * (4096 + 1024) + 3 * 14336 + 2 * 3 * 4096) + 4096 * 2
NORM_WEIGHT_BYTES = (2 * 32 + 1) * 4096 * 2
# The final norm (read, write) and the LM head run on each sequence's last token only.
LM_HEAD_WEIGHT_BYTES = 4096 * 128256 * 2
PER_SEQ_BYTES = 2 * 4096 * 2 + (4096 + 128256) * 2


@dataclass(frozen=True)
class GoldenStep:
    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]
    compute_s: float
    memory_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + LAUNCH_S


def _prefill_like(tokens: int, pairs: int) -> tuple[float, float]:
    """Enough tokens that the GEMMs and attention are compute-bound; norms, element-wise kernels and
    the one-row LM head stay memory-bound."""
    compute = (tokens * GEMM_FLOPS_PER_TOKEN + pairs * ATTENTION_FLOPS_PER_PAIR) / FLOPS_PER_S
    memory = tokens * ELEMENTWISE_BYTES_PER_TOKEN + NORM_WEIGHT_BYTES + LM_HEAD_WEIGHT_BYTES + PER_SEQ_BYTES
    return compute, memory / BYTES_PER_S


GOLDEN = {
    # A 2048-token prompt: pairs 1 + 2 + ... + 2048.
    "prefill": GoldenStep((2048,), (2048,), *_prefill_like(2048, 2048 * 2049 // 2)),
    # 512 new tokens after a 3584-token prefix-cache hit: pairs 3585 + ... + 4096 = 512 * 4096 - 512 * 511 / 2.
    "chunk": GoldenStep((512,), (4096,), *_prefill_like(512, 512 * 4096 - 512 * 511 // 2)),
    # Two sequences decode one token each: every operator is memory-bound, so the step reads every weight but
    # the embedding table once, each token's activations and the KV of all 2049 + 4097 context tokens.
    "decode": GoldenStep(
        (1, 1),
        (2049, 4097),
        0.0,
        (
            GEMM_WEIGHT_BYTES
            + NORM_WEIGHT_BYTES
            + LM_HEAD_WEIGHT_BYTES
            + 2 * (GEMM_IO_BYTES_PER_TOKEN + ATTENTION_IO_BYTES_PER_TOKEN + ELEMENTWISE_BYTES_PER_TOKEN + PER_SEQ_BYTES)
            + (2049 + 4097) * KV_BYTES_PER_CONTEXT_TOKEN
        )
        / BYTES_PER_S,
    ),
}


@pytest.fixture(scope="session")
def llama8b() -> ModelShape:
    return load_model_shape("llama-3-8b")


@pytest.fixture(scope="session")
def maia100() -> DeviceProfile:
    return load_profile("maia100")


@pytest.fixture(scope="session")
def golden() -> dict[str, GoldenStep]:
    return GOLDEN


@pytest.fixture
def host_raw() -> dict:
    """The least data file a profile loads from, figures of a small host: what calibrate-host adds to."""
    raw = {
        "name": "host",
        "hbm_capacity": {"value": 24, "unit": "GB", "source": "s"},
        "hbm_bandwidth": {"value": 10, "unit": "GB/s", "source": "s"},
        "sram": {"value": 0, "unit": "MB", "source": "s"},
        "peak_compute": {"bf16": {"value": 0.4, "unit": "TFLOP/s", "source": "s"}},
        "compute_efficiency": {"value": 1.0, "unit": "ratio", "source": "s"},
        "memory_efficiency": {"value": 1.0, "unit": "ratio", "source": "s"},
        "runtime_reserve": {"value": 0, "unit": "GiB", "source": "s"},
        "kernel_launch": {"value": 2, "unit": "us", "source": "s"},
        "scale_up": {
            "topology": "pcie",
            "bandwidth": {"value": 10, "unit": "GB/s", "source": "s"},
            "latency": {"value": 1, "unit": "us", "source": "s"},
        },
    }
    raw["host_link"] = raw["scale_up"]
    return raw
