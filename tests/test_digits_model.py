"""The bundled demo model: loads as builtin:digits and is accurate on the held-out digits through the serving path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from jobs.train_digits import digits_split
from pipeline.models import describe_model, load_model
from pipeline.preprocess import decode_image


@pytest.fixture(scope="module")
def held_out():
    _, held = digits_split()
    return held


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_split_is_fixed_and_disjoint_in_size(held_out):
    train, held = digits_split()
    assert (len(train), len(held)) == (1347, 450)
    assert [y for _, y in held] == [y for _, y in held_out]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(held, held_out, strict=True))
    assert held[0][0].size == (32, 32)


def test_builtin_digits_metadata():
    info = describe_model("builtin:digits")
    assert info.name == "digits-vit"
    assert info.labels == tuple(str(i) for i in range(10))
    assert info.digest.startswith("sha256:") and len(info.digest) == 7 + 64
    assert info.contract.image_size == (32, 32) and info.contract.patch_size == 8


def test_builtin_digits_accuracy_through_decode_image(held_out):
    bundle = load_model("builtin:digits")
    assert bundle.digest == describe_model("builtin:digits").digest
    tokens = np.stack([decode_image(png(img), bundle.contract)[0] for img, _ in held_out])  # [M, N, P*P*3] uint8
    labels = [str(y) for _, y in held_out]
    with torch.no_grad():
        pred = bundle.model(torch.from_numpy(tokens)).argmax(-1).tolist()
    accuracy = np.mean([bundle.labels[p] == y for p, y in zip(pred, labels, strict=True)])
    assert accuracy >= 0.95, accuracy


def test_builtin_digits_loads_in_transformers(held_out):
    transformers = pytest.importorskip("transformers")
    from importlib import resources

    path = resources.files("pipeline").joinpath("assets", "digits-vit")
    hf = transformers.ViTForImageClassification.from_pretrained(str(path)).eval()
    bundle = load_model("builtin:digits")
    img = held_out[:16]
    tokens = torch.from_numpy(np.stack([decode_image(png(x), bundle.contract)[0] for x, _ in img]))
    pixels = torch.from_numpy(np.stack([np.asarray(x.convert("RGB")) for x, _ in img])).float()  # [B, H, W, 3]
    pixel_values = ((pixels / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)  # [B, 3, H, W]
    with torch.no_grad():
        diff = hf(pixel_values=pixel_values).logits - bundle.model(tokens)
    assert diff.abs().max().item() < 1e-4
