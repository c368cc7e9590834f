"""How many streams this process runs at once, over both transports together.

A stream holds a client connection, a provider connection, a hold and some buffers for as long as
it runs, and a client can make it run long by reading slowly. Without a cap, enough of them
exhaust memory and file descriptors before anything refuses the next one. So one `StreamSlots`
(MAX_CONCURRENT_STREAMS) is shared by the gRPC StreamText method and the HTTP
/v1/generate/stream handler (the app wires the same object into both): past the cap a new stream
is refused at once, before it reserves or calls anything (gRPC RESOURCE_EXHAUSTED, HTTP 503, both
with reason TOO_MANY_STREAMS and a retry after a second). It is a process-wide guard; what one
caller may run at once is the rate limiter's (gateway_service.limits).
"""

from __future__ import annotations

REASON = "TOO_MANY_STREAMS"
MESSAGE = "the gateway is running as many streams as it can; retry shortly"
RETRY_AFTER_SECONDS = 1


class StreamSlots:
    """A counter of running streams with a ceiling (None: no ceiling). Single event loop: no
    lock needed, `take` and `release` never await."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_use = 0
        self.refused = 0

    def take(self) -> bool:
        """One slot for a new stream, or False (and the stream must be refused)."""
        if self.limit is not None and self.in_use >= self.limit:
            self.refused += 1
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
