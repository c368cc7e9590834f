"""POST /webhooks/lemonsqueezy: the HTTP face of the LemonSqueezy processor."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway_service.errors import Failure, GatewayError
from gateway_service.webhooks.lemonsqueezy import LemonSqueezyProcessor, signature_valid

log = logging.getLogger(__name__)

PATH = "/webhooks/lemonsqueezy"
MAX_BODY_BYTES = 1 << 20


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "reason": reason}}, status=status
    )


def lemonsqueezy_route(processor: LemonSqueezyProcessor, secret: str | None) -> web.RouteDef:
    async def handle(request: web.Request) -> web.Response:
        if not secret:
            return _error(503, "WEBHOOKS_NOT_CONFIGURED", "LEMONSQUEEZY_WEBHOOK_SECRET is not set")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(
                413, "BODY_TOO_LARGE", f"webhook bodies are at most {MAX_BODY_BYTES} bytes"
            )
        # The whole body (content.read(n) would return only what has arrived so far); aiohttp
        # refuses bodies over the app's client_max_size before buffering them.
        raw = await request.read()
        if len(raw) > MAX_BODY_BYTES:
            return _error(
                413, "BODY_TOO_LARGE", f"webhook bodies are at most {MAX_BODY_BYTES} bytes"
            )
        # Verified on the raw bytes, before anything is parsed.
        if not signature_valid(raw, request.headers.get("X-Signature"), secret):
            return _error(401, "INVALID_SIGNATURE", "missing or invalid X-Signature")
        try:
            outcome = await processor.handle(raw)
        except GatewayError as exc:
            if exc.failure is Failure.UNAVAILABLE:
                # Not applied: LemonSqueezy retries on a non-2xx answer.
                return _error(503, exc.reason, "ledger unavailable; retry later")
            log.error("lemonsqueezy webhook failed: %s", exc.reason)
            return _error(500, exc.reason, "the event could not be applied; retry later")
        return web.json_response({"status": str(outcome.status), "detail": outcome.detail})

    return web.post(PATH, handle)
