"""What a call's answer tells of its caller's rate limit: one set of fields, sent as the
RateLimit-* headers (the IETF draft's names) over HTTP and as lower-case metadata over gRPC, on
answers and on refusals alike."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateInfo:
    """The caller's requests-per-minute state after a call (or a refusal)."""

    limit: int
    remaining: int
    reset_seconds: float  # until the caller's bucket is full again

    def fields(self) -> tuple[tuple[str, str], ...]:
        return (
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(self.remaining)),
            ("RateLimit-Reset", str(math.ceil(self.reset_seconds))),
        )


def rate_headers(rate: RateInfo | None) -> dict[str, str]:
    return dict(rate.fields()) if rate is not None else {}


def rate_metadata(rate: RateInfo | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata keys are lower case."""
    return tuple((k.lower(), v) for k, v in rate.fields()) if rate is not None else ()
