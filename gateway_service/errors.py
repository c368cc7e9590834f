"""What can go wrong in a gateway call, independent of the transport: the gRPC servicer and the
HTTP edge each map a `Failure` to their own status (one table each, in one place)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from gateway_service.limits.rate import RateInfo


class Failure(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    CONFLICT = "conflict"  # an idempotency key reused for a different request
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"  # the ledger or a provider cannot serve now; retry later
    INTERNAL = "internal"


class GatewayError(Exception):
    """A refusal the caller can act on. `message` is safe to return: it never holds a secret."""

    def __init__(
        self,
        failure: Failure,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        rate: RateInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after
        self.rate = rate  # the caller's rate limit state, when a limit refused the call


def invalid(field: str, problem: str) -> GatewayError:
    return GatewayError(
        Failure.INVALID_ARGUMENT, "INVALID_ARGUMENT", f"{field}: {problem}", {"field": field}
    )
