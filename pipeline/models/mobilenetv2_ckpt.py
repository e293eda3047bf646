"""MobileNetV2 checkpoints: a Hugging Face MobileNetV2ForImageClassification directory, a torchvision state dict.

- HF (the google/mobilenet_v2_1.0_224 layout): config.json (model_type "mobilenet_v2": depth_multiplier, the
  channel rounding rules, tf_padding, layer_norm_eps = BatchNorm eps, 1001 classes with 0 = "background") and
  preprocessor_config.json (MobileNetV2ImageProcessor: shortest edge 256, crop 224, bilinear, mean = std = 0.5).
  A MobileNetV2Model directory (no classifier) loads as a features-only backbone.
- torchvision (`torchvision.models.mobilenet_v2().state_dict()`, keys features.N..., classifier.1.*): channels
  are read from the weights' shapes, strides from the paper's Table 2; BatchNorm eps 1e-5, symmetric padding.
  Preprocessing defaults to torchvision's IMAGENET1K weights (224 crop of a 256 shorter side, bilinear,
  ImageNet mean/std); a sidecar JSON (`<file>.json`, `<stem>.json` or config.json beside it) overrides it with
  timm's pretrained_cfg keys (input_size, crop_pct, crop_mode, interpolation, mean, std) and may give
  label_names, vitlabel_name, eps.
"""

from __future__ import annotations

import re

import torch

from pipeline.config import ImageContract
from pipeline.models.checkpoint import (
    Checkpoint,
    ModelError,
    hf_contract,
    hf_labels,
    hf_name,
    label_names,
    sanitize,
    sidecar,
    timm_contract,
)
from pipeline.models.mobilenetv2 import BLOCK_STRIDES, BlockSpec, MobileNetV2, MobileNetV2Config
from pipeline.models.registry import Family, ModelInfo

# torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 transforms: resize 256, centre crop 224, bilinear.
TORCHVISION_PRETRAINED_CFG = {"input_size": [3, 224, 224], "crop_pct": 224 / 256, "interpolation": "bilinear"}
# MobileNetV2ImageProcessor's defaults, for an HF directory without preprocessor_config.json.
HF_PROCESSOR_DEFAULT = ImageContract(image_size=(224, 224), resize="shortest", crop_pct=224 / 256,
                                     interpolation="bilinear")


# --- state dict mapping: HF, torchvision -> ours ----------------------------------------------------------------

_HF_PARTS = {"expand_1x1": "expand", "conv_3x3": "depthwise", "reduce_1x1": "project"}
_HF_KEY = re.compile(
    r"(?:mobilenet_v2\.)?(?:conv_stem\.(?P<stem>first_conv|expand_1x1|conv_3x3|reduce_1x1)"
    r"|layer\.(?P<layer>\d+)\.(?P<part>expand_1x1|conv_3x3|reduce_1x1)|(?P<last>conv_1x1))"
    r"\.(?P<mod>convolution|normalization)\.(?P<param>\w+)")


def hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MobileNetV2ForImageClassification (or MobileNetV2Model) keys -> ours.

    HF's stem (first_conv, [expand_1x1,] conv_3x3, reduce_1x1) is our stem conv plus block 0; layer.N is block N+1.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in ("classifier.weight", "classifier.bias"):
            out[key] = value
            continue
        m = _HF_KEY.fullmatch(key)
        if m is None:
            raise ModelError(f"model: expected MobileNetV2ForImageClassification weights, got an unknown key {key!r}")
        if m["stem"] == "first_conv":
            module = "stem"
        elif m["stem"]:
            module = f"blocks.0.{_HF_PARTS[m['stem']]}"
        elif m["layer"]:
            module = f"blocks.{int(m['layer']) + 1}.{_HF_PARTS[m['part']]}"
        else:
            module = "conv_last"
        out[f"{module}.{'conv' if m['mod'] == 'convolution' else 'bn'}.{m['param']}"] = value
    return out


_TV_CONV = re.compile(r"features\.(\d+)\.([01])\.(\w+)")  # stem, last conv: ConvNormActivation (0: conv, 1: bn)
_TV_BLOCK = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(?:([01])\.)?(\w+)")  # an InvertedResidual's `conv` layers


