"""ResNet v1.5 (He et al., 2016; torchvision's variant): an ImageNet CNN of residual blocks over raw pixels.

    uint8 [B, H, W, 3] -> Normalize -> stem: conv 7x7/2 + BN + ReLU, max-pool 3x3/2   [B, C0, H/4, W/4]
                       -> stages 1..S: blocks, the first of stages 2..S with stride 2  [B, C_S, H/32, W/32]
                       -> global average pool [B, C_S] (the features) -> fc [B, classes]

Blocks: `BasicBlock` (two 3x3 convs: ResNet-18/34) or `Bottleneck` (1x1 reduce, 3x3, 1x1 expand: ResNet-50/
101/152). v1.5 strides the Bottleneck's 3x3 conv; the original v1 (HF `downsample_in_bottleneck`) strides its
first 1x1 (`stride_in_1x1`). A block whose input and output differ (stride or channels) projects its shortcut
with a 1x1 conv + BN. Module names are torchvision's, so torchvision and timm state dicts load as they are;
the HF layout is mapped onto them in `resnet_ckpt.py`. The network normalises its uint8 input on the device
(`layers.Normalize`): the stem conv is padded, so normalisation cannot be folded into it. Never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelError
from pipeline.models.layers import Normalize

BLOCKS = ("basic", "bottleneck")
# depth -> (block, blocks per stage): torchvision's resnet18 ... resnet152
PRESETS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
           101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


@dataclass(frozen=True)
class ResNetConfig:
    block: str  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152)
    depths: tuple[int, ...]  # blocks per stage: (3, 4, 6, 3) for ResNet-34 and -50
    widths: tuple[int, ...]  # output channels per stage: (64, 128, 256, 512) basic, (256, ..., 2048) bottleneck
    num_classes: int  # 0: a features-only backbone (no fc)
    stem_width: int = 64  # channels of the 7x7 stem conv
    mid_widths: tuple[int, ...] = ()  # Bottleneck inner (3x3) channels per stage; () = widths // 4 (wide: more)
    stride_in_1x1: bool = False  # v1: stride on the Bottleneck's first 1x1 conv; v1.5 (False): on its 3x3
    first_stride: int = 1  # stride of stage 1's first block (HF downsample_in_first_stage: 2)
    eps: float = 1e-5  # BatchNorm eps: torchvision, timm and HF all use 1e-5

    def __post_init__(self) -> None:
        n = len(self.depths)
        checks = [
            (self.block in BLOCKS, "block", f"one of {BLOCKS}", self.block),
            (n > 0 and len(self.widths) == n and len(self.mid_widths) in (0, n), "widths/mid_widths",
             f"one per stage ({n} stages)", (self.widths, self.mid_widths)),
            (min((*self.depths, *self.widths, *self.mid_widths, self.stem_width), default=0) > 0,
             "depths/widths", "positive", (self.depths, self.widths)),
            (self.num_classes >= 0 and self.first_stride in (1, 2), "num_classes/first_stride", ">= 0 and 1 or 2",
             (self.num_classes, self.first_stride)),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"ResNetConfig.{name}: expected {expected}, got {got!r}")

    @classmethod
    def preset(cls, depth: int, num_classes: int = 1000, width: int = 64) -> ResNetConfig:
        """torchvision's resnet{18,34,50,101,152}; `width` scales every stage (64 = the real network)."""
        if depth not in PRESETS:
            raise ModelError(f"ResNetConfig.preset: expected a depth in {sorted(PRESETS)}, got {depth}")
        block, depths = PRESETS[depth]
        expansion = 4 if block == "bottleneck" else 1
        return cls(block=block, depths=depths, widths=tuple(width * expansion * 2**i for i in range(4)),
                   num_classes=num_classes, stem_width=width)

    @property
    def mids(self) -> tuple[int, ...]:
        if self.block == "basic":
            return self.widths
        return self.mid_widths or tuple(w // 4 for w in self.widths)

    @property
    def depth(self) -> int:
        """Weighted layers, as in the name ResNet-50: the stem conv, the blocks' convs and the fc."""
        return 2 + sum(self.depths) * (2 if self.block == "basic" else 3)

    @property
    def num_features(self) -> int:
        return self.widths[-1]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, eps: float) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out, eps=eps)


class BasicBlock(nn.Module):
    """relu(x' + bn2(conv2(relu(bn1(conv1(x)))))), both convs 3x3, the first with the stride."""

    def __init__(self, c_in: int, c_out: int, stride: int, eps: float):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride, eps)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3, 1, eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(c_in, c_out, stride, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [B, C_out, H/s, W/s]
        out = self.relu(self.bn1(self.conv1(x)))  # [B, C_out, H/s, W/s]
        out = self.bn2(self.conv2(out))  # [B, C_out, H/s, W/s]
        return self.relu(out + identity)  # [B, C_out, H/s, W/s]


class Bottleneck(nn.Module):
    """relu(x' + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))): 1x1 reduce, 3x3, 1x1 expand."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, stride_in_1x1: bool, eps: float):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = _conv_bn(c_in, mid, 1, s1, eps)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, s3, eps)
        self.conv3, self.bn3 = _conv_bn(mid, c_out, 1, 1, eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(c_in, c_out, stride, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [B, C_out, H/s, W/s]
        out = self.relu(self.bn1(self.conv1(x)))  # [B, mid, H, W] (v1: H/s, W/s)
        out = self.relu(self.bn2(self.conv2(out)))  # [B, mid, H/s, W/s]
        out = self.bn3(self.conv3(out))  # [B, C_out, H/s, W/s]
        return self.relu(out + identity)  # [B, C_out, H/s, W/s]


def shortcut(c_in: int, c_out: int, stride: int, eps: float) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv with the block's stride + BN) where shapes change; else identity."""
    if c_in == c_out and stride == 1:
        return None
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride, eps))


class ResNet(nn.Module):
    """ResNet over uint8 pixels [B, H, W, 3]; `mean`/`std` are the checkpoint's normalisation (its contract)."""

    def __init__(self, cfg: ResNetConfig, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(mean, std)
        self.conv1, self.bn1 = _conv_bn(3, cfg.stem_width, 7, 2, cfg.eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c_in, self.stages = cfg.stem_width, []
        for i, (n, mid, c_out) in enumerate(zip(cfg.depths, cfg.mids, cfg.widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = (cfg.first_stride if i == 0 else 2) if j == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, cfg.eps) if cfg.block == "basic"
                              else Bottleneck(c_in, mid, c_out, stride, cfg.stride_in_1x1, cfg.eps))
                c_in = c_out
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))  # torchvision's names: layer1..layer4
            self.stages.append(f"layer{i + 1}")
        self.fc = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's init (Kaiming fan-out convs, unit BN), for training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, H, W, 3] (uint8 or float, 0..255) -> globally average-pooled features [B, C_S]."""
        if pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels: expected [B, H, W, 3], got {list(pixels.shape)}")
        x = self.normalize(pixels)  # [B, 3, H, W] in the weights' dtype, on their device (channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, C0, H/4, W/4]
        for name in self.stages:
            x = getattr(self, name)(x)  # [B, C_i, H/4/2^i, W/4/2^i] (stage 1 keeps the size)
        return x.mean(dim=(2, 3))  # [B, C_S]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise ModelError("model: expected a ResNet with a classifier (fc), got a features-only backbone")
        return self.fc(feats)  # [B, C]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))  # [B, C]
