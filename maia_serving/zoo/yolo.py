"""A YOLOv8-shaped detector: the published architecture (Ultralytics' ``yolov8.yaml``: the backbone of strided
convolutions and C2f blocks, the SPPF, the path-aggregation neck and the anchor-free decoupled head with its
distribution focal loss decoding), its widths and depths per size, written here in plain PyTorch.

Not Ultralytics' own classes: `ultralytics` requires torchvision, and PyPI's torchvision builds are CUDA ones that
break the CPU torch of the vLLM environment (scripts/setup-vllm.sh removes them). The layer list and the
parameter counts are checked against Ultralytics' published model summaries (tests/unit/zoo).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from maia_serving.zoo import BuiltIn, Example, image_example


@dataclass(frozen=True)
class Scale:
    """A size's multipliers, as ``yolov8.yaml`` lists them: depth (repeats), width (channels), channel cap."""

    depth: float
    width: float
    max_channels: int


SCALES = {
    "n": Scale(0.33, 0.25, 1024),
    "s": Scale(0.33, 0.50, 1024),
    "m": Scale(0.67, 0.75, 768),
    "l": Scale(1.00, 1.00, 512),
    "x": Scale(1.00, 1.25, 512),
}
REG_MAX = 16  # bins of the box-side distribution (the DFL head)
STRIDES = (8, 16, 32)


class Conv(nn.Module):
    """Convolution, batch norm (Ultralytics' eps and momentum), SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split in two, run ``n`` bottlenecks on one half, concatenate every intermediate, project."""

    def __init__(self, c1: int, c2: int, n: int, shortcut: bool):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1, self.cv2 = Conv(c1, hidden, 1), Conv(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """The expected box side under each bin distribution: a fixed 1x1 convolution over softmaxed bins."""

    def __init__(self, bins: int = REG_MAX):
        super().__init__()
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """Anchor-free decoupled head: per level a box branch (4 x REG_MAX bins) and a class branch; at inference
    the boxes decoded (xywh, pixels) and the class scores sigmoided, ``(batch, 4 + classes, anchors)``."""

    def __init__(self, classes: int, channels: tuple[int, ...]):
        super().__init__()
        c2 = max(16, channels[0] // 4, REG_MAX * 4)
        c3 = max(channels[0], min(classes, 100))
        self.classes = classes
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1)) for c in channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, classes, 1)) for c in channels
        )
        self.dfl = DFL()

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        b = levels[0].shape[0]
        maps = [torch.cat((box(x), cls(x)), 1) for x, box, cls in zip(levels, self.cv2, self.cv3, strict=True)]
        flat = torch.cat([m.view(b, 4 * REG_MAX + self.classes, -1) for m in maps], 2)
        box, cls = flat.split((4 * REG_MAX, self.classes), 1)
        anchors, strides = _anchors(levels)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchors - lt, anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((xywh, cls.sigmoid()), 1)


def _anchors(levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, ``(2, anchors)``, and each one's stride, ``(1, anchors)``."""
    points, strides = [], []
    for x, stride in zip(levels, STRIDES, strict=True):
        h, w = x.shape[2:]
        sy = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
        sx = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy)).view(2, -1))
        strides.append(torch.full((1, h * w), float(stride), device=x.device, dtype=x.dtype))
    return torch.cat(points, 1), torch.cat(strides, 1)


class YoloV8(nn.Module):
    """``yolov8{size}``: backbone, neck and head of the published configuration, ``classes`` (COCO: 80)."""

    def __init__(self, size: str = "n", classes: int = 80):
        super().__init__()
        if size not in SCALES:
            raise ValueError(f"YOLOv8 size {size!r}: one of {', '.join(SCALES)}")
        scale = SCALES[size]

        def ch(c: int) -> int:
            return math.ceil(min(c, scale.max_channels) * scale.width / 8) * 8

        def n(repeats: int) -> int:
            return max(round(repeats * scale.depth), 1)

        self.stem = nn.Sequential(Conv(3, ch(64), 3, 2), Conv(ch(64), ch(128), 3, 2), C2f(ch(128), ch(128), n(3), True))
        self.p3 = nn.Sequential(Conv(ch(128), ch(256), 3, 2), C2f(ch(256), ch(256), n(6), True))
        self.p4 = nn.Sequential(Conv(ch(256), ch(512), 3, 2), C2f(ch(512), ch(512), n(6), True))
        self.p5 = nn.Sequential(
            Conv(ch(512), ch(1024), 3, 2), C2f(ch(1024), ch(1024), n(3), True), SPPF(ch(1024), ch(1024))
        )
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.top_down4 = C2f(ch(1024) + ch(512), ch(512), n(3), False)
        self.top_down3 = C2f(ch(512) + ch(256), ch(256), n(3), False)
        self.down3 = Conv(ch(256), ch(256), 3, 2)
        self.bottom_up4 = C2f(ch(256) + ch(512), ch(512), n(3), False)
        self.down4 = Conv(ch(512), ch(512), 3, 2)
        self.bottom_up5 = C2f(ch(512) + ch(1024), ch(1024), n(3), False)
        self.detect = Detect(classes, (ch(256), ch(512), ch(1024)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c3 = self.p3(self.stem(images))
        c4 = self.p4(c3)
        c5 = self.p5(c4)
        t4 = self.top_down4(torch.cat((self.up(c5), c4), 1))
        t3 = self.top_down3(torch.cat((self.up(t4), c3), 1))
        b4 = self.bottom_up4(torch.cat((self.down3(t3), t4), 1))
        b5 = self.bottom_up5(torch.cat((self.down4(b4), c5), 1))
        return self.detect([t3, b4, b5])


# Ultralytics' model summaries for the COCO head, as `model.info()` prints them and ultralytics/cfg/models/v8/
# yolov8.yaml quotes them beside each scale.
PUBLISHED = {"n": 3_157_200, "s": 11_166_560, "m": 25_902_640, "l": 43_691_520, "x": 68_229_648}


def class_scores(output: torch.Tensor) -> torch.Tensor:
    """Each anchor's 80 class scores (the detector's output is 4 box coordinates, then the classes, per
    anchor)."""
    return output[:, 4:, :].transpose(1, 2)


def builtins() -> list[BuiltIn]:
    def build(size: str) -> Callable[[int, int | None], Example]:
        def make(batch: int, shape: int | None) -> Example:
            return image_example(lambda _: YoloV8(size).eval(), batch, shape or 640, 32, "YOLOv8", class_scores)

        return make

    return [
        BuiltIn(
            f"yolov8{size}",
            f"YOLOv8{size} detector (COCO head, 640x640)",
            build(size),
            PUBLISHED[size],
            "Ultralytics model summary (model.info())",
        )
        for size in SCALES
    ]