def torchvision_to_ours(sd: dict[str, torch.Tensor], cfg: MobileNetV2Config) -> dict[str, torch.Tensor]:
    """torchvision keys -> ours. features.0 is the stem, features.1..17 the blocks, features.18 the last conv;
    a block's `conv` Sequential is [expand (conv, bn),] depthwise (conv, bn), project conv, project bn."""
    last = len(cfg.blocks) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        target = None
        if key in ("classifier.1.weight", "classifier.1.bias"):
            target = key.replace(".1.", ".")
        elif (m := _TV_CONV.fullmatch(key)) and int(m[1]) in (0, last):
            target = f"{'stem' if m[1] == '0' else 'conv_last'}.{('conv', 'bn')[int(m[2])]}.{m[3]}"
        elif (m := _TV_BLOCK.fullmatch(key)) and 0 < int(m[1]) < last:
            i, j, sub, param = int(m[1]) - 1, int(m[2]), m[3], m[4]
            parts = ["expand", "depthwise"] if cfg.blocks[i].expand else ["depthwise"]
            if j < len(parts) and sub is not None:
                target = f"blocks.{i}.{parts[j]}.{('conv', 'bn')[int(sub)]}.{param}"
            elif j - len(parts) in (0, 1) and sub is None:
                target = f"blocks.{i}.project.{('conv', 'bn')[j - len(parts)]}.{param}"
        if target is None:
            raise ModelError(f"model: expected torchvision mobilenet_v2 weights, got an unknown key {key!r}")
        out[target] = value
    return out


def torchvision_arch(shapes: dict[str, tuple[int, ...]], eps: float, where: str) -> MobileNetV2Config:
    """The channel plan from the weights' shapes; strides from Table 2 (torchvision's default setting)."""
    blocks: list[BlockSpec] = []
    while f"features.{len(blocks) + 1}.conv.0.0.weight" in shapes:
        conv = f"features.{len(blocks) + 1}.conv."
        expand = f"{conv}3.weight" in shapes  # [expand, depthwise, project conv, project bn]
        first = shapes[f"{conv}0.0.weight"]  # [hidden, inp, 1, 1] (expand) or [hidden, 1, 3, 3] (depthwise)
        hidden, inp = first[0], first[1] if expand else first[0]
        out = shapes[f"{conv}{2 if expand else 1}.weight"][0]
        stride = BLOCK_STRIDES[len(blocks)] if len(blocks) < len(BLOCK_STRIDES) else 0
        blocks.append(BlockSpec(inp, hidden, out, stride, expand, residual=stride == 1 and inp == out))
    if len(blocks) != len(BLOCK_STRIDES):
        raise ModelError(f"model: expected the {len(BLOCK_STRIDES)} inverted residual blocks of torchvision's "
                         f"mobilenet_v2 (features.1-{len(BLOCK_STRIDES)}) in {where}, got {len(blocks)}")
    head = shapes.get("classifier.1.weight")
    last = f"features.{len(blocks) + 1}.0.weight"
    if last not in shapes:
        raise ModelError(f"model: expected the final 1x1 conv {last} in {where}, got none")
    try:
        return MobileNetV2Config(stem=shapes["features.0.0.weight"][0], blocks=tuple(blocks), last=shapes[last][0],
                                 num_classes=head[0] if head else 0, eps=eps, tf_padding=False)
    except ModelError as e:
        raise ModelError(f"model: expected consistent mobilenet_v2 weight shapes in {where}, got {e}") from e


# --- recognise, describe, build -------------------------------------------------------------------------------


def recognise(ck: Checkpoint) -> bool:
    if ck.config is not None:
        return ck.config.get("model_type") == "mobilenet_v2"
    return ck.is_file and {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight"} <= set(
        ck.shapes())


def describe(ck: Checkpoint) -> ModelInfo:
    return _describe_hf(ck) if ck.is_dir else _describe_torchvision(ck)


def build(info: ModelInfo, ck: Checkpoint) -> MobileNetV2:
    sd = hf_to_ours(ck.state_dict()) if ck.is_dir else torchvision_to_ours(ck.state_dict(), info.arch)
    model = MobileNetV2(info.arch, info.contract.mean, info.contract.std)
    for key in model.state_dict():  # HF files may leave BatchNorm's step counter out; it plays no part at inference
        if key.endswith(".num_batches_tracked"):
            sd.setdefault(key, torch.zeros((), dtype=torch.long))
    model.load_state_dict(sd)
    return model


