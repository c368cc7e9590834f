"""One exception for every provider failure, with a kind the gateway maps to a gRPC status.

Messages are built here from the kind and the HTTP status only: SDK messages can quote the
provider's error body, and OpenAI's 401 body echoes part of the key that was sent.
"""

from __future__ import annotations

import enum
import math
import re
from email.utils import parsedate_to_datetime
from time import time

import anthropic
import httpx2
import openai


class ProviderErrorKind(enum.Enum):
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # 5xx, overloaded, connection refused or dropped
    TIMEOUT = "timeout"
    INVALID_REQUEST = "invalid_request"  # other 4xx: the request itself is wrong
    AUTH = "auth"  # 401/403, or no key to call with
    MALFORMED = "malformed"  # a response that does not parse or lacks usage


_DESCRIPTIONS = {
    ProviderErrorKind.RATE_LIMITED: "rate limited by the provider",
    ProviderErrorKind.UNAVAILABLE: "provider unavailable",
    ProviderErrorKind.TIMEOUT: "provider timed out",
    ProviderErrorKind.INVALID_REQUEST: "provider rejected the request",
    ProviderErrorKind.AUTH: "provider refused the API key",
    ProviderErrorKind.MALFORMED: "provider sent a malformed response",
}
_SAFE_TYPE = re.compile(r"^[a-z_]{1,64}$")


class ProviderError(Exception):
    def __init__(
        self,
        provider: str,
        kind: ProviderErrorKind,
        detail: str | None = None,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        error_type: str | None = None,
    ) -> None:
        message = f"{provider}: {detail or _DESCRIPTIONS[kind]}"
        if status_code is not None:
            message += f" (HTTP {status_code})"
        super().__init__(message)
        self.provider = provider
        self.kind = kind
        self.status_code = status_code
        self.retry_after = retry_after
        self.request_id = request_id
        self.error_type = error_type


_TIMEOUTS = (anthropic.APITimeoutError, openai.APITimeoutError, httpx2.TimeoutException)
_STATUS = (anthropic.APIStatusError, openai.APIStatusError)
_CONNECTION = (anthropic.APIConnectionError, openai.APIConnectionError, httpx2.TransportError)
# JSONDecodeError and pydantic's ValidationError are ValueErrors.
_MALFORMED = (anthropic.APIResponseValidationError, openai.APIResponseValidationError, ValueError)
# Errors the SDKs raise from an `error` event inside a 200 stream.
_OTHER_API = (anthropic.APIError, openai.APIError)


def map_sdk_error(provider: str, exc: BaseException) -> ProviderError | None:
    """The ProviderError for an SDK or transport exception; None for anything else (a bug)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, _TIMEOUTS):
        return ProviderError(provider, ProviderErrorKind.TIMEOUT)
    if isinstance(exc, _STATUS):
        return _from_status(provider, exc)
    if isinstance(exc, _MALFORMED):
        return ProviderError(provider, ProviderErrorKind.MALFORMED)
    if isinstance(exc, _CONNECTION + _OTHER_API):
        return ProviderError(provider, ProviderErrorKind.UNAVAILABLE)
    return None


def _from_status(
    provider: str, exc: anthropic.APIStatusError | openai.APIStatusError
) -> ProviderError:
    status = exc.status_code
    headers = exc.response.headers
    request_id = headers.get("request-id") or headers.get("x-request-id")
    body_type = _error_type(exc.body)
    # Kept for every status: a 503 or 529 may say when to come back as a 429 does.
    retry_after = parse_retry_after(headers.get("retry-after-ms"), headers.get("retry-after"))
    if status == 429:
        kind = ProviderErrorKind.RATE_LIMITED
    elif status in (401, 403):
        kind = ProviderErrorKind.AUTH
    elif status == 408:
        kind = ProviderErrorKind.TIMEOUT
    elif status >= 500:
        kind = ProviderErrorKind.UNAVAILABLE
    else:
        kind = ProviderErrorKind.INVALID_REQUEST
    return ProviderError(
        provider,
        kind,
        status_code=status,
        retry_after=retry_after,
        request_id=request_id,
        error_type=body_type,
    )


def _error_type(body: object) -> str | None:
    # Anthropic: {"type": "error", "error": {"type": ...}}; OpenAI's SDK passes the inner object.
    if isinstance(body, dict):
        inner = body.get("error", body)
        value = inner.get("type") if isinstance(inner, dict) else None
        if isinstance(value, str) and _SAFE_TYPE.match(value):
            return value
    return None


def parse_retry_after(retry_after_ms: str | None, retry_after: str | None) -> float | None:
    """Seconds to wait, from `retry-after-ms` or `retry-after` (seconds or an HTTP date), at
    most MAX_RETRY_AFTER; a value that is no number of seconds (`inf`, `nan`) is none."""
    if retry_after_ms:
        try:
            return _seconds(float(retry_after_ms) / 1000)
        except ValueError:
            pass
    if not retry_after:
        return None
    try:
        return _seconds(float(retry_after))
    except ValueError:
        pass
    try:
        return _seconds(parsedate_to_datetime(retry_after).timestamp() - time())
    except (TypeError, ValueError):
        return None


# A provider's wait longer than this is passed on as this (callers' Retry-After stays sane).
MAX_RETRY_AFTER = 3600.0


def _seconds(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a number of seconds")
    return min(MAX_RETRY_AFTER, max(0.0, value))
