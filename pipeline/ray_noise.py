"""Two lines Ray prints in every run that a user reads as failures, kept out of the driver's output (nothing else).

- core_worker.cc, ERROR: "Actor with class name: 'MapWorker(MapBatches(Predictor))' ... has constructor arguments
  in the object store and max_restarts > 0". Ray Data hands every actor-pool worker its DataContext and UDF as
  ObjectRefs, so any restartable actor pool triggers it (ray-project/ray#57733); ours must restart (a killed
  predictor is replaced) and the driver holds those refs for the whole execution. The C++ core worker writes it to
  fd 2, past Python logging, once per process: `quiet` spends that once on a throwaway restartable actor created
  while fd 2 points at /dev/null (a few milliseconds; the actor is killed at once).
- RayDeprecationWarning: "`ray_remote_args` is deprecated". Ray 2.60's map_batches has no named parameter for
  max_retries, max_restarts and max_task_retries, the bounded retries the README promises: that warning, and only
  it, is ignored.
(Ray Data's "Data sink ... finished. N rows" line, which counted marker rows, is gone with the datasink: the plan
consumes the stream itself, and `waves.WaveCommitter` logs the images each commit holds.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

_actor_warning_spent = False


def quiet() -> None:
    """Call after ray.init, before the first dataset runs; every run (test harnesses reset warning filters)."""
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
    _spend_actor_warning()


def _spend_actor_warning() -> None:
    global _actor_warning_spent
    if _actor_warning_spent:
        return
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Spend:
        def __init__(self, _ref_arg: object):
            pass

    arg = ray.put(None)
    with _fd2_to_devnull():
        actor = _Spend.remote(arg)  # the warning is written here, synchronously, into /dev/null
    ray.kill(actor, no_restart=True)
    _actor_warning_spent = True


@contextlib.contextmanager
def _fd2_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
