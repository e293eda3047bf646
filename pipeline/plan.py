"""Wires the stages into one Ray Data streaming plan, and commits its output. The only module that does.

    list shards (driver)  -> pending = all shards - shards committed for this model digest
    read shard (CPU task)   -> rows: image_id, source, key, bytes, shard_images, error (+1 marker row per shard)
    preprocess (CPU task)   -> rows + inputs uint8 (patch tokens [N, P*P*3] or pixels [H, W, 3]), width, height, status
    classify (actor pool)   -> rows + label, score, top-k (inputs dropped)
    LabelDatasink (writes)  -> staged Parquet files; then the driver commits a manifest per wave

Each shard ends with one marker row that carries how many images the reader produced; the commit
checks every shard's written rows against it, so a shard is committed whole or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipeline.config import JobConfig, redact
from pipeline.lease import Lease
from pipeline.preprocess import preprocess_batch
from pipeline.sink import STAGING_GRACE_S, LabelDatasink, commit, committed_shards, recover
from pipeline.sources import Shard, ShardError, iter_examples, iter_shard, list_shards

log = logging.getLogger(__name__)

LEASE_NAME = "nightly"  # OUTPUT/_lease/nightly/: shared by every leased job (nightly, run --lease)
_READ_COLUMNS = ("image_id", "source", "key", "bytes", "shard_images", "error")
# A worker that dies (OOM, segfault in a decoder) is retried a few times, then the job fails with
# Ray's error instead of retrying forever. Distinct remote args also keep Ray from fusing the CPU
# stages into the GPU actor: preprocessing must scale on its own CPUs.
TASK_RETRIES = 3
ACTOR_RESTARTS = -1  # the predictor holds no state a restart loses
ACTOR_TASK_RETRIES = 4


class RunFailed(RuntimeError):
    """A wave failed for good (a task or actor out of retries, a model that cannot load): nothing of that wave
    is committed; earlier waves stay committed and the next run starts where this one stopped."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def root_cause(e: BaseException) -> str:
    """'<Type>: <message>' of the error at the bottom of Ray's wrapping (the last one in its traceback text)."""
    found = [m for line in _ANSI.sub("", str(e)).splitlines() if (m := _EXCEPTION_LINE.match(line.strip()))]
    if found:
        return redact(f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}")
    first = (str(e).strip().splitlines() or [""])[0]
    return redact(f"{type(e).__name__}: {first}")


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    cols = {name: np.empty(len(rows), dtype=object) for name in _READ_COLUMNS}
    for i, row in enumerate(rows):
        for name, value in zip(_READ_COLUMNS, row, strict=True):
            cols[name][i] = value
    cols["shard_images"] = cols["shard_images"].astype(np.int64)
    return cols


