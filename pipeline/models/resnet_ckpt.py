"""ImageNet ResNet checkpoints: torchvision / timm state dicts, and HF `ResNetForImageClassification` directories.

Formats:
- a torchvision or timm state dict file (.pth/.pt/.bin/.safetensors; keys conv1, bn1, layer1..4.N.conv1/bn1/
  conv2/bn2(/conv3/bn3)/downsample.0/.1, fc), or a timm hub directory (config.json with `architecture`, no
  `model_type`, plus model.safetensors). Our module names are these, so the weights load as they are.
  Contract: a sidecar JSON where there is one (`<file>.json`, `<stem>.json` or `config.json` next to the
  file; timm's pretrained_cfg keys at the top level or under `pretrained_cfg`: input_size, crop_pct,
  crop_mode, interpolation, mean, std, label_names; timm's test_input_size is not used). Where it says
  nothing, the defaults are torchvision's ImageNet evaluation: a 224 x 224 centre crop of the shorter side
  resized to 256 (crop_pct 0.875), bilinear, ImageNet mean/std, labels class_0.. . timm's own ResNet weights
  differ (resnet50.a1_in1k: crop_pct 0.95, bicubic), so a timm file needs its pretrained_cfg beside it to be
  preprocessed as timm does.
- a HF directory (config.json model_type "resnet", model.safetensors or pytorch_model.bin,
  preprocessor_config.json: the microsoft/resnet-50 layout, a ConvNextImageProcessor at shortest_edge 224 with
  crop_pct 0.875, bicubic, ImageNet mean/std). Its keys are mapped onto torchvision's names. Both HF block
  options load: `downsample_in_bottleneck` (v1, stride on the first 1x1) and `downsample_in_first_stage`.

Not this family: the CIFAR ResNets (3x3 stem conv, no layer4: family resnet-cifar); timm's deep-stem/avg-down
variants (resnet50d: conv1.0, downsample.1) and grouped convs (ResNeXt) are refused with a clear error.
"""

from __future__ import annotations

import re

import torch

from pipeline.models.checkpoint import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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
from pipeline.models.registry import Family, ModelInfo
from pipeline.models.resnet import ResNet, ResNetConfig

# torchvision's ImageNet evaluation transform (also timm's ResNet default pretrained_cfg): see the module doc.
TORCHVISION_DEFAULTS = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
                        "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_TIMM_ARCH = re.compile(r"(resnet\d+[a-z]*|wide_resnet\d+_\d+)(\..*)?")  # timm hub config.json `architecture`


# --- state dict mapping: HF -> torchvision (ours) ---------------------------------------------------------

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_HF_STEM = [
    (r"embedder\.embedder\.convolution\.weight", "conv1.weight"),
    (r"embedder\.embedder\.normalization\." + _BN, r"bn1.\1"),
]
_HF_BLOCK = [  # inside encoder.stages.S.layers.L.
    (r"shortcut\.convolution\.weight", "downsample.0.weight"),
    (r"shortcut\.normalization\." + _BN, r"downsample.1.\1"),
    (r"layer\.(\d)\.convolution\.weight", lambda m: f"conv{int(m[1]) + 1}.weight"),
    (r"layer\.(\d)\.normalization\." + _BN, lambda m: f"bn{int(m[1]) + 1}.{m[2]}"),
]


def hf_to_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ResNetForImageClassification / ResNetModel keys -> torchvision's (stage S -> layer{S+1})."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = _hf_key(key.removeprefix("resnet."))
        if name is None:
            raise ModelError(f"model: expected ResNetForImageClassification weights, got an unknown key {key!r}")
        out[name] = value
    return out


def _hf_key(key: str) -> str | None:
    if (m := re.fullmatch(r"classifier\.1\.(weight|bias)", key)) is not None:
        return f"fc.{m[1]}"
    for pattern, target in _HF_STEM:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    if (m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key)) is not None:
        for pattern, target in _HF_BLOCK:
            if (b := re.fullmatch(pattern, m[3])) is not None:
                inner = target(b) if callable(target) else b.expand(target)
                return f"layer{int(m[1]) + 1}.{m[2]}.{inner}"
    return None


