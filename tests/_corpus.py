"""A varied image corpus for preprocessing parity, and the parity measure every model family's test uses.

`varied_images()`: about 60 encoded images, 17 px to 1600 px, portrait and landscape, greyscale, CMYK, alpha,
palette, 16-bit, EXIF-rotated; smooth shapes and texture (not noise), so a resize one pixel off changes little.

`parity(ours, reference, images)`: our CPU uint8 path + our model against the checkpoint's own processor
(`AutoImageProcessor`) + the reference model, on the same images; returns top-1 agreement and the mean absolute
difference of the top-1 probability.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# (width, height) of the corpus images: tiny, small, ImageNet-like, large; square, landscape, portrait.
SIZES = [(17, 17), (23, 40), (40, 23), (64, 64), (97, 61), (61, 97), (128, 128), (224, 224), (256, 192),
         (192, 256), (300, 200), (200, 300), (333, 500), (500, 333), (640, 480), (480, 640), (800, 600),
         (1024, 768), (768, 1024), (1600, 1200), (1200, 1600), (1600, 900), (31, 250), (250, 31)]


def _scene(w: int, h: int, seed: int) -> Image.Image:
    """A smooth scene: a gradient background, a few filled shapes, mild texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (xx / max(w - 1, 1) * rng.uniform(0.2, 1) + yy / max(h - 1, 1) * rng.uniform(0.2, 1)) / 2
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]  # [H, W, 3] float
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.1, 0.4) * min(w, h) + 1
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.integers(0, 256, 3)
    img += (np.sin(xx / rng.uniform(3, 12)) * np.cos(yy / rng.uniform(3, 12)) * 12)[..., None]  # texture
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.lru_cache(maxsize=2)
def varied_images(n: int = 60) -> tuple[tuple[str, bytes], ...]:
    """[(name, encoded bytes)]: JPEG/PNG/WebP, RGB, greyscale, CMYK, RGBA, palette, 16-bit grey, EXIF-rotated."""
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = _scene(w, h, seed=i)
        kind = i % 8
        if kind == 0:
            out.append((f"{i:02d}-rgb-{w}x{h}.jpg", _encode(img, "JPEG", quality=92)))
        elif kind == 1:
            out.append((f"{i:02d}-rgb-{w}x{h}.png", _encode(img, "PNG")))
        elif kind == 2:
            out.append((f"{i:02d}-grey-{w}x{h}.jpg", _encode(img.convert("L"), "JPEG", quality=92)))
        elif kind == 3:
            out.append((f"{i:02d}-cmyk-{w}x{h}.jpg", _encode(img.convert("CMYK"), "JPEG", quality=92)))
        elif kind == 4:  # alpha: opaque shapes on a half-transparent white-backed field (same result either way)
            rgba = img.convert("RGBA")
            alpha = np.full((h, w), 255, np.uint8)
            alpha[: h // 3] = 128
            arr = np.asarray(rgba).copy()
            arr[: h // 3, :, :3] = 255  # transparent part is white under the alpha too
            arr[..., 3] = alpha
            out.append((f"{i:02d}-rgba-{w}x{h}.png", _encode(Image.fromarray(arr, "RGBA"), "PNG")))
        elif kind == 5:
            out.append((f"{i:02d}-palette-{w}x{h}.png", _encode(img.convert("P", palette=Image.Palette.ADAPTIVE),
                                                                 "PNG")))
        elif kind == 6:  # EXIF orientation 6 (rotate 90 CW to display): stored sideways
            exif = Image.Exif()
            exif[0x0112] = 6
            stored = img.transpose(Image.Transpose.ROTATE_90)
            out.append((f"{i:02d}-exif6-{w}x{h}.jpg", _encode(stored, "JPEG", quality=92, exif=exif.tobytes())))
        else:
            out.append((f"{i:02d}-rgb-{w}x{h}.webp", _encode(img, "WEBP", quality=90)))
    return tuple(out)


def reference_rgb(data: bytes) -> Image.Image:
    """What a user's own loop hands the HF processor: EXIF-transposed RGB (alpha on white, as ours)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class Parity:
    n: int
    top1_agreement: float
    mean_abs_top1_prob: float

    def __str__(self) -> str:
        return f"top-1 agreement {self.top1_agreement:.3f} over {self.n}, mean |dp| {self.mean_abs_top1_prob:.4f}"


def parity(ours: Callable[[bytes], torch.Tensor], reference: Callable[[Image.Image], torch.Tensor],
           images: tuple[tuple[str, bytes], ...]) -> Parity:
    """ours(bytes) and reference(PIL RGB image) each return probabilities [C] for one image."""
    agree, diffs = 0, []
    for _name, data in images:
        p = ours(data).double()
        q = reference(reference_rgb(data)).double()
        agree += int(p.argmax() == q.argmax())
        diffs.append(abs(p.max().item() - q.max().item()))
    return Parity(len(images), agree / len(images), float(np.mean(diffs)))