def _describe_hf(ck: Checkpoint) -> ModelInfo:
    cfg = ck.config
    if cfg is None:
        raise ModelError(f"model: expected a checkpoint directory with config.json (HF "
                         f"MobileNetV2ForImageClassification), got {ck.spec!r} without one")
    where = ck.where("config.json")
    archs = cfg.get("architectures") or ["MobileNetV2ForImageClassification"]
    kind = (archs[0], cfg.get("num_channels", 3), cfg.get("hidden_act", "relu6"), cfg.get("output_stride", 32))
    if kind[0] not in ("MobileNetV2ForImageClassification", "MobileNetV2Model") or kind[1:] != (3, "relu6", 32):
        raise ModelError(f"model: expected (architecture, num_channels, hidden_act, output_stride) "
                         f"('MobileNetV2ForImageClassification' or 'MobileNetV2Model', 3, 'relu6', 32) in {where}, "
                         f"got {kind}")
    head = ck.shapes().get("classifier.weight")
    n_classes = head[0] if head else 0
    try:
        arch = MobileNetV2Config.scaled(
            float(cfg.get("depth_multiplier", 1.0)), divisor=int(cfg.get("depth_divisible_by", 8)),
            min_depth=int(cfg.get("min_depth", 8)), expand_ratio=float(cfg.get("expand_ratio", 6.0)),
            first_expand=not cfg.get("first_layer_is_expansion", True),
            finegrained_output=bool(cfg.get("finegrained_output", True)), num_classes=n_classes,
            eps=float(cfg.get("layer_norm_eps", 1e-3)), tf_padding=bool(cfg.get("tf_padding", True)))
    except ModelError as e:
        raise ModelError(f"model: expected a consistent MobileNetV2 config in {where}, got {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected numeric MobileNetV2 settings in {where}, got {e}") from e
    # A CNN takes any input size: the processor alone decides it (config.json's image_size is not checked).
    contract = hf_contract(ck, None) if ck.exists("preprocessor_config.json") else HF_PROCESSOR_DEFAULT
    labels = hf_labels(cfg, n_classes, where) if n_classes else ()
    return ModelInfo(family="mobilenetv2", name=hf_name(ck), digest="", contract=contract, labels=labels, arch=arch)


def _describe_torchvision(ck: Checkpoint) -> ModelInfo:
    shapes = ck.shapes()
    if any(k.startswith(("mobilenet_v2.", "conv_stem.")) for k in shapes):
        raise ModelError(f"model: expected a torchvision state dict, got Hugging Face keys in {ck.spec!r}: pass its "
                         "directory")
    meta, meta_path = sidecar(ck)
    pre = {**TORCHVISION_PRETRAINED_CFG, **meta.get("pretrained_cfg", {}), **meta}  # top-level keys win
    try:
        arch = torchvision_arch(shapes, float(pre.get("eps", 1e-5)), ck.spec)
        hw = tuple(int(x) for x in pre["input_size"][1:])
        contract = timm_contract(pre, hw, 0, meta_path)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ModelError(f"model: expected consistent mobilenet_v2 weights and metadata for {ck.spec!r}, got "
                         f"{type(e).__name__}: {e}") from e
    labels = label_names(pre.get("label_names"), arch.num_classes, "class_", meta_path) if arch.num_classes else ()
    return ModelInfo(family="mobilenetv2", name=sanitize(meta.get("vitlabel_name") or ck.name), digest="",
                     contract=contract, labels=labels, arch=arch)


FAMILY = Family(
    name="mobilenetv2", title="MobileNetV2 (Sandler et al.): inverted-residual CNN classifier over pixels",
    formats=("HF MobileNetV2ForImageClassification directory (google/mobilenet_v2_*; MobileNetV2Model: features)",
             "torchvision mobilenet_v2 state dict (+ optional <file>.json: timm-style pretrained_cfg, label_names)"),
    outputs="label: the classifier's top-1 (google's HF checkpoints: 1001 classes, 0 = background); score: its "
            "softmax probability",
    recognise=recognise, describe=describe, build=build,
)
