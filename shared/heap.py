"""Python's cyclic garbage collector, set for a long-running server once it has started.

With CPython's defaults a full collection walks every object alive, and most of them are made
at start-up (the provider SDKs', pydantic's and gRPC's modules, classes and schemas): in the
gateway under the bench's load at 32 callers a full collection came every ~2.5 s and stopped the
event loop for 150-210 ms each time, every call in flight with it (p99 210 ms against a p50 of
40 ms, ~8% of the loop's time). Young collections, every 700 net new container objects, cost
another ~3%, and each one promoted the objects of every call in flight to an older generation,
which is what made the full collections come so often.

After start-up, `settle()`:
- collects, then freezes what is left: the objects alive at start-up move to the permanent
  generation, which no collection walks again (they live as long as the process anyway);
- raises the young generation's threshold to YOUNG_THRESHOLD: the objects of a call in flight
  are mostly freed by reference counting before a collection sees them, so few are promoted.
Cyclic garbage is still collected, in fewer and larger sweeps of young objects; RSS stays flat
(`make bench`'s memory run).

`watch_pauses()` reports how long each collection stopped the process (the metric
`rpcai_gc_pause_seconds`), so a change that brings the long pauses back shows on a dashboard.
The collector's callback only appends to a deque: it runs wherever a collection starts, possibly
inside prometheus-client's (non-reentrant) lock on the same thread, so a thread hands the
pauses to the metric every PAUSE_REPORT_SECONDS instead.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

# Net new container objects (allocations minus deallocations) between young collections.
YOUNG_THRESHOLD = 20_000


def settle() -> int:
    """Freeze the objects alive now and raise the young threshold; returns how many were
    frozen. Call once the service is built, before it listens."""
    gc.collect()
    gc.freeze()
    # Again, with nothing left to walk: the collector sizes the next full collection by the
    # old generation it last saw, which was everything just frozen (it would wait for ~25% of
    # a million objects to reach the old generation before sweeping it).
    gc.collect()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects frozen, thresholds %s", frozen, gc.get_threshold())
    return frozen


PAUSE_REPORT_SECONDS = 1.0
# Pauses noted but not yet reported; past this many (the reporter stalled) the oldest are dropped.
MAX_PENDING_PAUSES = 10_000

_pauses: deque[tuple[int, float]] = deque(maxlen=MAX_PENDING_PAUSES)
_started: list[float] = [0.0]
_watching = threading.Lock()
_reporter: threading.Thread | None = None


def _on_collection(phase: str, info: dict[str, int]) -> None:
    # Collections never overlap (the collector holds the GIL throughout), so one start suffices.
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses.append((info["generation"], time.perf_counter() - _started[0]))


def _drain(observe: Callable[[int, float], None]) -> int:
    """Hands every pause noted so far to `observe(generation, seconds)`; returns how many."""
    handed = 0
    while _pauses:
        generation, seconds = _pauses.popleft()
        observe(generation, seconds)
        handed += 1
    return handed


def watch_pauses(observe: Callable[[int, float], None]) -> None:
    """From now on every collection's pause reaches `observe` within PAUSE_REPORT_SECONDS (from
    a daemon thread). Once per process: a second call changes nothing."""
    global _reporter
    with _watching:
        if _reporter is not None:
            return
        gc.callbacks.append(_on_collection)

        def report() -> None:
            while True:
                time.sleep(PAUSE_REPORT_SECONDS)
                try:
                    _drain(observe)
                except Exception:  # a failing metric must not end the reporting
                    log.exception("reporting the garbage collector's pauses failed")

        _reporter = threading.Thread(target=report, name="gc-pauses", daemon=True)
        _reporter.start()