def read_shards(batch: dict[str, np.ndarray], *, image_column: str, key_column: str, rows_per_batch: int
                ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard descriptors -> batches of image rows, then one marker row per shard.

    A shard that fails part way keeps the rows read so far; its marker carries the error, so the
    images that were read are labelled and the manifest records the shard error.
    """
    for uri, fmt in zip(batch["uri"], batch["format"], strict=True):
        shard = Shard(uri=str(uri), format=str(fmt), size=-1)
        rows: list[tuple] = []
        count, shard_error = 0, None
        try:
            for rec in iter_shard(shard, image_column=image_column, key_column=key_column):
                rows.append((rec.image_id(shard.uri), shard.uri, rec.key, rec.data, -1, rec.error))
                count += 1
                if len(rows) >= rows_per_batch:
                    yield _columns(rows)
                    rows = []
        except ShardError as e:
            shard_error = f"shard_error: {e.message}"  # "<code>: ...": sink.shard_done reads the code
        except Exception as e:  # one bad shard never fails the job
            shard_error = redact(f"shard_error: read_error: {type(e).__name__}: {e}")
        if shard_error:
            log.warning("%s: %s (kept %d images read before it)", redact(shard.uri), shard_error, count)
        rows.append(("", shard.uri, "", b"", count, shard_error))
        yield _columns(rows)


def read_and_preprocess(batch: dict[str, np.ndarray], *, image_column: str, key_column: str, rows_per_batch: int,
                        contract: Any, max_pixels: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard descriptors -> batches of preprocessed rows (inputs), each shard ending in its marker.

    Reading and preprocessing compose here, in the plan, so one CPU task streams one shard; each batch
    of `rows_per_batch` images is decoded as soon as it is read.
    """
    for rows in read_shards(batch, image_column=image_column, key_column=key_column, rows_per_batch=rows_per_batch):
        yield preprocess_batch(rows, contract=contract, max_pixels=max_pixels)


@dataclass
class RunSummary:
    run_id: str
    output: str
    model: str
    model_digest: str
    dt: str
    shards_total: int
    shards_skipped: int
    manifests: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        keys = ("images", "ok", "error", "shards", "shard_errors")
        return {k: sum(m["counts"].get(k, 0) for m in self.manifests) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "run_id": self.run_id, "output": self.output, "model": self.model, "model_digest": self.model_digest,
            "dt": self.dt, "shards_total": self.shards_total, "shards_skipped": self.shards_skipped,
            "commits": [m["commit_id"] for m in self.manifests], **c, "seconds": round(self.seconds, 3),
            "images_per_s": round(c["images"] / self.seconds, 2) if self.seconds else 0.0,
            "shard_error_list": {u: s["error"] for m in self.manifests for u, s in m["shards"].items() if s["error"]},
            "shards_to_retry": [u for m in self.manifests for u, s in m["shards"].items() if not s.get("done", True)],
        }


@dataclass(frozen=True)
class ModelPlan:
    """The model a run labels with: the checkpoint (`info`), its head, and the model version (`digest`)."""

    info: Any  # pipeline.models.ModelInfo
    head: Any  # pipeline.models.Head
    digest: str  # the model version: checkpoint files, family, contract and head (what rows are labelled under)

    @property
    def contract(self) -> Any:
        return self.info.contract

    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    def describe(self) -> dict[str, Any]:
        """What `--dry-run` prints about the model."""
        labels = list(self.labels)
        return {"family": self.info.family, "digest": self.digest, "checkpoint_digest": self.info.digest,
                "head": self.head.kind, "score": self.head.score_meaning, "labels": len(labels),
                "label_names": labels if len(labels) <= 50 else labels[:50] + ["..."],
                **({"prompts": self.head.meta["prompts"]} if "prompts" in self.head.meta else {}),
                **({"examples": self.head.meta["examples"]} if "examples" in self.head.meta else {}),
                "contract": {**dataclasses.asdict(self.contract), "layout": self.contract.layout,
                             "input_shape": list(self.contract.input_shape)},
                "files": dict(self.info.files)}


def resolve(cfg: JobConfig) -> tuple[JobConfig, ModelPlan]:
    """Fill in run id, date and model name, and plan the model: checkpoint, head and model version."""
    cfg.require_io()
    # torch: imported where needed, see build_dataset
    from pipeline.models import describe_model, model_version

    info = describe_model(cfg.model, cfg.model_family)
    head = resolve_head(cfg, info)
    return cfg.replace(
        run_id=cfg.run_id or new_run_id(),
        dt=cfg.dt or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        model_name=cfg.model_name or info.name,
    ), ModelPlan(info=info, head=head, digest=model_version(info, head.digest))


def resolve_head(cfg: JobConfig, info: Any) -> Any:
    """The checkpoint's classifier, a zero-shot vocabulary (--labels/--labels-file) or few-shot prototypes
    (--examples), computed once here on the driver: the actors only run the image model."""
    from pipeline.models import Head, ModelError, heads, text_embeddings

    if cfg.labels or cfg.labels_file:
        labels = vocabulary(cfg)
        return heads.zero_shot(labels, list(cfg.prompt), lambda texts: text_embeddings(cfg.model, info.family, texts))
    if cfg.examples:
        return few_shot_head(cfg, info)
    if not info.labels:
        raise ModelError(f"model: expected a classifier, got a {info.family} checkpoint without one ({cfg.model!r}):"
                         " give --labels (zero-shot, SigLIP) or --examples DIR (few-shot)")
    return Head("classifier", info.labels)


def vocabulary(cfg: JobConfig) -> list[str]:
    """Zero-shot labels from --labels (comma-separated) or --labels-file (one per line), stripped, unique."""
    from pipeline.config import ConfigError

    if cfg.labels_file:
        try:
            with fsspec.open(cfg.labels_file, "rt", encoding="utf-8") as f:
                raw = f.read().splitlines()
        except OSError as e:
            raise ConfigError(f"labels_file: expected a readable text file, got {redact(cfg.labels_file)!r}: "
                              f"{redact(str(e))}") from e
    else:
        raw = cfg.labels.split(",")
    labels = [x.strip() for x in raw if x.strip()]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if not labels or dupes:
        raise ConfigError(f"labels: expected distinct non-empty labels, got {dupes or labels}")
    return labels


def few_shot_head(cfg: JobConfig, info: Any) -> Any:
    """Prototypes from --examples: the same preprocessing and model as the run, here on the driver (fp32, CPU)."""
    import torch

    from pipeline.models import ModelError, heads, load_model
    from pipeline.preprocess import ImageError, decode_image

    bundle = load_model(cfg.model, family=info.family)
    if bundle.digest != info.digest:
        raise ModelError(f"model: expected checkpoint {info.digest}, got {bundle.digest}: it changed while planning")
    labels, inputs, skipped = [], [], []
    for label, name, data in iter_examples(cfg.examples):
        try:
            inputs.append(decode_image(data, info.contract, cfg.max_image_pixels)[0])
            labels.append(label)
        except ImageError as e:
            skipped.append(f"{label}/{name}: {e}")
    if skipped:
        log.warning("examples: %d image(s) skipped: %s", len(skipped), "; ".join(skipped[:5]))
    if not inputs:
        raise ModelError(f"examples: expected decodable images in sub-folders of {redact(cfg.examples)!r}, got none")
    feats = []
    with torch.inference_mode():
        for i in range(0, len(inputs), cfg.batch_size):
            x = torch.from_numpy(np.stack(inputs[i:i + cfg.batch_size]))  # [b, ...] uint8
            feats.append(bundle.model.forward_features(x).float().numpy())  # [b, D]
    names = sorted(set(labels))
    return heads.few_shot(names, np.concatenate(feats), labels)


def plan_shards(cfg: JobConfig, model_digest: str) -> tuple[list[Shard], list[Shard]]:
    """(all shards, pending shards): pending excludes shards a committed manifest covers for this digest."""
    shards = list_shards(cfg.input, cfg.input_format)
    done = committed_shards(cfg.output, model_digest)
    return shards, [s for s in shards if s.uri not in done]


def init_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
    if address is None and cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    ray.init(address=address, **kwargs)


def build_dataset(cfg: JobConfig, shards: list[Shard], model: ModelPlan, gpus_per_actor: float):
    """The streaming plan for one wave of shards (not yet executed)."""
    import ray

    # torch is imported here and in resolve(), not at module level: CPU workers unpickle the preprocessing
    # UDF by importing this module, and torch would add ~1.5 s to each worker's start and ~180 MB to its memory.
    from pipeline.predict import Predictor

    items = [{"uri": s.uri, "format": s.format} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    _bound_inflight(ds.context, cfg, model.contract, gpus_per_actor)
    # One task per shard. Two chained map_batches (read batch_size=1, preprocess batch_size=64) would be
    # fused by Ray Data into one task whose input is bundled up to the larger batch size: 64 shards per
    # task, read serially, with no overlap between reading and the model (measured: BENCHMARKS.md).
    ds = ds.map_batches(
        read_and_preprocess, batch_size=1, batch_format="numpy", num_cpus=cfg.preprocess_cpus,
        max_retries=TASK_RETRIES,
        fn_kwargs={"image_column": cfg.image_column, "key_column": cfg.key_column,
                   "rows_per_batch": cfg.preprocess_batch_size, "contract": model.contract,
                   "max_pixels": cfg.max_image_pixels},
    )
    threads = max(1, int(cfg.cpus_per_actor))
    ds = ds.map_batches(
        Predictor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor,
        max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES,
        fn_constructor_kwargs={"model": cfg.model, "family": model.info.family, "head": model.head,
                               "checkpoint_digest": model.info.digest, "top_k": cfg.top_k, "dtype": cfg.dtype,
                               "embeddings": cfg.embeddings, "num_threads": threads, "batch_size": cfg.batch_size,
                               "compile": cfg.compile},
    )
    return ds


def _bound_inflight(ctx: Any, cfg: JobConfig, contract: Any, gpus_per_actor: float) -> None:
    """Small token blocks and a small object-store budget for this dataset (its own DataContext copy).

    Blocks: at most 32 MiB of tokens (~200 images at 224 px) instead of Ray Data's 128 MiB, so the actors
    start on the first part of a shard and a preprocessing task holds part of a shard, not all of it.
    Budget: decoding usually outruns the model, and Ray Data lets the queue in front of the actors grow to
    its share of half the object store; a few blocks per actor and per preprocessing slot keep every actor
    busy, and anything above that only makes peak memory grow with the input size (BENCHMARKS.md).
    """
    import ray

    batch = cfg.preprocess_batch_size * contract.input_bytes  # bytes of model inputs per batch
    ctx.target_max_block_size = max(batch + (1 << 20), 32 << 20)  # + room for the other columns
    limits = ctx.execution_options.resource_limits
    if limits.object_store_memory not in (None, float("inf")):
        return  # the caller set a budget: keep it
    cpus = ray.cluster_resources().get("CPU", 1.0)
    actor_cpus = cfg.max_actors * cfg.cpus_per_actor
    slots = max(1, int((cpus - actor_cpus) // cfg.preprocess_cpus)) if cpus > actor_cpus else 1
    per_actor = 16 if gpus_per_actor > 0 else 4  # a GPU actor drains a block in milliseconds
    budget = max(256 << 20, (per_actor * cfg.max_actors + 2 * slots) * ctx.target_max_block_size)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if store:
        budget = min(budget, store / 2)  # never above Ray Data's own default share
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=budget)


def waves(shards: list[Shard], wave_shards: int) -> list[list[Shard]]:
    if not shards:
        return []
    n = wave_shards or len(shards)
    return [shards[i:i + n] for i in range(0, len(shards), n)]


def run(cfg: JobConfig) -> RunSummary:
    """Label every pending shard of `cfg.input` into `cfg.output`, committing wave by wave.

    With `cfg.lease` (nightly), holds OUTPUT/_lease/nightly for the whole run: raises LeaseHeld if another
    live job holds it, LeaseLost (before committing) if it expired and was taken over mid-run.
    """
    t0 = time.perf_counter()
    cfg, model = resolve(cfg)
    if not cfg.lease:
        return _run_waves(cfg, model, t0, None)
    # One leased writer per output: taken before listing pending shards, renewed before every commit.
    with Lease.acquire(cfg.output, name=LEASE_NAME, run_id=cfg.run_id, ttl_s=cfg.lease_ttl_s) as lease:
        return _run_waves(cfg, model, t0, lease)


def _run_waves(cfg: JobConfig, model: ModelPlan, t0: float, lease: Lease | None) -> RunSummary:
    import ray
    from ray.data import DataContext

    # Finish or undo a commit a killed driver left half done, before deciding what is pending. Only the
    # lease holder may also sweep fresh staging folders (without a lease another run may still be writing).
    recover(cfg.output, staging_grace_s=0.0 if lease is not None else STAGING_GRACE_S)
    shards, pending = plan_shards(cfg, model.digest)
    summary = RunSummary(run_id=cfg.run_id, output=cfg.output, model=cfg.model_name, model_digest=model.digest,
                         dt=cfg.dt, shards_total=len(shards), shards_skipped=len(shards) - len(pending))
    log.info("run %s: %d shards, %d pending, model %s (%s)", cfg.run_id, len(shards), len(pending),
             cfg.model_name, model.digest[:19])
    if not pending:
        summary.seconds = time.perf_counter() - t0
        return summary
    init_ray(cfg)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = cfg.progress
    gpus = cfg.gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    all_waves = waves(pending, cfg.wave_shards)
    for k, wave in enumerate(all_waves):
        commit_id = cfg.run_id if len(all_waves) == 1 else f"{cfg.run_id}-w{k:04d}"
        tw = time.perf_counter()
        sink = LabelDatasink(output=cfg.output, run_id=cfg.run_id, staging_id=commit_id,
                             model_digest=model.digest, embeddings=cfg.embeddings)
        try:
            build_dataset(cfg, wave, model, gpus).write_datasink(sink)
        except Exception as e:  # Ray gave up (its retries are bounded): say what broke, in one line
            raise RunFailed(f"run {cfg.run_id}: wave {k + 1}/{len(all_waves)} ({len(wave)} shards) failed, nothing "
                            f"of it committed ({len(summary.manifests)} earlier wave(s) are): {root_cause(e)}") from e
        seconds = time.perf_counter() - tw
        images = sum(r["rows"] for r in sink.results)
        if lease is not None:
            lease.renew()  # raises LeaseLost, committing nothing, if another writer took the output over
        manifest = commit(
            output=cfg.output, run_id=cfg.run_id, commit_id=commit_id, model_name=cfg.model_name,
            model_digest=model.digest, dt=cfg.dt, results=sink.results, expected_shards=[s.uri for s in wave],
            config=cfg.to_dict(), stats={"seconds": round(seconds, 3), "wave": k, "waves": len(all_waves),
                                         "family": model.info.family, "head": model.head.kind,
                                         "checkpoint_digest": model.info.digest,
                                         "images_per_s": round(images / seconds, 2) if seconds else 0.0},
        )
        summary.manifests.append(manifest)
        log.info("committed %s: %d shards, %d images in %.1fs", commit_id, len(wave),
                 manifest["counts"]["images"], seconds)
    summary.seconds = time.perf_counter() - t0
    return summary
