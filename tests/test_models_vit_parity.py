"""ViT family: preprocessing parity with the checkpoint's own processor (AutoImageProcessor, PIL backend).

Ours: `decode_image` (uint8 patch tokens from the contract that `hf_contract` reads) + our ViT; reference: the
processor of the same directory + transformers' ViTForImageClassification. Two layouts: a ViTImageProcessor
squash to a small size, and the DeiT one (facebook/deit-*-patch16-224: a ViT checkpoint whose DeiTImageProcessor
squashes to 256 x 256, then centre-crops 224).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _corpus import parity, varied_images

from pipeline.config import ImageContract
from pipeline.models import load_model
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from pipeline.preprocess import decode_image

transformers = pytest.importorskip("transformers")

SQUASH = {  # a ViTImageProcessor at 48 x 48, bicubic, ImageNet mean/std
    "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 48, "width": 48},
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
}
DEIT = {  # facebook/deit-base-patch16-224's preprocessor_config.json
    "image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 256, "width": 256},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_vit(path: Path, image_size: int, patch: int, processor: dict, n_classes: int = 10, seed: int = 0):
    """A tiny seeded ViTForImageClassification (hidden 64, 2 layers) with `processor`, saved to `path`.

    The classifier is standardised on the cls features of smooth images (logits of std ~4): a random head alone
    tends to give every image the same class, which would make top-1 agreement vacuous.
    """
    torch.manual_seed(seed)
    labels = [f"c{i}" for i in range(n_classes)]
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=image_size, patch_size=patch, initializer_range=0.1,
                                 id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        rng = torch.Generator().manual_seed(seed + 1)
        low = torch.rand(16, 3, image_size // 8, image_size // 8, generator=rng)  # smooth calibration images
        x = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear")  # [16, 3, H, W]
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        feats = model.vit(pixel_values=(x - mean) / std).last_hidden_state[:, 0]  # [16, D], final-normed cls
        mu, sd = feats.mean(0), feats.std(0)
        w = torch.randn(n_classes, feats.shape[1]) * 4.0 / (sd.clamp_min(sd.median()) * feats.shape[1] ** 0.5)
        model.classifier.weight.copy_(w)  # [C, D]
        model.classifier.bias.copy_(-w @ mu)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


@pytest.mark.parametrize("layout", ["squash", "deit"])
def test_preprocessing_parity_with_the_checkpoints_own_processor(tmp_path, layout):
    size, patch, processor = (48, 8, SQUASH) if layout == "squash" else (224, 16, DEIT)
    hf = make_vit(tmp_path / layout, size, patch, processor)
    bundle = load_model(str(tmp_path / layout))
    crop_pct = 1.0 if layout == "squash" else 224 / 256
    assert bundle.contract == ImageContract(image_size=(size, size), patch_size=patch, resize="squash",
                                            crop_pct=crop_pct, interpolation="bicubic", mean=IMAGENET_MEAN,
                                            std=IMAGENET_STD)
    reference_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / layout, backend="pil")
    assert type(reference_processor).__name__ == f"{processor['image_processor_type']}Pil"
    top1: list[int] = []

    @torch.no_grad()
    def ours(data: bytes) -> torch.Tensor:
        tokens, _, _ = decode_image(data, bundle.contract)  # [N, P*P*3] uint8
        probs = bundle.model(torch.from_numpy(tokens)[None]).softmax(-1)[0]
        top1.append(int(probs.argmax()))
        return probs

    @torch.no_grad()
    def reference(img) -> torch.Tensor:
        return hf(**reference_processor(images=img, return_tensors="pt")).logits.softmax(-1)[0]

    result = parity(ours, reference, varied_images())
    print(f"vit preprocessing parity ({layout}, {size} px, patch {patch}): {result}")
    assert result.top1_agreement >= 0.98 and result.mean_abs_top1_prob <= 0.02
    assert len(set(top1)) >= 5  # the class depends on the image: agreement is not vacuous
