"""MaiaWorker: vLLM's CPU worker, shipping each step's collectives with the step's output.

The tally (``maia_serving.vllm.communicator``) starts afresh with every step, so start-up,
profiling and warm-up collectives are never charged; the step's output carries it to the
scheduler as ``ModelRunnerOutput.maia_collectives`` (the output is pickled whole between
processes, so the attribute travels with it).
"""

from __future__ import annotations

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker

from maia_serving.vllm import ledger
from maia_serving.vllm.communicator import OUTPUT_ATTR, TALLY


def _with_collectives(output):
    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, OUTPUT_ATTR, TALLY.take())
    return output


class MaiaWorker(CPUWorker):
    def __init__(self, *args, **kwargs) -> None:
        ledger.require_surfaces(ledger.WORKER_SURFACES)
        super().__init__(*args, **kwargs)

    def execute_model(self, scheduler_output):
        TALLY.clear()
        return _with_collectives(super().execute_model(scheduler_output))

    def sample_tokens(self, grammar_output):
        return _with_collectives(super().sample_tokens(grammar_output))
