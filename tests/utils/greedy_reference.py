"""Greedy tokens a server gives, checked against transformers' float32 forward pass of the checkpoint, in
process: the independent reference for what a parallel or re-sharded server computes, without an engine
started for the original's tokens.

Teacher forced: the reference scores the server's own sequence in one pass, so each step is checked (a
generation of the reference would stop the comparison at the first parting). On the random demo models the
served greedy token was transformers' best at each of 36 steps, where the best led the next by 0.002-0.3 nats
(mean 0.06-0.09); another model's tokens trail it by more than 0.05 at all 36, and a re-sharded checkpoint
with one rank's o_proj rows reversed by 0.1-0.6 at most steps.
"""

from __future__ import annotations

from pathlib import Path

from tests.utils.e2e import openai_client
from tests.utils.launch import Server

# Two log-probabilities closer than this are a tie: the server (BF16, its ranks' sums in their own order) may
# pick either.
TIE_NATS = 0.02
PROMPTS = ["def main():", "import sys", "class Foo:"]
MAX_TOKENS = 12


def served_greedy(server: Server, model: str = "demo") -> list[tuple[list[int], list[int]]]:
    """Per prompt, the server's prompt token ids and its greedy completion's (both engines return them)."""
    client = openai_client(server)
    out = []
    for prompt in PROMPTS:
        choice = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True}
        ).choices[0]
        out.append((choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]))
    return out


def gaps_to_reference(reference, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """At each greedy step, how far the served token is below the reference's best one, by the reference's
    float32 log-probabilities over the served sequence."""
    import torch

    seq = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(seq).logits[0].float(), dim=-1)
    rows = logprobs[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)]
    return (rows.max(dim=-1).values - rows[torch.arange(len(ids)), torch.tensor(ids)]).tolist()


def assert_computes_the_checkpoint(got: list[tuple[list[int], list[int]]], checkpoint: Path) -> None:
    """Every served greedy token is, up to a tie, the checkpoint's best one."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for prompt, (prompt_ids, ids) in zip(PROMPTS, got):
        assert len(ids) == MAX_TOKENS, f"{prompt!r}: {len(ids)} tokens, not {MAX_TOKENS}"
        gaps = gaps_to_reference(reference, prompt_ids, ids)
        assert max(gaps) < TIE_NATS, f"{prompt!r}: the served tokens trail {checkpoint.name}'s best by {gaps}"
