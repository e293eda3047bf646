"""SigLIP (Zhai et al., 2023) and SigLIP 2 (Tschannen et al., 2025): the image tower of a sigmoid image-text model.

A ViT without a class token: patch tokens plus learned position embeddings, pre-norm transformer blocks with a
tanh-approximated GELU MLP, a final LayerNorm, then multihead attention pooling (MAP): one learned probe token
attends over all tokens, followed by a LayerNorm + MLP residual. The pooled vector [B, D] is the image embedding
(transformers' `get_image_features`, not normalised); zero-shot scores come from the text tower's embeddings
(`heads.zero_shot`), so there is no classifier here.

Input: uint8 tokens [B, N, P*P*3] (`config.ImageContract`); (x/255 - mean)/std is folded into the patch
projection, exact because SigLIP's patch conv has kernel = stride = P and no padding (SigLIP 2's is a Linear
over the same patches already). SigLIP 2 checkpoints are NaFlex (any grid); we run them at one fixed grid whose
position embeddings are resized when the checkpoint is loaded (`siglip_ckpt.py`). This module never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpoint import ModelError
from pipeline.models.layers import PatchGrid, embed_patches
from pipeline.models.vit import Attention


@dataclass(frozen=True)
class SiglipConfig(PatchGrid):
    image_size: tuple[int, int]  # (H, W) fed to the model
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    eps: float = 1e-6  # LayerNorm eps
    source_grid: int = 0  # SigLIP 2: side of the checkpoint's square position grid, resized at load; SigLIP: 0

    def __post_init__(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        checks = [
            (p > 0 and h % p == 0 and w % p == 0, "image_size", f"multiples of patch_size={p}", self.image_size),
            (self.heads > 0 and self.dim % self.heads == 0, "dim", f"a multiple of heads={self.heads}", self.dim),
            (min(self.depth, self.mlp_dim) > 0 and self.source_grid >= 0, "depth/mlp_dim/source_grid",
             "positive (source_grid >= 0)", (self.depth, self.mlp_dim, self.source_grid)),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ModelError(f"SiglipConfig.{name}: expected {expected}, got {got!r}")



class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # HF "gelu_pytorch_tanh"


class EncoderBlock(nn.Module):
    """Pre-norm transformer block (ViT's, with SigLIP's tanh GELU)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # [B, N, D]
        return x + self.mlp(self.norm2(x))  # [B, N, D]


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP): a learned probe queries every token; then LayerNorm + MLP, residual.

    The attention is torch's nn.MultiheadAttention(probe, x, x) (what transformers runs) written with SDPA:
    q from the probe, k and v from the tokens, then the output projection.
    """

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.heads = cfg.heads
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(self.probe).view(1, 1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)  # [B, h, 1, d/h]
        k, v = self.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d/h] each
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, d/h]
        y = self.proj(y.transpose(1, 2).reshape(b, 1, d))  # [B, 1, D]
        y = y + self.mlp(self.norm(y))  # [B, 1, D]
        return y[:, 0]  # [B, D]


class Siglip(nn.Module):
    """SigLIP image tower over patch tokens of raw pixels; attention-pooled embedding, no classifier."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        # Folded projection: the checkpoint's patch weights on normalised pixels, see fold_normalization().
        self.patch_embed = nn.Linear(cfg.token_dim, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))  # SigLIP 2: resized to the grid
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn_pool = AttentionPool(cfg)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, P*P*3] (uint8 or float) -> pooled image embedding [B, D] (not normalised)."""
        x = embed_patches(tokens, self.patch_embed, self.cfg) + self.pos_embed  # [B, N, D]
        for blk in self.blocks:
            x = blk(x)  # [B, N, D]
        return self.attn_pool(self.norm(x))  # [B, D]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        raise ModelError("model: expected a classifier, got SigLIP's image tower (features only): label with a "
                         "vocabulary (--labels, zero-shot) or examples (--examples, few-shot)")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_features(tokens)  # [B, D]
