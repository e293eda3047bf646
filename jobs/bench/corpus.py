"""The corpus: natural photographs at ImageNet-like sizes, as WebDataset shards, JPEG files and example folders.

Crops, scales, flips and mild sensor noise of scikit-learn's two sample photographs, at ImageNet-like sizes
(long side 500 px for most, 300-1024 px for the rest), JPEG quality 75-95. A pool of distinct photos is
generated once per workdir; bigger corpora cycle through the pool under new keys. Shards of the same images
are hard links to shared chunk files, so sets of many sizes cost little disk.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CORPUS_VERSION = 1


def make_photo(rng: random.Random, sources: list[Any]) -> bytes:
    """One natural photograph at an ImageNet-like size: crop, scale, flip, mild noise, JPEG q75-95."""
    from PIL import Image

    src = rng.choice(sources)
    if rng.random() < 0.5:
        src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    long_side = 500 if rng.random() < 0.6 else rng.randint(300, 1024)  # ImageNet: most are 500 x 333..375
    aspect = rng.choice((4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9))
    w, h = (long_side, round(long_side / aspect))
    if rng.random() < 0.25:  # portrait
        w, h = h, w
    sw, sh = src.size
    cw = min(sw, round(sh * w / h))  # the largest crop of the source with the target aspect
    ch = round(cw * h / w)
    scale = rng.uniform(0.35, 1.0)
    cw, ch = max(16, round(cw * scale)), max(16, round(ch * scale))
    x0, y0 = rng.randint(0, sw - cw), rng.randint(0, sh - ch)
    img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    sigma = rng.uniform(0.0, 4.0)  # sensor-like grain: up-scaled crops are otherwise unnaturally smooth
    if sigma > 0.5:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, sigma, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(75, 95))
    return buf.getvalue()


@dataclass
class Corpus:
    root: Path
    pool: list[Path]
    shard_images: int
    stats: dict[str, Any] = field(default_factory=dict)

    def image(self, i: int) -> Path:
        return self.pool[i % len(self.pool)]

    def shards(self, n: int, per_shard: int | None = None) -> Path:
        """A directory of WebDataset shards of `per_shard` (default: the corpus's) images 0..n-1 (hard links to
        shared chunk files)."""
        k = per_shard or self.shard_images
        out = self.root / "sets" / (f"n{n}" if k == self.shard_images else f"n{n}-k{k}")
        if (out / ".done").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for c, start in enumerate(range(0, n, k)):
            _link(self._chunk(start, min(n, start + k)), out / f"shard-{c:05d}.tar")
        (out / ".done").touch()
        return out

    def files(self, n: int) -> Path:
        """The same images 0..n-1 as a directory of JPEG files (for read_images)."""
        out = self.root / "files" / f"n{n}"
        if (out / ".done").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for i in range(n):
            _link(self.image(i), out / f"img-{i:07d}.jpg")
        (out / ".done").touch()
        return out

    def examples(self, labels: int, per_label: int) -> Path:
        """A few-shot examples folder: `labels` sub-folders of `per_label` photos each (features-only models)."""
        out = self.root / "examples" / f"l{labels}-k{per_label}"
        if (out / ".done").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        for j in range(labels):
            (out / f"label_{j:03d}").mkdir(parents=True)
            for i in range(per_label):
                _link(self.image(j * per_label + i), out / f"label_{j:03d}" / f"img-{i:03d}.jpg")
        (out / ".done").touch()
        return out

    def _chunk(self, start: int, stop: int) -> Path:
        from pipeline.sources import write_webdataset

        path = self.root / "chunks" / f"chunk-{start:08d}-{stop:08d}.tar"
        if not path.exists():
            samples = ((f"img-{i:07d}", {"jpg": self.image(i).read_bytes()}) for i in range(start, stop))
            write_webdataset(str(path), samples)
        return path


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links
        shutil.copyfile(src, dst)


def make_corpus(workdir: Path, unique: int, shard_images: int, seed: int) -> Corpus:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    spec = {"version": CORPUS_VERSION, "unique": unique, "shard_images": shard_images, "seed": seed}
    root = workdir / f"corpus-s{seed}-u{unique}-k{shard_images}"
    spec_file = root / "spec.json"
    pool_dir = root / "pool"
    if spec_file.exists() and json.loads(spec_file.read_text()).get("spec") == spec:
        info = json.loads(spec_file.read_text())
        return Corpus(root, sorted(pool_dir.glob("*.jpg")), shard_images, info["stats"])
    shutil.rmtree(root, ignore_errors=True)
    pool_dir.mkdir(parents=True)
    rng = random.Random(seed)
    sources = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg: 640x427
    t0 = time.perf_counter()
    sizes, nbytes, paths = [], [], []
    for i in range(unique):
        data = make_photo(rng, sources)
        path = pool_dir / f"{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(path)
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(im.size)
        nbytes.append(len(data))
    w = np.array([s[0] for s in sizes])
    h = np.array([s[1] for s in sizes])
    stats = {"distinct_photos": unique, "mean_width": round(float(w.mean())), "mean_height": round(float(h.mean())),
             "min_side": int(min(w.min(), h.min())), "max_side": int(max(w.max(), h.max())),
             "mean_kb": round(float(np.mean(nbytes)) / 1024, 1), "jpeg_quality": [75, 95],
             "sources": "sklearn.datasets.load_sample_images (china.jpg, flower.jpg)",
             "generate_seconds": round(time.perf_counter() - t0, 1)}
    spec_file.write_text(json.dumps({"spec": spec, "stats": stats}, indent=2))
    return Corpus(root, paths, shard_images, stats)


def upload(local_dir: Path, url: str) -> None:
    """Put every shard of `local_dir` under `url` (e.g. s3://bucket/prefix), creating the bucket."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put([str(p) for p in sorted(local_dir.glob("*.tar"))], root.rstrip("/") + "/")
