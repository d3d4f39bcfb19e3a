"""Vision transformers: transformers' ``ViTForImageClassification`` (the architecture of Dosovitskiy et al. and
of timm's ``vit_*_patch16_224``: patch embedding, class token, pre-norm encoder, linear head).

transformers', not timm's, classes: timm requires torchvision, whose PyPI builds are CUDA ones that break the CPU
torch of the vLLM environment (scripts/setup-vllm.sh removes them); transformers is in both environments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from maia_serving.zoo import BuiltIn, Example, image_example, logits


@dataclass(frozen=True)
class VitSize:
    hidden: int
    layers: int
    heads: int
    mlp: int
    published_params: int | None


# Parameter counts as timm's model cards state them for the ImageNet-1k head (vit_tiny/base/large_patch16_224):
# 5.7 M, 86.6 M, 304.3 M; exact counts of the same layers.
SIZES = {
    "vit-tiny-16": VitSize(192, 12, 3, 768, 5_717_416),
    "vit-base-16": VitSize(768, 12, 12, 3072, 86_567_656),
    "vit-large-16": VitSize(1024, 24, 16, 4096, 304_326_632),
}


def build_vit(size: VitSize, image: int = 224, classes: int = 1000) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp,
        image_size=image,
        patch_size=16,
        num_labels=classes,
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(config).eval()


def builtins() -> list[BuiltIn]:
    def build(size: VitSize) -> Callable[[int, int | None], Example]:
        def make(batch: int, shape: int | None) -> Example:
            return image_example(
                lambda side: build_vit(size, side), batch, shape or 224, 16, "a ViT of 16-pixel patches", logits
            )

        return make

    return [
        BuiltIn(
            name,
            f"ViT ({s.layers} layers, width {s.hidden}, 16x16 patches, 224x224)",
            build(s),
            s.published_params,
            "timm model card (ImageNet-1k head)",
        )
        for name, s in SIZES.items()
    ]
