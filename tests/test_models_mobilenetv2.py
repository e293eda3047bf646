"""The MobileNetV2 family (pipeline.models.mobilenetv2) against transformers' MobileNetV2ForImageClassification.

Tiny seeded models (depth multiplier 0.35, small images): the HF layout as saved by transformers (TF "SAME"
padding, BatchNorm eps 1e-3), and the torchvision layout, whose state dict is written here by hand from the
same HF weights (symmetric padding, eps 1e-5) and compared with transformers' class built with
tf_padding=False. Our model gets uint8 pixels, the reference normalised float NCHW of the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import parity, varied_images
from safetensors.torch import save_file

from pipeline.config import ImageContract
from pipeline.models import ModelError, describe_model, families, load_model
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, Checkpoint
from pipeline.models.mobilenetv2 import MobileNetV2Config
from pipeline.models.mobilenetv2_ckpt import FAMILY
from pipeline.preprocess import decode_image

transformers = pytest.importorskip("transformers")

TOL = 1e-4
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
GOOGLE_PROCESSOR = {  # google/mobilenet_v2_1.0_224's preprocessor_config.json
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "MobileNetV2ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}
IMAGENET_LABELS = ["background"] + [f"imagenet class {i}" for i in range(1000)]  # google's 1001-way head


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_hf(path: Path | None, *, multiplier: float = 0.35, labels: list[str] | None = None, tf_padding: bool = True,
            eps: float = 1e-3, seed: int = 0, head_hw: tuple[int, int] | None = None, processor: dict | None = None,
            **extra):
    """A seeded random MobileNetV2ForImageClassification, saved to `path` unless None.

    Conv weights are He-initialised (depthwise ones: random blurs) and BatchNorm statistics calibrated
    (activations stay O(1) and depend on the image through all 17 blocks) around non-trivial affine parameters.
    With `head_hw`, the classifier is standardised on the pooled features of smooth images of that size (logits
    of std ~4), so that the top-1 class varies from image to image (preprocessing parity); otherwise it is a
    plain random head with O(1) logits.
    """
    torch.manual_seed(seed)
    labels = labels or [f"c{i}" for i in range(10)]
    cfg = transformers.MobileNetV2Config(depth_multiplier=multiplier, tf_padding=tf_padding, layer_norm_eps=eps,
                                         id2label=dict(enumerate(labels)),
                                         label2id={x: i for i, x in enumerate(labels)}, **extra)
    model = transformers.MobileNetV2ForImageClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv_3x3.convolution.weight" in name:  # depthwise: random blurs, as trained nets are mostly low-pass
                p.copy_((1 + torch.randn_like(p)) / 9)  # (He-random ones make a chaotic net: top-1 flips on 1-level
                # pixel noise, e.g. JPEG draft decoding, which says nothing about preprocessing)
            elif "convolution.weight" in name:  # HF's N(0, 0.02) leaves conv outputs far below BN's eps: inert
                torch.nn.init.kaiming_normal_(p, mode="fan_in")
            elif "normalization.weight" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "normalization.bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
        calibration = pixel_values(images(8, (64, 64), seed=seed + 50), (0.5,) * 3, (0.5,) * 3)
        model.train()(pixel_values=calibration)  # BN momentum 0.997: running stats ~ these batch stats
        model.eval()
        if head_hw is None:  # a plain random head: logits O(1), fp32 noise far below the tolerance
            model.classifier.weight.normal_(0, model.classifier.in_features ** -0.5)
            model.classifier.bias.normal_(0, 0.5)
        else:
            feats = model.mobilenet_v2(pixel_values=pixel_values(images(16, head_hw, seed=seed + 100), (0.5,) * 3,
                                                                 (0.5,) * 3)).pooler_output  # [16, D]
            mu, sd = feats.mean(0), feats.std(0)
            sd = sd.clamp_min(sd.median())  # features nearly constant over these images get no big weight
            w = torch.randn(len(labels), feats.shape[1]) * 4.0 / (sd * feats.shape[1] ** 0.5)  # [C, D]
            model.classifier.weight.copy_(w)
            model.classifier.bias.copy_(-w @ mu)
    if path is not None:
        model.save_pretrained(path)
        (path / "preprocessor_config.json").write_text(json.dumps(processor or GOOGLE_PROCESSOR))
    return model


def images(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth random images [B, H, W, 3] uint8 (a noise field blurred by upsampling)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, hw[0] // 4 + 1, hw[1] // 4 + 1, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=hw, mode="bilinear", align_corners=False)  # [B, 3, H, W]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pixel_values(px: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = (torch.from_numpy(px).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).float()  # [B, 3, H, W]


@torch.no_grad()
def max_diff(ours: torch.nn.Module, ref: torch.nn.Module, px: np.ndarray, mean, std) -> tuple[float, float]:
    a = ours(torch.from_numpy(px))  # uint8 in
    b = ref(pixel_values=pixel_values(px, mean, std)).logits
    return (a - b).abs().max().item(), b.abs().max().item()


def hf_to_torchvision_by_hand(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent of pipeline.models: transformers' keys -> torchvision's mobilenet_v2 state dict layout.

    torchvision: features.0 = ConvNormActivation(conv, bn) stem; features.1 = InvertedResidual(t=1): conv =
    [dw ConvNormActivation, project conv, project bn]; features.2-17: conv = [pw ConvNormActivation, dw
    ConvNormActivation, project conv, project bn]; features.18 = ConvNormActivation 1x1; classifier = [Dropout,
    Linear]. transformers: conv_stem (first_conv, conv_3x3, reduce_1x1) = features.0 + features.1.
    """
    p, out = "mobilenet_v2.", {}

    def conv(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{p}{src}.convolution.weight"]

    def bn(src: str, dst: str) -> None:
        for x in BN:
            out[f"{dst}.{x}"] = sd[f"{p}{src}.normalization.{x}"]

    def conv_bn(src: str, dst: str) -> None:  # ConvNormActivation: Sequential(conv, bn, relu6)
        conv(src, f"{dst}.0")
        bn(src, f"{dst}.1")

    conv_bn("conv_stem.first_conv", "features.0")
    conv_bn("conv_stem.conv_3x3", "features.1.conv.0")
    conv("conv_stem.reduce_1x1", "features.1.conv.1")
    bn("conv_stem.reduce_1x1", "features.1.conv.2")
    for i in range(16):
        src, dst = f"layer.{i}.", f"features.{i + 2}.conv."
        conv_bn(src + "expand_1x1", dst + "0")
        conv_bn(src + "conv_3x3", dst + "1")
        conv(src + "reduce_1x1", dst + "2")
        bn(src + "reduce_1x1", dst + "3")
    conv_bn("conv_1x1", "features.18")
    out["classifier.1.weight"], out["classifier.1.bias"] = sd["classifier.weight"], sd["classifier.bias"]
    return out


def save_torchvision(tmp: Path, name: str = "mobilenet_v2-tiny.pth", **kw):
    """A torchvision-layout file from a tf_padding=False, eps 1e-5 HF model (the reference for that layout)."""
    hf = make_hf(None, tf_padding=False, eps=1e-5, **kw)
    torch.save(hf_to_torchvision_by_hand(hf.state_dict()), tmp / name)
    return hf, tmp / name


# --- logits --------------------------------------------------------------------------------------------------


def test_hf_checkpoint_logits_match_transformers(tmp_path):
    hf = make_hf(tmp_path / "mnv2", labels=IMAGENET_LABELS)
    bundle = load_model(str(tmp_path / "mnv2"))
    assert bundle.info.family == "mobilenetv2" and bundle.name == "mnv2"
    assert len(bundle.labels) == 1001 and bundle.labels[0] == "background"
    assert bundle.contract == ImageContract(image_size=(224, 224), resize="shortest", crop_pct=0.875,
                                            interpolation="bilinear")
    cfg = bundle.model.cfg
    assert (cfg.tf_padding, cfg.eps, cfg.stem, cfg.last) == (True, 1e-3, 16, 1280)  # finegrained_output below 1.0
    for hw in ((64, 64), (65, 80), (97, 71)):  # odd sizes: asymmetric TF "SAME" padding
        diff, scale = max_diff(bundle.model, hf, images(3, hw), (0.5,) * 3, (0.5,) * 3)
        print(f"mobilenetv2 HF logits {hw}: max |diff| {diff:.2e} (logits up to {scale:.1f})")
        assert scale > 1 and diff < TOL
    assert bundle.model.forward_features(torch.from_numpy(images(2, (64, 64)))).shape == (2, 1280)


def test_torchvision_state_dict_logits_match_transformers(tmp_path):
    hf, path = save_torchvision(tmp_path)
    bundle = load_model(str(path))
    assert bundle.info.family == "mobilenetv2" and bundle.name == "mobilenet_v2-tiny"
    assert bundle.labels == tuple(f"class_{i}" for i in range(10))
    assert bundle.contract == ImageContract(image_size=(224, 224), resize="shortest", crop_pct=0.875,
                                            interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert (bundle.model.cfg.tf_padding, bundle.model.cfg.eps) == (False, 1e-5)
    for hw in ((64, 64), (65, 80)):
        diff, scale = max_diff(bundle.model, hf, images(3, hw), IMAGENET_MEAN, IMAGENET_STD)
        print(f"mobilenetv2 torchvision logits {hw}: max |diff| {diff:.2e} (logits up to {scale:.1f})")
        assert scale > 1 and diff < TOL


def test_torchvision_layout_at_width_1(tmp_path):
    """The full-size layout, checked against numbers from torchvision's source: 314 entries, 3,504,872 params."""
    hf = make_hf(None, multiplier=1.0, labels=[f"c{i}" for i in range(1000)], tf_padding=False, eps=1e-5)
    sd = hf_to_torchvision_by_hand(hf.state_dict())
    assert len(sd) == 314
    expected = {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                "features.1.conv.1.weight": (16, 32, 1, 1), "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.17.conv.2.weight": (320, 960, 1, 1),
                "features.18.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "mobilenet_v2.safetensors")
    bundle = load_model(str(tmp_path / "mobilenet_v2.safetensors"))
    assert sum(p.numel() for p in bundle.model.parameters()) == 3_504_872
    assert bundle.model.cfg == MobileNetV2Config.scaled(1.0, num_classes=1000)
    diff, scale = max_diff(bundle.model, hf, images(2, (48, 40)), IMAGENET_MEAN, IMAGENET_STD)
    assert scale > 1 and diff < TOL


def test_hf_variants_first_expansion_and_no_finegrained_output(tmp_path):
    hf = make_hf(tmp_path / "ck", multiplier=0.5, first_layer_is_expansion=False, finegrained_output=False,
                 min_depth=16)
    bundle = load_model(str(tmp_path / "ck"))
    assert bundle.model.cfg.blocks[0].expand and bundle.model.cfg.last == 640
    diff, _ = max_diff(bundle.model, hf, images(2, (70, 64)), (0.5,) * 3, (0.5,) * 3)
    assert diff < TOL


def test_features_only_backbone(tmp_path):
    torch.manual_seed(0)
    base = transformers.MobileNetV2Model(transformers.MobileNetV2Config(depth_multiplier=0.35)).eval()
    base.save_pretrained(tmp_path / "backbone")
    bundle = load_model(str(tmp_path / "backbone"))
    assert bundle.labels == () and bundle.model.classifier is None
    px = images(2, (64, 64))
    with torch.no_grad():
        ref = base(pixel_values=pixel_values(px, (0.5,) * 3, (0.5,) * 3)).pooler_output  # [B, 1280]
        assert (bundle.model.forward_features(torch.from_numpy(px)) - ref).abs().max().item() < TOL
    with pytest.raises(ModelError, match="features-only"):
        bundle.model.forward_head(ref)


def test_bf16(tmp_path):
    _, path = save_torchvision(tmp_path)
    px = torch.from_numpy(images(2, (48, 48)))
    bundle = load_model(str(path), dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    with torch.no_grad():
        out = bundle.model(px)
        ref = load_model(str(path)).model(px)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()  # bf16: ~3 significant digits per layer


# --- preprocessing parity ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf224(tmp_path_factory):
    """(HF model, its directory): google's 224 layout and processor, a head whose top-1 varies by image."""
    path = tmp_path_factory.mktemp("mnv2") / "mnv2-224"
    return make_hf(path, multiplier=0.35, head_hw=(224, 224)), path


def test_preprocessing_parity_with_the_checkpoints_own_processor(hf224):
    hf, path = hf224
    bundle = load_model(str(path))
    processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    assert type(processor).__name__ == "MobileNetV2ImageProcessorPil"

    top1: list[int] = []

    @torch.no_grad()
    def ours(data: bytes) -> torch.Tensor:
        px, _, _ = decode_image(data, bundle.contract)
        probs = bundle.model(torch.from_numpy(px)[None]).softmax(-1)[0]
        top1.append(int(probs.argmax()))
        return probs

    @torch.no_grad()
    def reference(img) -> torch.Tensor:
        return hf(**processor(images=img, return_tensors="pt")).logits.softmax(-1)[0]

    result = parity(ours, reference, varied_images())
    print(f"mobilenetv2 preprocessing parity (HF dir, 224, multiplier 0.35): {result}")
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02
    assert len(set(top1)) >= 5  # the classes depend on the image: agreement is not vacuous


# --- detection and errors -----------------------------------------------------------------------------------------


def test_detection_picks_exactly_this_family(tmp_path):
    make_hf(tmp_path / "hf")
    _, path = save_torchvision(tmp_path)
    for spec in (str(tmp_path / "hf"), str(path)):
        ck = Checkpoint(spec, spec)
        assert [f.name for f in families().values() if f.recognise(ck)] == ["mobilenetv2"]
        assert describe_model(spec).family == "mobilenetv2"


def _fake_file(path: Path, keys: list[str]) -> str:
    save_file({k: torch.zeros(1) for k in keys}, path)
    return str(path)


def test_other_families_checkpoints_are_not_claimed(tmp_path):
    for model_type in ("vit", "resnet", "dinov2", "siglip", "mobilenet_v1", "convnext"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    others = [str(tmp_path / t) for t in ("vit", "resnet", "dinov2", "siglip", "mobilenet_v1", "convnext")]
    others += [
        _fake_file(tmp_path / "timm_vit.safetensors", ["patch_embed.proj.weight", "pos_embed", "cls_token"]),
        _fake_file(tmp_path / "resnet50.safetensors", ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight",
                                                        "fc.weight"]),
        _fake_file(tmp_path / "resnet32.safetensors", ["conv1.weight", "layer1.0.conv1.weight", "linear.weight"]),
        _fake_file(tmp_path / "mnv3.safetensors", ["features.0.0.weight", "features.1.block.0.0.weight",
                                                    "classifier.0.weight"]),
        _fake_file(tmp_path / "effnet.safetensors", ["features.0.0.weight", "features.1.0.block.0.0.weight",
                                                      "classifier.1.weight"]),
    ]
    for spec in others:
        assert not FAMILY.recognise(Checkpoint(spec, spec)), spec


def test_clear_errors(tmp_path):
    make_hf(tmp_path / "hf")
    with pytest.raises(ModelError, match="pass its directory"):  # the weights of an HF dir, passed alone
        describe_model(str(tmp_path / "hf" / "model.safetensors"), family="mobilenetv2")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for name, edit, match in (
        ("seg", {"architectures": ["MobileNetV2ForSemanticSegmentation"]}, "MobileNetV2ForImageClassification"),
        ("dilated", {"output_stride": 16}, "output_stride"),
        ("wider", {"depth_multiplier": 0.5}, "expected mobilenetv2 weights matching"),  # config vs weights
    ):
        (tmp_path / name).mkdir()
        for f in ("model.safetensors", "preprocessor_config.json"):
            (tmp_path / name / f).write_bytes((tmp_path / "hf" / f).read_bytes())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ModelError, match=match):
            load_model(str(tmp_path / name))
    _, path = save_torchvision(tmp_path)
    sd = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("features.17.")}, tmp_path / "short.pth")
    with pytest.raises(ModelError, match="17 inverted residual blocks"):
        describe_model(str(tmp_path / "short.pth"))
    torch.save({**sd, "features.5.conv.9.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match="unknown key 'features.5.conv.9.weight'"):
        load_model(str(tmp_path / "extra.pth"))
    model = load_model(str(path)).model
    with pytest.raises(ValueError, match=r"pixels: expected \[B, H, W, 3\]"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# --- sidecar metadata, fsspec --------------------------------------------------------------------------------------


def test_torchvision_sidecar_json_and_memory_fs(tmp_path):
    import fsspec

    hf, path = save_torchvision(tmp_path, name="mnv2_ft.pth", labels=["cat", "dog", "emu"])
    sidecar = {"vitlabel_name": "pets", "label_names": ["cat", "dog", "emu"],
               "pretrained_cfg": {"input_size": [3, 160, 128], "interpolation": "bicubic", "crop_pct": 0.95,
                                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "mnv2_ft.json").write_text(json.dumps(sidecar))
    mem = fsspec.filesystem("memory")
    for f in (path, tmp_path / "mnv2_ft.json"):
        mem.pipe(f"/models/tv/{f.name}", f.read_bytes())
    local, remote = load_model(str(path)), load_model("memory://models/tv/mnv2_ft.pth")
    assert remote.digest == local.digest and set(dict(remote.info.files)) == {"(weights file)", "mnv2_ft.json"}
    assert remote.name == "pets" and remote.labels == ("cat", "dog", "emu")
    assert remote.contract == ImageContract(image_size=(160, 128), resize="shortest", crop_pct=0.95,
                                            interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)
    diff, _ = max_diff(remote.model, hf, images(2, (160, 128)), (0.5,) * 3, (0.25,) * 3)
    assert diff < TOL
    mem.pipe("/models/tv/mnv2_ft.json", json.dumps({**sidecar, "label_names": ["cat", "dog", "ostrich"]}).encode())
    assert describe_model("memory://models/tv/mnv2_ft.pth").digest != local.digest


# --- the pipeline against a plain loop --------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_top1_equals_plain_loop(ray_local, tmp_path, hf224):
    from pipeline.config import JobConfig
    from pipeline.plan import run
    from pipeline.sources import write_webdataset
    from pipeline.table import read_table

    _, model_dir = hf224
    corpus = varied_images()[:16]
    samples = [(f"img{i:02d}", {name.rsplit(".", 1)[1]: data}) for i, (name, data) in enumerate(corpus)]
    samples.append(("broken", {"jpg": b"not a jpeg"}))
    (tmp_path / "in").mkdir()
    write_webdataset(str(tmp_path / "in" / "shard-000.tar"), samples)
    run(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(model_dir),
                  progress=False, batch_size=8))
    rows = {r["key"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == len(samples)
    assert rows["broken"]["status"] == "error" and rows["broken"]["label"] is None
    bundle = load_model(str(model_dir))
    assert len({r["label"] for r in rows.values()}) >= 3
    with torch.no_grad():
        for key, members in samples[:-1]:
            px, _, _ = decode_image(next(iter(members.values())), bundle.contract)
            top1 = int(bundle.model(torch.from_numpy(px)[None]).argmax(-1))
            assert rows[key]["status"] == "ok" and rows[key]["label"] == bundle.labels[top1], key
