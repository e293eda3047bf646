"""How a measured job runs: a fresh Python process of its own (its driver), which starts its own local Ray.

Its result comes back through a pipe, with the peak memory of that process and of everything it started, so no
job's memory includes the bench's or another job's.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs.bench.corpus import Corpus, make_corpus
from jobs.bench.machine import load_average, machine
from jobs.bench.memory import MemorySampler
from jobs.bench.settings import Settings, config_section

log = logging.getLogger(__name__)

# Set in every job process before anything imports transformers: no download attempts, no progress bars.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}


def in_job_process(fn: Callable[..., dict[str, Any]], *args: Any, memory: bool = True) -> dict[str, Any]:
    """`fn(*args)` in a fresh (spawned) process; its dict, plus the peak memory of it and all it started."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_job_main, args=(send, logging.getLogger().level, fn, args), name=fn.__name__)
    proc.start()
    send.close()
    sampler = MemorySampler(proc.pid) if memory else contextlib.nullcontext()
    with sampler:
        try:
            out = recv.recv()
        except EOFError:
            out = {"error": f"{fn.__name__}: the job process died (exit code {proc.join(30) or proc.exitcode})"}
        proc.join()
    if "error" in out:
        raise RuntimeError(f"bench job {fn.__name__} failed:\n{out['error']}")
    return {**out, **sampler.result()} if memory else out


def _job_main(send: Any, level: int, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    try:
        send.send(fn(*args))
    except BaseException:
        send.send({"error": traceback.format_exc()})
    finally:
        send.close()


@contextlib.contextmanager
def ray_session(num_cpus: int, num_gpus: int) -> Iterator[None]:
    """The job process's own local Ray."""
    import ray

    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 2) if seconds > 0 else 0.0


def timed_loop(fn: Callable[[Any], Any], items: list[Any], seconds: float) -> float:
    """Calls per second of `fn` over `items` (cycled) for about `seconds`, after one warm-up call."""
    fn(items[0])
    n, t0 = 0, time.perf_counter()
    while True:
        for x in items:
            fn(x)
            n += 1
            if n % 16 == 0 and time.perf_counter() - t0 >= seconds:
                return rate(n, time.perf_counter() - t0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch intra-op threads = n inside the block (decode timings run on one core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def bench_session(s: Settings, argv: list[str] | None) -> Iterator[tuple[dict[str, Any], Corpus, Path]]:
    """(result, corpus, scratch) of one bench run: the result starts with the command, machine, load and
    config, and ends with the load and the bench's seconds; scratch tables are removed at the end."""
    t_start = time.perf_counter()
    s.workdir.mkdir(parents=True, exist_ok=True)
    scratch = s.workdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {"command": " ".join(["vitlabel bench", *(argv or [])]), "machine": machine(),
                              "load_average_start": load_average(), "config": config_section(s)}
    log.info("bench: corpus of %d distinct photos in %s", s.unique_images, s.workdir)
    corpus = make_corpus(s.workdir, s.unique_images, s.shard_images, s.seed)
    result["corpus"] = {**corpus.stats, "images_per_shard": s.shard_images}
    yield result, corpus, scratch
    result["load_average_end"] = load_average()
    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    shutil.rmtree(scratch, ignore_errors=True)
