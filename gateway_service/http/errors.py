"""How a refusal looks over HTTP: one table from the core's `Failure` to an HTTP status, and one
JSON body for every error, `{"error": {"code": <status>, "message", "reason"[, "field"]}}`
(the `Error` model below: what is sent and what the document says).

Messages come from GatewayError / AuthError, which never quote a token or a key; nothing here
adds a request value to a message, only field names. The core names fields as the gRPC API does
(`max_tokens`); a refusal names them as the HTTP API's request models do (`maxTokens`,
`shapes.wire_name`), so there is no table of names to keep in step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, NotRequired

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from typing_extensions import TypedDict  # pydantic reads it on Python < 3.12

from gateway_service.auth import AuthError
from gateway_service.errors import Failure, GatewayError
from gateway_service.http.disconnect import CLIENT_CLOSED_REQUEST, ClientGone
from gateway_service.http.shapes import reply, to_data, wire_name
from gateway_service.limits.rate import rate_headers

log = logging.getLogger(__name__)

HTTP_STATUS: Mapping[Failure, int] = {
    Failure.INVALID_ARGUMENT: 400,
    Failure.UNAUTHENTICATED: 401,
    Failure.INSUFFICIENT_BALANCE: 402,
    Failure.PERMISSION_DENIED: 403,
    Failure.NOT_FOUND: 404,
    Failure.CONFLICT: 409,
    Failure.RATE_LIMITED: 429,
    Failure.INTERNAL: 500,
    Failure.UNAVAILABLE: 503,
    Failure.TIMEOUT: 504,
}

# Refusals that are HTTP's own (no core Failure behind them): status -> reason.
HTTP_REASONS: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "AUTHENTICATION_REQUIRED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "BODY_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL",
}

# Without a hint from upstream, a rate-limited caller is told to wait this long.
DEFAULT_RETRY_AFTER_SECONDS = 1


class HttpRefusal(Exception):
    """A refusal that is HTTP's own, with no core Failure behind it (415, 403 for an origin)."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or HTTP_REASONS.get(status, "ERROR")


@reply
class ErrorDetail(TypedDict):
    code: int
    """the HTTP status"""
    message: str
    """what went wrong, for a person"""
    reason: str
    """what went wrong, for a program: INVALID_ARGUMENT, INVALID_JSON, AUTHENTICATION_REQUIRED,
    INVALID_TOKEN, TOKEN_EXPIRED, INSUFFICIENT_BALANCE, IDEMPOTENCY_KEY_REUSED,
    PROVIDER_RATE_LIMITED, LEDGER_UNAVAILABLE, BODY_TOO_LARGE, NOT_FOUND, ..."""
    field: NotRequired[str]
    """the request field at fault (400 only)"""


@reply
class Error(TypedDict):
    """Every refusal, whatever its status."""

    error: ErrorDetail


def error_body(status: int, message: str, reason: str, field: str | None = None) -> dict[str, Any]:
    detail = ErrorDetail(code=status, message=message, reason=reason)
    if field:
        detail["field"] = field
    return to_data(Error, Error(error=detail))


def error_response(
    status: int,
    message: str,
    reason: str | None = None,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = error_body(status, message, reason or HTTP_REASONS.get(status, "ERROR"), field)
    return web.json_response(body, status=status, headers=headers)


class InvalidInput(GatewayError):
    """Bad input found by the edge itself: its field is already spelled as the client sent it."""

    def __init__(self, field: str | None, message: str, reason: str = "INVALID_ARGUMENT") -> None:
        super().__init__(
            Failure.INVALID_ARGUMENT, reason, message, {"field": field} if field else None
        )


def _camel(exc: GatewayError) -> tuple[str, str | None]:
    """The error's message and field, with the field spelled as the HTTP API spells it."""
    field = exc.metadata.get("field")
    if field is None or isinstance(exc, InvalidInput):
        return exc.message, field
    camel = wire_name(field)
    message = exc.message
    if message.startswith(f"{field}:"):
        message = camel + message[len(field) :]
    return message, camel


def retry_after(exc: GatewayError) -> str | None:
    """The Retry-After header value (whole seconds) a refusal should carry, if any."""
    if exc.retry_after is not None:
        return str(max(1, math.ceil(exc.retry_after)))
    if exc.failure is Failure.RATE_LIMITED:
        return str(DEFAULT_RETRY_AFTER_SECONDS)
    return None


def gateway_error(exc: GatewayError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers for a core refusal (also used for an SSE `error` event)."""
    status = HTTP_STATUS[exc.failure]
    message, field = _camel(exc)
    headers = rate_headers(exc.rate)
    if (wait := retry_after(exc)) is not None:
        headers[hdrs.RETRY_AFTER] = wait
    if status == 401:
        headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
    return status, error_body(status, message, exc.reason, field), headers


def gateway_error_response(exc: GatewayError) -> web.Response:
    status, body, headers = gateway_error(exc)
    return web.json_response(body, status=status, headers=headers)


def auth_error_response(exc: AuthError) -> web.Response:
    return error_response(
        401,
        str(exc),
        exc.reason,
        headers={hdrs.WWW_AUTHENTICATE: 'Bearer error="invalid_token"'},
    )


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPNotFound):
        message = f"no such endpoint: {request.method} {request.path[:200]}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed here; use {allowed}"
        headers[hdrs.ALLOW] = allowed
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = f"request body exceeds {request.client_max_size} bytes"
    else:
        message = exc.reason
    return error_response(status, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal becomes the JSON error body: core refusals, bad tokens, aiohttp's own
    (404 unknown route, 405, 413, a body it cannot decode: 400) and, without details, anything
    unexpected (500)."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return gateway_error_response(exc)
    except AuthError as exc:
        return auth_error_response(exc)
    except HttpRefusal as exc:
        return error_response(exc.status, exc.message, exc.reason)
    except ClientGone:
        return web.Response(status=CLIENT_CLOSED_REQUEST)  # nobody reads it: for the access log
    except web.RequestPayloadError:
        # Bad chunking or Content-Encoding: the client's bytes, not our failure. Not quoted.
        return error_response(400, "the body could not be decoded", "MALFORMED_REQUEST")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_exception_response(request, exc)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error", "INTERNAL")
