"""MobileNetV2 (Sandler et al., 2018): inverted residual blocks with linear bottlenecks.

The model takes uint8 pixels [B, H, W, 3] (`config.ImageContract` with patch_size 0) and normalises them on the
device first (`layers.Normalize`: the stem conv is padded, so normalisation cannot be folded into it). Two
padding rules, both exact: symmetric (k - 1) // 2 as torchvision pads, or TensorFlow "SAME" padding computed
from each conv's input size, as the TF-trained checkpoints (transformers' `tf_padding=True`) need.
Checkpoint formats (HF, torchvision) are mapped onto it in `mobilenetv2_ckpt.py`. This module never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoint import ModelError
from pipeline.models.layers import Normalize

# The paper's Table 2, after the stem: expansion t, output channels c, repeats n, stride s of the first repeat.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, LAST_CHANNELS = 32, 1280
BLOCK_STRIDES = tuple(s if i == 0 else 1 for _, _, n, s in INVERTED_RESIDUAL_SETTING for i in range(n))  # 17


@dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block: [expand 1x1 ->] depthwise 3x3 (stride) -> linear project 1x1."""

    inp: int
    hidden: int  # channels of the depthwise conv
    out: int
    stride: int
    expand: bool  # a 1x1 expansion conv (the paper's t > 1; HF's first_layer_is_expansion=False adds one at t = 1)
    residual: bool  # a skip connection: stride 1 and inp == out (transformers' first block never has one)


@dataclass(frozen=True)
class MobileNetV2Config:
    stem: int  # channels of the stride-2 3x3 stem conv
    blocks: tuple[BlockSpec, ...]
    last: int  # channels of the final 1x1 conv: the feature dimension
    num_classes: int  # 0: a features-only backbone
    eps: float = 1e-5  # BatchNorm eps: torchvision 1e-5, TF/HF 1e-3
    tf_padding: bool = False  # TensorFlow "SAME" padding (HF tf_padding) instead of symmetric padding

    def __post_init__(self) -> None:
        chain = [self.stem] + [b.out for b in self.blocks]
        checks = [
            (len(self.blocks) > 0, "blocks", "at least one block", self.blocks),
            (all(b.inp == c for b, c in zip(self.blocks, chain, strict=False)), "blocks",
             f"each block's inp equal to the previous output (stem {self.stem})", self.blocks),
            (all(b.stride in (1, 2) and min(b.inp, b.hidden, b.out) > 0 for b in self.blocks), "blocks",
             "strides 1 or 2 and positive channels", self.blocks),
            (all(b.expand or b.hidden == b.inp for b in self.blocks), "blocks",
             "hidden == inp where a block has no expansion conv", self.blocks),
            (all(b.stride == 1 and b.inp == b.out for b in self.blocks if b.residual), "blocks",
             "residual blocks of stride 1 with inp == out", self.blocks),
            (min(self.stem, self.last) > 0 and self.num_classes >= 0, "stem/last/num_classes",
             "positive channels and num_classes >= 0", (self.stem, self.last, self.num_classes)),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"MobileNetV2Config.{name}: expected {expected}, got {got!r}")

    @classmethod
    def scaled(cls, depth_multiplier: float = 1.0, *, divisor: int = 8, min_depth: int = 8, expand_ratio: float = 6.0,
               first_expand: bool = False, finegrained_output: bool = True, num_classes: int = 1000,
               eps: float = 1e-5, tf_padding: bool = False) -> MobileNetV2Config:
        """Table 2 at a width (depth) multiplier, with transformers' MobileNetV2Config channel rules.

        Every width is rounded to a multiple of `divisor` (at least `min_depth`, never 10% below the scaled
        width); the final conv keeps 1280 channels below width 1 when `finegrained_output` (torchvision too).
        """
        if depth_multiplier <= 0 or divisor < 1 or min_depth < 1:
            raise ModelError(f"MobileNetV2Config: expected depth_multiplier > 0, divisor >= 1, min_depth >= 1, got "
                             f"{(depth_multiplier, divisor, min_depth)}")

        def width(c: float) -> int:
            return make_divisible(round(c * depth_multiplier), divisor, min_depth)

        stem = width(STEM_CHANNELS)
        blocks: list[BlockSpec] = []
        inp = stem
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                stride, out = s if i == 0 else 1, width(c)
                hidden = make_divisible(round(inp * expand_ratio), divisor, min_depth) if t != 1 else inp
                blocks.append(BlockSpec(inp, hidden, out, stride, expand=t != 1 or first_expand,
                                        residual=bool(blocks) and stride == 1 and inp == out))
                inp = out
        fine = finegrained_output and depth_multiplier < 1.0
        return cls(stem=stem, blocks=tuple(blocks), last=LAST_CHANNELS if fine else width(LAST_CHANNELS),
                   num_classes=num_classes, eps=eps, tf_padding=tf_padding)


