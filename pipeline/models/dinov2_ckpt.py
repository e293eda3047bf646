"""DINOv2 checkpoints: Hugging Face `Dinov2Model` / `Dinov2ForImageClassification` directories, and their
register-token variants `Dinov2WithRegistersModel` / `Dinov2WithRegistersForImageClassification`.

- `*Model` (facebook/dinov2-{small,base,large,giant}, ...-with-registers-*): features only, `labels == ()`; the
  features are the final-normed class token (transformers' `pooler_output`): for few-shot labels (--examples)
  and --embeddings.
- `*ForImageClassification` (facebook/dinov2-*-imagenet1k-1-layer): a linear head on concat(class token, mean of
  the patch tokens) [2D]; those [B, 2D] are the features.

Weights: the on-disk names transformers writes (attention.attention.query, mlp.weights_in: ViT-g's fused SwiGLU
gate | up) and transformers 5's module names (q_proj, gate_proj/up_proj) both load. The input contract comes from
preprocessor_config.json (BitImageProcessor: shortest edge 256, centre crop 224, bicubic, ImageNet mean/std: a
16 x 16 grid); BitImageProcessor's own defaults fill what it leaves out, and a directory without one gets the
facebook/dinov2-* processor above. config.json's image_size (518 for the released models) only sizes the
position table (37 x 37 + cls); it is resized to the input's grid once, at load, exactly as transformers'
`interpolate_pos_encoding` resizes it on every forward (transformers 5.x: bicubic to size=(h/P, w/P),
align_corners=False, in fp32; antialiased for dinov2_with_registers only; untouched when the grids are equal), so
our logits equal transformers' at the same input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import ImageContract
from pipeline.models.checkpoint import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Checkpoint,
    ModelError,
    fuse,
    hf_contract,
    hf_labels,
    hf_name,
    pair,
    rename_keys,
)
from pipeline.models.dinov2 import Dinov2, Dinov2Config
from pipeline.models.layers import conv_to_linear, fold_normalization
from pipeline.models.registry import Family, ModelInfo

# model_type -> (features-only architecture, classifier architecture)
ARCHITECTURES = {
    "dinov2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
}
# BitImageProcessor's class defaults (transformers' OPENAI_CLIP_MEAN/STD, bicubic) for keys its config leaves out.
BIT_MEAN = (0.48145466, 0.4578275, 0.40821073)
BIT_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL resample enum
# facebook/dinov2-*'s preprocessor_config.json, for a directory without one: shortest edge 256, crop 224.
DINOV2_CONTRACT = dict(image_size=(224, 224), resize="shortest", crop_pct=224 / 256, interpolation="bicubic",
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)


# --- state dict mapping: HF -> ours -----------------------------------------------------------------------------

_P = r"(?:dinov2\.|dinov2_with_registers\.)?"  # the classifier's backbone prefix; none in a *Model directory
_L = _P + r"encoder\.layer\.(\d+)\."
_HF_TO_OURS = [
    (_P + r"embeddings\.cls_token", "cls_token"),
    (_P + r"embeddings\.register_tokens", "register_tokens"),
    (_P + r"embeddings\.position_embeddings", "pos_embed"),
    (_P + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (_L + r"norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_L + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (_L + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (_L + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (_L + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_L + r"layer_scale(1|2)\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_L + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (_L + r"mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.w12.\2"),  # SwiGLU: gate | up rows
    (_L + r"mlp\.(gate|up)_proj\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),  # transformers 5 names: fused below
    (_L + r"mlp\.(?:weights_out|down_proj)\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (_P + r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
    (_P + r"embeddings\.mask_token", None),  # masked-image pretraining only
]
# Projections stored apart that our blocks run as one Linear: (parts in row order, fused name).
_FUSED = (((".attn.q.", ".attn.k.", ".attn.v."), ".attn.qkv."), ((".mlp.gate.", ".mlp.up."), ".mlp.w12."))


def to_ours(sd: dict[str, torch.Tensor], cfg: Dinov2Config, contract: ImageContract) -> dict[str, torch.Tensor]:
    """HF DINOv2 state dict -> `Dinov2`'s: renamed, q/k/v (and SwiGLU gate/up) fused, the patch projection folded
    with the contract's normalisation, the position table resized to the input's grid."""
    out = rename_keys(sd, _HF_TO_OURS, "DINOv2 (transformers' Dinov2 layout)")
    for parts, fused in _FUSED:
        out = fuse(out, parts, fused)
    w = conv_to_linear(out["patch_embed.weight"].float())  # [D, P*P*3]
    out["patch_embed.weight"], out["patch_embed.bias"] = fold_normalization(w, out["patch_embed.bias"].float(),
                                                                            contract.mean, contract.std)
    out["pos_embed"] = resize_pos_embed(out["pos_embed"], cfg.source_grid, cfg.grid, cfg.pos_antialias)
    return out


def resize_pos_embed(pos: torch.Tensor, source: int, grid: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Position table [1, 1+S*S, D] (cls first) on a square S x S grid -> [1, 1+gh*gw, D] on the input's grid.

    transformers' Dinov2Embeddings.interpolate_pos_encoding (5.x): the table as is when the grids are equal, else
    F.interpolate(bicubic, size=grid, align_corners=False, antialias=`antialias`) in fp32; the cls row unchanged.
    """
    n, d = pos.shape[1] - 1, pos.shape[2]
    if n != source * source:
        raise ModelError(f"model: expected position_embeddings for a {source} x {source} grid (config.json "
                         f"image_size / patch_size) + cls, got {n} + 1 rows")
    if grid == (source, source):
        return pos
    x = pos[:, 1:].float().reshape(1, source, source, d).permute(0, 3, 1, 2)  # [1, D, S, S]
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=antialias)  # [1, D, gh, gw]
    x = x.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)  # [1, gh*gw, D]
    return torch.cat([pos[:, :1], x], dim=1)  # [1, 1+gh*gw, D]


