"""CPU preprocessing: image bytes -> the model's uint8 input, following the model's contract.

Runs in Ray CPU tasks (the plan wires it); this module never imports ray. Work per image:
decode (JPEG draft mode when downscaling), EXIF orientation, any mode -> RGB, resize/crop and
interpolation from the `ImageContract`, then the layout the contract names: patch tokens [N, P*P*3]
for the patch-based families (ViT, DINOv2, SigLIP), pixels [H, W, 3] for the CNNs. Inputs stay uint8
so they cross the object store at a quarter of float32's size; normalisation happens on the device
(folded into the patch projection where that is exact, a first step of the forward pass otherwise).

A bad image never raises out of `preprocess_batch`: it becomes a row with status "error" and an
error "<code>: <message>". Codes (stable, for grouping): empty, not_an_image, unsupported_format,
too_large, decode_error.

Hardening: only the decoders of the formats in `DECODED_FORMATS` ever run (Pillow identifies any format
from its header, but e.g. EPS would start Ghostscript), and the pixel limit (the decompression-bomb guard,
`max_pixels`, default `config.DEFAULT_MAX_IMAGE_PIXELS`) is checked from the header, before any decoding.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS, ImageContract
from pipeline.schema import MARKER_STATUS, input_batch, marker_flags, strings

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_MAX_ERROR_CHARS = 300
# Formats whose decoders may run (config.IMAGE_EXTENSIONS; MPO is what phones write as .jpg; DIB is BMP's body).
DECODED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "PPM"})

# Our own pixel limit (checked right after the header is read) is the bomb guard; Pillow's global
# one would warn on every large image and its error threshold is 2x ours, so silence the warning.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageError(Exception):
    """An image that cannot become tokens; `code` is short and stable, for grouping error rows."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [N, P*P*3]: row-major patches, each flattened in (row, col, channel) order."""
    h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(gh, patch, gw, patch, c)  # [gh, P, gw, P, C]
    x = x.transpose(0, 2, 1, 3, 4)  # [gh, gw, P, P, C]
    return np.ascontiguousarray(x.reshape(gh * gw, patch * patch * c))  # [N, P*P*C]


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if hasattr(img, "getexif") else 1
    return (h, w) if orientation in _ROTATED else (w, h)


def _resize_plan(w: int, h: int, contract: ImageContract) -> tuple[int, int]:
    """Size (w, h) the image is resized to before any crop, in display orientation."""
    th, tw = contract.image_size
    if contract.resize == "squash":  # HF: resize to size exactly; DeiT then centre-crops (crop_pct < 1)
        return math.floor(tw / contract.crop_pct), math.floor(th / contract.crop_pct)
    short = math.floor(min(th, tw) / contract.crop_pct)  # timm: scale_size = floor(size / crop_pct)
    if w <= h:
        return short, max(short, round(h * short / w))
    return max(short, round(w * short / h)), short


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float grey: scale to 8 bits by the format's range instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        # Transparent pixels carry arbitrary colour; composite on white like a viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_pixels(data: bytes, contract: ImageContract, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                ) -> tuple[np.ndarray, int, int]:
    """Decode, orient, convert and resize: returns (pixels [H, W, 3] uint8, width, height).

    width/height are the source image's size as displayed (after EXIF orientation).
    """
    if data is None or len(data) == 0:
        raise ImageError("empty", "zero bytes")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        # Pillow's own guard (it raises at 2x this, inside open) must not refuse what the configured limit
        # allows; it is only ever raised here, never lowered: our own check below enforces lower limits.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.format not in DECODED_FORMATS:
            raise ImageError("unsupported_format", f"{img.format} images are not decoded "
                                                   f"(expected one of {sorted(DECODED_FORMATS)})")
        w0, h0 = img.size
        if w0 * h0 > max_pixels:
            raise ImageError("too_large", f"{w0}x{h0} pixels exceeds the limit of {max_pixels}")
        if w0 < 1 or h0 < 1:
            raise ImageError("decode_error", f"invalid size {w0}x{h0}")
        ow, oh = _oriented_size(img)
        rw, rh = _resize_plan(ow, oh, contract)
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= the resize target:
            # most of the decode time on large photos, at no visible cost after the resize.
            want = (rh, rw) if (ow, oh) != (w0, h0) else (rw, rh)
            img.draft("RGB", want)
        img = ImageOps.exif_transpose(img)  # loads pixel data; also drops the orientation tag
        img = _to_rgb(img)
        resample = _RESAMPLE[contract.interpolation]
        if img.size != (rw, rh):
            img = img.resize((rw, rh), resample)
        th, tw = contract.image_size
        if (rw, rh) != (tw, th):  # center crop (shortest-side mode)
            left, top = (rw - tw) // 2, (rh - th) // 2
            img = img.crop((left, top, left + tw, top + th))
        pixels = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"exceeds the limit of {max_pixels} pixels: {e}"[:_MAX_ERROR_CHARS]) from e
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", "cannot identify image format") from e
    except MemoryError as e:
        raise ImageError("too_large", "out of memory while decoding") from e
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ... on bad data
        raise ImageError("decode_error", f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]) from e
    assert pixels.shape == (th, tw, 3), pixels.shape
    return pixels, ow, oh


def decode_image(data: bytes, contract: ImageContract, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> tuple[np.ndarray, int, int]:
    """Image bytes -> (input uint8 of `contract.input_shape`, width, height). Raises ImageError.

    The input is patch tokens [N, P*P*3] for a patch contract, the pixels [H, W, 3] themselves otherwise.
    """
    pixels, w, h = load_pixels(data, contract, max_pixels)
    return (patchify(pixels, contract.patch_size) if contract.patch_size else pixels), w, h


def preprocess_batch(batch: dict[str, Any], contract: ImageContract,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, np.ndarray]:
    """A batch of read rows (`schema.READ_COLUMNS`) -> its input rows (`schema.input_batch`).

    Marker rows (`schema.marker_flags`) and rows with a read error already are passed through without decoding.
    """
    data = batch["bytes"]
    n = len(data)
    inputs = np.zeros((n, *contract.input_shape), dtype=np.uint8)  # [B, N, P*P*3] or [B, H, W, 3]
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    status = np.empty(n, dtype=object)
    error = np.array([e or None for e in strings(batch["error"])], dtype=object)
    marker = marker_flags(batch)
    for i in range(n):
        if marker[i]:
            status[i] = MARKER_STATUS
            continue
        if error[i]:
            status[i] = "error"
            continue
        try:
            inputs[i], width[i], height[i] = decode_image(data[i], contract, max_pixels)
            status[i] = "ok"
        except ImageError as e:
            status[i], error[i] = "error", str(e)
    return input_batch(batch, inputs=inputs, width=width, height=height, status=status, error=error)
