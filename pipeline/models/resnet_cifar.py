"""The CIFAR ResNet (He et al., 2016, section 4.2): ResNet-20/32/44/56/110 for 32x32 images.

A 3x3 conv stem (16 channels, BN, ReLU; no max-pool), three stages of n BasicBlocks each (16, 32, 64 channels;
stride 2 in the first block of stages 2 and 3), global average pooling, one linear classifier: 6n+2 layers.
Where a block changes the shape, its shortcut is either option A, parameter-free (the input subsampled by the
stride and zero-padded on channels, as in the paper's CIFAR experiments), or option B, a 1x1 conv + BN.

Module names are those of the widely used CIFAR state-dict layout, so those weights load as they are; the
checkpoint formats are read in `resnet_cifar_ckpt.py`. The network takes uint8 pixels [B, H, W, 3] and
normalises them on the device (`layers.Normalize`; the stem conv is padded, so nothing is folded into it).
This module never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoint import ModelError
from pipeline.models.layers import Normalize

SHORTCUTS = ("A", "B")


@dataclass(frozen=True)
class ResNetCifarConfig:
    depths: tuple[int, ...] = (5, 5, 5)  # BasicBlocks per stage: n each in the paper (ResNet-32: n = 5)
    widths: tuple[int, ...] = (16, 32, 64)  # output channels per stage; the stem has widths[0]
    shortcut: str = "A"  # A: subsample + zero-pad channels; B: 1x1 conv + BN (where the shape changes)
    num_classes: int = 10  # 0: a features-only backbone
    eps: float = 1e-5  # BatchNorm eps

    def __post_init__(self) -> None:
        checks = [
            (len(self.depths) == len(self.widths) > 0 and min(self.depths) > 0, "depths",
             f"one positive block count per stage of widths={self.widths}", self.depths),
            (min(self.widths, default=0) > 0, "widths", "positive channel counts", self.widths),
            (self.shortcut in SHORTCUTS, "shortcut", f"one of {SHORTCUTS}", self.shortcut),
            (self.shortcut == "B" or list(self.widths) == sorted(self.widths), "widths",
             "non-decreasing widths for option A (it zero-pads channels)", self.widths),
            (self.num_classes >= 0, "num_classes", ">= 0", self.num_classes),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"ResNetCifarConfig.{name}: expected {expected}, got {got!r}")

    @property
    def layers(self) -> int:
        return 2 * sum(self.depths) + 2  # ResNet-32: 2 * 15 + 2

    @property
    def dim(self) -> int:
        return self.widths[-1]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: identity on a subsampled grid, extra channels zero (half before, half after the input's)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.before, self.after = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]  # [B, Cin, H/s, W/s]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))  # [B, Cout, H/s, W/s]


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 carries the stride."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: ResNetCifarConfig):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout, eps=cfg.eps)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=cfg.eps)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = PadShortcut(cin, cout, stride) if cfg.shortcut == "A" else nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=cfg.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, Cout, H/s, W/s]
        out = self.bn2(self.conv2(out))  # [B, Cout, H/s, W/s]
        return F.relu(out + self.shortcut(x))  # [B, Cout, H/s, W/s]


class ResNetCifar(nn.Module):
    """uint8 pixels [B, H, W, 3] -> pooled features [B, widths[-1]] -> logits [B, C]."""

    def __init__(self, cfg: ResNetCifarConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(mean, std)  # buffers only, not in the state dict
        self.conv1 = conv3x3(3, cfg.widths[0])
        self.bn1 = nn.BatchNorm2d(cfg.widths[0], eps=cfg.eps)
        cin = cfg.widths[0]
        for i, (n, cout) in enumerate(zip(cfg.depths, cfg.widths, strict=True)):
            first_stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin if j == 0 else cout, cout, first_stride if j == 0 else 1, cfg) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        self.reset_parameters()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.depths))]

    def reset_parameters(self) -> None:
        """He (kaiming normal) init for convs and the classifier, BN at identity, for training from scratch."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, H, W, 3] (uint8) -> globally average-pooled features [B, widths[-1]]."""
        if pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels: expected [B, H, W, 3], got {list(pixels.shape)}")
        x = self.normalize(pixels)  # [B, 3, H, W] in the weights' dtype and device
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 16, H, W]
        for stage in self.stages:
            x = stage(x)  # [B, 16, H, W] -> [B, 32, H/2, W/2] -> [B, 64, H/4, W/4]
        return x.mean(dim=(2, 3))  # [B, 64]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            raise ModelError("model: expected a classifier to compute logits, got a features-only ResNet")
        return self.linear(feats)  # [B, C]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))  # [B, C]
