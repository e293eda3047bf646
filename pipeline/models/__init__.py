"""The model stage: a small registry of model families (one paper-shaped file each), their checkpoint formats,
and the heads that turn features into labels. See `registry` for the family interface.

Public API: `describe_model`, `load_model`, `families`, `ModelInfo`, `ModelBundle`, `ModelError`, `Head`.
"""

from pipeline.models.checkpoint import ModelError
from pipeline.models.heads import Head
from pipeline.models.registry import (
    BUILTINS,
    ModelBundle,
    ModelInfo,
    describe_model,
    families,
    load_model,
    model_version,
    text_embeddings,
)

__all__ = ["BUILTINS", "Head", "ModelBundle", "ModelError", "ModelInfo", "describe_model", "families", "load_model",
           "model_version", "text_embeddings"]
