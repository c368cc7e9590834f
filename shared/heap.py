"""Python's cyclic garbage collector, set for a long-running server once it has started.

With CPython's defaults a full collection walks every object alive, and most of them are made
at start-up (the provider SDKs', pydantic's and gRPC's modules, classes and schemas): in the
gateway under the bench's load at 32 callers a full collection came every ~2.5 s and stopped the
event loop for 150-210 ms each time, every call in flight with it (p99 210 ms against a p50 of
40 ms, ~8% of the loop's time). Young collections, every 700 net new container objects, cost
another ~3%, and each one promoted the objects of every call in flight to an older generation,
which is what made the full collections come so often.

After start-up, `settle()`:
- collects once, then freezes what is left: the objects alive at start-up move to the permanent
  generation, which no collection walks again (they live as long as the process anyway);
- raises the young generation's threshold to YOUNG_THRESHOLD: the objects of a call in flight
  are mostly freed by reference counting before a collection sees them, so few are promoted.
Cyclic garbage is still collected, in fewer and larger sweeps of young objects; RSS stays flat
(`make bench`'s memory run).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Net new container objects (allocations minus deallocations) between young collections.
YOUNG_THRESHOLD = 20_000


def settle() -> int:
    """Freeze the objects alive now and raise the young threshold; returns how many were
    frozen. Call once the service is up, before it takes load."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects frozen, thresholds %s", frozen, gc.get_threshold())
    return frozen
