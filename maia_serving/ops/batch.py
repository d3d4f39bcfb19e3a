"""The arguments of paged attention bundled as the engines think of them: one step's batch (``PagedBatch``,
built once per step by each adapter, as vLLM's ``CommonAttentionMetadata`` and SGLang's ``ForwardBatch`` are)
and one cache's quantization (``KvQuant``). Only the Triton launch and the plain-torch references below it take
the flat argument list, so that a kernel and its reference can be called alike."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class PagedPlan:
    """Index tensors of one step's batch for the torch path, shared by every layer of its window (built once per
    step by ``host.plan_paged_attention``)."""

    num_seqs: int
    max_q: int
    max_len: int
    blocks: torch.Tensor  # [seqs, blocks needed for max_len]
    index: torch.Tensor  # [seqs, max_q] token row of each padded query
    valid_q: torch.Tensor  # [seqs, max_q]
    mask: torch.Tensor  # [seqs, 1 or max_q, max_len], True where a key is not attended
    batched: bool  # False: the padded scores would be too large, use the reference
    sliding_window: int | None = None  # the window the mask was built for


@dataclass(frozen=True)
class PagedBatch:
    """One step's varlen queries over the paged KV cache.

    ``max_query_len`` (the longest query) spares a device sync; ``sliding_window``: each query sees its last
    that many keys, itself included (None: all); ``plan``: the torch path's index tensors for this batch and
    window (None: built where needed)."""

    block_tables: torch.Tensor  # [seqs, max_blocks] page numbers
    seq_lens: torch.Tensor  # [seqs] tokens of context, this step's included
    query_start_loc: torch.Tensor  # [seqs + 1]
    max_query_len: int | None = None
    sliding_window: int | None = None
    causal: bool = True
    plan: PagedPlan | None = None

    def windowed(self, sliding_window: int | None) -> PagedBatch:
        """The same batch seen by a layer of another window (its plan, built for this one's mask, dropped)."""
        if sliding_window == self.sliding_window:
            return self
        return replace(self, sliding_window=sliding_window, plan=None)


@dataclass(frozen=True)
class KvQuant:
    """How a KV cache stores its values: the format's name (``auto``: the model's dtype; an FP8 or a
    block-scaled one) and the K and V scales (per tensor, per KV head, NVFP4's tensor scale; None where the
    format keeps its scales in its blocks)."""

    dtype: str = "auto"
    k_scale: float | torch.Tensor | None = None
    v_scale: float | torch.Tensor | None = None


UNQUANTIZED = KvQuant()
