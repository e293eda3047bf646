"""Shards written with the libraries users write them with: the `webdataset` library, Hugging Face `datasets`."""

from __future__ import annotations

import os

import fsspec


def storage_options(url: str) -> dict[str, str]:
    """fsspec options for a test URL: the moto endpoint for s3:// (credentials come from the environment)."""
    return {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if url.startswith("s3://") else {}


def wds_write(url: str, samples: list[dict]) -> None:
    """Samples written by webdataset's own TarWriter (gzip for *.gz / *.tgz), on disk or on S3."""
    import webdataset as wds

    if "://" not in url:
        os.makedirs(os.path.dirname(url), exist_ok=True)
    with fsspec.open(url, "wb", **storage_options(url)) as f, \
            wds.TarWriter(f, compress=url.endswith((".gz", ".tgz"))) as w:
        for sample in samples:
            w.write(sample)
