"""DINOv2 (Oquab et al., 2023): a ViT trained by self-distillation, with layer scale and optional register tokens.

ViT-S/B/L/g at patch 14. Each pre-norm block scales its two residual branches by a learned per-channel vector
(layer scale); the giant model's MLP is a SwiGLU. "Vision Transformers Need Registers" (Darcet et al., 2024) adds
R learned register tokens after the class token: they take part in attention and are dropped from every output.

Outputs, as transformers computes them:
- features only (`Dinov2Model`): the final-normed class token [B, D] (transformers' `pooler_output`);
- classifier (`Dinov2ForImageClassification`): features are concat(class token, mean of the patch tokens, the
  registers excluded) [B, 2D], all final-normed; the linear head maps them to logits.

Input: uint8 tokens [B, N, P*P*3] (`config.ImageContract`); (x/255 - mean)/std is folded into the patch
projection, exact because the patch conv has kernel = stride = P and no padding. The checkpoint's position table
(37 x 37 for the 518 px pretraining) is resized to the input's grid once, when the checkpoint is loaded
(`dinov2_ckpt.py`), so `pos_embed` here is already on the input's grid. This module never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoint import ModelError
from pipeline.models.layers import PatchGrid, embed_patches
from pipeline.models.vit import Attention, Mlp


@dataclass(frozen=True)
class Dinov2Config(PatchGrid):
    image_size: tuple[int, int]  # (H, W) fed to the model: the processor's crop, not the 518 px of pretraining
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int  # MLP hidden width; SwiGLU: the width of its gate (and of its up projection)
    num_classes: int = 0  # 0: features only (Dinov2Model)
    num_registers: int = 0
    swiglu: bool = False  # SwiGLU MLP (ViT-g) instead of fc1 -> GELU -> fc2
    eps: float = 1e-6  # LayerNorm eps
    qkv_bias: bool = True
    source_grid: int = 37  # side of the checkpoint's square position table, resized to `grid` at load
    pos_antialias: bool = False  # that resize: transformers' dinov2 without, dinov2_with_registers with antialias

    def __post_init__(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        checks = [
            (p > 0 and h % p == 0 and w % p == 0, "image_size", f"multiples of patch_size={p}", self.image_size),
            (self.heads > 0 and self.dim % self.heads == 0, "dim", f"a multiple of heads={self.heads}", self.dim),
            (min(self.depth, self.mlp_dim, self.source_grid) > 0, "depth/mlp_dim/source_grid", "positive",
             (self.depth, self.mlp_dim, self.source_grid)),
            (min(self.num_classes, self.num_registers) >= 0, "num_classes/num_registers", ">= 0",
             (self.num_classes, self.num_registers)),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"Dinov2Config.{name}: expected {expected}, got {got!r}")



class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT's layer scale; transformers' `lambda1`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma  # [B, n, D]


class SwiGLU(nn.Module):
    """SwiGLU MLP of ViT-g: w3(silu(gate) * up), gate and up from one fused projection (DINOv2's `w12`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)  # rows: gate | up
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)  # [B, n, hidden] each
        return self.w3(F.silu(gate) * up)  # [B, n, D]


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_dim) if cfg.swiglu else Mlp(cfg.dim, cfg.mlp_dim)
        self.ls2 = LayerScale(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))  # [B, 1+R+N, D]
        return x + self.ls2(self.mlp(self.norm2(x)))  # [B, 1+R+N, D]


class Dinov2(nn.Module):
    """DINOv2 over patch tokens of raw pixels: class token (+ registers) + patches; optional linear classifier."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.cfg = cfg
        # Folded projection: the checkpoint's patch conv on normalised pixels, see fold_normalization().
        self.patch_embed = nn.Linear(cfg.token_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))  # on the input's grid
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(2 * cfg.dim, cfg.num_classes) if cfg.num_classes else None  # on [cls, mean patch]

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, P*P*3] (uint8 or float) -> features: normed cls [B, D], or [cls, mean patch] [B, 2D]."""
        x = embed_patches(tokens, self.patch_embed, self.cfg)  # [B, N, D]
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed  # [B, 1+N, D]
        if self.register_tokens is not None:  # registers go after the class token, without position embeddings
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)  # [B, 1+R+N, D]
        for blk in self.blocks:
            x = blk(x)  # [B, 1+R+N, D]
        if self.head is None:
            return self.norm(x[:, 0])  # [B, D]; LayerNorm is per token, so norming only cls is the same
        x = self.norm(x)  # [B, 1+R+N, D]
        patches = x[:, 1 + self.cfg.num_registers:]  # [B, N, D]; registers excluded
        return torch.cat([x[:, 0], patches.mean(dim=1)], dim=-1)  # [B, 2D]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ModelError("model: expected a classifier, got a DINOv2 backbone (features only): label with "
                             "examples (--examples, few-shot)")
        return self.head(feats)  # [B, C]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(tokens)  # [B, D] or [B, 2D]
        return feats if self.head is None else self.forward_head(feats)  # [B, C] for a classifier
