"""ViT (Dosovitskiy et al., 2021): a plain transformer over raw-pixel patch tokens.

The model takes uint8 tokens [B, N, P*P*3] in the layout `config.ImageContract` defines and owns the
normalisation: (x/255 - mean)/std is folded into the patch projection (an nn.Linear, which is the reference
conv2d with kernel = stride = P applied to pre-cut patches; exact, since that conv has no padding).
Checkpoint formats (HF, timm) are mapped onto it in `vit_ckpt.py`. This module never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoint import ModelError
from pipeline.models.layers import PatchGrid, embed_patches


@dataclass(frozen=True)
class ViTConfig(PatchGrid):
    image_size: tuple[int, int]  # (H, W)
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    num_classes: int
    eps: float = 1e-6  # LayerNorm eps: timm 1e-6, HF 1e-12
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        checks = [
            (p > 0 and h % p == 0 and w % p == 0, "image_size", f"multiples of patch_size={p}", self.image_size),
            (self.heads > 0 and self.dim % self.heads == 0, "dim", f"a multiple of heads={self.heads}", self.dim),
            (min(self.depth, self.mlp_dim, self.num_classes) > 0, "depth/mlp_dim/num_classes", "positive",
             (self.depth, self.mlp_dim, self.num_classes)),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"ViTConfig.{name}: expected {expected}, got {got!r}")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, h, n, d/h]
        q, k, v = qkv.unbind(0)  # [B, h, n, d/h] each
        x = F.scaled_dot_product_attention(q, k, v)  # [B, h, n, d/h]; flash/mem-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # [B, n, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as HF "gelu" and timm nn.GELU


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # [B, 1+N, D]
        return x + self.mlp(self.norm2(x))  # [B, 1+N, D]


class ViT(nn.Module):
    """ViT classifier over patch tokens of raw pixels; cls-token pooling."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        # Folded projection: for weights trained on normalised pixels see fold_normalization().
        self.patch_embed = nn.Linear(cfg.token_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style init (truncated normal 0.02, zero biases), for training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, P*P*3] (uint8 or float) -> final-normed cls embedding [B, D]."""
        x = embed_patches(tokens, self.patch_embed, self.cfg)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, 1+N, D]
        for blk in self.blocks:
            x = blk(x)  # [B, 1+N, D]
        return self.norm(x[:, 0])  # [B, D]; LayerNorm is per token, so norming only cls is the same

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # [B, C]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(tokens))  # [B, C]


