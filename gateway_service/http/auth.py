"""The caller of an HTTP request, from `Authorization: Bearer <JWT>` read by the rule gRPC uses
(`auth.bearer_token`): no header is a public caller (None); a header that is not one valid bearer
token, or several headers, are refused (401)."""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway_service.auth import Identity, bearer_token
from gateway_service.errors import Failure, GatewayError
from gateway_service.http.state import VERIFIER


async def caller(request: web.Request) -> Identity | None:
    token = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
    if token is None:
        return None
    return await request.app[VERIFIER].verify(token)


async def signed_in(request: web.Request) -> Identity:
    identity = await caller(request)
    if identity is None:
        raise GatewayError(
            Failure.UNAUTHENTICATED,
            "AUTHENTICATION_REQUIRED",
            "sign in: Authorization: Bearer <JWT>",
        )
    return identity
