"""Reading checkpoints: files of a directory or one weights file, by local path or any fsspec URL.

`Checkpoint` is what every family's loader reads through. It hashes each file it reads, so the model
version covers exactly the files that decide a prediction (weights, config.json, preprocessor_config.json,
a sidecar JSON, tokenizer files) and nothing else. Also here, because several families need them: the
Hugging Face preprocessor config -> `ImageContract` reading, label lists, interpolation names.

This module never imports ray, and builds no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tempfile
from typing import Any

import fsspec
import safetensors.torch
import torch

from pipeline.config import INTERPOLATIONS, ImageContract

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".th")  # .th: the CIFAR ResNets' own files
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL enum order


class ModelError(ValueError):
    """A checkpoint cannot be found, read or mapped onto a model family."""


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Checkpoint:
    """A checkpoint directory (HF layout) or a single weights file (timm/torchvision), read through fsspec.

    Every `read` is hashed into `files`: {name relative to the checkpoint: sha256}; `digest` combines them.
    """

    def __init__(self, spec: str, url: str):
        self.spec = spec
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
            self.is_dir = self.fs.isdir(root)
            self.is_file = not self.is_dir and root.endswith(WEIGHT_SUFFIXES) and self.fs.isfile(root)
        except Exception as e:
            raise ModelError(f"model: expected a checkpoint directory or weights file, got {spec!r} "
                             f"({type(e).__name__}: {e})") from e
        self.root = root.rstrip("/") if self.is_dir else root
        self.dir = self.root if self.is_dir else posixpath.dirname(self.root)
        self.files: dict[str, str] = {}
        self._cache: dict[str, bytes] = {}
        self._state_dict: dict[str, torch.Tensor] | None = None
        self.config = self.json("config.json") if self.is_dir else None

    # --- files ---------------------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read(self, name: str = "") -> bytes:
        """Bytes of `name` (relative to the checkpoint's directory; "" = the weights file itself), hashed."""
        if name in self._cache:
            return self._cache[name]
        try:
            data = self.fs.cat_file(self.path(name))
        except OSError as e:
            raise ModelError(f"model: expected a readable file, got {self.where(name)!r}: {e}") from e
        self._cache[name] = data
        self.files[name or "(weights file)"] = sha256(data)  # a renamed copy is the same checkpoint
        return data

    def json(self, name: str) -> dict[str, Any] | None:
        """A JSON object file, or None if it does not exist."""
        if not self.exists(name):
            return None
        try:
            data = json.loads(self.read(name))
        except ValueError as e:
            raise ModelError(f"model: expected a JSON object in {self.where(name)}, got unreadable content: {e}"
                             ) from e
        if not isinstance(data, dict):
            raise ModelError(f"model: expected a JSON object in {self.where(name)}, got {type(data).__name__}")
        return data

    def where(self, name: str = "") -> str:
        return f"{self.spec.rstrip('/')}/{name}" if name and self.is_dir else self.spec

    def listing(self) -> list[str]:
        return sorted(posixpath.basename(p) for p in self.fs.ls(self.dir, detail=False))

    @property
    def name(self) -> str:
        """A name for the partition path: the directory's name, or the file's stem unless it is a generic one."""
        if self.is_dir:
            return posixpath.basename(self.root)
        stem = posixpath.basename(self.root).rsplit(".", 1)[0]
        generic = ("model", "pytorch_model", "checkpoint", "weights")
        return posixpath.basename(self.dir) or stem if stem in generic else stem

    # --- weights -------------------------------------------------------------------------------------------

    def weights_name(self) -> str:
        """The weights file, relative: "" for a single-file checkpoint, else an unsharded HF weights file."""
        if not self.is_dir:
            return ""
        for name in HF_WEIGHT_FILES:
            if self.exists(name):
                return name
        raise ModelError(f"model: expected {' or '.join(HF_WEIGHT_FILES)} (unsharded) in {self.spec!r}, got "
                         f"{self.listing()}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of the weights file (safetensors: from its header, without materialising tensors)."""
        name = self.weights_name()
        data = self.read(name)
        if self.path(name).endswith(".safetensors"):
            try:
                n = int.from_bytes(data[:8], "little")
                header = json.loads(data[8:8 + n])
                return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
            except (ValueError, KeyError, TypeError) as e:
                raise ModelError(f"model: expected a safetensors file, got an unreadable header in "
                                 f"{self.where(name)!r}") from e
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as tensors (cached); training wrappers (`state_dict`, `model`, `module.`) removed."""
        if self._state_dict is None:
            name = self.weights_name()
            self._state_dict = parse_weights(self.read(name), self.path(name), self.where(name))
        return self._state_dict

    def drop_weights(self) -> None:
        """Free the cached bytes and tensors once a model holds them (the hashes stay)."""
        self._cache.clear()
        self._state_dict = None

    @property
    def digest(self) -> str:
        """sha256 over every file read so far, by relative name: the same checkpoint anywhere has one digest."""
        return sha256(json.dumps(sorted(self.files.items())).encode())

    def local_dir(self) -> str:
        """A local directory with the checkpoint's files (itself on local disk; a temporary copy otherwise)."""
        if "file" in self.fs.protocol or self.fs.protocol == "file":
            return self.dir
        tmp = tempfile.mkdtemp(prefix="vitlabel-ckpt-")
        for name in self.listing():
            if not self.fs.isdir(self.path(name)):
                with open(f"{tmp}/{name}", "wb") as f:
                    f.write(self.fs.cat_file(self.path(name)))
        return tmp


def parse_weights(data: bytes, path: str, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return safetensors.torch.load(data)
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"model: expected a safetensors or torch state dict, got unreadable {where!r}: {e}") from e
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise ModelError(f"model: expected a state dict in {where!r}, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "model"


def hf_name(ck: Checkpoint) -> str:
    """Partition name of a HF checkpoint directory: `vitlabel_name`, `_name_or_path`'s last part, or the dir."""
    cfg = ck.config or {}
    named = cfg.get("vitlabel_name") or posixpath.basename(str(cfg.get("_name_or_path", "")).rstrip("/"))
    return sanitize(named or ck.name)


def label_names(names: list[Any] | None, n: int, default: str, where: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{default}{i}" for i in range(n))
    if len(names) != n:
        raise ModelError(f"model: expected {n} label names (classifier rows) in {where}, got {len(names)}")
    return tuple(str(x) for x in names)


def hf_labels(cfg: dict[str, Any], n: int, where: str) -> tuple[str, ...]:
    """config.json's id2label (keys are strings of ints) for a head of n rows; LABEL_i where absent."""
    id2label = cfg.get("id2label")
    names = [id2label[k] for k in sorted(id2label, key=int)] if id2label and len(id2label) == n else None
    if id2label and names is None:
        raise ModelError(f"model: expected {n} entries in id2label (classifier rows) in {where}, got {len(id2label)}")
    return label_names(names, n, "LABEL_", where)


def interpolation(value: Any, where: str) -> str:
    if isinstance(value, int) and 0 <= value < len(HF_RESAMPLE):
        return HF_RESAMPLE[value]
    if isinstance(value, str) and value.lower() in INTERPOLATIONS:
        return value.lower()
    raise ModelError(f"model: expected an interpolation in {INTERPOLATIONS} in {where}, got {value!r}")


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def hf_contract(ck: Checkpoint, image_size: tuple[int, int] | None, patch_size: int = 0,
                default_mean: tuple[float, ...] = (0.5, 0.5, 0.5), default_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                default_resample: int = 2) -> ImageContract:
    """preprocessor_config.json (HF defaults where absent) -> ImageContract.

    Resize rules of the HF image processors, as they run them:
    - `size: {height, width}` (ViT, SigLIP): resize to exactly that size ("squash"), then a centre crop if the
      processor has one (DeiT: crop_pct = crop / size);
    - `size: {shortest_edge}` + `do_center_crop` + `crop_size` (BiT/DINOv2, MobileNetV2, DeiT, CLIP): shorter side
      to shortest_edge, then centre crop: "shortest" with crop_pct = crop / shortest_edge;
    - `size: {shortest_edge}` + `crop_pct` (ConvNext, the microsoft/resnet-50 layout): below 384 px the shorter
      side goes to shortest_edge / crop_pct, then a centre crop of shortest_edge; at 384 px and more, a squash.
    `image_size` (the model's own, if it has one) must agree with the processor's output size.
    """
    where = ck.where("preprocessor_config.json")
    p = ck.json("preprocessor_config.json") or {}
    try:
        if "vitlabel_contract" in p:  # written by our save_checkpoint: round-trips resize modes HF cannot express
            c = p["vitlabel_contract"]
            contract = ImageContract(**{**c, "image_size": tuple(c["image_size"]), "mean": tuple(c["mean"]),
                                        "std": tuple(c["std"])})
        else:
            contract = _hf_processor_contract(p, image_size, patch_size, default_mean, default_std,
                                              default_resample, where)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"model: expected a valid preprocessor config in {where}, got {e}") from e
    if image_size is not None and (contract.image_size, contract.patch_size) != (tuple(image_size), patch_size):
        raise ModelError(f"model: expected a {tuple(image_size)} input (patch {patch_size}) in {where}, got "
                         f"{contract.image_size} (patch {contract.patch_size})")
    return contract


def _hf_processor_contract(p: dict[str, Any], image_size: tuple[int, int] | None, patch_size: int,
                           default_mean: tuple[float, ...], default_std: tuple[float, ...], default_resample: int,
                           where: str) -> ImageContract:
    # Fold rescale_factor into mean/std: (x*r - m)/s == (x/255 - m/(255 r)) / (s/(255 r)).
    scale = 255.0 * (float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0)
    normalize = p.get("do_normalize", True)
    mean = [float(x) for x in p.get("image_mean", default_mean)] if normalize else [0.0] * 3
    std = [float(x) for x in p.get("image_std", default_std)] if normalize else [1.0] * 3
    size = p.get("size")
    if isinstance(size, (int, float)):  # old processors: an int is the shortest edge
        size = {"shortest_edge": int(size)}
    size = size or ({"height": image_size[0], "width": image_size[1]} if image_size else {"height": 224,
                                                                                          "width": 224})
    crop = p.get("crop_size")
    if isinstance(crop, (int, float)):
        crop = {"height": int(crop), "width": int(crop)}
    resize, crop_pct = "squash", 1.0
    if "shortest_edge" in size and "crop_pct" in p and p.get("crop_pct") is not None:  # ConvNext layout
        edge = int(size["shortest_edge"])
        out = (edge, edge)
        if edge < 384:
            resize, crop_pct = "shortest", float(p["crop_pct"])
    elif "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if p.get("do_center_crop", True) and crop:
            out = (int(crop["height"]), int(crop["width"]))
            resize, crop_pct = "shortest", min(1.0, min(out) / edge)
        else:
            raise ModelError(f"model: expected a centre crop after a shortest_edge resize in {where}, got none "
                             "(the output size would depend on each image's aspect ratio)")
    else:
        out = (int(size["height"]), int(size["width"]))
        if p.get("do_center_crop") and crop:  # DeiT: squash to 256 x 256, then centre crop 224 x 224
            squashed, out = out, (int(crop["height"]), int(crop["width"]))
            crop_pct = out[0] / squashed[0]
            if abs(out[1] / squashed[1] - crop_pct) > 1e-6 or crop_pct > 1:
                raise ModelError(f"model: expected a centre crop of one ratio on both sides in {where}, got "
                                 f"{out} out of {squashed}")
    return ImageContract(image_size=out, patch_size=patch_size, resize=resize, crop_pct=crop_pct,
                         interpolation=interpolation(p.get("resample", default_resample), where),
                         mean=tuple(round(m / scale, 12) for m in mean), std=tuple(round(s / scale, 12) for s in std))


def sidecar(ck: Checkpoint) -> tuple[dict[str, Any], str]:
    """The checkpoint's metadata JSON ({} if none) and its name: config.json of a directory, else the first of
    `<file>.json`, `<stem>.json`, `config.json` beside the weights file."""
    if ck.is_dir:
        return ck.config or {}, ck.where("config.json")
    base = posixpath.basename(ck.root)
    for candidate in (f"{base}.json", f"{base.rsplit('.', 1)[0]}.json", "config.json"):
        found = ck.json(candidate)
        if found is not None:
            return found, candidate
    return {}, f"{base}.json"


def timm_contract(pre: dict[str, Any], hw: tuple[int, int], patch: int, where: str) -> ImageContract:
    """timm's pretrained_cfg (defaults where absent: ImageNet mean/std, bicubic, crop_pct 0.9) -> ImageContract."""
    squash = pre.get("crop_mode", "center") == "squash"
    return ImageContract(image_size=hw, patch_size=patch, resize="squash" if squash else "shortest",
                         crop_pct=1.0 if squash else float(pre.get("crop_pct", 0.9)),
                         interpolation=interpolation(pre.get("interpolation", "bicubic"), where),
                         mean=tuple(pre.get("mean", IMAGENET_MEAN)), std=tuple(pre.get("std", IMAGENET_STD)))


def rename_keys(sd: dict[str, torch.Tensor], table: list[tuple[str, str | None]], what: str
                ) -> dict[str, torch.Tensor]:
    """Keys renamed by the first (regex, target) of `table` that matches whole; a None target drops the key; a key
    no rule matches is an error (a checkpoint of another layout must not load half-mapped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        rule = next(((p, t) for p, t in table if re.fullmatch(p, key)), None)
        if rule is None:
            raise ModelError(f"model: expected {what} weights, got an unknown key {key!r}")
        if rule[1] is not None:
            out[re.sub(*rule, key)] = value
    return out


def fuse(sd: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str) -> dict[str, torch.Tensor]:
    """Projections stored apart that one Linear runs: every key with `parts[0]` and its siblings with the other
    parts become one key with `fused`, their rows concatenated in `parts` order (e.g. q | k | v)."""
    for name in [k for k in sd if parts[0] in k]:
        sd[name.replace(parts[0], fused)] = torch.cat([sd.pop(name.replace(parts[0], p)) for p in parts])
    return sd
