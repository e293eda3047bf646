"""Heads: how features become label scores. Three kinds, one interface.

- classifier: the checkpoint's own trained head (`model.forward_head`); score = softmax probability.
- zero-shot (SigLIP): text embeddings of "<prompt>" with each label, computed once per run on the driver and
  averaged over prompts; score = sigmoid(cos(image, text) * scale + bias), SigLIP's own probability. It is
  not a softmax: the scores of one image do not sum to 1, and every label may score low.
- few-shot (any family with features): one prototype per label, the mean of its examples' L2-normalised
  embeddings (normalised again); score = cosine similarity to the nearest prototype.

A `Head` is plain data (numpy arrays), shipped to the actors with the model path; its digest goes into the
model version, so a change of vocabulary, prompts or examples makes every shard pending again.
This module never imports ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.checkpoint import ModelError

HEAD_KINDS = ("classifier", "zero-shot", "few-shot")
DEFAULT_PROMPTS = ("This is a photo of {}.",)  # transformers' zero-shot-image-classification default


@dataclass(frozen=True, eq=False)
class Head:
    kind: str  # one of HEAD_KINDS
    labels: tuple[str, ...]
    weight: np.ndarray | None = None  # [C, D] float32, rows L2-normalised: text embeddings or prototypes
    scale: float = 1.0  # zero-shot: exp(logit_scale)
    bias: float = 0.0  # zero-shot: logit_bias
    meta: dict = field(default_factory=dict)  # what else made the head (prompts, example counts): in the digest

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ModelError(f"head: expected one of {HEAD_KINDS}, got {self.kind!r}")
        if not self.labels:
            raise ModelError(f"head: expected at least one label for a {self.kind} head, got none")
        if self.kind != "classifier" and (self.weight is None or self.weight.shape[0] != len(self.labels)):
            raise ModelError(f"head: expected a [{len(self.labels)}, D] weight for a {self.kind} head, got "
                             f"{None if self.weight is None else self.weight.shape}")

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps({"kind": self.kind, "labels": self.labels, "scale": self.scale,
                                       "bias": self.bias, "meta": self.meta}, sort_keys=True).encode())
        if self.weight is not None:
            h.update(np.ascontiguousarray(self.weight, dtype=np.float32).tobytes())
        return "sha256:" + h.hexdigest()

    @property
    def score_meaning(self) -> str:
        return {"classifier": "softmax probability", "zero-shot": "sigmoid probability (SigLIP; not a softmax)",
                "few-shot": "cosine similarity to the label's prototype"}[self.kind]

    def to(self, device: torch.device) -> torch.Tensor | None:
        """The weight as a float32 tensor on `device` (the actor keeps it there)."""
        return None if self.weight is None else torch.from_numpy(np.ascontiguousarray(self.weight)).to(device)

    def scores(self, feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """feats [B, D] -> scores [B, C] for the zero-shot and few-shot kinds (classifiers: see the predictor)."""
        sim = F.normalize(feats.float(), dim=-1) @ weight.T  # [B, C] cosine similarities
        if self.kind == "zero-shot":
            return torch.sigmoid(sim * self.scale + self.bias)
        return sim


def normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def zero_shot(labels: list[str], prompts: list[str], embed) -> Head:
    """Zero-shot head: `embed(texts) -> (embeddings [T, D], scale, bias)` runs the text tower once for every
    (prompt, label) pair; each label's text embedding is the normalised mean over prompts of the normalised ones.
    """
    prompts = list(prompts) or list(DEFAULT_PROMPTS)
    bad = [p for p in prompts if "{}" not in p]
    if bad:
        raise ModelError(f"prompt: expected a template with {{}} for the label, got {bad[0]!r}")
    texts = [p.format(label) for label in labels for p in prompts]
    emb, scale, bias = embed(texts)  # [L*P, D]
    emb = normalized(emb).reshape(len(labels), len(prompts), -1).mean(axis=1)  # [L, D]
    return Head("zero-shot", tuple(labels), normalized(emb), float(scale), float(bias),
                meta={"prompts": prompts})


def few_shot(labels: list[str], feats: np.ndarray, example_labels: list[str]) -> Head:
    """Few-shot head: prototypes [L, D] from example features [E, D] and each example's label."""
    feats = normalized(feats)
    protos, counts = [], {}
    for label in labels:
        rows = feats[[i for i, x in enumerate(example_labels) if x == label]]
        if len(rows) == 0:
            raise ModelError(f"examples: expected at least one decodable image for label {label!r}, got none")
        protos.append(rows.astype(np.float64).mean(axis=0))
        counts[label] = len(rows)
    return Head("few-shot", tuple(labels), normalized(np.stack(protos)), meta={"examples": counts})
