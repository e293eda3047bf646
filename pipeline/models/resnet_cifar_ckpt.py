"""CIFAR ResNet checkpoints: a state dict in the widely used CIFAR layout, as a file or in a directory.

The layout (pytorch_resnet_cifar10 and the CIFAR repos that follow it): `conv1`, `bn1`, `layer1..3.N.conv1/bn1/
conv2/bn2`, `linear` (or `fc`) for the classifier; option-B blocks add `shortcut.0` (1x1 conv) and `shortcut.1`
(BN), option-A blocks have no shortcut weights. Depth, widths, shortcut option and classes are read from the keys.

Preprocessing, for a bare state dict: squash to 32x32, bilinear, CIFAR-10 mean/std, labels class_i. A sidecar
JSON (`<file>.json`, `<stem>.json` or `config.json` beside it; timm's keys: pretrained_cfg.input_size,
interpolation, mean, std, crop_mode, crop_pct, label_names, each also at the top level) overrides that.
A directory holds `model.safetensors` (or `pytorch_model.bin`), `config.json` (that sidecar, with model_type
"resnet_cifar") and optionally a HF `preprocessor_config.json`, which then decides the contract and must agree
with the sidecar. `save_checkpoint` writes such a directory (the bundled builtin:digits-resnet32 is one).
"""

from __future__ import annotations

import json
import re
from dataclasses import astuple
from typing import Any

import fsspec
import safetensors.torch

from pipeline.config import ImageContract
from pipeline.models.checkpoint import (
    HF_RESAMPLE,
    HF_WEIGHT_FILES,
    Checkpoint,
    ModelError,
    hf_contract,
    hf_labels,
    label_names,
    sanitize,
    sidecar,
    timm_contract,
)
from pipeline.models.registry import Family, ModelInfo
from pipeline.models.resnet_cifar import ResNetCifar, ResNetCifarConfig

MODEL_TYPE = "resnet_cifar"  # config.json model_type of a checkpoint directory
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_CFG = {"input_size": [3, 32, 32], "crop_mode": "squash", "interpolation": "bilinear",
               "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
CONTRACT_KEYS = ("input_size", "crop_mode", "crop_pct", "interpolation", "mean", "std")
_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.")


# --- the state dict layout ---------------------------------------------------------------------------------


def canonical(key: str) -> str:
    """A key of the CIFAR layout as our module names it: `module.` dropped, `fc.` -> `linear.`."""
    key = key.removeprefix("module.")
    return "linear." + key[3:] if key.startswith("fc.") else key


def is_cifar_layout(shapes: dict[str, tuple[int, ...]]) -> bool:
    """A 3x3 stem over RGB and stages layer1..layer3 only (the ImageNet ResNet has a 7x7 stem and a layer4)."""
    keys = {canonical(k) for k in shapes}
    stem = shapes.get("conv1.weight", shapes.get("module.conv1.weight"))
    stages = {m.group(1) for k in keys if (m := _BLOCK.match(k))}
    return stem is not None and tuple(stem[1:]) == (3, 3, 3) and stages == {"1", "2", "3"}


def arch_of(shapes: dict[str, tuple[int, ...]], spec: str) -> ResNetCifarConfig:
    """Depths, widths, shortcut option and classes from the keys and shapes of a CIFAR-layout state dict."""
    heads = {k.removeprefix("module.").split(".")[0] for k in shapes} & {"fc", "linear"}
    if len(heads) > 1:
        raise ModelError(f"model: expected one classifier (linear.* or fc.*) in {spec!r}, got both")
    shapes = {canonical(k): v for k, v in shapes.items()}
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in shapes if (m := _BLOCK.match(k))})
    if any(".conv3." in k for k in shapes):
        raise ModelError(f"model: expected BasicBlocks (conv1, conv2) in {spec!r}, got bottleneck blocks (conv3)")
    stages = sorted({s for s, _ in blocks})
    depths = tuple(sum(1 for s2, _ in blocks if s2 == s) for s in stages)
    try:
        widths = tuple(shapes[f"layer{s}.0.conv2.weight"][0] for s in stages)
        stem = shapes["conv1.weight"][0]
    except KeyError as e:
        raise ModelError(f"model: expected CIFAR ResNet weights with {e.args[0]!r} in {spec!r}, got none") from e
    if stem != widths[0]:
        raise ModelError(f"model: expected the stem to have layer1's {widths[0]} channels in {spec!r}, got {stem}")
    head = shapes.get("linear.weight")
    if head is not None and head[1:] != (widths[-1],):
        raise ModelError(f"model: expected a classifier over {widths[-1]} features in {spec!r}, got {list(head)}")
    shortcut = "B" if any(k.endswith(".shortcut.0.weight") for k in shapes) else "A"
    return ResNetCifarConfig(depths=depths, widths=widths, shortcut=shortcut, num_classes=head[0] if head else 0)


# --- recognise, describe, build ---------------------------------------------------------------------------


def recognise(ck: Checkpoint) -> bool:
    if ck.config is not None and "model_type" in ck.config:
        return ck.config["model_type"] == MODEL_TYPE
    if ck.is_dir and not any(ck.exists(name) for name in HF_WEIGHT_FILES):
        return False
    return is_cifar_layout(ck.shapes())


