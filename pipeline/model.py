"""The model stage: a plain ViT over raw-pixel patch tokens, and its weight import and export.

The model takes uint8 tokens [B, N, P*P*3] in the layout `config.ImageContract` defines and owns
the normalisation: (x/255 - mean)/std is folded into the patch projection (an nn.Linear, which is
the reference conv2d with kernel = stride = P, applied to pre-cut patches). Preprocessing stays
integer, and the contract that produced the tokens travels with the weights.

Checkpoints: a Hugging Face ViTForImageClassification directory (local or any fsspec URL), a timm
ViT state dict file, or `builtin:digits`. Both formats are mapped to timm key names first (ours
are timm's, except the folded `patch_embed`), so there is one loading path. This module never
imports ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import re
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import fsspec
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import INTERPOLATIONS, ImageContract

BUILTINS = {"digits": "digits-vit"}  # builtin:<name> -> directory under pipeline/assets
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL enum order
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # timm's ViT widths


class ModelError(ValueError):
    """A checkpoint cannot be found, read or mapped onto the ViT."""


@dataclass(frozen=True)
class ViTConfig:
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

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


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
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.cfg.num_patches, self.cfg.token_dim):
            raise ValueError(f"tokens: expected [B, {self.cfg.num_patches}, {self.cfg.token_dim}], "
                             f"got {list(tokens.shape)}")
        w = self.patch_embed.weight
        x = tokens.to(device=w.device, dtype=w.dtype)  # [B, N, P*P*3]; uint8 -> weight dtype on device
        x = self.patch_embed(x)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, 1+N, D]
        for blk in self.blocks:
            x = blk(x)  # [B, 1+N, D]
        return self.norm(x[:, 0])  # [B, D]; LayerNorm is per token, so norming only cls is the same

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # [B, C]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(tokens))  # [B, C]


# --- normalisation folding and the patch layout ----------------------------------------------------


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


# --- state dict mapping: HF -> timm -> ours ----------------------------------------------------------

_L = r"vit\.(?:encoder\.layer|layers)\.(\d+)\."  # transformers 4.x on-disk names and 5.x module names
_HF_TO_TIMM = [
    (r"vit\.embeddings\.cls_token", "cls_token"),
    (r"vit\.embeddings\.position_embeddings", "pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_L + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (_L + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (_L + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (_L + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_L + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_L + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_L + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"vit\.layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
    (r"vit\.pooler\..*|vit\.embeddings\.mask_token", None),  # unused by image classification
]


def hf_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTForImageClassification state dict -> timm ViT names (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for pattern, target in _HF_TO_TIMM:
            if re.fullmatch(pattern, key):
                if target is not None:
                    out[re.sub(pattern, target, key)] = value
                break
        else:
            raise ModelError(f"model: expected ViTForImageClassification weights, got an unknown key {key!r}")
    for name in [k for k in out if ".attn.q." in k]:
        q, k, v = (out.pop(name.replace(".q.", f".{x}.")) for x in "qkv")
        out[name.replace(".q.", ".qkv.")] = torch.cat([q, k, v], dim=0)  # [3D, D] or [3D]: timm's q|k|v order
    return out


def timm_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT names -> HF ViTForImageClassification on-disk names (what transformers 4.x and 5.x load)."""
    fixed = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
             "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
             "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    per_block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        assert m is not None, key
        i, mod, kind = m.groups()
        prefix = f"vit.encoder.layer.{i}."
        if mod == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.contiguous()
        else:
            out[f"{prefix}{per_block[mod]}.{kind}"] = value
    return out


def _timm_to_ours(sd: dict[str, torch.Tensor], cfg: ViTConfig, contract: ImageContract) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    w = conv_to_linear(sd["patch_embed.proj.weight"].float())  # [D, P*P*3]
    b = sd.get("patch_embed.proj.bias", torch.zeros(cfg.dim)).float()  # some timm ViTs have no patch bias
    out["patch_embed.weight"], out["patch_embed.bias"] = fold_normalization(w, b, contract.mean, contract.std)
    return out


# --- checkpoints ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to plan a run, without building the network."""

    name: str
    digest: str
    contract: ImageContract
    labels: tuple[str, ...]
    config: ViTConfig


@dataclass(frozen=True)
class ModelBundle:
    model: ViT
    contract: ImageContract
    labels: tuple[str, ...]
    name: str
    digest: str


def describe_model(spec: str) -> ModelInfo:
    """Name, digest, contract and labels of a checkpoint (reads and hashes the weights file)."""
    return _open(spec, want_weights=False)[0]


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """builtin:digits, a HF checkpoint directory (path or fsspec URL) or a timm state dict file -> eval ViT."""
    info, sd = _open(spec, want_weights=True)
    assert sd is not None
    model = ViT(info.config)
    try:
        model.load_state_dict(_timm_to_ours(sd, info.config, info.contract))
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"model: expected weights matching {info.config}, got a mismatch in {spec!r}: {e}") from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ModelBundle(model=model, contract=info.contract, labels=info.labels, name=info.name, digest=info.digest)


