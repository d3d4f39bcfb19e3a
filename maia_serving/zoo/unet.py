"""Diffusion UNets: diffusers' own ``UNet2DConditionModel``, in Stable Diffusion 1.5's configuration (the
``unet/config.json`` of its release: 512x512 images as 64x64 latents, text embeddings of 77 x 768) and in a tiny
one of the same block types for tests. One forward is one denoising step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from maia_serving.zoo import BuiltIn, Example

SD15: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TEXT_TOKENS = {"unet-sd15": 77, "unet-tiny": 8}
# Stable Diffusion's model card: an 860M UNet (859,520,964 as diffusers builds this configuration).
PUBLISHED = 859_520_964


class Denoiser(torch.nn.Module):
    """The UNet as one step calls it, returning the predicted noise (diffusers returns an output object)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
        except ImportError as exc:
            raise ValueError(
                f"the built-in UNets are diffusers' own: pip install 'maia-serving[models]' ({exc})"
            ) from exc

        self.unet = UNet2DConditionModel(**config)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=text).sample


def builtins() -> list[BuiltIn]:
    def build(name: str, config: dict[str, Any]) -> Callable[[int, int | None], Example]:
        def make(batch: int, shape: int | None) -> Example:
            side = shape or config["sample_size"]
            if side % 2 ** (len(config["block_out_channels"]) - 1):
                raise ValueError(f"{name} takes latents whose side is a multiple of its downsamplings, not {side}")
            inputs = (
                torch.randn(batch, config["in_channels"], side, side),
                torch.full((batch,), 500, dtype=torch.long),  # a timestep: token-like, kept integer
                torch.randn(batch, TEXT_TOKENS[name], config["cross_attention_dim"]),
            )
            return Example(Denoiser(config).eval(), inputs, "denoising steps", batch)

        return make

    return [
        BuiltIn(
            "unet-tiny", "diffusers UNet2DConditionModel, two levels of width 32/64 (tests)", build("unet-tiny", TINY)
        ),
        BuiltIn(
            "unet-sd15",
            "Stable Diffusion 1.5's UNet (64x64 latents of a 512x512 image, one denoising step)",
            build("unet-sd15", SD15),
            PUBLISHED,
            "Stable Diffusion v1 model card (860M UNet); diffusers' count of its config",
        ),
    ]
