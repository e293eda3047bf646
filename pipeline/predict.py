"""The predictor: a callable class that Ray Data runs as an actor pool over batches of model inputs.

One actor loads the model once and then labels batches: uint8 inputs (patch tokens or pixels) go to the
device as they are (a quarter of float32's bytes), the model normalises on the device (folded into the patch
projection, or as its first step for CNNs), and the head's scores and the top-k run on the device too. On a
GPU it runs bf16 with SDPA (flash) attention and channels_last CNNs; on a CPU it runs with as many torch
threads as the actor was given CPUs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.models import Head, ModelError, load_model
from pipeline.schema import FORMAT_COLUMN, INPUTS, MARKER_COLUMN, prediction_table, strings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_dtype(dtype: str, num_threads: int = 1) -> tuple[torch.device, torch.dtype]:
    """auto: bf16 on a GPU; on a CPU bf16 only where it is measurably faster than fp32 (`cpu_bf16_faster`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        if device.type == "cuda":
            return device, torch.bfloat16
        return device, torch.bfloat16 if cpu_bf16_faster(num_threads)[0] else torch.float32
    return device, _DTYPES[dtype]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_bf16_faster(num_threads: int = 1) -> tuple[bool, str]:
    """(bf16 is faster than fp32 on this CPU, why). AMX: yes. AVX512-BF16: a quick matmul probe (~0.3 s) decides,
    at the shape of a ViT-Ti MLP. Neither: no (bf16 is emulated, often many times slower)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "amx_bf16"
    if "avx512_bf16" not in flags:
        return False, "no amx_bf16 or avx512_bf16"
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))
    try:
        x, w = torch.randn(2048, 192), torch.randn(768, 192)
        rates = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = x.to(dt), w.to(dt)
            a @ b.T  # warm up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.15:
                a @ b.T
                n += 1
            rates[dt] = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    ratio = rates[torch.bfloat16] / rates[torch.float32]
    return ratio >= 1.2, f"avx512_bf16, bf16/fp32 matmul speed {ratio:.2f}x"


class Predictor:
    """Callable class for `Dataset.map_batches(Predictor, compute=ActorPoolStrategy(...))`, for any model family.

    The actor loads the checkpoint once and checks that its digest is the one the driver planned with (a
    checkpoint replaced mid-run would otherwise label under the wrong model version). `head` says how features
    become scores: the checkpoint's classifier (softmax), a zero-shot vocabulary (SigLIP sigmoid) or few-shot
    prototypes (cosine); its weights stay on the device. The plan always passes both; without them (benchmarks,
    tests) the checkpoint's own classifier labels and nothing is compared.

    GPU path: bf16 weights, SDPA restricted to the fused kernels (flash first), CNNs channels_last, the uint8
    batch copied to the device from pinned memory; results are gathered on the device and synchronised once
    per Ray batch. The Ray batch is cut into forward batches of `batch_size` (equal by default).
    `compile=True` wraps the forward in torch.compile; forward batches are then padded to `batch_size` so one
    graph serves every call.
    """

    def __init__(self, model: str, head: Head | None = None, checkpoint_digest: str = "", family: str = "auto",
                 top_k: int = 5,
                 dtype: str = "auto", embeddings: bool = False, num_threads: int = 1, batch_size: int = 64,
                 compile: bool = False):
        self.device, self.dtype = pick_device_dtype(dtype, num_threads)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(num_threads)))
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.bundle = load_model(model, family=family, device=str(self.device), dtype=self.dtype)
        if checkpoint_digest and self.bundle.digest != checkpoint_digest:
            raise ModelError(f"model: expected the checkpoint the run was planned with ({checkpoint_digest}), got "
                             f"{self.bundle.digest} at {model!r}: it changed during the run; start the run again")
        self.model = self.bundle.model.eval()
        if self.device.type == "cuda" and self.bundle.contract.layout == "pixels":
            self.model = self.model.to(memory_format=torch.channels_last)  # CNNs: NHWC kernels on the GPU
        head = head or Head("classifier", self.bundle.labels)  # None: the checkpoint's own classifier
        self.head = head
        self.head_weight = head.to(self.device)
        self.labels = np.asarray(head.labels, dtype=object)
        self.top_k = min(top_k, len(self.labels))
        self.embeddings = embeddings
        self.batch_size = batch_size
        self.compiled = compile
        self._forward = torch.compile(self._features_scores, dynamic=False) if compile else self._features_scores
        log.info("predictor ready: %s (%s, %s head) on %s/%s, pid %d%s", self.bundle.name, self.bundle.info.family,
                 head.kind, self.device, self.dtype, os.getpid(), ", compiled" if compile else "")

    def _features_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)  # [b, D]
        if self.head.kind == "classifier":
            return f, self.model.forward_head(f).float().softmax(-1)  # [b, D], [b, C]
        return f, self.head.scores(f, self.head_weight)  # [b, D], [b, C]

    def _attention(self) -> contextlib.AbstractContextManager:
        """On CUDA pick flash attention first (bf16/fp16), then cuDNN and mem-efficient; math only as a fallback."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        try:
            return sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch < 2.6 has no priorities: the same backends in torch's default order
            return sdpa_kernel(order)

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        """uint8 numpy [B, ...] -> device tensor; on CUDA copied from pinned memory, asynchronously."""
        x = torch.from_numpy(np.ascontiguousarray(inputs))  # no copy when contiguous
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def classify(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """inputs [B, ...] uint8 -> (top-k ids [B, k], top-k scores [B, k], embeddings [B, D] | None)."""
        ids, scores, feats = [], [], []
        with self._attention():
            for start in range(0, len(inputs), self.batch_size):
                x = self._to_device(inputs[start:start + self.batch_size])  # [b, ...] uint8
                b = len(x)
                if self.compiled and b < self.batch_size:  # one static shape: pad the tail batch
                    x = torch.cat([x, x.new_zeros((self.batch_size - b, *x.shape[1:]))])
                f, s = self._forward(x)  # [b', D], [b', C]
                s, i = s[:b].topk(self.top_k, dim=-1)  # [b, k]
                ids.append(i)
                scores.append(s)
                if self.embeddings:
                    feats.append(f[:b].float())
        if not ids:
            return np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k), np.float32), None
        # One device -> host sync per Ray batch, not one per forward batch.
        emb = torch.cat(feats).cpu().numpy() if self.embeddings else None
        return torch.cat(ids).cpu().numpy(), torch.cat(scores).float().cpu().numpy(), emb

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        status = np.asarray(batch["status"], dtype=object)
        ok = status == "ok"
        n = len(status)
        ids, probs, emb = self.classify(batch[INPUTS][ok])
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
        cols: dict[str, Any] = {
            "image_id": batch["image_id"], "source": batch["source"], "key": batch["key"],
            MARKER_COLUMN: batch[MARKER_COLUMN], FORMAT_COLUMN: strings(batch[FORMAT_COLUMN]), "status": status,
            "error": strings(batch["error"]),
            "width": batch["width"], "height": batch["height"], "label": label, "label_id": label_id,
            "score": pa.array(score, mask=~ok), "topk_labels": topk_labels, "topk_ids": topk_ids,
            "topk_scores": topk_scores,
        }
        if self.embeddings:
            rows: list[list[float] | None] = [None] * n
            for j, i in enumerate(np.flatnonzero(ok)):
                rows[i] = emb[j].tolist()
            cols["embedding"] = rows
        return prediction_table(cols, self.embeddings)
