"""Rolling commits: the driver consumes the one prediction stream of a run and commits it wave by wave.

The run is ONE Ray Data execution: the actors start once and never drain between waves. Its output (small
prediction rows plus one marker row per shard, never the model inputs) streams to the driver, which
- keeps each shard's rows until the shard is complete: its marker row has arrived (it carries the shard's image
  count) AND that many image rows have. The marker is the read task's last row, but with separate preprocessing
  tasks and an actor pool the blocks of one shard reach the driver in any order, so the marker may come first
  (rows == images is checked again by the commit);
- adds complete shards, in the order they complete, to the current wave, and stages the wave's rows as
  Parquet files under `_staging/<commit id>.v<version>/` as they accumulate (memory stays bounded);
- commits the wave (write-ahead intent, moves, manifest last: `commit.commit`) as soon as it holds
  `wave_shards` complete shards, while later shards keep flowing through the same actors.

So a killed driver loses only the wave being filled plus the shards in flight (about two waves' worth at most:
the stream is back-pressured), and everything committed stays committed. The manifests prove exactly-once the
same way as ever: per shard, rows written == the marker's image count, or the commit is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit import commit
from pipeline.layout import staging_name
from pipeline.schema import MARKER_COLUMN, is_marker
from pipeline.staging import write_staging

log = logging.getLogger(__name__)

STAGE_ROWS = 50_000  # stage a file once a wave's complete shards hold this many rows


class WaveCommitter:
    """Feed it the stream's tables with `add`; it commits a wave whenever `wave_size` shards are complete."""

    def __init__(self, *, output: str, run_id: str, model_name: str, model_digest: str, dt: str,
                 shards: list[str], wave_size: int, embeddings: bool, config: dict[str, Any],
                 stats: dict[str, Any], before_commit: Callable[[], None] | None = None,
                 live_stats: Callable[[], dict[str, Any]] | None = None):
        self.output, self.run_id, self.model_name, self.model_digest, self.dt = output, run_id, model_name, \
            model_digest, dt
        self.pending = set(shards)  # shards not yet complete
        self.wave_size = max(1, wave_size)
        self.n_waves = -(-len(shards) // self.wave_size)
        self.embeddings, self.config, self.stats = embeddings, config, stats
        self.before_commit = before_commit
        self.live_stats = live_stats  # stats read at each commit (the nodes lost so far)
        self.partial: dict[str, list[pa.Table]] = {}  # shard -> its rows so far (not complete yet)
        self.seen: dict[str, int] = {}  # shard -> image rows so far
        self.expected: dict[str, int] = {}  # shard -> its marker's image count, once the marker has arrived
        self.wave: list[str] = []  # complete shards of the wave being filled, in completion order
        self.unstaged: list[pa.Table] = []  # their rows (and markers) not yet in a staged file
        self.unstaged_rows = 0
        self.results: list[dict[str, Any]] = []  # staged files of the wave being filled
        self.manifests: list[dict[str, Any]] = []
        self._wave_started = time.perf_counter()

    @property
    def commit_id(self) -> str:
        k = len(self.manifests)
        return self.run_id if self.n_waves == 1 else f"{self.run_id}-w{k:04d}"

    @property
    def staging_id(self) -> str:
        """`_staging/<commit id>.v<model version>/`: `commit.recover` of another version's writer leaves it alone."""
        return staging_name(self.commit_id, self.model_digest)

    @property
    def wave_label(self) -> str:
        """'wave k/n (m shards)' of the wave being filled, for messages."""
        k = len(self.manifests)
        size = min(self.wave_size, len(self.pending) + len(self.wave))
        return f"wave {k + 1}/{self.n_waves} ({size} shards)"

    def add(self, table: pa.Table) -> None:
        """One block of the stream: image rows and marker rows of any shards, in any order."""
        if table.num_rows == 0:
            return
        sources = table.column("source")
        for src in pc.unique(sources).to_pylist():
            if src not in self.pending:
                raise ValueError(f"stream: expected rows of the run's pending shards, got rows for {src!r} "
                                 "(unknown, or complete already)")
            rows = table.filter(pc.equal(sources, src))
            self.partial.setdefault(src, []).append(rows)
            marks = is_marker(rows)
            n_marks = pc.sum(marks.cast(pa.int64())).as_py() or 0
            self.seen[src] = self.seen.get(src, 0) + rows.num_rows - n_marks
            if n_marks:
                if n_marks > 1 or src in self.expected:
                    raise ValueError(f"stream: expected one marker row for {src!r}, got another")
                self.expected[src] = pc.max(rows.column(MARKER_COLUMN)).as_py()
            if src in self.expected and self.seen[src] >= self.expected[src]:
                self._complete(src)

    def _complete(self, src: str) -> None:
        self.pending.discard(src)
        del self.seen[src], self.expected[src]
        tables = self.partial.pop(src)
        self.wave.append(src)
        self.unstaged.extend(tables)
        self.unstaged_rows += sum(t.num_rows for t in tables)
        if self.unstaged_rows >= STAGE_ROWS:
            self._stage()
        if len(self.wave) == self.wave_size or not self.pending:
            self._commit()

    def _stage(self) -> None:
        if self.unstaged:
            self.results.append(write_staging(self.unstaged, output=self.output, run_id=self.run_id,
                                              model_digest=self.model_digest, embeddings=self.embeddings,
                                              staging_id=self.staging_id))
        self.unstaged, self.unstaged_rows = [], 0

    def _commit(self) -> None:
        self._stage()
        if self.before_commit is not None:
            self.before_commit()  # the lease: raises, committing nothing, if another writer took the output over
        seconds = time.perf_counter() - self._wave_started
        images = sum(r["rows"] for r in self.results)
        live = self.live_stats() if self.live_stats is not None else {}
        k = len(self.manifests)
        manifest = commit(
            output=self.output, run_id=self.run_id, commit_id=self.commit_id, model_name=self.model_name,
            model_digest=self.model_digest, dt=self.dt, results=self.results, expected_shards=self.wave,
            config=self.config, staging_id=self.staging_id,
            stats={**self.stats, **live, "seconds": round(seconds, 3), "wave": k, "waves": self.n_waves,
                   "images_per_s": round(images / seconds, 2) if seconds else 0.0},
        )
        self.manifests.append(manifest)
        counts = manifest["counts"]
        log.info("committed %s (wave %d/%d): %d shards, %d images (%d ok, %d errors) in %.1fs", manifest["commit_id"],
                 k + 1, self.n_waves, len(self.wave), counts["images"], counts["ok"], counts["error"], seconds)
        self.wave, self.results = [], []
        self._wave_started = time.perf_counter()

    def finish(self) -> None:
        """The stream ended: every shard must have completed (and so been committed)."""
        if self.pending or self.wave:
            missing = [f"{s} ({self.seen.get(s, 0)} rows, " + (f"marker {self.expected[s]} images)" if s in
                       self.expected else "no marker row)") for s in sorted(self.pending)[:5]]
            raise ValueError(f"stream ended with {len(self.pending)} shard(s) incomplete, e.g. {'; '.join(missing)}")
