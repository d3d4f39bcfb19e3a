"""The models `maia-serving profile` knows by name: each built from its library's own model classes (or, where
the library cannot install beside the environments' torch, from the published architecture), random weights
made here (no hub), with an example input of the size a user runs it at.

A size's parameter count is checked against the figure its authors publish (tests/unit/zoo); the full sizes
are for pricing, the small ones for tests that run them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Example:
    """A model and one batch of its input: what ``profile`` runs. ``unit`` is what a batch holds (images,
    sequences, denoising steps), for throughput."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    unit: str
    batch: int
    # The class scores in the model's output, classes on the last axis (``--dtype fp8``'s top-1 agreement);
    # None for a model without (a UNet's noise).
    scores: Callable[[Any], torch.Tensor] | None = None


@dataclass(frozen=True)
class BuiltIn:
    """A named model: how to build it at a batch size (``shape``: its input's spatial size or sequence length,
    None for the published one) and the parameter count its authors publish, with where."""

    name: str
    description: str
    build: Callable[[int, int | None], Example]
    published_params: int | None = None
    source: str = ""


def image_example(
    module: Callable[[int], nn.Module],
    batch: int,
    side: int,
    multiple: int,
    what: str,
    scores: Callable[[Any], torch.Tensor] | None = None,
) -> Example:
    """An image model at ``batch`` random RGB images of ``side`` pixels (``module(side)`` builds it), the side a
    multiple of what its strides or patches take."""
    if side % multiple:
        raise ValueError(f"{what} takes images whose side is a multiple of {multiple}, not {side}")
    return Example(module(side), (torch.rand(batch, 3, side, side),), "images", batch, scores)


def logits(output: Any) -> torch.Tensor:
    """A transformers model's class or token scores."""
    return output["logits"]


def main_output(value: Any) -> torch.Tensor:
    """A model output's main tensor: the output itself, its logits, sample or last hidden state (a field of
    transformers' or diffusers' output objects, or a key of the plain dict they become on the host), or its
    first tensor."""
    if isinstance(value, torch.Tensor):
        return value
    for key in ("logits", "sample", "last_hidden_state"):
        found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if isinstance(found, torch.Tensor):
            return found
    items = value.values() if isinstance(value, dict) else value
    return next(v for v in items if isinstance(v, torch.Tensor))


def _registry() -> dict[str, BuiltIn]:
    from maia_serving.zoo import llama, unet, vit, yolo

    models = [*yolo.builtins(), *vit.builtins(), *unet.builtins(), *llama.builtins()]
    return {m.name: m for m in models}


def names() -> list[str]:
    return list(_registry())


def builtin(name: str) -> BuiltIn:
    """The built-in model ``name``; ValueError naming the known ones."""
    found = _registry().get(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(names())}, an .onnx file, or module:callable")
    return found
