"""Shards written with the libraries users write them with: the `webdataset` library, Hugging Face `datasets`."""

from __future__ import annotations

import os
from typing import Any

import fsspec


def storage_options(url: str) -> dict[str, str]:
    """fsspec options for a test URL: the moto endpoint for s3:// (credentials come from the environment)."""
    return {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if url.startswith("s3://") else {}


def wds_write(url: str, samples: list[dict]) -> None:
    """Samples written by webdataset's own TarWriter (gzip for *.gz / *.tgz), on disk or on S3."""
    import webdataset as wds

    with _create(url) as f, wds.TarWriter(f, compress=url.endswith((".gz", ".tgz"))) as w:
        for sample in samples:
            w.write(sample)


def _create(url: str) -> Any:
    """A file open for writing, on disk (its folder made) or on S3."""
    if "://" not in url:
        os.makedirs(os.path.dirname(url), exist_ok=True)
    return fsspec.open(url, "wb", **storage_options(url))


def put(url: str, data: bytes) -> None:
    with _create(url) as f:
        f.write(data)


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    fs.rm(path)


def hf_parquet(url: str, images: list) -> None:
    """`Dataset.to_parquet` of a Hugging Face dataset whose `image` column (an `Image` feature) was built from
    `images`: file paths or URLs give {bytes: null, path}, as `datasets` writes them."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))})
    with _create(url) as f:
        ds.cast_column("image", datasets.Image()).to_parquet(f)
