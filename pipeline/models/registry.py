"""The model families, and how a checkpoint finds its family.

A family (one `<family>_ckpt.py` module each, exporting `FAMILY`) says:
- `recognise(ck)`: whether a checkpoint is one of its own (config.json's model_type/architectures, or the
  state dict's keys and shapes);
- `describe(ck)`: a `ModelInfo`: the input contract read from the checkpoint's own preprocessing config,
  the classifier's labels (none for a features-only backbone), and the architecture config. It reads (and so
  hashes) every file that decides a prediction, and builds no network;
- `build(info, ck)`: the network with its weights, fp32 on the CPU. Every network maps the contract's uint8
  input [B, ...] to features with `forward_features` [B, D], and features to logits with `forward_head`
  (classifiers only);
- optionally `text_embeddings(ck, texts)`: a text tower, for zero-shot labelling (SigLIP).

`--model-family NAME` skips detection; detection that finds no family, or several, is an error listing the
choices. This module never imports ray.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ImageContract
from pipeline.models.checkpoint import Checkpoint, ModelError, sha256

# builtin:<name> -> directory under pipeline/assets
BUILTINS = {"digits": "digits-vit", "digits-resnet32": "digits-resnet32"}
# Modules `pipeline.models.<name>_ckpt`, in detection order.
FAMILY_MODULES = ("vit", "resnet", "resnet_cifar", "mobilenetv2", "dinov2", "siglip")


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to plan a run, without building the network."""

    family: str
    name: str  # default partition name
    digest: str  # sha256 over the checkpoint files that decide a prediction (see Checkpoint.digest)
    contract: ImageContract
    labels: tuple[str, ...]  # the checkpoint's classifier labels; () for a features-only backbone
    arch: Any  # the family's architecture config, handed to its build()
    files: tuple[tuple[str, str], ...] = ()  # (file, sha256) behind the digest


@dataclass(frozen=True)
class Family:
    name: str  # --model-family value
    title: str  # one line for `vitlabel models`
    formats: tuple[str, ...]  # checkpoint formats it loads
    outputs: str  # what label and score mean
    recognise: Callable[[Checkpoint], bool]
    describe: Callable[[Checkpoint], ModelInfo]
    build: Callable[[ModelInfo, Checkpoint], nn.Module]
    text_embeddings: Callable[[Checkpoint, list[str]], tuple[np.ndarray, float, float]] | None = None


@dataclass(frozen=True)
class ModelBundle:
    model: nn.Module
    info: ModelInfo

    @property
    def contract(self) -> ImageContract:
        return self.info.contract

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def digest(self) -> str:
        return self.info.digest


_FAMILIES: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """name -> Family, in detection order."""
    if not _FAMILIES:
        for module in FAMILY_MODULES:
            fam = importlib.import_module(f"pipeline.models.{module}_ckpt").FAMILY
            _FAMILIES[fam.name] = fam
    return _FAMILIES


def open_checkpoint(spec: str) -> Checkpoint:
    url = _builtin_dir(spec) if spec.startswith("builtin:") else spec
    ck = Checkpoint(spec, url)
    if not (ck.is_dir or ck.is_file):
        raise ModelError(f"model: expected a checkpoint directory (HF layout, with config.json), a state dict file "
                         f"(.safetensors/.pth/.pt/.bin) or builtin:{'|'.join(BUILTINS)}, got {spec!r}")
    return ck


def detect(ck: Checkpoint, family: str = "auto") -> Family:
    """The family that `family` names, or the one family that recognises the checkpoint."""
    known = families()
    if family != "auto":
        if family not in known:
            raise ModelError(f"model_family: expected auto or one of {sorted(known)}, got {family!r}")
        return known[family]
    found = [f for f in known.values() if f.recognise(ck)]
    if len(found) == 1:
        return found[0]
    if ck.config:
        what = f"config.json model_type={ck.config.get('model_type')!r}, architectures={ck.config.get('architectures')}"
    elif ck.is_file:
        what = f"state dict keys {sorted(ck.shapes())[:6]}..."
    else:
        what = f"a directory without config.json: {ck.listing()[:10]}"
    verdict = "no family recognises it" if not found else f"it fits {[f.name for f in found]}"
    if ck.is_file and ck.exists("config.json"):
        verdict += "; it sits in a Hugging Face checkpoint directory: pass its directory"
    raise ModelError(f"model: expected a checkpoint of one model family, got {ck.spec!r} ({what}): {verdict}; "
                     f"choose one with --model-family from {sorted(known)}")


def _describe(ck: Checkpoint, family: str) -> tuple[Family, ModelInfo]:
    fam = detect(ck, family)
    info = fam.describe(ck)
    ck.read(ck.weights_name())  # the weights are always part of the digest (read once, cached)
    return fam, ModelInfo(**{**info.__dict__, "family": fam.name, "digest": ck.digest,
                             "files": tuple(sorted(ck.files.items()))})


def describe_model(spec: str, family: str = "auto") -> ModelInfo:
    """Family, name, digest, contract and labels of a checkpoint (reads and hashes its files)."""
    return _describe(open_checkpoint(spec), family)[1]


def load_model(spec: str, family: str = "auto", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A checkpoint -> its family's network in eval mode, no grads, on `device` in `dtype`."""
    ck = open_checkpoint(spec)
    fam, info = _describe(ck, family)
    try:
        model = fam.build(info, ck)
    except ModelError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"model: expected {fam.name} weights matching {info.arch}, got a mismatch in "
                         f"{spec!r}: {e}") from e
    finally:
        ck.drop_weights()
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ModelBundle(model=model, info=info)


def text_embeddings(spec: str, family: str, texts: list[str]) -> tuple[np.ndarray, float, float]:
    """(embeddings [T, D] float32, logit scale, logit bias) of `texts` from the checkpoint's text tower."""
    ck = open_checkpoint(spec)
    fam = detect(ck, family)
    if fam.text_embeddings is None:
        zero_shot = sorted(f.name for f in families().values() if f.text_embeddings is not None)
        raise ModelError(f"labels: expected a model with a text tower for zero-shot labels ({zero_shot}), got "
                         f"{fam.name}; use --examples DIR for few-shot labels")
    return fam.text_embeddings(ck, texts)


def model_version(info: ModelInfo, head_digest: str) -> str:
    """The model digest a run labels with: the checkpoint's files, its family, the contract and the head."""
    parts = {"checkpoint": info.digest, "family": info.family, "contract": asdict(info.contract),
             "head": head_digest}
    return sha256(json.dumps(parts, sort_keys=True).encode())


def _builtin_dir(spec: str) -> str:
    name = spec.split(":", 1)[1]
    if name not in BUILTINS:
        raise ModelError(f"model: expected one of {[f'builtin:{b}' for b in BUILTINS]}, got {spec!r}")
    return str(resources.files("pipeline").joinpath("assets", BUILTINS[name]))