def make_divisible(value: float, divisor: int, min_value: int) -> int:
    """The nearest multiple of `divisor`, at least `min_value`, and not more than 10% below `value`."""
    out = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def same_padding(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TensorFlow "SAME" padding for `conv` on x [B, C, H, W]: ceil(in / stride) outputs, the odd pixel at the
    bottom/right (as transformers' apply_tf_padding computes it)."""
    pads = []
    for size, k, s, d in zip(x.shape[-1:-3:-1], conv.kernel_size[::-1], conv.stride[::-1], conv.dilation[::-1],
                             strict=True):  # width first, then height: F.pad's order
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2 * d, (total - total // 2) * d]
    return F.pad(x, pads) if any(pads) else x  # [B, C, H + pad, W + pad]


# --- blocks ----------------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU6 (omitted for the linear bottleneck's projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, cfg: MobileNetV2Config, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.tf_padding = cfg.tf_padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0 if cfg.tf_padding else (kernel - 1) // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding:
            x = same_padding(x, self.conv)  # [B, Cin, H', W']
        return self.act(self.bn(self.conv(x)))  # [B, Cout, H / stride, W / stride]


class InvertedResidual(nn.Module):
    """Narrow -> wide (expand 1x1) -> depthwise 3x3 -> narrow (linear 1x1), with a skip when shapes allow."""

    def __init__(self, spec: BlockSpec, cfg: MobileNetV2Config):
        super().__init__()
        self.expand = ConvBN(spec.inp, spec.hidden, 1, cfg) if spec.expand else None
        self.depthwise = ConvBN(spec.hidden, spec.hidden, 3, cfg, stride=spec.stride, groups=spec.hidden)
        self.project = ConvBN(spec.hidden, spec.out, 1, cfg, act=False)
        self.residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x  # [B, hidden, H, W]
        y = self.depthwise(y)  # [B, hidden, H / s, W / s]
        y = self.project(y)  # [B, out, H / s, W / s]
        return x + y if self.residual else y


# --- network ---------------------------------------------------------------------------------------------------


class MobileNetV2(nn.Module):
    """MobileNetV2 over uint8 pixels [B, H, W, 3]; global average pooling of the final 1x1 conv."""

    def __init__(self, cfg: MobileNetV2Config, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(mean, std)
        self.stem = ConvBN(3, cfg.stem, 3, cfg, stride=2)
        self.blocks = nn.ModuleList(InvertedResidual(spec, cfg) for spec in cfg.blocks)
        self.conv_last = ConvBN(cfg.blocks[-1].out, cfg.last, 1, cfg)
        self.classifier = nn.Linear(cfg.last, cfg.num_classes) if cfg.num_classes else None  # dropout: training only

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, H, W, 3] (uint8 or float 0..255) -> pooled features [B, last]."""
        if pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels: expected [B, H, W, 3], got {list(pixels.shape)}")
        x = self.normalize(pixels)  # [B, 3, H, W], the weights' dtype and device
        x = self.stem(x)  # [B, stem, H/2, W/2]
        for blk in self.blocks:
            x = blk(x)  # [B, c, H/s, W/s]; s = 32 after the last strided block
        x = self.conv_last(x)  # [B, last, H/32, W/32]
        return x.mean(dim=(2, 3))  # [B, last]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ModelError("MobileNetV2: expected a checkpoint with a classifier for logits, got a features-only "
                             "backbone; use its features (few-shot) instead")
        return self.classifier(feats)  # [B, C]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))  # [B, C]