def describe(ck: Checkpoint) -> ModelInfo:
    meta, where = sidecar(ck)
    pre = {**meta.get("pretrained_cfg", {}), **meta}  # top-level keys win over pretrained_cfg
    shapes = ck.shapes()
    if not is_cifar_layout(shapes):
        raise ModelError(f"model: expected a CIFAR ResNet state dict (3x3 conv1 stem, layer1..layer3) in "
                         f"{ck.spec!r}, got keys {sorted(shapes)[:6]}...")
    arch = arch_of(shapes, ck.spec)
    try:
        hw = tuple(int(x) for x in pre.get("input_size", DEFAULT_CFG["input_size"])[1:])
        contract = timm_contract({**DEFAULT_CFG, **pre}, hw, 0, where)
    except ModelError:
        raise
    except (TypeError, ValueError, IndexError) as e:
        raise ModelError(f"model: expected a valid pretrained_cfg in {where}, got {e}") from e
    if ck.is_dir and ck.exists("preprocessor_config.json"):  # what a transformers user runs: it decides
        hf = hf_contract(ck, hw if "input_size" in pre else None, 0, CIFAR10_MEAN, CIFAR10_STD)
        if any(k in pre for k in CONTRACT_KEYS) and _rounded(hf) != _rounded(contract):
            raise ModelError(f"model: expected preprocessor_config.json and {where} to agree in {ck.spec!r}, got "
                             f"{hf} and {contract}")
        contract = hf
    n = arch.num_classes
    if "label_names" not in pre and meta.get("id2label"):
        labels = hf_labels(meta, n, where)
    else:
        labels = label_names(pre.get("label_names"), n, "class_", where)
    return ModelInfo(family="resnet-cifar", name=sanitize(meta.get("vitlabel_name") or ck.name), digest="",
                     contract=contract, labels=labels, arch=arch)


def build(info: ModelInfo, ck: Checkpoint) -> ResNetCifar:
    sd = {canonical(k): v for k, v in ck.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = ResNetCifar(info.arch, info.contract.mean, info.contract.std)
    missing, unexpected = model.load_state_dict(sd, strict=False)  # shape mismatches still raise
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"model: expected the CIFAR ResNet keys of {info.arch} in {ck.spec!r}, got "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _rounded(c: ImageContract) -> tuple[Any, ...]:
    return tuple(tuple(round(x, 6) for x in v) if isinstance(v, tuple) else v for v in astuple(c))


# --- writing a checkpoint directory -------------------------------------------------------------------------


def save_checkpoint(model: ResNetCifar, contract: ImageContract, labels: tuple[str, ...] | list[str], path: str,
                    name: str) -> str:
    """Write a checkpoint directory (local path or fsspec URL): model.safetensors in the CIFAR layout, config.json
    (model_type + pretrained_cfg + label_names) and a ViTImageProcessor preprocessor_config.json, so that
    transformers' AutoImageProcessor preprocesses exactly as we do. Returns the checkpoint digest."""
    cfg = model.cfg
    if len(labels) != cfg.num_classes or contract.patch_size or contract.resize != "squash" or contract.crop_pct != 1:
        raise ModelError(f"save_checkpoint: expected {cfg.num_classes} labels and a squashing pixel contract, got "
                         f"{len(labels)} labels and {contract}")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    h, w = contract.image_size
    config = {  # the pretrained_cfg keys at the top level: a `pretrained_cfg` key makes transformers take the
        # directory for a timm one and look for its processor in config.json
        "model_type": MODEL_TYPE, "architecture": f"resnet{cfg.layers}", "vitlabel_name": name,
        "num_classes": cfg.num_classes, "num_features": cfg.dim, "shortcut": cfg.shortcut,
        "input_size": [3, h, w], "crop_mode": "squash", "crop_pct": 1.0, "interpolation": contract.interpolation,
        "mean": list(contract.mean), "std": list(contract.std), "label_names": list(labels),
    }
    processor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
        "resample": HF_RESAMPLE.index(contract.interpolation), "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(contract.mean), "image_std": list(contract.std),
    }
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/config.json", (json.dumps(config, indent=2) + "\n").encode())
    fs.pipe_file(f"{root}/preprocessor_config.json", (json.dumps(processor, indent=2) + "\n").encode())
    fs.pipe_file(f"{root}/model.safetensors", safetensors.torch.save(sd, metadata={"format": "pt"}))
    from pipeline.models.registry import describe_model

    return describe_model(path, "resnet-cifar").digest


FAMILY = Family(
    name="resnet-cifar", title="CIFAR ResNet-20/32/44/56/110 (He et al., sec. 4.2): 32x32 classifier",
    formats=("CIFAR ResNet state dict (linear/fc, option A or B shortcuts; + optional sidecar JSON)",
             "directory: model.safetensors + config.json (model_type resnet_cifar) + preprocessor_config.json",
             "builtin:digits-resnet32"),
    outputs="label: the classifier's top-1; score: its softmax probability",
    recognise=recognise, describe=describe, build=build,
)
