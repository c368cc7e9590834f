"""POST /webhooks/lemonsqueezy: the HTTP face of the LemonSqueezy processor."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from gateway_service.errors import Failure, GatewayError
from gateway_service.metrics import WEBHOOK_EVENTS
from gateway_service.webhooks.lemonsqueezy import (
    SOURCE,
    SUBSCRIPTION_EVENTS,
    LemonSqueezyProcessor,
    signature_valid,
)

log = logging.getLogger(__name__)

PATH = "/webhooks/lemonsqueezy"
MAX_BODY_BYTES = 1 << 20
KNOWN_EVENTS = SUBSCRIPTION_EVENTS | {
    "order_created",
    "order_refunded",
    "subscription_payment_success",
    "subscription_payment_refunded",
}


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "reason": reason}}, status=status
    )


def _kind(raw: bytes) -> str:
    """The event's name when it is one we know (a label: never a caller-chosen string)."""
    try:
        name = json.loads(raw)["meta"]["event_name"]
    except (ValueError, KeyError, TypeError):
        return "unparsable"
    return name if name in KNOWN_EVENTS else "other"


def lemonsqueezy_route(processor: LemonSqueezyProcessor, secret: str | None) -> web.RouteDef:
    def counted(kind: str, outcome: str, response: web.Response) -> web.Response:
        WEBHOOK_EVENTS.labels(SOURCE, kind, outcome).inc()
        return response

    async def handle(request: web.Request) -> web.Response:
        if not secret:
            return counted(
                "unverified",
                "not_configured",
                _error(503, "WEBHOOKS_NOT_CONFIGURED", "LEMONSQUEEZY_WEBHOOK_SECRET is not set"),
            )
        too_large = _error(
            413, "BODY_TOO_LARGE", f"webhook bodies are at most {MAX_BODY_BYTES} bytes"
        )
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return counted("unverified", "too_large", too_large)
        # The whole body (content.read(n) would return only what has arrived so far); aiohttp
        # refuses bodies over the app's client_max_size before buffering them.
        raw = await request.read()
        if len(raw) > MAX_BODY_BYTES:
            return counted("unverified", "too_large", too_large)
        # Verified on the raw bytes, before anything is parsed.
        if not signature_valid(raw, request.headers.get("X-Signature"), secret):
            return counted(
                "unverified",
                "invalid_signature",
                _error(401, "INVALID_SIGNATURE", "missing or invalid X-Signature"),
            )
        kind = _kind(raw)
        try:
            outcome = await processor.handle(raw)
        except GatewayError as exc:
            if exc.failure is Failure.UNAVAILABLE:
                # Not applied: LemonSqueezy retries on a non-2xx answer.
                return counted(
                    kind, "unavailable", _error(503, exc.reason, "ledger unavailable; retry later")
                )
            log.error("lemonsqueezy webhook failed: %s", exc.reason)
            return counted(
                kind,
                "error",
                _error(500, exc.reason, "the event could not be applied; retry later"),
            )
        return counted(
            kind,
            str(outcome.status),
            web.json_response({"status": str(outcome.status), "detail": outcome.detail}),
        )

    return web.post(PATH, handle)
