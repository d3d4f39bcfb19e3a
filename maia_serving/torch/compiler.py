"""``torch.compile`` on maia.

``torch.compile(model, backend="maia")`` (PyTorch's ``torch_dynamo_backends`` entry point; OpenReg's
``compiler.py`` shows the same minimum): Dynamo captures the graph, and the graph runs operator by
operator on the device, so each stays priced as in eager mode. Inductor, the default backend, generates
kernels for a device it knows; it knows none for maia, and says so in one message (``device.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def maia_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The captured graph, run as it is: every aten operator reaches the maia device and its price."""
    return gm.forward
