"""The resnet-cifar family against a plain reference, its checkpoint's own processor, and the bundled ResNet-32.

transformers has no CIFAR ResNet, so the oracle is written here: the paper's section 4.2 network transcribed as
functions over the state dict (F.conv2d / F.batch_norm on the keys of the widely used CIFAR layout), built from
random weights and random BatchNorm statistics, independently of pipeline/models/resnet_cifar*.py.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _corpus import parity, varied_images
from _digits import png_bytes
from safetensors.torch import load_file, save_file

from pipeline.config import ImageContract
from pipeline.models import ModelError, describe_model, families, load_model
from pipeline.models.registry import open_checkpoint
from pipeline.models.resnet_cifar import ResNetCifar, ResNetCifarConfig
from pipeline.models.resnet_cifar_ckpt import CIFAR10_MEAN, CIFAR10_STD, FAMILY, save_checkpoint
from pipeline.preprocess import decode_image

TOL = 1e-4
BUILTIN = "builtin:digits-resnet32"
ASSET = Path(str(resources.files("pipeline").joinpath("assets", "digits-resnet32")))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference: random CIFAR-layout state dicts, and the network as functions over them ------------------


def cifar_state_dict(n: int, option: str, classes: int | None = 10, head: str = "linear", seed: int = 0,
                     widths: tuple[int, int, int] = (16, 32, 64)) -> dict[str, torch.Tensor]:
    """ResNet-(6n+2) weights in the CIFAR layout: conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2 (+ shortcut.0/.1
    for option B where the shape changes), `head`.weight/bias. He-init convs, BatchNorm away from identity."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 0.5 + 0.5 * torch.rand(c, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", widths[0], 3, 3)
    bn("bn1", widths[0])
    cin = widths[0]
    for s, cout in enumerate(widths, start=1):
        for i in range(n):
            p = f"layer{s}.{i}"
            conv(f"{p}.conv1", cout, cin, 3)
            bn(f"{p}.bn1", cout)
            conv(f"{p}.conv2", cout, cout, 3)
            bn(f"{p}.bn2", cout)
            if option == "B" and cin != cout:
                conv(f"{p}.shortcut.0", cout, cin, 1)
                bn(f"{p}.shortcut.1", cout)
            cin = cout
    if classes:
        sd[f"{head}.weight"] = torch.randn(classes, cin, generator=g) * 0.3
        sd[f"{head}.bias"] = 0.1 * torch.randn(classes, generator=g)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: normalised float [B, 3, H, W] -> (pooled features [B, 64], logits [B, C] or None), from the keys alone."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, momentum=0.0, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        i = 0
        while f"layer{stage}.{i}.conv1.weight" in sd:
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            out = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:  # option B: projection
                short = bn(F.conv2d(h, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            elif out.shape != h.shape:  # option A: every other pixel, planes//4 zero channels on each side
                planes = out.shape[1]
                short = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                short = h
            h = F.relu(out + short)
            i += 1
    feats = F.adaptive_avg_pool2d(h, 1).flatten(1)  # global average pooling
    head = "linear" if "linear.weight" in sd else "fc"
    logits = F.linear(feats, sd[f"{head}.weight"], sd[f"{head}.bias"]) if f"{head}.weight" in sd else None
    return feats, logits


def pixels(n: int, hw: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *hw, 3), dtype=np.uint8)  # [B, H, W, 3]


def normalised(px: np.ndarray, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    x = (torch.from_numpy(px).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).float()  # [B, 3, H, W]


def save(sd: dict[str, torch.Tensor], path: Path, wrap: bool = False) -> str:
    """.safetensors or .pth; `wrap`: as pytorch_resnet_cifar10 saves its checkpoints ({"state_dict": module.*})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0} if wrap else sd,
                   path)
    return str(path)


# --- 1. logits against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("option,suffix,head,n", [("A", ".pth", "linear", 3), ("A", ".safetensors", "fc", 1),
                                                  ("B", ".pth", "fc", 1), ("B", ".safetensors", "linear", 3)])
def test_state_dicts_match_the_reference(tmp_path, option, suffix, head, n):
    sd = cifar_state_dict(n, option, head=head)
    path = save(sd, tmp_path / f"resnet{6 * n + 2}{suffix}", wrap=suffix == ".pth" and option == "A")
    bundle = load_model(path)
    assert bundle.info.family == "resnet-cifar"
    assert bundle.info.arch == ResNetCifarConfig(depths=(n, n, n), shortcut=option, num_classes=10)
    assert bundle.contract == ImageContract(image_size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert bundle.labels == tuple(f"class_{i}" for i in range(10))
    px = pixels(4)
    feats, logits = reference_forward(sd, normalised(px))
    with torch.no_grad():
        ours = bundle.model.forward_features(torch.from_numpy(px))
        diff = (bundle.model.forward_head(ours) - logits).abs().max().item()
    print(f"\nresnet-cifar option {option} {suffix} ({head}): logits max |diff| {diff:.2e}, "
          f"|logits| up to {logits.abs().max():.1f}")
    assert diff < TOL and (ours - feats).abs().max().item() < TOL


def test_sidecar_json_sets_contract_and_labels(tmp_path):
    sd = cifar_state_dict(1, "A", classes=3)
    path = save(sd, tmp_path / "net.safetensors")
    meta = {"pretrained_cfg": {"input_size": [3, 40, 48], "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3],
                               "std": [0.2, 0.25, 0.3], "crop_mode": "center", "crop_pct": 0.875},
            "label_names": ["plane", "car", "bird"]}
    for name in ("net.safetensors.json", "net.json", "config.json"):  # each of the three places is read
        (tmp_path / name).write_text(json.dumps(meta))
        bundle = load_model(path)
        assert bundle.contract == ImageContract(image_size=(40, 48), resize="shortest", crop_pct=0.875,
                                                interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
        assert bundle.labels == ("plane", "car", "bird") and bundle.name == "net"
        (tmp_path / name).unlink()
    (tmp_path / "net.json").write_text(json.dumps(meta))
    px = pixels(2, (40, 48))
    _, logits = reference_forward(sd, normalised(px, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    with torch.no_grad():
        assert (load_model(path).model(torch.from_numpy(px)) - logits).abs().max().item() < TOL


def test_features_only_and_bf16(tmp_path):
    sd = cifar_state_dict(1, "B", classes=None)
    bundle = load_model(save(sd, tmp_path / "backbone.safetensors"))
    assert bundle.labels == () and bundle.info.arch.num_classes == 0
    px = pixels(3)
    feats, _ = reference_forward(sd, normalised(px))
    with torch.no_grad():
        assert (bundle.model.forward_features(torch.from_numpy(px)) - feats).abs().max().item() < TOL
    with pytest.raises(ModelError, match="expected a classifier"):
        bundle.model.forward_head(feats)
    half = load_model(save(cifar_state_dict(1, "A"), tmp_path / "c.pth"), dtype=torch.bfloat16)
    with torch.no_grad():
        out = half.model(torch.from_numpy(px))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 10) and torch.isfinite(out.float()).all()


# --- the bundled model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out():
    from jobs.train_digits import digits_split

    return digits_split()[1]


def test_builtin_metadata_and_stable_digest(tmp_path):
    from jobs.train_digits import RESNET_CONFIG, RESNET_CONTRACT

    info = describe_model(BUILTIN)
    assert (info.family, info.name, info.labels) == ("resnet-cifar", "digits-resnet32", tuple("0123456789"))
    assert info.arch == RESNET_CONFIG and info.arch.layers == 32 and info.contract == RESNET_CONTRACT
    assert info.digest.startswith("sha256:") and len(info.digest) == 7 + 64
    assert {f for f, _ in info.files} == {"config.json", "preprocessor_config.json", "model.safetensors"}
    copy = shutil.copytree(ASSET, tmp_path / "elsewhere")
    assert describe_model(str(copy)).digest == describe_model(BUILTIN).digest == info.digest
    assert sum(p.numel() for p in ResNetCifar(RESNET_CONFIG, CIFAR10_MEAN, CIFAR10_STD).parameters()) == 464_154
    assert (ASSET / "model.safetensors").stat().st_size < 2_000_000


def test_builtin_accuracy_through_decode_image(held_out):
    bundle = load_model(BUILTIN)
    assert bundle.digest == describe_model(BUILTIN).digest
    px = np.stack([decode_image(png_bytes(img), bundle.contract)[0] for img, _ in held_out])  # [M, 32, 32, 3]
    with torch.no_grad():
        pred = bundle.model(torch.from_numpy(px)).argmax(-1).tolist()
    accuracy = float(np.mean([bundle.labels[p] == str(y) for p, (_, y) in zip(pred, held_out, strict=True)]))
    print(f"\ndigits-resnet32 held-out top-1: {accuracy:.4f} on {len(held_out)} images")
    assert accuracy >= 0.95
    # The reference network on the asset's own weights agrees.
    _, logits = reference_forward(load_file(ASSET / "model.safetensors"), normalised(px[:32]))
    with torch.no_grad():
        assert (bundle.model(torch.from_numpy(px[:32])) - logits).abs().max().item() < TOL


# --- 2. preprocessing parity with the checkpoint's own processor -------------------------------------------


def _parity_against_processor(ck_dir: Path) -> object:
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoImageProcessor.from_pretrained(str(ck_dir), backend="pil")
    sd = load_file(ck_dir / "model.safetensors")
    bundle = load_model(str(ck_dir))

    @torch.no_grad()
    def ours(data: bytes) -> torch.Tensor:
        px, _, _ = decode_image(data, bundle.contract)
        return bundle.model(torch.from_numpy(px)[None]).softmax(-1)[0]

    @torch.no_grad()
    def theirs(img) -> torch.Tensor:
        x = processor(images=img, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        return reference_forward(sd, x)[1].softmax(-1)[0]

    return parity(ours, theirs, varied_images())


def test_preprocessing_parity_bundled_model():
    result = _parity_against_processor(ASSET)
    print(f"\nresnet-cifar preprocessing parity (builtin:digits-resnet32 vs AutoImageProcessor, 32x32 bilinear): "
          f"{result}")
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02


def test_preprocessing_parity_saved_random_model(tmp_path):
    """A random option-B ResNet-8 written by save_checkpoint with a non-square bicubic contract; its classifier
    is scaled up so that classes are well separated (the test is about pixels, not weights)."""
    cfg = ResNetCifarConfig(depths=(1, 1, 1), shortcut="B", num_classes=10)
    contract = ImageContract(image_size=(40, 32), interpolation="bicubic", mean=(0.45, 0.5, 0.55), std=(0.2, 0.3, 0.25))
    sd = cifar_state_dict(1, "B", seed=3)
    sd["linear.weight"] *= 20
    model = ResNetCifar(cfg, contract.mean, contract.std)
    model.load_state_dict(sd)
    labels = [f"k{i}" for i in range(10)]
    digest = save_checkpoint(model, contract, labels, str(tmp_path / "rand"), "rand")
    info = describe_model(str(tmp_path / "rand"))
    assert (info.digest, info.contract, info.labels, info.arch) == (digest, contract, tuple(labels), cfg)
    result = _parity_against_processor(tmp_path / "rand")
    print(f"\nresnet-cifar preprocessing parity (random ResNet-8, 40x32 bicubic): {result}")
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02


# --- 3. detection and errors ------------------------------------------------------------------------------


def torchvision_resnet_keys(tmp_path: Path) -> str:
    """An ImageNet ResNet-18 layout (7x7 stem, layer1..4, fc) at a tiny width: the other family's."""
    sd = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(5, 64), "fc.bias": torch.zeros(5)}
    for name, c in (("bn1", 8),):
        sd.update({f"{name}.{k}": torch.ones(c) for k in ("weight", "bias", "running_mean", "running_var")})
    cin = 8
    for s, c in enumerate((8, 16, 32, 64), start=1):
        for i in range(2):
            p = f"layer{s}.{i}"
            sd[f"{p}.conv1.weight"] = torch.zeros(c, cin, 3, 3)
            sd[f"{p}.conv2.weight"] = torch.zeros(c, c, 3, 3)
            for b in ("bn1", "bn2"):
                sd.update({f"{p}.{b}.{k}": torch.ones(c) for k in ("weight", "bias", "running_mean", "running_var")})
            if i == 0 and s > 1:
                sd[f"{p}.downsample.0.weight"] = torch.zeros(c, cin, 1, 1)
                sd.update({f"{p}.downsample.1.{k}": torch.ones(c)
                           for k in ("weight", "bias", "running_mean", "running_var")})
            cin = c
    return save(sd, tmp_path / "imagenet" / "resnet18.safetensors")


def test_detection_picks_exactly_this_family(tmp_path):
    for path in (save(cifar_state_dict(1, "A"), tmp_path / "a.pth"),
                 save(cifar_state_dict(1, "B", head="fc"), tmp_path / "b.safetensors"), str(ASSET), BUILTIN):
        assert describe_model(path).family == "resnet-cifar", path
    bare = tmp_path / "bare"  # a directory of CIFAR weights without config.json
    bare.mkdir()
    save(cifar_state_dict(1, "A"), bare / "model.safetensors")
    assert describe_model(str(bare)).family == "resnet-cifar"
    assert describe_model(str(bare)).contract.mean == CIFAR10_MEAN


def test_other_families_checkpoints_are_not_claimed(tmp_path):
    imagenet = torchvision_resnet_keys(tmp_path)
    assert not FAMILY.recognise(open_checkpoint(imagenet))
    assert not FAMILY.recognise(open_checkpoint("builtin:digits"))
    vit_file = tmp_path / "vit.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "pos_embed": torch.zeros(1, 5, 8),
               "cls_token": torch.zeros(1, 1, 8)}, str(vit_file))
    assert not FAMILY.recognise(open_checkpoint(str(vit_file)))
    if "resnet" in families():  # the ImageNet ResNet family, where present, takes its own and leaves ours
        assert describe_model(imagenet).family == "resnet"
        assert not families()["resnet"].recognise(open_checkpoint(save(cifar_state_dict(1, "A"), tmp_path / "c.pth")))
        assert not families()["resnet"].recognise(open_checkpoint(BUILTIN))


