"""The ViT family (pipeline.models.vit) against the references: transformers' ViT and the conv patch embedding.

A tiny seeded HF ViTForImageClassification is the oracle: it gets normalised NCHW pixels, our ViT gets
the same images as uint8 patch tokens, and the logits must agree in fp32.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.config import ImageContract
from pipeline.models import ModelError, describe_model, load_model
from pipeline.models.layers import conv_to_linear, fold_normalization, unfold_normalization
from pipeline.models.vit import ViT, ViTConfig
from pipeline.models.vit_ckpt import save_checkpoint
from pipeline.preprocess import patchify

transformers = pytest.importorskip("transformers")

MEAN = (0.485, 0.456, 0.406)  # non-default on purpose: HF's own default is 0.5
STD = (0.229, 0.224, 0.225)
LABELS = ("cat", "dog", "bird", "fish", "frog")
TOL = 1e-4


def make_hf(tmp: Path, image_size: tuple[int, int], patch: int, *, seed: int = 0, bin_file: bool = False,
            qkv_bias: bool = True):
    """Random seeded HF ViT with non-identity layernorms and non-zero biases, saved to `tmp`."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
        image_size=list(image_size) if image_size[0] != image_size[1] else image_size[0], patch_size=patch,
        initializer_range=0.1, qkv_bias=qkv_bias, layer_norm_eps=1e-12,
        id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)},
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)  # weights away from 1, biases away from 0
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp)
    if bin_file:  # the older pytorch_model.bin layout, with the on-disk (4.x) key names
        sd = load_file(tmp / "model.safetensors")
        (tmp / "model.safetensors").unlink()
        torch.save(sd, tmp / "pytorch_model.bin")
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": image_size[0], "width": image_size[1]}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
    }))
    return model


def images(n: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    h, w = image_size
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)  # [B, H, W, 3]


def tokens_of(px: np.ndarray, patch: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([patchify(x, patch) for x in px]))  # [B, N, P*P*3] uint8


