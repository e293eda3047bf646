"""The predictor: a callable class that Ray Data runs as an actor pool over batches of patch tokens.

One actor loads the model once and then classifies batches: uint8 tokens go to the device as they
are (a quarter of float32's bytes), the model normalises inside its folded patch projection, and
softmax + top-k run on the device too. On a GPU it runs bf16 with SDPA (flash) attention; on a CPU
it runs with as many torch threads as the actor was given CPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.model import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """auto: bf16 on a GPU, fp32 on a CPU (bf16 on a CPU is faster but not bit-comparable)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[dtype]


def _strings(values: Any) -> list[str | None]:
    """Ray hands an all-null string column back as float NaNs; keep strings, map anything else to null."""
    return [v if isinstance(v, str) else None for v in values]


class Predictor:
    """Callable class for `Dataset.map_batches(Predictor, compute=ActorPoolStrategy(...))`."""

    def __init__(self, model: str, top_k: int = 5, dtype: str = "auto", embeddings: bool = False,
                 num_threads: int = 1, batch_size: int = 64):
        self.device, self.dtype = pick_device_dtype(dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(num_threads)))
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.bundle = load_model(model, device=str(self.device), dtype=self.dtype)
        self.model = self.bundle.model.eval()
        self.labels = np.asarray(self.bundle.labels, dtype=object)
        self.top_k = min(top_k, len(self.labels))
        self.embeddings = embeddings
        self.batch_size = batch_size
        log.info("predictor ready: %s on %s/%s, pid %d", self.bundle.name, self.device, self.dtype, os.getpid())

    @torch.inference_mode()
    def classify(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """tokens [B, N, P*P*3] uint8 -> (top-k ids [B, k], top-k probs [B, k], embeddings [B, D] | None)."""
        ids, probs, feats = [], [], []
        pin = self.device.type == "cuda"
        for start in range(0, len(tokens), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tokens[start:start + self.batch_size]))  # [b, N, PPC] uint8
            if pin:
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=pin)
            f = self.model.forward_features(x)  # [b, D]
            logits = self.model.forward_head(f).float()  # [b, C]
            p, i = logits.softmax(-1).topk(self.top_k, dim=-1)  # [b, k]
            ids.append(i.cpu())
            probs.append(p.cpu())
            if self.embeddings:
                feats.append(f.float().cpu())
        if not ids:
            return np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k), np.float32), None
        emb = torch.cat(feats).numpy() if self.embeddings else None
        return torch.cat(ids).numpy(), torch.cat(probs).numpy(), emb

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        status = np.asarray(batch["status"], dtype=object)
        ok = status == "ok"
        n = len(status)
        ids, probs, emb = self.classify(batch["tokens"][ok])
        label_id = np.full(n, -1, dtype=np.int32)
        score = np.full(n, np.nan, dtype=np.float32)
        topk_ids = [[] for _ in range(n)]
        topk_scores = [[] for _ in range(n)]
        topk_labels = [[] for _ in range(n)]
        label = [None] * n
        for j, i in enumerate(np.flatnonzero(ok)):
            label_id[i] = ids[j, 0]
            score[i] = probs[j, 0]
            topk_ids[i] = ids[j].tolist()
            topk_scores[i] = probs[j].tolist()
            topk_labels[i] = self.labels[ids[j]].tolist()
            label[i] = topk_labels[i][0]
        cols: dict[str, pa.Array] = {
            "image_id": pa.array(batch["image_id"], pa.string()),
            "source": pa.array(batch["source"], pa.string()),
            "key": pa.array(batch["key"], pa.string()),
            "shard_images": pa.array(batch["shard_images"], pa.int64()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(_strings(batch["error"]), pa.string()),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "label": pa.array(label, pa.string()),
            "label_id": pa.array(label_id, pa.int32()),
            "score": pa.array(score, pa.float32(), mask=~ok),
            "topk_labels": pa.array(topk_labels, pa.list_(pa.string())),
            "topk_ids": pa.array(topk_ids, pa.list_(pa.int32())),
            "topk_scores": pa.array(topk_scores, pa.list_(pa.float32())),
        }
        if self.embeddings:
            rows: list[list[float] | None] = [None] * n
            for j, i in enumerate(np.flatnonzero(ok)):
                rows[i] = emb[j].tolist()
            cols["embedding"] = pa.array(rows, pa.list_(pa.float32()))
        return pa.table(cols)
