"""The caller of an HTTP request, from `Authorization: Bearer <JWT>` exactly as over gRPC: no
header is a public caller (None); a header that is not a valid bearer token is refused (401)."""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway_service.auth import AuthError, Identity
from gateway_service.errors import Failure, GatewayError
from gateway_service.http.state import VERIFIER


async def caller(request: web.Request) -> Identity | None:
    values = request.headers.getall(hdrs.AUTHORIZATION, [])
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("send one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return await request.app[VERIFIER].verify(token.strip())


async def signed_in(request: web.Request) -> Identity:
    identity = await caller(request)
    if identity is None:
        raise GatewayError(
            Failure.UNAUTHENTICATED,
            "AUTHENTICATION_REQUIRED",
            "sign in: Authorization: Bearer <JWT>",
        )
    return identity
