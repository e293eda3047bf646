"""The product measured: decode per core, the model-only bound, and `pipeline.plan.run` end to end.

    decode       pipeline.preprocess.decode_image on one core: images/s per core
    model-only   Predictor.classify on pre-made model inputs, in Ray actors laid out exactly like the e2e job's
                 (same actors, CPUs, threads, batch, head): the bound the e2e job can reach with its model's CPUs
    e2e          pipeline.plan.run: listing, read + decode tasks, actor pool, Parquet sink, manifest commits

Every model is given as `vitlabel run` takes it (`ModelSpec`: checkpoint, family, zero-shot labels or few-shot
examples), and the predictor gets the head the plan would build for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.bench.corpus import Corpus
from jobs.bench.harness import rate, ray_session, timed_loop, torch_threads
from jobs.bench.settings import Layout, Settings


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint and how a run labels with it: JobConfig's model, model_family, labels and examples."""

    path: str
    family: str = "auto"
    labels: str = ""  # zero-shot vocabulary (comma-separated), for a model with a text tower
    examples: str = ""  # few-shot examples folder, for a features-only model

    def job_config(self, s: Settings, lay: Layout | None, **fields: Any) -> Any:
        """The JobConfig of a run of this model in the bench's dtype and batch size: laid out as `lay` (a split
        layout: decode tasks + model actors), or with `vitlabel run`'s own defaults for everything else (None)."""
        import dataclasses

        from pipeline.config import JobConfig

        if lay is not None:
            fields = {"preprocess_batch_size": s.batch_size, "preprocess_cpus": lay.preprocess_cpus,
                      "min_actors": lay.actors, "max_actors": lay.actors, "cpus_per_actor": lay.cpus_per_actor,
                      "gpus_per_actor": lay.gpus_per_actor, **fields}
            if "layout" in {f.name for f in dataclasses.fields(JobConfig)}:
                fields["layout"] = "split"
        return JobConfig(model=self.path, model_family=self.family, labels=self.labels, examples=self.examples,
                         dtype=s.dtype, batch_size=s.batch_size, compile=s.compile, progress=False, **fields)


def measure_decode(corpus: Corpus, contract: Any, seconds: float) -> float:
    """This pipeline's decode + preprocessing (JPEG draft mode, uint8 model input) on one core: images/s."""
    from pipeline.preprocess import decode_image

    data = [corpus.image(i).read_bytes() for i in range(min(len(corpus.pool), 256))]
    with torch_threads(1):
        return timed_loop(lambda b: decode_image(b, contract), data, seconds)


def model_inputs(corpus: Corpus, contract: Any, n: int) -> np.ndarray:
    """n decoded images of the corpus: one batch of model input, uint8 [n, ...]."""
    from pipeline.preprocess import decode_image

    return np.stack([decode_image(corpus.image(i).read_bytes(), contract)[0] for i in range(n)])


class ModelBench:
    """Ray actor: the e2e actor's Predictor, timed on pre-made inputs (no decoding, no Ray Data)."""

    def __init__(self, inputs: np.ndarray, predictor_kwargs: dict[str, Any]):
        from pipeline.predict import Predictor

        self.inputs = np.ascontiguousarray(inputs)
        self.predictor = Predictor(**predictor_kwargs)

    def run(self, seconds: float) -> tuple[int, float]:
        self.predictor.classify(self.inputs)  # warm up (and compile)
        self.predictor.classify(self.inputs)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.predictor.classify(self.inputs)  # ends with a device -> host copy: synchronised
            n += len(self.inputs)
        return n, time.perf_counter() - t0


def predictor_kwargs(s: Settings, spec: ModelSpec) -> dict[str, Any]:
    """What the plan hands each predictor actor for this model: family, head (as the plan resolves it), digest."""
    from pipeline.models import describe_model
    from pipeline.plan import resolve_head

    info = describe_model(spec.path, spec.family)
    head = resolve_head(spec.job_config(s, s.layout), info)
    return {"model": spec.path, "family": info.family, "head": head, "checkpoint_digest": info.digest,
            "dtype": s.dtype, "batch_size": s.batch_size, "compile": s.compile}


