"""The resnet family against its reference: transformers' ResNetForImageClassification, and its own processor.

A tiny seeded HF ResNet (random weights and random BatchNorm running statistics, in eval mode) is the oracle.
torchvision/timm files are built from the same weights with torchvision's key layout (mapped in this file,
independently of pipeline/models/resnet_ckpt.py), so all three formats are compared with the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import parity, reference_rgb, varied_images
from safetensors.torch import save_file

from pipeline.models import ModelError, describe_model, load_model
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.registry import open_checkpoint
from pipeline.models.resnet import ResNetConfig
from pipeline.models.resnet_ckpt import FAMILY
from pipeline.preprocess import decode_image

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# (layer_type, depths, hidden_sizes, embedding_size): ResNet-50 and ResNet-34 layouts at a tiny width.
R50 = ("bottleneck", [3, 4, 6, 3], [16, 32, 64, 128], 8)
R34 = ("basic", [3, 4, 6, 3], [8, 16, 32, 64], 8)
SMALL = ("bottleneck", [1, 1, 1, 1], [16, 32, 64, 128], 8)
# torchvision's resnet50 / resnet34 state dicts: 53 / 36 convs, as many BatchNorms (5 tensors each), fc (2).
TORCHVISION_KEYS = {"bottleneck": 53 + 53 * 5 + 2, "basic": 36 + 36 * 5 + 2}
PROCESSOR = {  # microsoft/resnet-50's preprocessor_config.json
    "image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 3,
    "rescale_factor": 1 / 255, "size": {"shortest_edge": 224},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_hf(tmp: Path, layout=SMALL, n_classes: int = 5, seed: int = 0, processor: bool = True, **extra):
    """A random seeded HF ResNetForImageClassification in eval mode, saved to `tmp` (microsoft/resnet-50 layout)."""
    torch.manual_seed(seed)
    layer_type, depths, hidden, embedding = layout
    labels = [f"thing{i}" for i in range(n_classes)]
    cfg = transformers.ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden,
                                    embedding_size=embedding, id2label=dict(enumerate(labels)),
                                    label2id={x: i for i, x in enumerate(labels)}, **extra)
    model = transformers.ResNetForImageClassification(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # random affine and running stats, kept near unit gain
                m.weight.uniform_(0.4, 0.9)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(tmp)
    if processor:
        (tmp / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return model


def spread_head(hf, tmp: Path, images, spread: float = 2.0) -> None:
    """Re-draw the classifier so that, on these images, each class's logit is centred with std `spread`.

    A random ResNet's pooled features barely change from image to image; without this every image would get
    the same class at a near-uniform probability, and a parity test would prove nothing. Saved back to `tmp`.
    """
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp), backend="pil")
    with torch.no_grad():
        pv = torch.cat([processor(images=reference_rgb(data), return_tensors="pt")["pixel_values"]
                        for _, data in images])  # [N, 3, 224, 224]
        f = hf.resnet(pv).pooler_output.flatten(1)  # [N, D]
        std = f.std(0)
        w = torch.randn(hf.classifier[1].out_features, f.shape[1]) * (std > 1e-6) / std.clamp_min(1e-6)
        w *= spread / ((f - f.mean(0)) @ w.T).std(0, keepdim=True).T  # [C, D]
        hf.classifier[1].weight.copy_(w)
        hf.classifier[1].bias.copy_(-w @ f.mean(0))
    hf.save_pretrained(tmp)


def torchvision_state_dict(hf) -> dict[str, torch.Tensor]:
    """The HF model's weights under torchvision's names (torchvision/models/resnet.py: conv1, bn1, layerN.B.convI,
    bnI, downsample.0/.1, fc), walked module by module."""
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, module) -> None:
        for name, t in module.state_dict().items():
            sd[f"{prefix}.{name}"] = t.clone()

    put("conv1", hf.resnet.embedder.embedder.convolution)
    put("bn1", hf.resnet.embedder.embedder.normalization)
    for s, stage in enumerate(hf.resnet.encoder.stages):
        for b, block in enumerate(stage.layers):
            for i, conv_layer in enumerate(block.layer):
                put(f"layer{s + 1}.{b}.conv{i + 1}", conv_layer.convolution)
                put(f"layer{s + 1}.{b}.bn{i + 1}", conv_layer.normalization)
            if not isinstance(block.shortcut, torch.nn.Identity):
                put(f"layer{s + 1}.{b}.downsample.0", block.shortcut.convolution)
                put(f"layer{s + 1}.{b}.downsample.1", block.shortcut.normalization)
    put("fc", hf.classifier[1])
    return sd


def pixels(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # [B, H, W, 3]


def normalised(px: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(px).double() / 255.0  # [B, H, W, 3]
    x = (x - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    return x.permute(0, 3, 1, 2).float().contiguous()  # [B, 3, H, W]


def reference(hf, px: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features [B, D], logits [B, C]) of the HF model on normalised NCHW pixels."""
    with torch.no_grad():
        out = hf.resnet(normalised(px))
        return out.pooler_output.flatten(1), hf.classifier(out.pooler_output)


