"""The peers `vitlabel run` is measured against, written as their users write them: no vitlabel code in them.

    ray-docs     Ray's documented batch-inference example for a Hugging Face ViT ("Image Classification Batch
                 Inference with Hugging Face Vision Transformer"): read_images(mode="RGB") -> map_batches over an
                 actor class holding a transformers pipeline("image-classification") -> write_parquet. The
                 pipeline is built from the bench's checkpoint directory (local), in the bench's dtype.
    plain-loop   the loop a user writes: PIL decode, AutoImageProcessor, AutoModelForImageClassification in the
                 bench's dtype, torch on every core, batches of the bench's batch size, one Parquet file at the
                 end; timed whole, imports and model loading included.

Both read the checkpoint the bench saved (a Hugging Face ViTForImageClassification directory whose
preprocessor_config.json is a ViTImageProcessor's), so every variant runs the same weights, dtype and batch.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench.corpus import Corpus
from jobs.bench.harness import rate, ray_session, timed_loop, torch_threads
from jobs.bench.settings import Layout, Settings


class ImageClassifier:
    """The docs' predictor class: one transformers image-classification pipeline per actor."""

    def __init__(self, model: str, dtype: str, device: str, batch_size: int):
        import torch
        from transformers import pipeline

        self.batch_size = batch_size
        self.classifier = pipeline("image-classification", model=model, dtype=getattr(torch, dtype), device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        # The HF pipeline takes PIL images; `outputs` is one list of the top_k {score, label} per image.
        outputs = self.classifier([Image.fromarray(a) for a in batch["image"]], top_k=1, batch_size=self.batch_size)
        batch["score"] = [o[0]["score"] for o in outputs]
        batch["label"] = [o[0]["label"] for o in outputs]
        return batch


def ray_docs_job(s: Settings, lay: Layout, model: str, files: Path, output: Path) -> dict[str, Any]:
    """The docs' example on the corpus's JPEG files, laid out like the e2e job (actors, their CPUs/GPUs, batch)."""
    import ray
    from ray.data import DataContext

    n = sum(1 for _ in files.glob("*.jpg"))
    # The docs leave read tasks at Ray's default 1 CPU, as the job layout does; other layouts give both one split.
    cpu = {} if lay.preprocess_cpus == 1 else {"num_cpus": lay.preprocess_cpus}
    with ray_session(s.num_cpus, s.num_gpus):
        t0 = time.perf_counter()
        DataContext.get_current().enable_progress_bars = False
        ds = ray.data.read_images(str(files), mode="RGB", **cpu)
        predictions = ds.map_batches(
            ImageClassifier, concurrency=lay.actors, num_cpus=lay.cpus_per_actor, num_gpus=lay.gpus_per_actor,
            batch_size=s.batch_size,
            fn_constructor_kwargs={"model": model, "dtype": s.dtype, "batch_size": s.batch_size,
                                   "device": "cuda" if lay.gpus_per_actor else "cpu"})
        written = predictions.drop_columns(["image"])
        written.write_parquet(str(output))
        seconds = time.perf_counter() - t0
        plan = _operators(written)
    return {"layout": lay.name, "images": n, "seconds": round(seconds, 3), "images_per_s": rate(n, seconds),
            "plan": plan}


def _operators(ds: Any) -> str:
    """The physical operators Ray ran (shows which stages it fused), from the dataset's stats."""
    with contextlib.suppress(Exception):
        names = [line.split(":", 1)[0].split(" ", 2)[2] for line in ds.stats().splitlines()
                 if line.startswith("Operator ")]
        return " -> ".join(names)
    return "?"


def measure_docs_decode(corpus: Corpus, model: str, seconds: float) -> float:
    """The docs' per-image CPU work on one core: read_images' full-size PIL decode to an RGB array, then the
    pipeline's image processor (resize, rescale, normalise to float32). Images/s."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model)
    data = [corpus.image(i).read_bytes() for i in range(min(len(corpus.pool), 256))]

    def one(b: bytes) -> Any:
        with Image.open(io.BytesIO(b)) as img:
            array = np.asarray(img.convert("RGB"))  # read_images(mode="RGB")
        return processor(images=Image.fromarray(array), return_tensors="pt")  # the pipeline's preprocess

    with torch_threads(1):
        return timed_loop(one, data, seconds)


def plain_loop_job(s: Settings, model: str, shards: Path, output: Path) -> dict[str, Any]:
    """One process, no Ray: the WebDataset shards read with tarfile, PIL, the checkpoint's own processor and
    transformers model; timed from the first import to the Parquet file written."""
    t0 = time.perf_counter()
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    torch.set_num_threads(s.num_cpus)  # a plain process has the whole machine
    device, dtype = ("cuda" if s.device == "cuda" else "cpu"), getattr(torch, s.dtype)
    processor = AutoImageProcessor.from_pretrained(model)
    net = AutoModelForImageClassification.from_pretrained(model, dtype=dtype).to(device).eval()
    keys: list[str] = []
    ids: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    images: list[Any] = []

    def classify() -> None:
        x = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)  # [B, 3, 224, 224]
        with torch.inference_mode():
            score, idx = net(pixel_values=x).logits.float().softmax(-1).max(-1)  # [B], [B]
        ids.append(idx.cpu().numpy())
        scores.append(score.cpu().numpy())
        images.clear()

    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".jpg"):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:  # type: ignore[union-attr]
                    images.append(img.convert("RGB"))
                keys.append(member.name.rsplit(".", 1)[0])
                if len(images) == s.batch_size:
                    classify()
    if images:
        classify()
    label_id = np.concatenate(ids)
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "label": [net.config.id2label[int(i)] for i in label_id],
                             "label_id": label_id, "score": np.concatenate(scores)}), output / "part-0.parquet")
    seconds = time.perf_counter() - t0
    return {"images": len(keys), "seconds": round(seconds, 3), "images_per_s": rate(len(keys), seconds),
            "torch_threads": s.num_cpus}
