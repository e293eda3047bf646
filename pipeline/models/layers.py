"""Pieces several families share: the folded patch projection, and on-device normalisation for CNNs.

Patch families (ViT, DINOv2, SigLIP) embed patches with a conv of kernel = stride = P and no padding, which is
exactly a Linear over pre-cut patches; (x/255 - mean)/std folds into that Linear, so tokens stay uint8 until
the projection. CNNs pad their first conv, where folding would be wrong at the borders: they normalise on the
device first (`Normalize`).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """Conv patch kernel [D, 3, P, P] -> linear weight [D, P*P*3] in the (row, col, channel) token order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # [D, P*P*3]


def linear_to_conv(w: torch.Tensor, patch: int) -> torch.Tensor:
    return w.reshape(w.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()  # [D, 3, P, P]


def _per_token(values: tuple[float, ...], token_dim: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).repeat(token_dim // 3)  # [P*P*3]; channel varies fastest


def fold_normalization(weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear patch weights on (x/255 - mean)/std -> the same function of raw 0..255 pixels.

    W' = W * s, b' = b - W @ (mean/std), with s = 1/(255*std) per channel; done in float64.
    """
    w, b = weight.double(), bias.double()  # [D, P*P*3], [D]
    m, s = _per_token(mean, w.shape[1]), _per_token(std, w.shape[1])  # [P*P*3]
    return (w / (255.0 * s)).to(weight.dtype), (b - w @ (m / s)).to(bias.dtype)


def unfold_normalization(weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of fold_normalization: weights on raw pixels -> weights on normalised pixels."""
    w_raw, b_raw = weight.double(), bias.double()  # [D, P*P*3], [D]
    m, s = _per_token(mean, w_raw.shape[1]), _per_token(std, w_raw.shape[1])  # [P*P*3]
    w = w_raw * (255.0 * s)  # [D, P*P*3]
    return w.to(weight.dtype), (b_raw + w @ (m / s)).to(bias.dtype)




class Normalize(nn.Module):
    """uint8 pixels [B, H, W, 3] -> (x/255 - mean)/std [B, 3, H, W], computed in fp32, in the model's dtype.

    The permute of an NHWC batch is a channels_last NCHW tensor already: no copy, and the CNN runs
    channels_last on a GPU.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))  # x/255/std == x * scale
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean, dtype=torch.float64) / torch.tensor(std)).float()
                             .view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(device=self.scale.device, dtype=torch.float32)  # [B, 3, H, W]
        return torch.addcmul(self.shift.float(), x, self.scale.float()).to(self.scale.dtype)  # [B, 3, H, W]


class PatchGrid:
    """Mixin for the patch families' frozen configs (fields image_size (H, W) and patch_size): the token layout."""

    image_size: tuple[int, int]
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


def embed_patches(tokens: torch.Tensor, proj: nn.Linear, cfg: PatchGrid) -> torch.Tensor:
    """uint8 (or float) tokens [B, N, P*P*3] -> proj(tokens) [B, N, D] in the projection's dtype and device."""
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (cfg.num_patches, cfg.token_dim):
        raise ValueError(f"tokens: expected [B, {cfg.num_patches}, {cfg.token_dim}], got {list(tokens.shape)}")
    return proj(tokens.to(device=proj.weight.device, dtype=proj.weight.dtype))  # [B, N, D]