def _open(spec: str, want_weights: bool) -> tuple[ModelInfo, dict[str, torch.Tensor] | None]:
    url = _builtin_dir(spec) if spec.startswith("builtin:") else spec
    expected = ("a checkpoint directory with config.json (HF ViTForImageClassification), a timm state dict "
                f"file ({'/'.join(WEIGHT_SUFFIXES)}) or builtin:{'|'.join(BUILTINS)}")
    try:
        fs, root = fsspec.core.url_to_fs(url)
        is_dir = fs.isdir(root)
        is_file = not is_dir and root.endswith(WEIGHT_SUFFIXES) and fs.isfile(root)
    except Exception as e:
        raise ModelError(f"model: expected {expected}, got {spec!r} ({type(e).__name__}: {e})") from e
    if is_dir:
        return _open_hf(fs, root.rstrip("/"), spec, want_weights)
    if is_file:
        return _open_timm(fs, root, spec, want_weights)
    raise ModelError(f"model: expected {expected}, got {spec!r}")


def _builtin_dir(spec: str) -> str:
    name = spec.split(":", 1)[1]
    if name not in BUILTINS:
        raise ModelError(f"model: expected one of {[f'builtin:{b}' for b in BUILTINS]}, got {spec!r}")
    return str(resources.files("pipeline").joinpath("assets", BUILTINS[name]))


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    if not fs.exists(path):
        return None
    try:
        data = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"model: expected a JSON object in {path}, got unreadable content: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"model: expected a JSON object in {path}, got {type(data).__name__}")
    return data


def _read_weights(fs: Any, path: str) -> tuple[bytes, str]:
    try:
        data = fs.cat_file(path)
    except OSError as e:
        raise ModelError(f"model: expected a readable weights file, got {path!r}: {e}") from e
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _parse_weights(data: bytes, path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return safetensors.torch.load(data)
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"model: expected a safetensors or torch state dict, got unreadable {path!r}: {e}") from e
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise ModelError(f"model: expected a state dict in {path!r}, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _shapes(data: bytes, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes without materialising tensors where the format allows (safetensors header)."""
    if path.endswith(".safetensors"):
        try:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"model: expected a safetensors file, got an unreadable header in {path!r}") from e
    return {k: tuple(v.shape) for k, v in _parse_weights(data, path).items()}


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "model"


