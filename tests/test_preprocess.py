"""Preprocessing: decode, orientation, modes, the contract's resize, and the one patch layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageContract
from pipeline.preprocess import ImageError, decode_image, load_pixels, patchify, preprocess_batch
from pipeline.schema import INPUTS, MARKER_STATUS, image_row, marker_row, read_batch

C = ImageContract(image_size=(32, 32), patch_size=8, interpolation="bilinear")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def quadrants(w: int = 64, h: int = 48) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation is visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(a)


def test_patchify_layout_is_row_major_patches_of_row_col_channel():
    pixels = np.arange(16 * 24 * 3, dtype=np.int64).reshape(16, 24, 3)
    tokens = patchify(pixels, 8)
    assert tokens.shape == (2 * 3, 8 * 8 * 3)
    # patch (row 1, col 2) is token 1*3+2; its first value is pixel (8, 16) channel 0, then channel 1
    assert tokens[5, 0] == pixels[8, 16, 0] and tokens[5, 1] == pixels[8, 16, 1]
    assert tokens[5, 3] == pixels[8, 17, 0]  # next column in the same patch row
    assert tokens[5, 8 * 3] == pixels[9, 16, 0]  # next patch row
    np.testing.assert_array_equal(tokens[5].reshape(8, 8, 3), pixels[8:16, 16:24])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    base = quadrants()
    # Store the image so that applying `orientation` gives `base` back as displayed.
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    stored = base if inverse[orientation] is None else base.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    pixels, w, h = load_pixels(data, C)
    assert (w, h) == base.size
    expected = np.asarray(base.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    img = quadrants().convert("RGBA" if mode in ("LA", "RGBA") else "RGB")
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr.astype(np.uint16))
        assert img.mode.startswith("I;16")
    else:
        img = img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    tokens, w, h = decode_image(encode(img, fmt), C)
    assert tokens.shape == (16, 192) and tokens.dtype == np.uint8
    assert (w, h) == (64, 48)
    if mode == "I;16":  # 16-bit scaled down, not clipped to white
        assert 0 < tokens.mean() < 250


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    tokens, _, _ = decode_image(encode(img, "PNG"), C)
    assert tokens.min() == 255


def test_jpeg_draft_keeps_result_close_to_full_decode():
    rng = np.random.default_rng(0)
    big = Image.fromarray(np.kron(rng.integers(0, 255, (48, 64, 3)), np.ones((16, 16, 1))).astype(np.uint8))
    data = encode(big, "JPEG", quality=95)
    drafted, w, h = load_pixels(data, C)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert (w, h) == (1024, 768)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 4


def test_shortest_side_resize_then_center_crop():
    c = ImageContract(image_size=(32, 32), patch_size=8, resize="shortest", crop_pct=1.0, interpolation="nearest")
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, 32:64] = 200  # the middle third survives the center crop
    pixels, _, _ = load_pixels(encode(Image.fromarray(img), "PNG"), c)
    assert pixels.shape == (32, 32, 3) and pixels.min() == 200


@pytest.mark.parametrize("data,code", [(b"", "empty"), (b"GIF89a-not-really", "decode_error"),
                                       (b"hello world, no image here", "not_an_image")])
def test_bad_bytes_raise_image_error_with_code(data, code):
    with pytest.raises(ImageError) as e:
        decode_image(data, C)
    assert e.value.code in (code, "not_an_image", "decode_error")
    assert str(e.value).startswith(e.value.code + ": ")


def test_decompression_bomb_limit():
    data = encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(data, C, max_pixels=1_000_000)
    assert e.value.code == "too_large"
    decode_image(data, C, max_pixels=4_000_000)  # same image under a higher limit is fine


def test_truncated_jpeg_is_an_error_row_not_a_crash():
    noise = np.random.default_rng(1).integers(0, 255, (192, 256, 3), dtype=np.uint8)
    good = encode(Image.fromarray(noise), "JPEG")
    src = "file:///s.tar"
    batch = read_batch([image_row("a", src, "a", good, None), image_row("b", src, "b", good[: len(good) // 2], None),
                        image_row("c", src, "c", good, "no_image: x"), marker_row(src, "webdataset", 3, None)])
    out = preprocess_batch(batch, C)
    assert list(out["status"]) == ["ok", "error", "error", MARKER_STATUS]
    assert out["error"][1].startswith("decode_error") and out["error"][2] == "no_image: x"
    assert "bytes" not in out and out[INPUTS].shape == (4, 16, 192)
    assert list(out["shard_images"]) == [-1, -1, -1, 3] and list(out["shard_format"]) == [None] * 3 + ["webdataset"]
    assert out["width"][0] == 256 and out["width"][1] == -1