def assert_logits_match(spec: str, hf, px: np.ndarray, **kw) -> float:
    bundle = load_model(spec, **kw)
    assert bundle.info.family == "resnet"
    with torch.no_grad():
        feats = bundle.model.forward_features(torch.from_numpy(px))
        logits = bundle.model.forward_head(feats)
    ref_feats, ref_logits = reference(hf, px)
    assert (feats - ref_feats).abs().max().item() < TOL
    diff = (logits - ref_logits).abs().max().item()
    assert diff < TOL, diff
    assert (ref_feats[0] - ref_feats[1]).abs().max() > 10 * TOL  # the features tell the images apart
    return diff


# --- 1. logits: HF directory, torchvision file, timm file + pretrained_cfg -------------------------------------


@pytest.mark.parametrize("layout", [R50, R34], ids=["resnet50", "resnet34"])
def test_three_formats_match_transformers(tmp_path, layout):
    hf = make_hf(tmp_path / "hf", layout)
    px = pixels(3)
    diffs = {"hf": assert_logits_match(str(tmp_path / "hf"), hf, px)}

    sd = torchvision_state_dict(hf)
    assert len(sd) == TORCHVISION_KEYS[layout[0]]  # torchvision's key count for resnet50 / resnet34
    torch.save(sd, tmp_path / "resnet-tv.pth")
    diffs["torchvision"] = assert_logits_match(str(tmp_path / "resnet-tv.pth"), hf, px)

    timm = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # timm files omit them
    save_file(timm, tmp_path / "resnet-timm.safetensors")
    diffs["timm"] = assert_logits_match(str(tmp_path / "resnet-timm.safetensors"), hf, px)
    print(f"\n{layout[0]} logits max |diff| vs transformers: {diffs}")

    hf_info = describe_model(str(tmp_path / "hf"))
    tv_info = describe_model(str(tmp_path / "resnet-tv.pth"))
    assert hf_info.arch == tv_info.arch  # the same network, read from config.json or from key shapes
    assert hf_info.arch.depth == (50 if layout[0] == "bottleneck" else 34)
    assert hf_info.labels == tuple(f"thing{i}" for i in range(5))
    assert tv_info.labels == tuple(f"class_{i}" for i in range(5))


