"""One typed config for a labelling job, and the image contract a model carries.

The CLI (`vitlabel run --flag ...`), a job file (TOML, YAML or JSON) and the Python API all fill
the same frozen `JobConfig`; validation happens once, here, with "expected X, got Y" messages.
Credentials are never config fields: object-store keys come from the environment (AWS_* for S3),
so a saved config can be shown and stored with every run without leaking anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_MODEL = "builtin:digits"
INPUT_FORMATS = ("auto", "webdataset", "parquet", "folder")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LAYOUTS = ("auto", "split", "fused")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZE_MODES = ("squash", "shortest")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
# Shard-level error codes (sources) that mean "the shard could not be reached": a shard that failed with one of
# these before yielding any image is not marked done, so a later run tries it again (layout.committed_shards).
RETRYABLE_SHARD_CODES = ("missing", "unavailable")
# A shard error (sources) that starts so: the shard's compressed data failed its integrity check (gzip CRC), which
# only the end of the stream tells, after its images were read. None of its rows can be trusted: the commit makes
# each of them an UNTRUSTED_ROW_CODE error row (commit.commit).
INTEGRITY_FAILED = "corrupt: integrity check failed"
UNTRUSTED_ROW_CODE = "corrupt_shard"
# Pillow's own default bomb limit is 89.5 MP (warning) / 179 MP (error); we make the error explicit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type."""


