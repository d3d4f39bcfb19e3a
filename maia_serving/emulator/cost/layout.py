"""A parallel layout as vLLM's flags give it, and where its pipeline stages and nodes fall."""

from __future__ import annotations

from dataclasses import dataclass

# vLLM's --all2all-backend values the cost model prices: the default gathers every data-parallel rank's tokens
# and reduce-scatters the experts' outputs back; DeepEP's kernels send each token to its experts' ranks only,
# and serve expert parallelism only (without it the default's moves are priced).
ALL2ALL_BACKENDS = ("allgather_reducescatter", "deepep_high_throughput", "deepep_low_latency")


@dataclass(frozen=True)
class Parallel:
    """A layout as vLLM's flags give it: ``dp`` replicas (``--data-parallel-size``) of ``tp x pp`` chips, and
    with ``ep`` (``--enable-expert-parallel``) the routed experts spread whole over the ``tp * dp`` chips of a
    stage instead of each expert's width split over them; with ``eplb`` (``--enable-eplb``, its
    ``num_redundant_experts``; None: off) placed by vLLM's load balancer, with that many redundant experts,
    balanced once it has ``eplb_rearranged`` (its initial map before: ``routing.eplb_initial_placement``)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False
    all2all: str = "allgather_reducescatter"
    eplb: int | None = None
    eplb_rearranged: bool = True

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be at least 1, got tp={self.tp}, pp={self.pp}, dp={self.dp}")
        if self.eplb is not None and not self.ep:
            raise ValueError(
                "EPLB balances experts under expert parallelism: add --enable-expert-parallel "
                "(vLLM refuses --enable-eplb without it)"
            )
        if self.all2all not in ALL2ALL_BACKENDS:
            raise ValueError(
                f"unknown all2all backend {self.all2all!r}; the cost model prices: {', '.join(ALL2ALL_BACKENDS)}"
            )

    @property
    def chips(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def moe_ranks(self) -> int:
        """The chips one MoE layer's experts are split over: vLLM flattens the data-parallel replicas' tensor
        parallel ranks into one group (``FusedMoEParallelConfig``), the expert-parallel group under ``ep``."""
        return self.tp * self.dp

    @property
    def sequence_parallel_moe(self) -> bool:
        """vLLM's ``use_sequence_parallel_moe``: with experts spread over replicas of several tensor-parallel
        ranks, each rank sends only its share of the replica's tokens, and an all-gather over the tensor-parallel
        group takes the place of the MoE output's all-reduce."""
        return self.ep and self.tp > 1 and self.dp > 1


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers of each pipeline stage as vLLM splits them (``vllm.distributed.utils.get_pp_indices``): evenly,
    the remainder one each to the stages before the last, which also holds the LM head."""
    if not 1 <= pp <= num_layers:
        raise ValueError(
            f"pipeline parallel size {pp}: a model of {num_layers} layers takes 1 to {num_layers} "
            f"stages (each stage needs a layer)"
        )
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return tuple(parts)


def crosses_node(stage: int, tp: int, node_chips: int) -> bool:
    """Whether stage ``stage`` sends to the next over the scale-out tier: some rank ``stage * tp + j`` and its
    counterpart ``(stage + 1) * tp + j`` sit on different nodes of ``node_chips``."""
    return any((stage * tp + j) // node_chips != ((stage + 1) * tp + j) // node_chips for j in range(tp))


SINGLE_CHIP = Parallel()