def test_contracts_of_each_format(tmp_path):
    """HF: its ConvNext processor; bare file: torchvision's evaluation; timm file: its pretrained_cfg sidecar."""
    hf = make_hf(tmp_path / "hf")
    c = describe_model(str(tmp_path / "hf")).contract
    assert (c.image_size, c.resize, c.crop_pct, c.interpolation, c.patch_size) == ((224, 224), "shortest", 0.875,
                                                                                   "bicubic", 0)
    assert np.allclose(c.mean, IMAGENET_MEAN) and np.allclose(c.std, IMAGENET_STD)

    save_file(torchvision_state_dict(hf), tmp_path / "tv.safetensors")
    c = describe_model(str(tmp_path / "tv.safetensors")).contract
    assert (c.image_size, c.resize, c.crop_pct, c.interpolation) == ((224, 224), "shortest", 0.875, "bilinear")
    assert (c.mean, c.std) == (IMAGENET_MEAN, IMAGENET_STD)

    # timm's hub config.json for resnet50.a1_in1k: pretrained_cfg nested, label names at the top level.
    meta = {"architecture": "resnet50", "num_classes": 5, "label_names": list("abcde"),
            "pretrained_cfg": {"tag": "a1_in1k", "input_size": [3, 160, 192], "crop_pct": 0.95, "crop_mode": "center",
                               "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    for name in ("tv.safetensors.json", "tv.json", "config.json"):  # each sidecar name timm/vit_ckpt accepts
        (tmp_path / name).write_text(json.dumps(meta))
        info = describe_model(str(tmp_path / "tv.safetensors"))
        c = info.contract
        assert (c.image_size, c.crop_pct, c.interpolation, c.mean) == ((160, 192), 0.95, "bicubic", (0.5,) * 3), name
        assert info.labels == tuple("abcde")
        (tmp_path / name).unlink()

    # The sidecar's mean/std reach the network's Normalize: logits still match the reference on those pixels.
    (tmp_path / "tv.json").write_text(json.dumps(meta))
    bundle = load_model(str(tmp_path / "tv.safetensors"))
    px = pixels(2)
    with torch.no_grad():
        ref = hf(normalised(px, (0.5,) * 3, (0.25,) * 3)).logits
        assert (bundle.model(torch.from_numpy(px)) - ref).abs().max() < TOL

    # A timm hub directory (config.json with `architecture`, model.safetensors) is the same checkpoint.
    hub = tmp_path / "resnet50.a1_in1k"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in torchvision_state_dict(hf).items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps(meta))
    info = describe_model(str(hub))
    assert info.labels == tuple("abcde") and info.contract.crop_pct == 0.95 and info.name == "resnet50.a1_in1k"
    assert FAMILY.recognise(open_checkpoint(str(hub)))


@pytest.mark.parametrize("extra", [{"downsample_in_bottleneck": True}, {"downsample_in_first_stage": True}],
                         ids=["v1-stride-in-1x1", "downsample-in-first-stage"])
def test_hf_block_options(tmp_path, extra):
    hf = make_hf(tmp_path / "hf", **extra)
    assert_logits_match(str(tmp_path / "hf"), hf, pixels(2))


def test_features_only_backbone(tmp_path):
    """A HF ResNetModel (no classifier) and a torchvision file without fc: features only, no labels."""
    hf = make_hf(tmp_path / "full")
    hf.resnet.save_pretrained(tmp_path / "backbone")
    sd = {k: v for k, v in torchvision_state_dict(hf).items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "backbone.pth")
    px = pixels(2)
    ref, _ = reference(hf, px)
    for spec in (str(tmp_path / "backbone"), str(tmp_path / "backbone.pth")):
        bundle = load_model(spec)
        assert bundle.labels == () and bundle.info.arch.num_classes == 0
        with torch.no_grad():
            assert (bundle.model.forward_features(torch.from_numpy(px)) - ref).abs().max() < TOL
        with pytest.raises(ModelError, match="expected a ResNet with a classifier"):
            bundle.model.forward_head(ref)


def test_bf16_and_presets(tmp_path):
    hf = make_hf(tmp_path / "hf")
    px = pixels(4)
    bundle = load_model(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bundle.model.parameters())
    with torch.no_grad():
        out = bundle.model(torch.from_numpy(px))
    _, ref = reference(hf, px)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 5)
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()  # bf16: about 3 significant digits
    # 18/34/50/101/152 from block counts: the names' layer counts, torchvision's widths.
    for depth in (18, 34, 50, 101, 152):
        cfg = ResNetConfig.preset(depth)
        assert cfg.depth == depth and cfg.num_features == (512 if depth < 50 else 2048)


# --- 2. preprocessing: our decode + model against AutoImageProcessor + transformers -----------------------------