def load_weights(model: ResNet, sd: dict[str, torch.Tensor], where: str) -> ResNet:
    """Strict load, except BatchNorm's `num_batches_tracked` (absent from old torchvision and some timm files)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"model: expected ResNet weights matching {model.cfg}, got {len(missing)} missing "
                         f"{missing[:4]} and {len(unexpected)} unexpected {unexpected[:4]} keys in {where!r}")
    return model


# --- recognise, describe, build ---------------------------------------------------------------------------


def _is_hf(ck: Checkpoint) -> bool:
    return ck.config is not None and ck.config.get("model_type") == "resnet"


def _is_timm_dir(ck: Checkpoint) -> bool:
    cfg = ck.config
    return (cfg is not None and "model_type" not in cfg
            and _TIMM_ARCH.fullmatch(str(cfg.get("architecture", ""))) is not None)


def recognise(ck: Checkpoint) -> bool:
    if ck.is_dir:
        return _is_hf(ck) or _is_timm_dir(ck)
    shapes = ck.shapes()
    if "resnet.embedder.embedder.convolution.weight" in shapes:  # a HF weights file on its own: said in describe
        return True
    conv1 = shapes.get("conv1.weight") or shapes.get("conv1.0.weight") or ()
    # ImageNet stem (7x7, or timm's deep 3x3 stem conv1.0) and four stages; CIFAR ResNets: 3x3 stem, no layer4.
    return len(conv1) == 4 and conv1[1] == 3 and any(k.startswith("layer4.") for k in shapes)


def describe(ck: Checkpoint) -> ModelInfo:
    return _describe_hf(ck) if _is_hf(ck) else _describe_state_dict(ck)


def build(info: ModelInfo, ck: Checkpoint) -> ResNet:
    sd = hf_to_torchvision(ck.state_dict()) if _is_hf(ck) else ck.state_dict()
    model = ResNet(info.arch, info.contract.mean, info.contract.std)
    return load_weights(model, sd, ck.spec)


def _describe_hf(ck: Checkpoint) -> ModelInfo:
    cfg = ck.config or {}
    where = ck.where("config.json")
    kind = (cfg.get("num_channels", 3), cfg.get("hidden_act", "relu"), cfg.get("layer_type", "bottleneck"))
    if kind[:2] != (3, "relu") or kind[2] not in ("basic", "bottleneck"):
        raise ModelError(f"model: expected (num_channels, hidden_act, layer_type) (3, 'relu', 'basic' or "
                         f"'bottleneck') in {where}, got {kind}")
    shapes = ck.shapes()
    head = shapes.get("classifier.1.weight")  # absent: a ResNetModel backbone (features only)
    n_classes = head[0] if head else 0
    try:
        config = ResNetConfig(block=kind[2], depths=tuple(cfg.get("depths", (3, 4, 6, 3))),
                              widths=tuple(cfg.get("hidden_sizes", (256, 512, 1024, 2048))), num_classes=n_classes,
                              stem_width=int(cfg.get("embedding_size", 64)),
                              stride_in_1x1=bool(cfg.get("downsample_in_bottleneck", False)),
                              first_stride=2 if cfg.get("downsample_in_first_stage", False) else 1)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected a consistent ResNet config in {where}, got {e}") from e
    if not ck.exists("preprocessor_config.json"):  # no processor: torchvision's ImageNet evaluation
        contract = timm_contract(TORCHVISION_DEFAULTS, (224, 224), 0, where)
    else:
        contract = hf_contract(ck, None, default_mean=IMAGENET_MEAN, default_std=IMAGENET_STD)
    labels = hf_labels(cfg, n_classes, where) if n_classes else ()
    return ModelInfo(family="resnet", name=hf_name(ck), digest="", contract=contract, labels=labels, arch=config)


def _describe_state_dict(ck: Checkpoint) -> ModelInfo:
    meta, meta_path = sidecar(ck)
    pre = {**TORCHVISION_DEFAULTS, **meta.get("pretrained_cfg", {}), **meta}  # top-level keys win
    config = arch_of(ck.shapes(), ck.spec)
    try:
        hw = (int(pre["input_size"][-2]), int(pre["input_size"][-1]))
        contract = timm_contract(pre, hw, 0, meta_path)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model: expected consistent pretrained_cfg metadata for {ck.spec!r}, got {e}") from e
    labels = label_names(pre.get("label_names"), config.num_classes, "class_", meta_path) if config.num_classes else ()
    return ModelInfo(family="resnet", name=sanitize(meta.get("vitlabel_name") or ck.name), digest="",
                     contract=contract, labels=labels, arch=config)


def arch_of(shapes: dict[str, tuple[int, ...]], spec: str) -> ResNetConfig:
    """The architecture of a torchvision/timm ResNet state dict, read from its keys and shapes."""
    if "resnet.embedder.embedder.convolution.weight" in shapes:
        raise ModelError(f"model: expected a torchvision/timm state dict, got Hugging Face ResNet keys in {spec!r}: "
                         "pass its directory (with config.json)")
    stem = shapes.get("conv1.weight")
    if stem is None or "layer1.0.conv1.weight" not in shapes:
        deep = " (a timm deep-stem variant such as resnet50d is not supported)" if "conv1.0.weight" in shapes else ""
        raise ModelError(f"model: expected a torchvision/timm ResNet state dict (conv1, layer1..4, fc) in {spec!r}, "
                         f"got keys {sorted(shapes)[:6]}...{deep}")
    if tuple(stem[1:]) != (3, 7, 7):
        raise ModelError(f"model: expected an ImageNet ResNet stem conv1 [C, 3, 7, 7] in {spec!r}, got "
                         f"{list(stem)} (a 3x3 stem is a CIFAR ResNet: --model-family resnet-cifar)")
    if any(re.fullmatch(r"layer\d+\.\d+\.downsample\.2\..*", k) for k in shapes):
        raise ModelError(f"model: expected a downsample of conv + BN (downsample.0/.1) in {spec!r}, got timm's "
                         "avg-pool downsample (resnet*d variants are not supported)")
    n_stages = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"layer(\d+)\.", k)))
    depths = tuple(1 + max((int(m[1]) for k in shapes if (m := re.match(rf"layer{s}\.(\d+)\.", k))), default=-1)
                   for s in range(1, n_stages))
    if min(depths) < 1:
        raise ModelError(f"model: expected stages layer1..layer{n_stages - 1} in {spec!r}, got depths {depths}")
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    last = "conv3" if block == "bottleneck" else "conv2"
    try:
        widths = tuple(shapes[f"layer{s}.0.{last}.weight"][0] for s in range(1, n_stages))
        mids = tuple(shapes[f"layer{s}.0.conv1.weight"][0] for s in range(1, n_stages))
        grouped = [s for s in range(1, n_stages) if shapes[f"layer{s}.0.conv2.weight"][1] != mids[s - 1]]
    except KeyError as e:
        raise ModelError(f"model: expected a complete ResNet state dict in {spec!r}, got no {e}") from e
    if grouped:
        raise ModelError(f"model: expected ungrouped 3x3 convs in {spec!r}, got grouped ones in layer{grouped[0]} "
                         "(ResNeXt is not supported)")
    fc = shapes.get("fc.weight")
    wide = block == "bottleneck" and mids != tuple(w // 4 for w in widths)  # wide_resnet50_2: 2x the inner width
    return ResNetConfig(block=block, depths=depths, widths=widths, num_classes=fc[0] if fc else 0,
                        stem_width=stem[0], mid_widths=mids if wide else ())


FAMILY = Family(
    name="resnet", title="ResNet v1.5 (He et al.; torchvision): ImageNet CNN, ResNet-18/34/50/101/152",
    formats=("torchvision/timm ResNet state dict (+ optional pretrained_cfg JSON), timm hub directory",
             "HF ResNetForImageClassification directory (microsoft/resnet-50 layout)"),
    outputs="label: the classifier's top-1; score: its softmax probability",
    recognise=recognise, describe=describe, build=build,
)
