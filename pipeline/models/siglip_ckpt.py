"""SigLIP checkpoints: Hugging Face `SiglipModel` and `Siglip2Model` directories (image and text towers).

Formats:
- `SiglipModel` (config.json model_type "siglip": google/siglip-*, and SigLIP 2 at fixed resolution,
  google/siglip2-*-patch16-224 and the like): image tower at `vision_config.image_size`, a conv patch embedding;
  preprocessing from preprocessor_config.json (SiglipImageProcessor: squash to `size`, bicubic, mean/std 0.5).
- `Siglip2Model` (model_type "siglip2": google/siglip2-*-naflex): NaFlex, the patch embedding a Linear over
  patches flattened (row, col, channel) and position embeddings on a G x G grid resized to each image's grid.
  We run it at ONE fixed grid: the grid the checkpoint's own Siglip2ImageProcessor gives a square image, i.e.
  g x g patches with g = isqrt(max_num_patches) (256 -> 16 x 16, an image of 16P x 16P pixels), every image
  squashed to that size (bilinear, the processor's resample). The position embeddings are resized to g x g once,
  at load, as transformers resizes them (bilinear, antialiased, half-pixel centres): our embeddings equal
  Siglip2Model's on the processor's output for that grid. Non-square images differ from NaFlex, which keeps
  their aspect ratio: we squash them, as SigLIP does.

The image tower is mapped onto `siglip.Siglip` (q, k, v fused; nn.MultiheadAttention's in_proj split into the
probe's q and the tokens' kv). The text tower is transformers' own (`text_embeddings`, run once per job on the
driver with the checkpoint's tokenizer), so transformers and its tokenizer backends (sentencepiece for
spiece.model) are runtime dependencies of zero-shot labelling. `describe` reads (hashes) the tokenizer files:
a new vocabulary file is a new model version.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ImageContract
from pipeline.models.checkpoint import Checkpoint, ModelError, fuse, hf_contract, hf_name, pair, rename_keys
from pipeline.models.layers import conv_to_linear, fold_normalization
from pipeline.models.registry import Family, ModelInfo
from pipeline.models.siglip import Siglip, SiglipConfig

ARCHITECTURES = {"siglip": "SiglipModel", "siglip2": "Siglip2Model"}
# Files that decide the text embeddings besides config.json and the weights (whichever the checkpoint has).
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
VOCAB_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")
TEXT_BATCH = 256  # texts per text-tower forward


# --- state dict mapping: HF -> ours -----------------------------------------------------------------------------

_L = r"vision_model\.encoder\.layers\.(\d+)\."
_HF_TO_OURS = [
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.\1"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "pos_embed"),
    (_L + r"self_attn\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_L + r"layer_norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_L + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"vision_model\.head\.probe", "attn_pool.probe"),
    (r"vision_model\.head\.attention\.in_proj_(weight|bias)", r"attn_pool.in_proj.\1"),
    (r"vision_model\.head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"vision_model\.head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"vision_model\.head\.mlp\.(fc1|fc2)\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
    (r"text_model\..*|logit_scale|logit_bias", None),  # the text tower runs in transformers (text_embeddings)
]


def image_tower(sd: dict[str, torch.Tensor], cfg: SiglipConfig, contract: ImageContract) -> dict[str, torch.Tensor]:
    """SiglipModel / Siglip2Model state dict -> `Siglip`'s: fused qkv, split MAP in_proj, folded patch projection,
    position embeddings on the input's grid."""
    out = fuse(rename_keys(sd, _HF_TO_OURS, "SiglipModel/Siglip2Model"), (".attn.q.", ".attn.k.", ".attn.v."),
               ".attn.qkv.")
    for kind in ("weight", "bias"):  # nn.MultiheadAttention's in_proj: q | k | v rows
        w = out.pop(f"attn_pool.in_proj.{kind}")
        out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = w[:cfg.dim], w[cfg.dim:]
    w = out["patch_embed.weight"].float()
    w = conv_to_linear(w) if w.dim() == 4 else w  # SigLIP: conv [D, 3, P, P]; SigLIP 2: Linear [D, P*P*3] already
    out["patch_embed.weight"], out["patch_embed.bias"] = fold_normalization(w, out["patch_embed.bias"].float(),
                                                                            contract.mean, contract.std)
    pos = out["pos_embed"]  # [G*G, D]
    out["pos_embed"] = (resize_pos_embed(pos, cfg.grid) if cfg.source_grid else pos)[None]  # [1, N, D]
    return out


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SigLIP 2 position embeddings [G*G, D] on a square G x G grid -> [gh*gw, D] on the input's grid.

    transformers' Siglip2VisionEmbeddings.resize_positional_embeddings: F.interpolate(bilinear,
    align_corners=False, antialias=True) in fp32, there written out as per-axis weights.
    """
    g, d = math.isqrt(pos.shape[0]), pos.shape[1]
    x = pos.float().reshape(g, g, d).permute(2, 0, 1)[None]  # [1, D, G, G]
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=True)  # [1, D, gh, gw]
    return x[0].permute(1, 2, 0).reshape(-1, d).to(pos.dtype)  # [gh*gw, D]


# --- recognise, describe, build ---------------------------------------------------------------------------------


def recognise(ck: Checkpoint) -> bool:
    if ck.config is not None:
        return ck.config.get("model_type") in ARCHITECTURES
    return ck.is_file and "vision_model.head.probe" in ck.shapes()  # a HF weights file on its own: said in describe


def describe(ck: Checkpoint) -> ModelInfo:
    cfg = ck.config
    if cfg is None:
        raise ModelError(f"model: expected a SigLIP checkpoint directory (config.json, weights, tokenizer), got "
                         f"{ck.spec!r}: pass its directory")
    where = ck.where("config.json")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or [ARCHITECTURES.get(model_type, "?")]
    if model_type not in ARCHITECTURES or archs[0] != ARCHITECTURES[model_type]:
        raise ModelError(f"model: expected architectures [{ARCHITECTURES.get(model_type, 'SiglipModel')!r}] "
                         f"(image and text towers) in {where}, got model_type={model_type!r}, architectures={archs}")
    v = cfg.get("vision_config") or {}
    kind = (v.get("num_channels", 3), v.get("hidden_act", "gelu_pytorch_tanh"), v.get("vision_use_head", True))
    if kind != (3, "gelu_pytorch_tanh", True):
        raise ModelError(f"model: expected vision_config (num_channels, hidden_act, vision_use_head) (3, "
                         f"'gelu_pytorch_tanh', True) in {where}, got {kind}")
    patch = pair(v.get("patch_size", 16))
    if patch[0] != patch[1]:
        raise ModelError(f"model: expected a square vision_config.patch_size in {where}, got {v.get('patch_size')!r}")
    if model_type == "siglip":
        image_size, source_grid, resample = pair(v.get("image_size", 224)), 0, 3  # SiglipImageProcessor: bicubic
    else:
        image_size, source_grid = _fixed_grid(ck, patch[0], int(v.get("num_patches", 256)), where)
        resample = 2  # Siglip2ImageProcessor: bilinear
    try:
        arch = SiglipConfig(image_size=image_size, patch_size=patch[0], dim=v.get("hidden_size", 768),
                            depth=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                            mlp_dim=v.get("intermediate_size", 3072), eps=v.get("layer_norm_eps", 1e-6),
                            source_grid=source_grid)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected a consistent SigLIP vision_config in {where}, got {e}") from e
    contract = hf_contract(ck, arch.image_size, arch.patch_size, default_resample=resample)
    for name in TOKENIZER_FILES:  # the vocabulary decides the text embeddings: hash it with the checkpoint
        if ck.exists(name):
            ck.read(name)
    return ModelInfo(family="siglip", name=hf_name(ck), digest="", contract=contract, labels=(), arch=arch)


def _fixed_grid(ck: Checkpoint, patch: int, num_positions: int, where: str) -> tuple[tuple[int, int], int]:
    """SigLIP 2 (NaFlex): (image size, side of the checkpoint's position grid) for our fixed square grid."""
    source = math.isqrt(num_positions)
    if source * source != num_positions:
        raise ModelError(f"model: expected a square vision_config.num_patches in {where}, got {num_positions}")
    pre_where = ck.where("preprocessor_config.json")
    pre = ck.json("preprocessor_config.json") or {}
    if int(pre.get("patch_size", patch)) != patch:
        raise ModelError(f"model: expected patch_size {patch} (vision_config) in {pre_where}, got "
                         f"{pre.get('patch_size')!r}")
    g = math.isqrt(int(pre.get("max_num_patches", 256)))  # a square image's grid under the processor's budget
    if g < 1:
        raise ModelError(f"model: expected max_num_patches >= 1 in {pre_where}, got {pre.get('max_num_patches')!r}")
    return (g * patch, g * patch), source


def build(info: ModelInfo, ck: Checkpoint) -> Siglip:
    model = Siglip(info.arch)
    model.load_state_dict(image_tower(ck.state_dict(), info.arch, info.contract))
    return model


# --- the text tower: transformers' own, on the driver -----------------------------------------------------------


def text_embeddings(ck: Checkpoint, texts: list[str]) -> tuple[np.ndarray, float, float]:
    """(embeddings [T, D] float32, exp(logit_scale), logit_bias): `get_text_features` of SiglipModel/Siglip2Model
    on `texts`, tokenised by the checkpoint's own tokenizer as its processor does (padding="max_length", as SigLIP
    was trained; truncated). max_length: the tokenizer's model_max_length where it fits the text tower, else
    text_config.max_position_embeddings (64 for Google's checkpoints: what SiglipProcessor and Siglip2Processor
    use)."""
    describe(ck)  # a SiglipModel/Siglip2Model directory, readable
    if not any(ck.exists(name) for name in VOCAB_FILES):
        raise ModelError(f"labels: expected a tokenizer ({' or '.join(VOCAB_FILES)}) in {ck.spec!r} for zero-shot "
                         f"labels, got {ck.listing()}")
    import transformers  # a runtime dependency of zero-shot labelling only

    local = ck.local_dir()
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(local)
        model = transformers.AutoModel.from_pretrained(local, **dtype).eval()
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise ModelError(f"labels: expected transformers to load the text tower and tokenizer of {ck.spec!r}, got "
                         f"{type(e).__name__}: {e}") from e
    limit = int(model.config.text_config.max_position_embeddings)
    n = tokenizer.model_max_length
    max_length = n if isinstance(n, int) and 0 < n <= limit else limit
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), TEXT_BATCH):
            batch = tokenizer(texts[i:i + TEXT_BATCH], padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")
            emb: Any = model.get_text_features(**batch)
            out.append((emb if isinstance(emb, torch.Tensor) else emb.pooler_output).float())  # [t, D]
    scale, bias = model.logit_scale.exp().item(), model.logit_bias.item()
    return torch.cat(out).numpy(), scale, bias


FAMILY = Family(
    name="siglip", title="SigLIP / SigLIP 2 (Zhai et al.): image-text model, zero-shot labels from a vocabulary",
    formats=("HF SiglipModel directory (SigLIP; SigLIP 2 at fixed resolution)",
             "HF Siglip2Model directory (NaFlex, run at one square grid: isqrt(max_num_patches) patches a side)"),
    outputs="zero-shot (--labels): label: the vocabulary's top-1; score: sigmoid(cos * exp(logit_scale) + "
            "logit_bias), SigLIP's own probability (not a softmax); few-shot (--examples): cosine to the prototype",
    recognise=recognise, describe=describe, build=build, text_embeddings=text_embeddings,
)