def _labels(names: list[Any] | None, n: int, default: str, where: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{default}{i}" for i in range(n))
    if len(names) != n:
        raise ModelError(f"model: expected {n} label names (classifier rows) in {where}, got {len(names)}")
    return tuple(str(x) for x in names)


def _interpolation(value: Any, where: str) -> str:
    if isinstance(value, int) and 0 <= value < len(HF_RESAMPLE):
        return HF_RESAMPLE[value]
    if isinstance(value, str) and value.lower() in INTERPOLATIONS:
        return value.lower()
    raise ModelError(f"model: expected an interpolation in {INTERPOLATIONS} in {where}, got {value!r}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _open_hf(fs: Any, root: str, spec: str, want_weights: bool) -> tuple[ModelInfo, dict | None]:
    cfg = _read_json(fs, f"{root}/config.json")
    if cfg is None:
        raise ModelError(f"model: expected a checkpoint directory with config.json (HF ViTForImageClassification),"
                         f" got {spec!r} without one")
    where = f"{spec}/config.json"
    kind = (cfg.get("model_type", "vit"), cfg.get("num_channels", 3), cfg.get("hidden_act", "gelu"))
    if kind != ("vit", 3, "gelu"):
        raise ModelError(f"model: expected (model_type, num_channels, hidden_act) ('vit', 3, 'gelu') in {where}, "
                         f"got {kind}")
    patch = _pair(cfg.get("patch_size", 16))
    if patch[0] != patch[1]:
        raise ModelError(f"model: expected a square patch_size in {where}, got {cfg.get('patch_size')!r}")
    id2label = cfg.get("id2label")
    if id2label:
        names = [id2label[k] for k in sorted(id2label, key=int)]
    elif "num_labels" in cfg:
        names = None
    else:
        raise ModelError(f"model: expected id2label in {where}, got neither id2label nor num_labels")
    n_classes = len(names) if names is not None else int(cfg["num_labels"])
    try:
        config = ViTConfig(image_size=_pair(cfg.get("image_size", 224)), patch_size=patch[0],
                           dim=cfg.get("hidden_size", 768), depth=cfg.get("num_hidden_layers", 12),
                           heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
                           num_classes=n_classes, eps=cfg.get("layer_norm_eps", 1e-12),
                           qkv_bias=cfg.get("qkv_bias", True))
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected a consistent ViT config in {where}, got {e}") from e
    contract = _hf_contract(_read_json(fs, f"{root}/preprocessor_config.json") or {}, config, spec)
    if fs.exists(f"{root}/model.safetensors"):
        wpath = f"{root}/model.safetensors"
    elif fs.exists(f"{root}/pytorch_model.bin"):
        wpath = f"{root}/pytorch_model.bin"
    else:
        raise ModelError(f"model: expected model.safetensors or pytorch_model.bin (unsharded) in {spec!r}, got "
                         f"{sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))}")
    data, digest = _read_weights(fs, wpath)
    named = cfg.get("vitlabel_name") or posixpath.basename(str(cfg.get("_name_or_path", "")).rstrip("/"))
    info = ModelInfo(name=_sanitize(named or posixpath.basename(root)), digest=digest, contract=contract,
                     labels=_labels(names, n_classes, "LABEL_", where), config=config)
    if not want_weights:
        return info, None
    sd = _parse_weights(data, wpath)
    if "classifier.weight" not in sd:
        raise ModelError(f"model: expected ViTForImageClassification weights with a classifier in {wpath!r}, "
                         "got none (a ViTModel backbone?)")
    return info, hf_to_timm(sd)


def _hf_contract(p: dict[str, Any], config: ViTConfig, spec: str) -> ImageContract:
    """preprocessor_config.json (HF defaults where absent) -> ImageContract; exact for our own checkpoints."""
    where = f"{spec}/preprocessor_config.json"
    try:
        if "vitlabel_contract" in p:  # written by save_checkpoint: round-trips resize modes HF cannot express
            c = p["vitlabel_contract"]
            contract = ImageContract(**{**c, "image_size": tuple(c["image_size"]), "mean": tuple(c["mean"]),
                                        "std": tuple(c["std"])})
            if (contract.image_size, contract.patch_size) != (config.image_size, config.patch_size):
                raise ModelError(f"model: expected vitlabel_contract for {config.image_size}/{config.patch_size} "
                                 f"in {where}, got {contract.image_size}/{contract.patch_size}")
            return contract
        # Fold rescale_factor into mean/std: (x*r - m)/s == (x/255 - m/(255 r)) / (s/(255 r)).
        scale = 255.0 * (float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0)
        normalize = p.get("do_normalize", True)
        mean = [float(x) for x in p.get("image_mean", (0.5, 0.5, 0.5))] if normalize else [0.0] * 3
        std = [float(x) for x in p.get("image_std", (0.5, 0.5, 0.5))] if normalize else [1.0] * 3
        size = p.get("size") or {}
        resize, crop_pct = "squash", 1.0
        if p.get("do_center_crop") and p.get("crop_size"):  # e.g. DeiT: resize 256, crop 224 -> timm-style
            crop = p["crop_size"]
            crop_h = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else int(crop)
            short = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else int(size)
            resize, crop_pct, size = "shortest", min(1.0, crop_h / short), {}
        if isinstance(size, dict) and "height" in size and (size["height"], size["width"]) != config.image_size:
            raise ModelError(f"model: expected size {config.image_size} (the model's image_size) in {where}, "
                             f"got {size}")
        return ImageContract(image_size=config.image_size, patch_size=config.patch_size, resize=resize,
                             crop_pct=crop_pct, interpolation=_interpolation(p.get("resample", 2), where),
                             mean=tuple(round(m / scale, 12) for m in mean),
                             std=tuple(round(s / scale, 12) for s in std))
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"model: expected a valid preprocessor config in {where}, got {e}") from e


def _open_timm(fs: Any, path: str, spec: str, want_weights: bool) -> tuple[ModelInfo, dict | None]:
    data, digest = _read_weights(fs, path)
    stem = path.rsplit(".", 1)[0]
    meta, meta_path = {}, f"{stem}.json"
    for candidate in (f"{path}.json", f"{stem}.json", f"{posixpath.dirname(path)}/config.json"):
        found = _read_json(fs, candidate)
        if found is not None:
            meta, meta_path = found, candidate
            break
    pre = {**meta.get("pretrained_cfg", {}), **meta}  # top-level keys win over pretrained_cfg
    margs = meta.get("model_args", {})
    shapes = _shapes(data, path)
    if "patch_embed.proj.weight" not in shapes and any(k.startswith("vit.") for k in shapes):
        raise ModelError(f"model: expected a timm state dict, got Hugging Face keys in {spec!r}: pass its directory")
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "head.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ModelError(f"model: expected a timm ViT classifier state dict in {spec!r}, got no {missing}")
    dim, chans, p, _ = shapes["patch_embed.proj.weight"]
    tokens = shapes["pos_embed"][1] - 1  # class token first
    if pre.get("global_pool", "token") != "token" or chans != 3:
        raise ModelError(f"model: expected a 3-channel ViT with cls-token pooling in {spec!r}, got "
                         f"global_pool={pre.get('global_pool')!r}, {chans} channels")
    if "input_size" in pre or "img_size" in margs:
        hw = tuple(pre["input_size"][1:]) if "input_size" in pre else _pair(margs["img_size"])
    else:  # no metadata: assume a square grid
        g = math.isqrt(tokens)
        hw = (g * p, g * p) if g * g == tokens else (0, 0)
    if hw[0] * hw[1] != tokens * p * p:
        raise ModelError(f"model: expected pos_embed to cover a {hw} image in {spec!r}, got {tokens} patch tokens "
                         f"(give pretrained_cfg.input_size in {meta_path})")
    heads = meta.get("num_heads") or margs.get("num_heads") or TIMM_HEADS.get(dim, max(1, dim // 64))
    n_classes = shapes["head.weight"][0]
    try:
        config = ViTConfig(image_size=hw, patch_size=p, dim=dim, mlp_dim=shapes["blocks.0.mlp.fc1.weight"][0],
                           depth=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
                           heads=int(heads), num_classes=n_classes, eps=float(pre.get("eps", 1e-6)),
                           qkv_bias="blocks.0.attn.qkv.bias" in shapes)
        squash = pre.get("crop_mode", "center") == "squash"
        contract = ImageContract(image_size=hw, patch_size=p, resize="squash" if squash else "shortest",
                                 crop_pct=1.0 if squash else float(pre.get("crop_pct", 0.9)),
                                 interpolation=_interpolation(pre.get("interpolation", "bicubic"), meta_path),
                                 mean=tuple(pre.get("mean", IMAGENET_MEAN)), std=tuple(pre.get("std", IMAGENET_STD)))
    except ModelError:
        raise
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected consistent timm ViT metadata for {spec!r}, got {e}") from e
    base = posixpath.basename(stem)
    if base in ("model", "pytorch_model", "checkpoint", "weights"):  # hub-style file names say nothing
        base = posixpath.basename(posixpath.dirname(path)) or base
    info = ModelInfo(name=_sanitize(meta.get("vitlabel_name") or base), digest=digest, contract=contract,
                     labels=_labels(pre.get("label_names"), n_classes, "class_", meta_path), config=config)
    return info, (_parse_weights(data, path) if want_weights else None)


def save_checkpoint(model: ViT, contract: ImageContract, labels: tuple[str, ...] | list[str], path: str,
                    name: str) -> str:
    """Write a HF ViTForImageClassification directory (local path or fsspec URL); returns the digest.

    The patch projection is un-folded back to a conv on normalised pixels, so transformers loads the
    directory as-is; `vitlabel_contract` in preprocessor_config.json keeps our contract exact.
    """
    cfg = model.cfg
    if len(labels) != cfg.num_classes or contract.image_size != cfg.image_size or contract.patch_size != cfg.patch_size:
        raise ModelError(f"save_checkpoint: expected {cfg.num_classes} labels and a contract for {cfg.image_size}/"
                         f"{cfg.patch_size}, got {len(labels)} labels and {contract.image_size}/{contract.patch_size}")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    w, b = unfold_normalization(sd.pop("patch_embed.weight"), sd.pop("patch_embed.bias"), contract.mean, contract.std)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = linear_to_conv(w, cfg.patch_size), b
    weights = safetensors.torch.save({k: v.contiguous() for k, v in timm_to_hf(sd).items()}, metadata={"format": "pt"})
    h, wd = cfg.image_size
    config = {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "vitlabel_name": name,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": cfg.eps,
        "image_size": h if h == wd else [h, wd], "patch_size": cfg.patch_size, "num_channels": 3,
        "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size,
        "id2label": {str(i): str(x) for i, x in enumerate(labels)},
        "label2id": {str(x): i for i, x in enumerate(labels)},
    }
    pre = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": wd},
        "resample": HF_RESAMPLE.index(contract.interpolation) if contract.interpolation in HF_RESAMPLE else 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(contract.mean), "image_std": list(contract.std),
        "vitlabel_contract": asdict(contract),
    }
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/config.json", (json.dumps(config, indent=2) + "\n").encode())
    fs.pipe_file(f"{root}/preprocessor_config.json", (json.dumps(pre, indent=2) + "\n").encode())
    fs.pipe_file(f"{root}/model.safetensors", weights)
    return "sha256:" + hashlib.sha256(weights).hexdigest()