# --- recognise, describe, build ---------------------------------------------------------------------------------


def recognise(ck: Checkpoint) -> bool:
    if ck.config is not None:
        return ck.config.get("model_type") in ARCHITECTURES
    return ck.is_file and any(k.endswith("layer_scale1.lambda1") for k in ck.shapes())  # said in describe


def describe(ck: Checkpoint) -> ModelInfo:
    cfg = ck.config
    if cfg is None:
        raise ModelError(f"model: expected a DINOv2 checkpoint directory (config.json, weights, "
                         f"preprocessor_config.json), got {ck.spec!r}: pass its directory")
    where = ck.where("config.json")
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"model: expected model_type in {sorted(ARCHITECTURES)} in {where}, got {model_type!r}")
    shapes = ck.shapes()
    has_head = "classifier.weight" in shapes
    known = ARCHITECTURES[model_type]
    arch_name = (cfg.get("architectures") or [known[int(has_head)]])[0]
    if arch_name not in known:
        raise ModelError(f"model: expected architectures [{known[0]!r}] or [{known[1]!r}] in {where}, got "
                         f"{cfg.get('architectures')}")
    if (arch_name == known[1]) != has_head:
        raise ModelError(f"model: expected {arch_name} weights {'without' if has_head else 'with'} a classifier "
                         f"in {ck.spec!r}, got {'one' if has_head else 'none'}")
    swiglu = bool(cfg.get("use_swiglu_ffn", False))
    kind = (cfg.get("num_channels", 3), cfg.get("hidden_act", "gelu"))
    if kind[0] != 3 or (kind[1] != "gelu" and not swiglu):
        raise ModelError(f"model: expected (num_channels, hidden_act) (3, 'gelu') or use_swiglu_ffn in {where}, "
                         f"got {kind}")
    patch, size = pair(cfg.get("patch_size", 14)), pair(cfg.get("image_size", 224))
    if patch[0] != patch[1] or size[0] != size[1]:
        raise ModelError(f"model: expected a square patch_size and image_size in {where}, got "
                         f"{cfg.get('patch_size')!r} and {cfg.get('image_size')!r}")
    contract = (hf_contract(ck, None, patch[0], default_mean=BIT_MEAN, default_std=BIT_STD, default_resample=BICUBIC)
                if ck.exists("preprocessor_config.json") else ImageContract(patch_size=patch[0], **DINOV2_CONTRACT))
    dim = int(cfg.get("hidden_size", 768))
    mlp_dim = int(dim * cfg.get("mlp_ratio", 4))
    if swiglu:  # transformers' Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
        mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    n_classes = shapes["classifier.weight"][0] if has_head else 0
    try:
        arch = Dinov2Config(image_size=contract.image_size, patch_size=patch[0], dim=dim,
                            depth=int(cfg.get("num_hidden_layers", 12)), heads=int(cfg.get("num_attention_heads", 12)),
                            mlp_dim=mlp_dim, num_classes=n_classes, swiglu=swiglu,
                            num_registers=int(cfg.get("num_register_tokens", 4)) if model_type != "dinov2" else 0,
                            eps=float(cfg.get("layer_norm_eps", 1e-6)), qkv_bias=bool(cfg.get("qkv_bias", True)),
                            source_grid=size[0] // patch[0], pos_antialias=model_type != "dinov2")
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected a consistent DINOv2 config in {where}, got {e}") from e
    labels = hf_labels(cfg, n_classes, where) if has_head else ()
    return ModelInfo(family="dinov2", name=hf_name(ck), digest="", contract=contract, labels=labels, arch=arch)


def build(info: ModelInfo, ck: Checkpoint) -> Dinov2:
    model = Dinov2(info.arch)
    model.load_state_dict(to_ours(ck.state_dict(), info.arch, info.contract))
    return model


FAMILY = Family(
    name="dinov2", title="DINOv2 (Oquab et al.): self-supervised ViT features (+ registers); optional linear head",
    formats=("HF Dinov2Model / Dinov2WithRegistersModel directory (features only)",
             "HF Dinov2ForImageClassification / Dinov2WithRegistersForImageClassification directory"),
    outputs="classifier: label: its top-1, score: softmax probability (head on concat(cls, mean patch)); "
            "features only: few-shot (--examples): label: the nearest prototype, score: cosine to it",
    recognise=recognise, describe=describe, build=build,
)