def test_preprocessing_parity_with_autoimageprocessor(tmp_path):
    # microsoft/resnet-50's contract (ConvNext processor, 224, crop_pct 0.875, bicubic) on a tiny-width network;
    # the classifier is re-drawn so that the 10 random classes spread over the images (the test is about pixels).
    hf = make_hf(tmp_path / "hf", n_classes=10)
    spread_head(hf, tmp_path / "hf", varied_images())
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"), backend="pil")
    assert type(processor).__name__.startswith("ConvNextImageProcessor")
    bundle = load_model(str(tmp_path / "hf"))
    contract = bundle.contract

    def ours(data: bytes) -> torch.Tensor:
        x = torch.from_numpy(decode_image(data, contract)[0].copy())  # [224, 224, 3] uint8
        with torch.no_grad():
            return bundle.model(x[None])[0].softmax(-1)

    classes: set[int] = set()

    def theirs(img) -> torch.Tensor:
        with torch.no_grad():
            pv = processor(images=img, return_tensors="pt")["pixel_values"]
            assert pv.shape == (1, 3, 224, 224)
            p = hf(pixel_values=pv).logits[0].softmax(-1)
        classes.add(int(p.argmax()))
        return p

    result = parity(ours, theirs, varied_images())
    print(f"\nresnet preprocessing parity vs AutoImageProcessor (ConvNext, 224, crop_pct 0.875): {result}; "
          f"{len(classes)} distinct top-1 classes")
    assert len(classes) >= 5  # the images are told apart, not all given one class
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02, result


# --- 3. detection and errors ----------------------------------------------------------------------------------


