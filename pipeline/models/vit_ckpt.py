"""ViT checkpoints: a Hugging Face ViTForImageClassification directory, a timm ViT state dict file.

Both formats are mapped to timm key names first (ours are timm's, except the folded `patch_embed`), so there
is one loading path; `save_checkpoint` writes the HF layout back (the bundled digits model is one).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import asdict

import fsspec
import safetensors.torch
import torch

from pipeline.config import ImageContract
from pipeline.models.checkpoint import (
    HF_RESAMPLE,
    Checkpoint,
    ModelError,
    fuse,
    hf_contract,
    hf_labels,
    hf_name,
    label_names,
    pair,
    rename_keys,
    sanitize,
    timm_contract,
)
from pipeline.models.layers import conv_to_linear, fold_normalization, linear_to_conv, unfold_normalization
from pipeline.models.registry import Family, ModelInfo
from pipeline.models.vit import ViT, ViTConfig

TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # timm's ViT widths


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
    """HF ViTForImageClassification state dict -> timm ViT names (q, k, v fused into qkv: timm's q|k|v order)."""
    return fuse(rename_keys(sd, _HF_TO_TIMM, "ViTForImageClassification"), (".attn.q.", ".attn.k.", ".attn.v."),
                ".attn.qkv.")


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


def timm_to_ours(sd: dict[str, torch.Tensor], cfg: ViTConfig, contract: ImageContract) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    w = conv_to_linear(sd["patch_embed.proj.weight"].float())  # [D, P*P*3]
    b = sd.get("patch_embed.proj.bias", torch.zeros(cfg.dim)).float()  # some timm ViTs have no patch bias
    out["patch_embed.weight"], out["patch_embed.bias"] = fold_normalization(w, b, contract.mean, contract.std)
    return out





# --- recognise, describe, build ---------------------------------------------------------------------------


def recognise(ck: Checkpoint) -> bool:
    if ck.config is not None:
        return (ck.config.get("model_type", "vit") == "vit" and "architecture" not in ck.config  # timm hub dir
                and "ViTMAEModel" not in ck.config.get("architectures", []))
    shapes = set(ck.shapes()) if ck.is_file else set()
    return {"patch_embed.proj.weight", "pos_embed", "cls_token"} <= shapes and "blocks.0.ls1.gamma" not in shapes


def describe(ck: Checkpoint) -> ModelInfo:
    return _describe_hf(ck) if ck.is_dir else _describe_timm(ck)


def build(info: ModelInfo, ck: Checkpoint) -> ViT:
    sd = ck.state_dict()
    if ck.is_dir:
        if "classifier.weight" not in sd:
            raise ModelError(f"model: expected ViTForImageClassification weights with a classifier in "
                             f"{ck.spec!r}, got none (a ViTModel backbone?)")
        sd = hf_to_timm(sd)
    model = ViT(info.arch)
    model.load_state_dict(timm_to_ours(sd, info.arch, info.contract))
    return model


def _describe_hf(ck: Checkpoint) -> ModelInfo:
    cfg = ck.config
    if cfg is None:
        raise ModelError(f"model: expected a checkpoint directory with config.json (HF ViTForImageClassification),"
                         f" got {ck.spec!r} without one")
    where = ck.where("config.json")
    kind = (cfg.get("model_type", "vit"), cfg.get("num_channels", 3), cfg.get("hidden_act", "gelu"))
    if kind != ("vit", 3, "gelu"):
        raise ModelError(f"model: expected (model_type, num_channels, hidden_act) ('vit', 3, 'gelu') in {where}, "
                         f"got {kind}")
    patch = pair(cfg.get("patch_size", 16))
    if patch[0] != patch[1]:
        raise ModelError(f"model: expected a square patch_size in {where}, got {cfg.get('patch_size')!r}")
    if not cfg.get("id2label") and "num_labels" not in cfg:
        raise ModelError(f"model: expected id2label in {where}, got neither id2label nor num_labels")
    n_classes = len(cfg["id2label"]) if cfg.get("id2label") else int(cfg["num_labels"])
    try:
        config = ViTConfig(image_size=pair(cfg.get("image_size", 224)), patch_size=patch[0],
                           dim=cfg.get("hidden_size", 768), depth=cfg.get("num_hidden_layers", 12),
                           heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
                           num_classes=n_classes, eps=cfg.get("layer_norm_eps", 1e-12),
                           qkv_bias=cfg.get("qkv_bias", True))
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected a consistent ViT config in {where}, got {e}") from e
    contract = hf_contract(ck, config.image_size, config.patch_size)
    return ModelInfo(family="vit", name=hf_name(ck), digest="", contract=contract,
                     labels=hf_labels(cfg, n_classes, where), arch=config)


def _describe_timm(ck: Checkpoint) -> ModelInfo:
    path, spec = ck.root, ck.spec
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    meta, meta_path = {}, f"{stem}.json"
    for candidate in (f"{posixpath.basename(path)}.json", f"{stem}.json", "config.json"):
        found = ck.json(candidate)
        if found is not None:
            meta, meta_path = found, candidate
            break
    pre = {**meta.get("pretrained_cfg", {}), **meta}  # top-level keys win over pretrained_cfg
    margs = meta.get("model_args", {})
    shapes = ck.shapes()
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
        hw = tuple(pre["input_size"][1:]) if "input_size" in pre else pair(margs["img_size"])
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
        contract = timm_contract(pre, hw, p, meta_path)
    except ModelError:
        raise
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected consistent timm ViT metadata for {spec!r}, got {e}") from e
    return ModelInfo(family="vit", name=sanitize(meta.get("vitlabel_name") or ck.name), digest="", contract=contract,
                     labels=label_names(pre.get("label_names"), n_classes, "class_", meta_path), arch=config)


def save_checkpoint(model: ViT, contract: ImageContract, labels: tuple[str, ...] | list[str], path: str,
                    name: str) -> str:
    """Write a HF ViTForImageClassification directory (local path or fsspec URL); returns its checkpoint digest.

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
    from pipeline.models.registry import describe_model

    return describe_model(path, "vit").digest


FAMILY = Family(
    name="vit", title="ViT (Dosovitskiy et al.): classifier over patch tokens",
    formats=("HF ViTForImageClassification directory", "timm ViT state dict (+ optional pretrained_cfg JSON)",
             "builtin:digits"),
    outputs="label: the classifier's top-1; score: its softmax probability",
    recognise=recognise, describe=describe, build=build,
)
