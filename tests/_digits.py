"""Real test images: the held-out scikit-learn digits (the bundled model's held-out split) as PNG bytes."""

from __future__ import annotations

import functools
import io


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def held_out_pngs() -> tuple[bytes, ...]:
    from jobs.train_digits import digits_split

    _, held = digits_split()
    return tuple(png_bytes(img) for img, _ in held)
