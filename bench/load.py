"""A closed-loop load generator: C concurrent callers spread over worker processes (so the
client's own Python does not cap what it measures), each repeating one async operation for a
fixed time. Reports operations per second and latency percentiles."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# A factory builds, inside the worker process, the operation its callers repeat.
# It receives (worker index, caller count) and returns (operation, cleanup).
OpFactory = Callable[
    [int, int], Awaitable[tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]]
]


@dataclass
class LoadResult:
    ops: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def __add__(self, other: LoadResult) -> LoadResult:
        """Two runs of the same figure as one (interleaved runs, see gateway_bench)."""
        return LoadResult(
            self.ops + other.ops,
            self.errors + other.errors,
            self.seconds + other.seconds,
            self.latencies_ms + other.latencies_ms,
        )

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def _run_worker(
    factory: OpFactory, worker: int, callers: int, seconds: float
) -> tuple[int, int, list[float]]:
    op, cleanup = await factory(worker, callers)
    latencies: list[float] = []
    errors = 0
    # Warm up: connections open, statements prepared.
    await asyncio.gather(*(op(c) for c in range(callers)))
    deadline = time.perf_counter() + seconds

    async def caller(c: int) -> None:
        nonlocal errors
        while (start := time.perf_counter()) < deadline:
            try:
                await op(c)
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(caller(c) for c in range(callers)))
    await cleanup()
    return len(latencies), errors, latencies


def _worker_main(factory: OpFactory, worker: int, callers: int, seconds: float, out: Any) -> None:
    out.put(asyncio.run(_run_worker(factory, worker, callers, seconds)))


def run_load(
    factory: OpFactory, concurrency: int, seconds: float, processes: int = 2
) -> LoadResult:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    per = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    procs = [
        ctx.Process(target=_worker_main, args=(factory, i, n, seconds, out))
        for i, n in enumerate(per)
        if n
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    ops = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = [x for r in results for x in r[2]]
    return LoadResult(ops=ops, errors=errors, seconds=seconds, latencies_ms=latencies)
