"""What can go wrong in the ledger, as the domain sees it. The servicer maps each to a gRPC
status; `reason` is the stable google.rpc.ErrorInfo reason clients branch on."""

from __future__ import annotations

from collections.abc import Mapping


class LedgerError(Exception):
    reason = "LEDGER_ERROR"

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class InvalidArgument(LedgerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", {"field": field})
        self.field = field


class InsufficientBalance(LedgerError):
    reason = "INSUFFICIENT_BALANCE"


class IdempotencyKeyReused(LedgerError):
    reason = "IDEMPOTENCY_KEY_REUSED"


class ReservationNotFound(LedgerError):
    reason = "RESERVATION_NOT_FOUND"


class PurchaseNotFound(LedgerError):
    reason = "PURCHASE_NOT_FOUND"


class ReservationNotHeld(LedgerError):
    reason = "RESERVATION_NOT_HELD"


class SubscriptionNotFound(LedgerError):
    reason = "SUBSCRIPTION_NOT_FOUND"


class DeadLetterNotFound(LedgerError):
    reason = "DEAD_LETTER_NOT_FOUND"


class SubscriptionTokensUnknown(LedgerError):
    """A subscription payment without tokens, and the subscription's tokens_per_period is
    unknown (its variant was not in the catalog when its state was stored)."""

    reason = "SUBSCRIPTION_TOKENS_UNKNOWN"


class Unavailable(LedgerError):
    """The database could not be reached or failed; the caller may retry with the same key."""

    reason = "LEDGER_UNAVAILABLE"


class MonthlyQuotaExceeded(LedgerError):
    """The hold would take the month's usage past the caller's monthly quota."""

    reason = "MONTHLY_QUOTA_EXCEEDED"


class TransactionConflict(LedgerError):
    """The database rolled the transaction back to break a conflict with a concurrent one
    (deadlock, serialization failure): nothing was applied; the same call may be retried."""

    reason = "CONCURRENT_UPDATE"