def model_only_job(s: Settings, spec: ModelSpec, inputs: np.ndarray, layouts: list[Layout]) -> dict[str, Any]:
    """Model-only images/s for each layout: all its actors timed at once, each a Predictor on pre-made inputs."""
    import ray

    kwargs = predictor_kwargs(s, spec)
    out = []
    with ray_session(s.num_cpus, s.num_gpus):
        remote = ray.remote(ModelBench)
        inputs_ref = ray.put(inputs)
        for lay in layouts:
            handles = [remote.options(num_cpus=lay.cpus_per_actor, num_gpus=lay.gpus_per_actor)
                       .remote(inputs_ref, {**kwargs, "num_threads": lay.threads_per_actor}) for _ in range(lay.actors)]
            results = ray.get([h.run.remote(s.seconds) for h in handles])
            for h in handles:
                ray.kill(h)
            out.append({"layout": lay.name, "actors": lay.actors, "threads_per_actor": lay.threads_per_actor,
                        "gpus_per_actor": lay.gpus_per_actor, "images_per_s": round(sum(n / t for n, t in results), 2)})
    return {"layouts": out}


def e2e_job(s: Settings, lay: Layout | None, spec: ModelSpec, input_url: str, output_url: str,
            wave_shards: int = 0) -> dict[str, Any]:
    """pipeline.plan.run, laid out as `lay` (None: `vitlabel run`'s defaults). `seconds`: from the call to the
    last commit, Ray already up (what the model bound is compared with); `wall_seconds`: the whole job from this
    process's start of work, imports and Ray's start included (what a user waits for; compared with the plain
    loop's whole wall time)."""
    t_wall = time.perf_counter()
    from pipeline.plan import run

    cfg = spec.job_config(s, lay, input=input_url, output=output_url, wave_shards=wave_shards)
    with ray_session(s.num_cpus, s.num_gpus):
        summary = run(cfg)
        wall = time.perf_counter() - t_wall  # Ray's shutdown left out, as the loop's interpreter exit is
    stats = summary.manifests[0].get("stats", {}) if summary.manifests else {}
    d = summary.to_dict()
    if d["error"] or d["shard_errors"]:
        raise RuntimeError(f"e2e run had errors: {d['shard_error_list'] or d['error']}")
    n = d["images"]
    return {"layout": lay.name if lay else "default", "plan_layout": stats.get("layout", "split"), "images": n,
            "seconds": d["seconds"], "images_per_s": rate(n, d["seconds"]), "wall_seconds": round(wall, 3),
            "wall_images_per_s": rate(n, wall), "commits": len(d["commits"]), "wave_shards": wave_shards,
            "actor_time": d.get("actor_time")}


def in_job_model(run: dict[str, Any], bound: float | None) -> dict[str, float | None]:
    """What a run's own model actors say (`pipeline.plan.model_actor_time`), measured inside the run and so at
    the same moments as its wall time: the share of the run they were busy labelling, the CPU their UDF got per
    second of it, and the model's images/s while busy (images / (UDF seconds / actors)) against the isolated
    model-only `bound`. e2e / bound is about busy x model_vs_bound: the pipeline's share of a miss is 1 - busy;
    the rest is the model running slower inside the job than alone (contention, or the machine's own drift)."""
    at = run.get("actor_time") or {}
    wall, actors = at.get("udf_wall_s"), at.get("actors")
    rate_busy = round(run["images"] / (wall / actors), 2) if wall and actors else None
    return {"busy": at.get("busy"), "cpu_per_wall": at.get("cpu_per_wall"), "model_images_per_s": rate_busy,
            "model_vs_bound": round(rate_busy / bound, 3) if rate_busy and bound else None}