def cifar_resnet_state_dict() -> dict[str, torch.Tensor]:
    """A CIFAR ResNet-20's keys: 3x3 stem with 16 channels, three stages (no layer4)."""
    sd = {"conv1.weight": torch.zeros(16, 3, 3, 3), "fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}
    for s, c in enumerate((16, 32, 64)):
        for b in range(3):
            sd[f"layer{s + 1}.{b}.conv1.weight"] = torch.zeros(c, c if b or not s else c // 2, 3, 3)
            sd[f"layer{s + 1}.{b}.conv2.weight"] = torch.zeros(c, c, 3, 3)
    return sd


def test_detection(tmp_path):
    hf = make_hf(tmp_path / "hf")
    sd = torchvision_state_dict(hf)
    torch.save(sd, tmp_path / "tv.pth")
    for spec in (tmp_path / "hf", tmp_path / "tv.pth"):
        assert describe_model(str(spec)).family == "resnet"

    # Not ours: a CIFAR ResNet, a ViT directory, a timm ViT file.
    torch.save(cifar_resnet_state_dict(), tmp_path / "cifar.pth")
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3))
    vit.save_pretrained(tmp_path / "vit")
    save_file({"patch_embed.proj.weight": torch.zeros(32, 3, 8, 8), "pos_embed": torch.zeros(1, 17, 32),
               "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "vit-timm.safetensors")
    for spec in ("cifar.pth", "vit", "vit-timm.safetensors"):
        assert not FAMILY.recognise(open_checkpoint(str(tmp_path / spec))), spec
    with pytest.raises(ModelError, match=r"3x3 stem is a CIFAR ResNet"):
        describe_model(str(tmp_path / "cifar.pth"), family="resnet")


def test_clear_errors(tmp_path):
    hf = make_hf(tmp_path / "hf")
    sd = torchvision_state_dict(hf)

    # The HF weights file on its own: pass the directory.
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "hf-weights.safetensors")
    with pytest.raises(ModelError, match="pass its directory"):
        describe_model(str(tmp_path / "hf-weights.safetensors"))

    # config.json disagreeing with the weights (depths).
    bad = tmp_path / "mismatch"
    shutil.copytree(tmp_path / "hf", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "depths": [2, 1, 1, 1]}))
    with pytest.raises(ModelError, match=r"expected ResNet weights matching .* missing"):
        load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_sizes": [16, 32, 64, 256]}))
    with pytest.raises(ModelError, match="expected resnet weights matching"):
        load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ModelError, match=r"expected \(num_channels, hidden_act, layer_type\)"):
        describe_model(str(bad))

    # Truncated weights; timm's deep stem / avg-down variants; grouped convs (ResNeXt).
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:20])
    with pytest.raises(ModelError, match="expected a safetensors file"):
        describe_model(str(tmp_path / "cut.safetensors"), family="resnet")
    deep = {k: v for k, v in sd.items() if k != "conv1.weight"} | {"conv1.0.weight": torch.zeros(8, 3, 3, 3)}
    torch.save(deep, tmp_path / "resnet50d.pth")
    with pytest.raises(ModelError, match="deep-stem"):
        describe_model(str(tmp_path / "resnet50d.pth"))
    avg_down = {k.replace("downsample.1.", "downsample.2.").replace("downsample.0.", "downsample.1."): v
                for k, v in sd.items()}
    torch.save(avg_down, tmp_path / "avgdown.pth")
    with pytest.raises(ModelError, match="avg-pool downsample"):
        describe_model(str(tmp_path / "avgdown.pth"))
    grouped = {**sd, "layer1.0.conv2.weight": sd["layer1.0.conv2.weight"][:, :2].contiguous()}
    torch.save(grouped, tmp_path / "resnext.pth")
    with pytest.raises(ModelError, match="ResNeXt"):
        describe_model(str(tmp_path / "resnext.pth"))
    # Label names that do not fit the classifier.
    torch.save(sd, tmp_path / "tv.pth")
    (tmp_path / "tv.json").write_text(json.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(ModelError, match="expected 5 label names"):
        describe_model(str(tmp_path / "tv.pth"))


# --- 4. fsspec ------------------------------------------------------------------------------------------------


def test_memory_and_s3_urls(tmp_path, s3):
    import fsspec

    hf = make_hf(tmp_path / "hf")
    torch.save(torchvision_state_dict(hf), tmp_path / "tv.pth")
    (tmp_path / "tv.json").write_text(json.dumps({"pretrained_cfg": {"crop_pct": 0.95}}))
    mem = fsspec.filesystem("memory")
    for f in (tmp_path / "hf").iterdir():
        mem.pipe(f"/models/r50/{f.name}", f.read_bytes())
        s3.put_object(Bucket="test-bucket", Key=f"models/r50/{f.name}", Body=f.read_bytes())
    for name in ("tv.pth", "tv.json"):
        s3.put_object(Bucket="test-bucket", Key=f"files/{name}", Body=(tmp_path / name).read_bytes())
    px = pixels(2)
    local = describe_model(str(tmp_path / "hf"))
    for url in ("memory://models/r50", "s3://test-bucket/models/r50"):
        assert_logits_match(url, hf, px)
        remote = describe_model(url)
        assert (remote.digest, remote.contract, remote.name) == (local.digest, local.contract, "r50")
    remote = describe_model("s3://test-bucket/files/tv.pth")
    assert remote.contract.crop_pct == 0.95 and "tv.json" in dict(remote.files)
    assert remote.digest == describe_model(str(tmp_path / "tv.pth")).digest
    assert_logits_match("s3://test-bucket/files/tv.pth", hf, px)


# --- 5. the pipeline against a plain loop ---------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_matches_plain_loop(ray_local, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.sources import write_webdataset
    from pipeline.table import read_table

    images = [(f"img{i:02d}", data) for i, (_, data) in enumerate(varied_images()[:12])]
    spread_head(make_hf(tmp_path / "model", n_classes=10), tmp_path / "model", images)
    samples = [(key, {"jpg": data}) for key, data in images] + [("broken", {"jpg": b"not an image"})]
    (tmp_path / "in").mkdir()
    write_webdataset(str(tmp_path / "in" / "shard-000.tar"), samples)

    # dtype as the fp32 reference's: `auto` is bf16 on AMX CPUs
    run(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tmp_path / "model"),
                  progress=False, batch_size=4, preprocess_batch_size=4, dtype="float32"))
    rows = {r["key"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}

    bundle = load_model(str(tmp_path / "model"))
    with torch.no_grad():
        expected = {key: bundle.labels[int(bundle.model(torch.from_numpy(decode_image(data, bundle.contract)[0].copy())
                                                        [None]).argmax())] for key, data in images}
    assert set(rows) == {*expected, "broken"} and len(set(expected.values())) >= 3
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]
    assert {k: (rows[k]["status"], rows[k]["label"]) for k in expected} == {k: ("ok", v) for k, v in expected.items()}