def test_clear_errors(tmp_path):
    sd = cifar_state_dict(1, "B")
    bottleneck = {**sd, "layer1.0.conv3.weight": torch.zeros(64, 16, 1, 1)}
    with pytest.raises(ModelError, match=r"expected BasicBlocks .* got bottleneck"):
        describe_model(save(bottleneck, tmp_path / "bottleneck.safetensors"))
    broken = {k: v for k, v in sd.items() if not k.startswith("layer2.0.shortcut.")}  # one projection missing
    with pytest.raises(ModelError, match="missing"):
        load_model(save(broken, tmp_path / "broken.safetensors"))
    wrong = {**sd, "layer3.0.conv2.weight": torch.zeros(64, 32, 3, 3)}
    with pytest.raises(ModelError, match="mismatch"):
        load_model(save(wrong, tmp_path / "wrong.safetensors"))
    both = {**sd, "fc.weight": sd["linear.weight"].clone(), "fc.bias": sd["linear.bias"].clone()}
    with pytest.raises(ModelError, match="got both"):
        describe_model(save(both, tmp_path / "both.safetensors"))
    labelled = save(sd, tmp_path / "labels" / "net.safetensors")
    (tmp_path / "labels" / "net.json").write_text(json.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(ModelError, match="expected 10 label names"):
        describe_model(labelled)
    disagree = shutil.copytree(ASSET, tmp_path / "disagree")
    pre = json.loads((disagree / "preprocessor_config.json").read_text())
    (disagree / "preprocessor_config.json").write_text(json.dumps({**pre, "resample": 3}))
    with pytest.raises(ModelError, match="to agree"):
        describe_model(str(disagree))
    with pytest.raises(ModelError, match="expected a CIFAR ResNet state dict"):
        describe_model(torchvision_resnet_keys(tmp_path), family="resnet-cifar")
    with pytest.raises(ValueError, match=r"pixels: expected \[B, H, W, 3\]"):
        load_model(BUILTIN).model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# --- 4. fsspec: memory:// and S3 ----------------------------------------------------------------------------


def test_memory_and_s3_urls(tmp_path, s3):
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in ASSET.iterdir():
        mem.pipe(f"/models/digits-r32/{f.name}", f.read_bytes())
    remote = load_model("memory://models/digits-r32")
    assert remote.digest == describe_model(BUILTIN).digest and remote.contract == describe_model(BUILTIN).contract
    sd = cifar_state_dict(1, "B", classes=3)
    path = save(sd, tmp_path / "r8.safetensors")
    (tmp_path / "r8.json").write_text(json.dumps({"label_names": ["x", "y", "z"]}))
    for name in ("r8.safetensors", "r8.json"):
        s3.upload_file(str(tmp_path / name), "test-bucket", f"models/{name}")
    bundle = load_model("s3://test-bucket/models/r8.safetensors")
    assert bundle.labels == ("x", "y", "z") and bundle.digest == describe_model(path).digest
    px = pixels(2)
    with torch.no_grad():
        assert (bundle.model(torch.from_numpy(px)) - reference_forward(sd, normalised(px))[1]).abs().max() < TOL


# --- 5. the pipeline against a plain loop ---------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_top1_equals_plain_loop(ray_local, tmp_path, held_out):
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.sources import write_webdataset
    from pipeline.table import read_table

    samples = [(f"d{i:03d}", {"png": png_bytes(img)}) for i, (img, _) in enumerate(held_out[:24])]
    samples.append(("broken", {"jpg": b"not a jpeg"}))
    (tmp_path / "in").mkdir()
    write_webdataset(str(tmp_path / "in" / "shard-000.tar"), samples[::2])
    write_webdataset(str(tmp_path / "in" / "shard-001.tar"), samples[1::2])
    run(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=BUILTIN, progress=False,
                  batch_size=8, preprocess_batch_size=8, dtype="float32"))  # as the reference: auto = bf16 on AMX
    rows = {r["key"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == len(samples) and rows["broken"]["status"] == "error" and rows["broken"]["label"] is None
    bundle = load_model(BUILTIN)
    with torch.no_grad():
        for key, members in samples[:-1]:
            px, _, _ = decode_image(members["png"], bundle.contract)
            probs = bundle.model(torch.from_numpy(px)[None]).softmax(-1)[0]
            assert rows[key]["status"] == "ok" and rows[key]["label"] == bundle.labels[int(probs.argmax())], key
            assert abs(rows[key]["score"] - float(probs.max())) < 1e-5