def pixel_values(px: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    x = (torch.from_numpy(px).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).float()  # [B, 3, H, W]


@torch.no_grad()
def hf_logits(model, px: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    return model(pixel_values=pixel_values(px, mean, std)).logits  # [B, C]


def hf_to_timm_by_hand(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent of pipeline.models: transformers' on-disk names -> timm's vision_transformer names."""
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"],
    }
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vit\.encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        h = f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{kind}"] = sd[h + f"layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[h + f"layernorm_after.{kind}"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[h + f"attention.attention.{x}.{kind}"] for x in ("query", "key", "value")])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[h + f"attention.output.dense.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[h + f"intermediate.dense.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[h + f"output.dense.{kind}"]
    return out


@pytest.mark.parametrize("image_size,patch", [((32, 32), 8), ((48, 32), 8), ((32, 48), 4)])
@pytest.mark.parametrize("bin_file", [False, True])
def test_hf_checkpoint_logits_match_transformers(tmp_path, image_size, patch, bin_file):
    hf = make_hf(tmp_path / "tiny-vit", image_size, patch, bin_file=bin_file)
    bundle = load_model(str(tmp_path / "tiny-vit"))
    assert bundle.labels == LABELS
    assert bundle.name == "tiny-vit"
    assert bundle.contract == ImageContract(image_size=image_size, patch_size=patch, resize="squash",
                                            interpolation="bicubic", mean=MEAN, std=STD)
    px = images(6, image_size)
    ref = hf_logits(hf, px)
    with torch.no_grad():
        ours = bundle.model(tokens_of(px, patch))  # uint8 in: the model casts
        ours_float = bundle.model(tokens_of(px, patch).float())
    assert ref.abs().max() > 0.5  # logits are not trivially small
    assert (ours - ref).abs().max().item() < TOL
    assert torch.equal(ours, ours_float)
    feats = bundle.model.forward_features(tokens_of(px, patch))
    assert feats.shape == (6, 192)


def test_hf_without_qkv_bias_and_without_preprocessor(tmp_path):
    hf = make_hf(tmp_path / "ck", (32, 32), 8, qkv_bias=False)
    (tmp_path / "ck" / "preprocessor_config.json").unlink()  # HF defaults: squash, bilinear, mean = std = 0.5
    bundle = load_model(str(tmp_path / "ck"))
    assert bundle.contract.mean == (0.5, 0.5, 0.5) and bundle.contract.std == (0.5, 0.5, 0.5)
    assert bundle.contract.interpolation == "bilinear" and not bundle.model.cfg.qkv_bias
    px = images(3, (32, 32))
    with torch.no_grad():
        diff = bundle.model(tokens_of(px, 8)) - hf_logits(hf, px, (0.5,) * 3, (0.5,) * 3)
    assert diff.abs().max().item() < TOL


def test_transformers_5_module_names_load_too(tmp_path):
    hf = make_hf(tmp_path / "ck", (32, 32), 8)
    (tmp_path / "ck" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "ck" / "pytorch_model.bin")  # vit.layers.N.attention.q_proj...
    px = images(2, (32, 32))
    with torch.no_grad():
        diff = load_model(str(tmp_path / "ck")).model(tokens_of(px, 8)) - hf_logits(hf, px)
    assert diff.abs().max().item() < TOL


def test_patching_plus_linear_projection_equals_reference_conv(tmp_path):
    # (1) the functions: folded linear on raw uint8 patches == conv2d(kernel=stride=P) on normalised pixels.
    torch.manual_seed(1)
    d, p, (h, w) = 64, 8, (48, 32)
    conv_w, conv_b = torch.randn(d, 3, p, p), torch.randn(d)
    px = images(2, (h, w), seed=3)
    ref = F.conv2d(pixel_values(px), conv_w, conv_b, stride=p).flatten(2).transpose(1, 2)  # [B, N, D]
    lin_w, lin_b = fold_normalization(conv_to_linear(conv_w), conv_b, MEAN, STD)
    ours = tokens_of(px, p).float() @ lin_w.T + lin_b  # [B, N, D]
    assert (ours - ref).abs().max().item() < TOL
    back_w, back_b = unfold_normalization(lin_w, lin_b, MEAN, STD)
    assert torch.allclose(back_w, conv_to_linear(conv_w), atol=1e-5) and torch.allclose(back_b, conv_b, atol=1e-4)
    # (2) a loaded model's patch_embed == the HF model's own patch conv.
    hf = make_hf(tmp_path / "ck", (h, w), p)
    model = load_model(str(tmp_path / "ck")).model
    with torch.no_grad():
        ref = hf.vit.embeddings.patch_embeddings(pixel_values(px))  # [B, N, D]
        ours = model.patch_embed(tokens_of(px, p).float())  # [B, N, D]
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("image_size", [(32, 32), (48, 32)])
def test_timm_state_dict_with_sidecar_json(tmp_path, image_size):
    hf = make_hf(tmp_path / "hf", image_size, 8)
    sd = hf_to_timm_by_hand(load_file(tmp_path / "hf" / "model.safetensors"))
    save_file(sd, tmp_path / "vit_tiny_test.safetensors")
    (tmp_path / "vit_tiny_test.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8", "num_classes": 5, "label_names": list(LABELS),
        "model_args": {"num_heads": 3},
        "pretrained_cfg": {"input_size": [3, *image_size], "interpolation": "bilinear", "crop_pct": 0.875,
                           "mean": MEAN, "std": STD},
    }))
    spec = str(tmp_path / "vit_tiny_test.safetensors")
    bundle = load_model(spec)
    assert bundle.labels == LABELS and bundle.name == "vit_tiny_test"
    assert bundle.model.cfg == ViTConfig(image_size=image_size, patch_size=8, dim=192, depth=2, heads=3,
                                         mlp_dim=384, num_classes=5, eps=1e-6, qkv_bias=True)
    assert bundle.contract == ImageContract(image_size=image_size, patch_size=8, resize="shortest", crop_pct=0.875,
                                            interpolation="bilinear", mean=MEAN, std=STD)
    # timm's LayerNorm eps is 1e-6, HF's 1e-12: identical within tolerance for these activations.
    px = images(4, image_size)
    with torch.no_grad():
        diff = bundle.model(tokens_of(px, 8)) - hf_logits(hf, px)
    assert diff.abs().max().item() < TOL
    assert describe_model(spec).arch == bundle.model.cfg


def test_timm_pth_without_metadata_uses_defaults(tmp_path):
    hf = make_hf(tmp_path / "hf", (32, 32), 8)
    sd = hf_to_timm_by_hand(load_file(tmp_path / "hf" / "model.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ft.pth")  # a training ckpt
    bundle = load_model(str(tmp_path / "ft.pth"))
    assert bundle.labels == tuple(f"class_{i}" for i in range(5))
    assert bundle.model.cfg.heads == 3  # timm's width table (192 -> 3 heads)
    c = bundle.contract
    assert (c.resize, c.crop_pct, c.interpolation, c.mean, c.std) == ("shortest", 0.9, "bicubic", MEAN, STD)
    px = images(2, (32, 32))
    with torch.no_grad():
        diff = bundle.model(tokens_of(px, 8)) - hf_logits(hf, px)
    assert diff.abs().max().item() < TOL


def test_save_checkpoint_round_trips_through_transformers(tmp_path):
    hf = make_hf(tmp_path / "hf", (48, 32), 8)
    bundle = load_model(str(tmp_path / "hf"))
    digest = save_checkpoint(bundle.model, bundle.contract, bundle.labels, str(tmp_path / "ours"), name="round trip!")
    reloaded_hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "ours").eval()
    assert reloaded_hf.config.id2label == dict(enumerate(LABELS))
    px = images(4, (48, 32))
    ref = hf_logits(hf, px)
    assert (hf_logits(reloaded_hf, px) - ref).abs().max().item() < TOL
    again = load_model(str(tmp_path / "ours"))
    assert again.name == "round-trip" and again.digest == digest
    assert again.contract == bundle.contract and again.labels == LABELS
    with torch.no_grad():
        assert (again.model(tokens_of(px, 8)) - ref).abs().max().item() < TOL


def test_save_checkpoint_keeps_a_timm_contract_exact(tmp_path):
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(32, 32), patch_size=4, dim=64, depth=1, heads=2, mlp_dim=128, num_classes=3))
    contract = ImageContract(image_size=(32, 32), patch_size=4, resize="shortest", crop_pct=0.9,
                             interpolation="bicubic", mean=MEAN, std=STD)
    save_checkpoint(model, contract, ["a", "b", "c"], str(tmp_path / "ck"), "x")
    again = load_model(str(tmp_path / "ck"))
    assert again.contract == contract and again.model.cfg == model.cfg
    tok = tokens_of(images(2, (32, 32)), 4)
    with torch.no_grad():
        assert (again.model(tok) - model.eval()(tok)).abs().max().item() < TOL


def test_digest_covers_every_file_that_decides_a_prediction(tmp_path):
    make_hf(tmp_path / "a", (32, 32), 8, seed=0)
    make_hf(tmp_path / "b", (32, 32), 8, seed=0)
    make_hf(tmp_path / "c", (32, 32), 8, seed=1)
    a = describe_model(str(tmp_path / "a"))
    files = dict(a.files)
    assert set(files) == {"config.json", "preprocessor_config.json", "model.safetensors"}
    raw = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert a.digest == load_model(str(tmp_path / "a")).digest == describe_model(str(tmp_path / "b")).digest
    assert describe_model(str(tmp_path / "c")).digest != a.digest
    sd = load_file(tmp_path / "a" / "model.safetensors")
    sd["classifier.bias"] = sd["classifier.bias"] + 1e-3
    save_file(sd, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    assert describe_model(str(tmp_path / "a")).digest != a.digest
    # Labels (config.json) and preprocessing (preprocessor_config.json) are part of the version too.
    for name, edit in (("config.json", lambda c: {**c, "id2label": {**c["id2label"], "0": "lion"}}),
                       ("preprocessor_config.json", lambda c: {**c, "resample": 2})):
        path = tmp_path / "b" / name
        before = describe_model(str(tmp_path / "b")).digest
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        assert describe_model(str(tmp_path / "b")).digest != before, name


def test_fsspec_urls(tmp_path):
    import fsspec

    make_hf(tmp_path / "ck", (32, 32), 8)
    mem = fsspec.filesystem("memory")
    for f in (tmp_path / "ck").iterdir():
        mem.pipe(f"/models/tiny/{f.name}", f.read_bytes())
    local = load_model(str(tmp_path / "ck"))
    remote = load_model("memory://models/tiny")
    assert remote.digest == local.digest and remote.name == "tiny" and remote.contract == local.contract
    save_checkpoint(remote.model, remote.contract, remote.labels, "memory://models/copy", "copy")
    assert describe_model("memory://models/copy").labels == LABELS


def test_s3_checkpoint(tmp_path, s3):
    make_hf(tmp_path / "ck", (32, 32), 8)
    for f in (tmp_path / "ck").iterdir():
        s3.put_object(Bucket="test-bucket", Key=f"models/tiny-vit/{f.name}", Body=f.read_bytes())
    bundle = load_model("s3://test-bucket/models/tiny-vit")
    assert bundle.name == "tiny-vit" and bundle.labels == LABELS
    assert bundle.digest == load_model(str(tmp_path / "ck")).digest


def test_dtype_and_device(tmp_path):
    make_hf(tmp_path / "ck", (32, 32), 8)
    bundle = load_model(str(tmp_path / "ck"), dtype=torch.bfloat16)
    assert bundle.model.patch_embed.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in bundle.model.parameters())
    out = bundle.model(tokens_of(images(2, (32, 32)), 8))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5)


def test_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="expected a checkpoint directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        describe_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="builtin:digits"):
        load_model("builtin:nothing")
    make_hf(tmp_path / "ck", (32, 32), 8)
    with pytest.raises(ModelError, match="pass its directory"):
        load_model(str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="safetensors"):
        describe_model(str(tmp_path / "bad.safetensors"))
    model = load_model(str(tmp_path / "ck")).model
    with pytest.raises(ValueError, match=r"tokens: expected \[B, 16, 192\]"):
        model(torch.zeros(1, 4, 192, dtype=torch.uint8))