def _expect(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class ImageContract:
    """How a model wants its pixels: owned by the model (read from its checkpoint), consumed by preprocessing.

    Two layouts, defined once here:
    - patches (patch_size P > 0: ViT, DINOv2, SigLIP): an image [H, W, 3] becomes tokens [N, P*P*3] with
      N = (H/P)*(W/P) patches in row-major order, each patch flattened in (row, col, channel) order;
    - pixels (patch_size 0: the CNNs): the image itself, [H, W, 3].
    Both are uint8; the model normalises with `mean`/`std` on the device.
    """

    image_size: tuple[int, int]  # (H, W) fed to the model
    patch_size: int = 0  # > 0: patch tokens; 0: whole images
    resize: str = "squash"  # squash: to (H, W) / crop_pct exactly (HF ViT); shortest: shorter side (timm, HF BiT)
    crop_pct: float = 1.0  # the centre crop (H, W) is this fraction of the resized image's side(s)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        _expect(h > 0 and w > 0, "image_size", "positive (H, W)", self.image_size)
        _expect(p >= 0 and (p == 0 or (h % p == 0 and w % p == 0)), "image_size",
                f"multiples of patch_size={p}", self.image_size)
        _expect(self.resize in RESIZE_MODES, "resize", f"one of {RESIZE_MODES}", self.resize)
        _expect(self.interpolation in INTERPOLATIONS, "interpolation", f"one of {INTERPOLATIONS}", self.interpolation)
        _expect(0 < self.crop_pct <= 1, "crop_pct", "0 < crop_pct <= 1", self.crop_pct)
        _expect(len(self.mean) == 3 and len(self.std) == 3, "mean/std", "3 values each", (self.mean, self.std))
        _expect(all(s > 0 for s in self.std), "std", "positive values", self.std)

    @property
    def layout(self) -> str:
        return "patches" if self.patch_size else "pixels"

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image's model input: (N, P*P*3) patch tokens or (H, W, 3) pixels."""
        return (self.num_patches, self.token_dim) if self.patch_size else (*self.image_size, 3)

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class JobConfig:
    """Every knob of a labelling job. Field comments double as CLI help."""

    input: str = ""  # shard URL, glob or prefix: /data/shards, s3://bucket/prefix/*.tar, ...
    output: str = ""  # table root: local path or fsspec URL (s3://bucket/labels)
    model: str = BUILTIN_MODEL  # a checkpoint dir or state-dict file (local or fsspec URL), or builtin:NAME
    model_family: str = "auto"  # auto: detected from the checkpoint; else a family of `vitlabel models`
    model_name: str = ""  # partition name; default: from the checkpoint
    labels: str = ""  # zero-shot vocabulary (SigLIP), comma-separated: "cat,dog,red car"
    labels_file: str = ""  # zero-shot vocabulary file, one label per line (local path or fsspec URL)
    prompt: tuple[str, ...] = ()  # zero-shot prompt template with {} for the label; repeat to average several
    examples: str = ""  # few-shot: a folder (or URL) with one sub-folder of example images per label
    input_format: str = "auto"  # auto, webdataset, parquet or folder
    image_column: str = "auto"  # parquet: column holding image bytes (or an HF {bytes, path} struct)
    key_column: str = "auto"  # parquet: column used as the image key (default: path, else row number)
    top_k: int = 5  # how many labels and scores to keep per image
    batch_size: int = 64  # images per model forward
    preprocess_batch_size: int = 64  # images per preprocessing task batch
    preprocess_cpus: float = 1.0  # CPUs each preprocessing task asks Ray for
    dtype: str = "auto"  # auto: bf16 on GPU; on CPU bf16 only where measured faster (AMX/AVX512-BF16), else fp32
    layout: str = "auto"  # auto: fused without GPUs, else split (decode tasks + model actors); fused: actors do both
    min_actors: int = 1  # predictor actor pool lower bound
    max_actors: int = 1  # predictor actor pool upper bound (fused layout: 1 = as many as the CPUs hold)
    gpus_per_actor: float = -1.0  # -1: 1 if the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # on CPU the actor runs torch with this many threads
    compile: bool = False  # torch.compile the model in each actor (GPU: faster after a warm-up; CPU: no gain)
    embeddings: bool = False  # also keep the pooled embedding per image
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb limit (width*height)
    wave_shards: int = 0  # commit every N shards (0: one commit for the whole run)
    dt: str = ""  # date partition YYYY-MM-DD (default: today, UTC)
    run_id: str = ""  # default: generated from time + random suffix
    lease: bool = True  # one job per model version writes OUTPUT at a time (--no-lease: UNSAFE, may label twice)
    lease_ttl_s: float = 900.0  # lease expiry in seconds; renewed by a heartbeat and before every commit
    ray_address: str = ""  # default: RAY_ADDRESS or an in-process local Ray
    num_cpus: int = 0  # local Ray only: CPUs to give it (0: all)
    progress: bool = True  # show Ray Data progress bars
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form tags stored in the manifest

    def __post_init__(self) -> None:
        _expect(isinstance(self.input, str), "input", "a string", self.input)
        _expect(isinstance(self.output, str), "output", "a string", self.output)
        _expect(bool(self.model), "model", "a checkpoint path, URL or builtin:digits", self.model)
        _expect(isinstance(self.prompt, tuple) and all(isinstance(p, str) and "{}" in p for p in self.prompt),
                "prompt", "templates with {} for the label", self.prompt)
        _expect(not (self.examples and (self.labels or self.labels_file)), "examples",
                "either --examples (few-shot) or --labels/--labels-file (zero-shot), not both", self.examples)
        _expect(not (self.labels and self.labels_file), "labels", "either --labels or --labels-file, not both",
                self.labels)
        _expect(not self.prompt or bool(self.labels or self.labels_file), "prompt",
                "--labels or --labels-file with it (prompts are for zero-shot)", self.prompt)
        _expect(self.input_format in INPUT_FORMATS, "input_format", f"one of {INPUT_FORMATS}", self.input_format)
        _expect(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _expect(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}", self.layout)
        for name in ("top_k", "batch_size", "preprocess_batch_size", "min_actors", "max_actors", "max_image_pixels"):
            v = getattr(self, name)
            _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1", v)
        _expect(self.max_actors >= self.min_actors, "max_actors", f">= min_actors ({self.min_actors})", self.max_actors)
        _expect(self.preprocess_cpus > 0, "preprocess_cpus", "> 0", self.preprocess_cpus)
        _expect(self.cpus_per_actor > 0, "cpus_per_actor", "> 0", self.cpus_per_actor)
        _expect(self.gpus_per_actor == -1 or self.gpus_per_actor >= 0, "gpus_per_actor", "-1 or >= 0",
                self.gpus_per_actor)
        _expect(isinstance(self.wave_shards, int) and self.wave_shards >= 0, "wave_shards", "an integer >= 0",
                self.wave_shards)
        _expect(isinstance(self.lease_ttl_s, (int, float)) and not isinstance(self.lease_ttl_s, bool)
                and self.lease_ttl_s >= 1, "lease_ttl_s", "a number of seconds >= 1", self.lease_ttl_s)
        _expect(isinstance(self.num_cpus, int) and self.num_cpus >= 0, "num_cpus", "an integer >= 0", self.num_cpus)
        _expect(not self.dt or re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.dt) is not None, "dt", "YYYY-MM-DD", self.dt)
        _expect(not self.run_id or re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", self.run_id) is not None, "run_id",
                "letters, digits, '_', '.', '-' (at most 80)", self.run_id)
        _expect(not self.model_name or re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", self.model_name) is not None,
                "model_name", "letters, digits, '_', '.', '-'", self.model_name)

    def require_io(self) -> JobConfig:
        """Input and output are required to run (not to build a config piecewise)."""
        _expect(bool(self.input), "input", "a shard URL, glob or prefix", self.input)
        _expect(bool(self.output), "output", "a table root path or URL", self.output)
        return self

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Build from a mapping (job file, JSON): unknown keys are errors; kebab-case keys accepted."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in d.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{raw_key}: expected one of {sorted(known)}, got an unknown key")
            values[key] = _coerce(key, known[key].type, value)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> JobConfig:
        """Read a TOML, YAML or JSON job file; `overrides` (e.g. from CLI flags) win."""
        data = read_job_file(path)
        data.update({k.replace("-", "_"): v for k, v in overrides.items()})
        return cls.from_dict(data)


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML, YAML or JSON job file (optionally under a `[job]` table), keys in snake_case."""
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"job file: expected .toml, .yaml, .yml or .json, got {p.name!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"job file: expected a mapping of settings, got {type(data).__name__}")
    data = data.get("job", data)  # allow a [job] table
    if not isinstance(data, dict):
        raise ConfigError(f"job file: expected a mapping under [job], got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    """Job files are typed already; accept ints for floats and strings for bools from env-ish sources."""
    t = str(type_name)
    if t == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t == "bool" and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if t.startswith("tuple") and isinstance(value, (list, str)):  # a job file's list, or one template
        return tuple([value] if isinstance(value, str) else value)
    if t == "int" and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    return value


# ---------------------------------------------------------------------------------------------------------
# redaction: every message, manifest and error row goes through `redact` before it leaves the process

REDACTED = "***"
# Environment variables whose values are secrets wherever they turn up (AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, RAY_AUTH_TOKEN, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_KEY, ...).
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|ACCOUNT_KEY|API_KEY|_KEY$",
                         re.IGNORECASE)
_MIN_SECRET_CHARS = 8  # shorter values ("1", "true") would mangle messages and are no secret anyway
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
                           r"access_token|password|secret|api_key|key)=)[^&\s#'\"]+")


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so a secret inside another goes too)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` without credentials: URL user:password@ parts, signed-URL query secrets, secret env values."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(r"\1", text)
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    for value in secret_values():
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def redact_obj(obj: Any) -> Any:
    """`redact` applied to every string (keys included) of a JSON-like value, e.g. a config saved in a manifest."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj
