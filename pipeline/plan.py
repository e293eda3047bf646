"""Wires the stages into one Ray Data streaming plan, and commits its output. The only module that does.

    list shards (driver)    -> pending = all shards - shards committed for this model digest
    read shard (CPU task)   -> read rows (`sources.read_rows`): one per image, + 1 marker row per shard
    preprocess (CPU task)   -> input rows: + inputs uint8 (patch tokens or pixels), width, height, status
    classify (actor pool)   -> prediction rows: + label, score, top-k (inputs dropped)
    WaveCommitter (driver)  -> consumes the stream: stages Parquet files, commits a manifest per wave

The row formats are `pipeline.schema`'s; this module types none of its own.

One Ray Data execution per run: the actors start once, and waves commit while later shards keep flowing.
Each shard ends with one marker row that carries how many images the reader produced; the commit
checks every shard's written rows against it, so a shard is committed whole or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipeline import ray_noise
from pipeline.cluster import NodeWatch, watch_head
from pipeline.commit import STAGING_GRACE_S, recover
from pipeline.config import JobConfig, redact
from pipeline.layout import committed_shards
from pipeline.lease import Lease, version_lease
from pipeline.preprocess import preprocess_batch
from pipeline.sources import Shard, iter_examples, list_shards, read_rows
from pipeline.waves import WaveCommitter

log = logging.getLogger(__name__)

# A worker that dies (OOM, segfault in a decoder) is retried a few times, then the job fails with
# Ray's error instead of retrying forever. Distinct remote args also keep Ray from fusing the CPU
# stages into the GPU actor: preprocessing must scale on its own CPUs.
TASK_RETRIES = 3
ACTOR_RESTARTS = -1  # the predictor holds no state a restart loses
ACTOR_TASK_RETRIES = 4
EXIT_HEAD_LOST = 1  # the driver's exit status when the Ray head is lost mid-run (cluster.HeadWatch)


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


def read_and_preprocess(batch: dict[str, np.ndarray], *, image_column: str, key_column: str, rows_per_batch: int,
                        contract: Any, max_pixels: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard descriptors (`build_dataset`'s items) -> batches of input rows, each shard ending in
    its marker row.

    Reading (`sources.read_rows`) and preprocessing compose here, in the plan, so one CPU task streams one
    shard; each batch of `rows_per_batch` images is decoded as soon as it is read.
    """
    for uri, fmt in zip(batch["uri"], batch["format"], strict=True):
        shard = Shard(uri=str(uri), format=str(fmt))
        for rows in read_rows(shard, image_column=image_column, key_column=key_column, rows_per_batch=rows_per_batch):
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
    nodes_lost: list[str] = field(default_factory=list)  # Ray node ids alive at the start, dead at the end
    actor_time: dict[str, Any] | None = None  # the model actors' time in their UDF (`model_actor_time`)

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
            "nodes_lost": self.nodes_lost,
            "actor_time": self.actor_time,
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


def actor_threads(cfg: JobConfig) -> int:
    """Torch threads of a predictor actor: as many as the CPUs it asked Ray for, rounded up (1.5 -> 2)."""
    return max(1, math.ceil(cfg.cpus_per_actor))


def pick_dtype(cfg: JobConfig, gpus_per_actor: float) -> tuple[str, str]:
    """(dtype, why): --dtype, or for auto bf16 on a GPU, and on a CPU bf16 only where it measures faster."""
    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype"
    if gpus_per_actor > 0:
        return "bfloat16", "GPU"
    from pipeline.predict import cpu_bf16_faster

    faster, why = cpu_bf16_faster(actor_threads(cfg))
    return ("bfloat16" if faster else "float32"), why


def build_dataset(cfg: JobConfig, shards: list[Shard], model: ModelPlan, gpus_per_actor: float,
                  dtype: str = "float32", layout: str = "split", fused_pool: int | None = None):
    """The streaming plan of a run (not yet executed), in one of two layouts:

    split: read+decode tasks (CPU) -> model inputs through the object store -> predictor actors (GPU or CPU);
    fused: actors that read, decode and label whole shards themselves (CPU clusters: no inputs cross the
           object store, and every CPU of an actor runs both decoding and the model).
    Both emit the same stream: prediction rows and one marker row per shard. `fused_pool`: the fused layout's
    actors (default: `fused_actors(cfg)`).
    """
    import ray

    # torch is imported here and in resolve(), not at module level: CPU workers unpickle the preprocessing
    # UDF by importing this module, and torch would add ~1.5 s to each worker's start and ~180 MB to its memory.
    from pipeline.predict import Predictor

    items = [{"uri": s.uri, "format": s.format} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    _bound_inflight(ds.context, cfg, model.contract, gpus_per_actor)
    read_kwargs = {"image_column": cfg.image_column, "key_column": cfg.key_column,
                   "rows_per_batch": cfg.preprocess_batch_size, "contract": model.contract,
                   "max_pixels": cfg.max_image_pixels}
    predictor_kwargs = {"model": cfg.model, "family": model.info.family, "head": model.head,
                        "checkpoint_digest": model.info.digest, "top_k": cfg.top_k, "dtype": dtype,
                        "embeddings": cfg.embeddings, "num_threads": actor_threads(cfg),
                        "batch_size": cfg.batch_size, "compile": cfg.compile}
    actors = dict(num_cpus=cfg.cpus_per_actor, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES)
    if layout == "fused":
        n = fused_pool or fused_actors(cfg)
        return ds.map_batches(ShardLabeler, batch_size=1, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(min_size=n, max_size=n), num_gpus=0,
                              fn_constructor_kwargs={"read_kwargs": read_kwargs, "predictor_kwargs": predictor_kwargs},
                              runtime_env={"env_vars": FUSED_ACTOR_ENV}, **actors)
    # One task per shard. Two chained map_batches (read batch_size=1, preprocess batch_size=64) would be
    # fused by Ray Data into one task whose input is bundled up to the larger batch size: 64 shards per
    # task, read serially, with no overlap between reading and the model (measured: BENCHMARKS.md).
    ds = ds.map_batches(read_and_preprocess, batch_size=1, batch_format="numpy", num_cpus=cfg.preprocess_cpus,
                        max_retries=TASK_RETRIES, fn_kwargs=read_kwargs)
    return ds.map_batches(Predictor, batch_size=cfg.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                          num_gpus=gpus_per_actor, fn_constructor_kwargs=predictor_kwargs, **actors)


def fused_actors(cfg: JobConfig) -> int:
    """Actors of the fused layout: --max-actors if more than 1, else as many as the cluster's CPUs hold."""
    import ray

    if cfg.max_actors > 1:
        return cfg.max_actors
    return max(1, int(ray.cluster_resources().get("CPU", 1.0) // cfg.cpus_per_actor))


# In the fused actors' environment, so glibc reads it as their process starts, before Ray's own threads
# allocate: malloc keeps at most two arenas for all of the process's threads (default: 8 per core). Without it the
# actors' heap grew with every shard while the bytes in use stayed flat (mallinfo2: ~141 MB in use, free arena
# space +30 MB a shard): fragmentation over many arenas, not a leak (BENCHMARKS.md). Ray merges these env_vars
# into the job's own (credentials included).
FUSED_ACTOR_ENV = {"MALLOC_ARENA_MAX": "2"}


class ShardLabeler:
    """The fused CPU layout's actor: reads, decodes and labels one shard per call, with the model loaded once.

    Decoding runs in a background thread, one batch ahead of the model (Pillow and numpy release the GIL), so
    the actor's CPUs run the decoder and torch's threads at the same time; nothing crosses the object store
    but the prediction rows.
    """

    def __init__(self, read_kwargs: dict[str, Any], predictor_kwargs: dict[str, Any]):
        from pipeline.predict import Predictor

        self.read_kwargs = read_kwargs
        self.predictor = Predictor(**predictor_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[Any]:
        for rows in _prefetched(read_and_preprocess(batch, **self.read_kwargs)):
            yield self.predictor(rows)
        _glibc("malloc_trim", 0)  # hand the freed pages of this shard back


@functools.cache
def _libc() -> Any:
    """The C library, loaded once per process (`find_library` runs ldconfig: not once per shard); None if absent."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _glibc(name: str, *args: int) -> None:
    """Call a glibc malloc tuning function where there is one (Linux); elsewhere nothing."""
    fn = getattr(_libc(), name, None)
    if fn is not None:
        fn(*args)


def _prefetched(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`it`'s items, produced by a background thread up to `depth` ahead; its exceptions re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in it:
                q.put((item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put((None, e))
        q.put((done, None))

    threading.Thread(target=produce, daemon=True, name="decode-ahead").start()
    while True:
        item, error = q.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item


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


def run(cfg: JobConfig) -> RunSummary:
    """Label every pending shard of `cfg.input` into `cfg.output`, committing wave by wave.

    With `cfg.lease` (the default), holds OUTPUT/_lease/<model version>/ for the whole run: raises LeaseHeld if
    another live job of the same model version holds it, LeaseLost (before committing) if it expired and was
    taken over mid-run. Jobs of other model versions may write the same output meanwhile.
    """
    t0 = time.perf_counter()
    cfg, model = resolve(cfg)
    if not cfg.lease:
        return _run_waves(cfg, model, t0, None)
    # One leased writer per output and model version: taken before listing pending shards, renewed before
    # every commit.
    with Lease.acquire(cfg.output, name=version_lease(model.digest), run_id=cfg.run_id,
                       ttl_s=cfg.lease_ttl_s) as lease:
        return _run_waves(cfg, model, t0, lease)


def _run_waves(cfg: JobConfig, model: ModelPlan, t0: float, lease: Lease | None) -> RunSummary:
    import ray
    from ray.data import DataContext

    # Finish or undo a commit a killed driver of this model version left half done, before deciding what is
    # pending. Only the lease holder may also sweep this version's fresh staging folders (without a lease
    # another run may still be writing); other versions' writers may be running: recover leaves theirs alone.
    recover(cfg.output, model_digest=model.digest, staging_grace_s=0.0 if lease is not None else STAGING_GRACE_S)
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
    dtype, why = pick_dtype(cfg, gpus)
    layout = cfg.layout if cfg.layout != "auto" else ("split" if gpus else "fused")
    log.info("run %s: %s layout, %s actors, dtype %s (%s)", cfg.run_id, layout, "GPU" if gpus else "CPU", dtype,
             why)
    nodes = NodeWatch()  # the nodes alive now: each commit and the summary name those lost since
    committer = WaveCommitter(
        output=cfg.output, run_id=cfg.run_id, model_name=cfg.model_name, model_digest=model.digest, dt=cfg.dt,
        shards=[s.uri for s in pending], wave_size=cfg.wave_shards or len(pending), embeddings=cfg.embeddings,
        config=cfg.to_dict(), before_commit=lease.renew if lease is not None else None,
        live_stats=lambda: {"nodes_lost": nodes.lost()},
        stats={"family": model.info.family, "head": model.head.kind, "checkpoint_digest": model.info.digest,
               "dtype": dtype, "dtype_reason": why, "layout": layout})
    summary.manifests = committer.manifests  # filled as waves commit
    ray_noise.quiet()  # Ray's lines that read as failures; the committer logs what each commit holds
    # the model actors' pool size: read once, for the plan and for `actor_time` (a node lost mid-run would
    # make a second reading of the cluster's CPUs disagree with the pool that ran)
    pool = fused_actors(cfg) if layout == "fused" else cfg.max_actors
    ds = build_dataset(cfg, pending, model, gpus, dtype, layout, fused_pool=pool)
    stream = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4))
    with watch_head(lambda why: _head_lost(cfg, committer, why)):
        while True:
            try:
                table = next(stream, None)
            except Exception as e:  # Ray gave up (its retries are bounded): say what broke, in one line
                raise _failed(cfg, committer, e) from e
            if table is None:
                break
            try:
                committer.add(table)
            except (OSError, ValueError) as e:  # staging or commit I/O of this driver
                raise _failed(cfg, committer, e) from e
    committer.finish()
    summary.nodes_lost = nodes.lost()
    summary.seconds = time.perf_counter() - t0
    summary.actor_time = model_actor_time(ds, layout, pool, actor_threads(cfg), summary.seconds)
    return summary


def model_actor_time(ds: Any, layout: str, actors: int, threads: int, run_seconds: float) -> dict[str, Any] | None:
    """How the model actors spent the run, from Ray Data's own stats of this execution: the seconds their UDF
    ran (wall, summed over its calls: one per block), the CPU seconds its process got meanwhile, and so
    - busy: UDF wall / (actors x run seconds): the share of the run the actors were labelling (not waiting
      for input): near 1 means the model, not the pipeline, sets the pace (actors: the pool's maximum, so a
      split-layout pool that scaled below --max-actors reads low);
    - cpu_per_wall: UDF CPU / UDF wall, per thread of the actor: below 1 the actor's threads waited for a CPU
      (or for the fused layout's decoder) while inside the UDF.
    In the fused layout the UDF also reads and decodes (in a thread beside the model). None if Ray's stats do
    not have it; this never fails a run."""
    name = "ShardLabeler" if layout == "fused" else "Predictor"
    try:
        ops = [op for op in ds.get_stats_summary().operators_stats if name in op.operator_name]
        if not ops or ops[-1].wall_time is None:
            return None
        op = ops[-1]
        wall = float(op.wall_time.sum)
        cpu = float(op.cpu_time.sum) if op.cpu_time is not None else None
        return {"operator": op.operator_name, "actors": actors, "calls": int(op.wall_time.count),
                "udf_wall_s": round(wall, 3), "udf_cpu_s": round(cpu, 3) if cpu is not None else None,
                "busy": round(wall / (actors * run_seconds), 3) if run_seconds > 0 else None,
                "cpu_per_wall": round(cpu / wall / max(1, threads), 3) if wall > 0 and cpu is not None else None}
    except Exception as e:  # noqa: BLE001 - telemetry: Ray's stats API moves between versions
        log.debug("no actor time from Ray Data's stats: %s", e)
        return None


def _failed(cfg: JobConfig, committer: WaveCommitter, e: BaseException | str) -> RunFailed:
    why = e if isinstance(e, str) else root_cause(e)
    return RunFailed(f"run {cfg.run_id}: {committer.wave_label} failed, nothing of it committed "
                     f"({len(committer.manifests)} earlier wave(s) are): {why}")


def _head_lost(cfg: JobConfig, committer: WaveCommitter, why: str) -> None:
    """The head is gone: end this driver now, with one line, instead of Ray's silent exit a minute later.

    Nothing of the wave being filled is committed (a commit in progress is finished or undone by the next run's
    `recover`); the next run on a live cluster labels the shards no manifest covers."""
    log.critical("%s; re-run on a live cluster to resume", _failed(cfg, committer, why))
    logging.shutdown()
    os._exit(EXIT_HEAD_LOST)
