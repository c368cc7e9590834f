"""Authentication through the gateway over gRPC: every bad token is refused with UNAUTHENTICATED
before anything is charged or any provider is called; public callers must bring a key and are
not tracked; the caller is only ever the JWT's `sub`; tier and quota claims reach GetUserStatus."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import AUDIENCE, ISSUER, JWT_SECRET, Stack, bearer, mint
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    fetchval,
    gateway_on,
    own_sim,
    rpc_error,
    sim_stack,
    usage_rows,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

CALL = "[[usage:40,60]] say something"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# ---- token makers ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        **overrides,
    }
    return {k: v for k, v in values.items() if v is not None}  # None: leave the claim out


def hand_signed(
    header: dict[str, Any],
    payload: dict[str, Any],
    key: bytes | None,
    digest: Callable[[], Any] = hashlib.sha256,
) -> str:
    """A JWT built by hand: PyJWT refuses to make the malicious ones (alg none, HS with a PEM)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def alg_none(sub: str) -> str:
    return hand_signed({"alg": "none", "typ": "JWT"}, claims(sub), None)


def test_token_makers_build_what_they_claim() -> None:
    """The refusals below mean something only if the good-token path of the same makers works."""
    good = hs_token("someone")
    assert jwt.decode(good, JWT_SECRET, algorithms=["HS256"], audience=AUDIENCE)["sub"] == "someone"
    by_hand = hand_signed({"alg": "HS256", "typ": "JWT"}, claims("someone"), JWT_SECRET.encode())
    assert (
        jwt.decode(by_hand, JWT_SECRET, algorithms=["HS256"], audience=AUDIENCE)["sub"] == "someone"
    )


def hs_token(sub: str, secret: str = JWT_SECRET, alg: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(sub, **overrides), secret, algorithm=alg)


# Tokens the HS256 gateway must refuse (each built for the given `sub`).
BAD_HS_TOKENS: dict[str, Callable[[str], str]] = {
    "forged-other-secret": lambda s: hs_token(s, secret="another-secret-that-is-long-enough-too!"),
    "expired": lambda s: hs_token(s, exp=int(time.time()) - 300),
    "wrong-audience": lambda s: hs_token(s, aud="some-other-service"),
    "wrong-issuer": lambda s: hs_token(s, iss="https://evil.example"),
    "alg-none": alg_none,
    "alg-none-with-signature": lambda s: hand_signed(
        {"alg": "none", "typ": "JWT"}, claims(s), JWT_SECRET.encode()
    ),
    # The right secret, but an algorithm the gateway was not configured for.
    "alg-not-configured-HS512": lambda s: hand_signed(
        {"alg": "HS512", "typ": "JWT"}, claims(s), JWT_SECRET.encode(), hashlib.sha512
    ),
    "signature-stripped": lambda s: hs_token(s).rsplit(".", 1)[0] + ".",
    "no-exp": lambda s: hs_token(s, exp=None),
    "alg-None-capitalised": lambda s: hand_signed({"alg": "None", "typ": "JWT"}, claims(s), None),
    "no-sub": lambda s: jwt.encode(
        {k: v for k, v in claims(s).items() if k != "sub"}, JWT_SECRET, algorithm="HS256"
    ),
    "garbage": lambda _s: "xyz",
}


async def rich_user(stack: Stack) -> str:
    sub = f"victim-{time.monotonic_ns()}"
    await credit(stack.ledger.stub, sub, 1000)
    return sub


async def nothing_happened(stack: Stack, sim: Sim, sub: str, requests_before: int) -> None:
    b = await balance(stack.ledger.stub, sub)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)
    assert await usage_rows(stack.ledger) == []
    assert sim.stats.requests == requests_before, "a provider was called for a refused caller"
    assert await fetchval(stack.ledger, "SELECT count(*) FROM holds") == 0
    await assert_audit_ok(stack.ledger)


# ---- refused tokens -------------------------------------------------------------------------


async def stream_all(
    call: AsyncIterable[gpb.StreamTextResponse],
) -> list[gpb.StreamTextResponse]:
    return [message async for message in call]


async def test_bad_tokens_are_refused_everywhere(sim_stack: Stack, own_sim: Sim) -> None:
    stack = sim_stack
    sub = await rich_user(stack)  # a real, funded user: only the token can stop the call
    before = own_sim.stats.requests
    for kind, make in BAD_HS_TOKENS.items():
        auth = bearer(make(sub))
        calls: list[Awaitable[Any]] = [
            stack.stub.GenerateText(gpb.GenerateTextRequest(content=CALL), metadata=auth),
            # A bad token is not downgraded to a public caller, even with a key of one's own.
            stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=CALL, api_key="sk-own"), metadata=auth
            ),
            stream_all(stack.stub.StreamText(gpb.GenerateTextRequest(content=CALL), metadata=auth)),
            stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth),
            stack.stub.GetUsageAnalytics(gpb.GetUsageAnalyticsRequest(days=1), metadata=auth),
            stack.stub.GetPurchaseHistory(gpb.GetPurchaseHistoryRequest(), metadata=auth),
            stack.stub.CheckRequestEligibility(
                gpb.CheckRequestEligibilityRequest(estimated_tokens=1), metadata=auth
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == UNAUTHENTICATED, (kind, err.value)
    await nothing_happened(stack, own_sim, sub, before)


async def test_garbage_authorization_headers_are_refused(sim_stack: Stack, own_sim: Sim) -> None:
    before = own_sim.stats.requests
    for header in ("Bearer xyz", "Bearer ", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "xyz"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sim_stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=CALL, api_key="sk-own"),
                metadata=(("authorization", header),),
            )
        assert err.value.code() == UNAUTHENTICATED, header
    assert own_sim.stats.requests == before
    assert await usage_rows(sim_stack.ledger) == []


async def test_a_valid_token_is_served(sim_stack: Stack) -> None:
    """The control for the refusals above: the same user with a good token is served."""
    sub = await rich_user(sim_stack)
    reply = await sim_stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=CALL, max_tokens=100), metadata=bearer(mint(sub))
    )
    assert reply.token_usage.tokens_charged == 125
    assert reply.token_usage.remaining_balance == 675


# ---- HS/RS confusion: a gateway configured for RS256 from a JWKS -----------------------------


class Jwks:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.document = {"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}
        self.url = ""

    def rs_token(self, sub: str, key: rsa.RSAPrivateKey | None = None) -> str:
        return jwt.encode(claims(sub), key or self.key, algorithm="RS256", headers={"kid": "k1"})

    def public_pems(self) -> list[bytes]:
        public = self.key.public_key()
        return [
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        ]


@pytest.fixture(scope="module")
async def jwks() -> AsyncIterator[Jwks]:
    state = Jwks()

    async def serve(_request: web.Request) -> web.Response:
        return web.json_response(state.document)

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/.well-known/jwks.json"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("algorithms", "secret"),
    [(["RS256"], None), (["RS256", "HS256"], JWT_SECRET)],
    ids=["RS256-only", "RS256-and-HS256"],
)
async def test_hs_rs_confusion_is_refused(
    ledger: LedgerHarness,
    own_sim: Sim,
    jwks: Jwks,
    algorithms: list[str],
    secret: str | None,
) -> None:
    async with gateway_on(
        ledger,
        own_sim.url,
        jwt_algorithms=algorithms,
        jwt_jwks_url=jwks.url,
        jwt_secret=secret,
    ) as stack:
        sub = await rich_user(stack)
        before = own_sim.stats.requests

        # Control: a real RS256 token from the JWKS key is accepted.
        status = await stack.stub.GetUserStatus(
            gpb.GetUserStatusRequest(), metadata=bearer(jwks.rs_token(sub))
        )
        assert status.available_tokens == 800

        header = {"alg": "HS256", "typ": "JWT", "kid": "k1"}
        refused = [hand_signed(header, claims(sub), pem) for pem in jwks.public_pems()]
        refused.append(hand_signed(header, claims(sub), jwks.public_pems()[0].strip()))
        refused.append(jwks.rs_token(sub, key=jwks.stranger))  # RS256, not the JWKS key
        refused.append(alg_none(sub))
        for token in refused:
            for call in (
                stack.stub.GenerateText(
                    gpb.GenerateTextRequest(content=CALL), metadata=bearer(token)
                ),
                stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=bearer(token)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == UNAUTHENTICATED

        await nothing_happened(stack, own_sim, sub, before)


# ---- public callers -------------------------------------------------------------------------


async def test_no_token_and_no_key_is_unauthenticated(sim_stack: Stack, own_sim: Sim) -> None:
    before = own_sim.stats.requests
    request = gpb.GenerateTextRequest(content=CALL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sim_stack.stub.GenerateText(request)
    assert rpc_error(err.value) == (UNAUTHENTICATED, "AUTHENTICATION_REQUIRED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream_all(sim_stack.stub.StreamText(request))
    assert rpc_error(err.value) == (UNAUTHENTICATED, "AUTHENTICATION_REQUIRED")
    for call in (
        sim_stack.stub.GetUserStatus(gpb.GetUserStatusRequest()),
        sim_stack.stub.GetUsageAnalytics(gpb.GetUsageAnalyticsRequest(days=1)),
        sim_stack.stub.GetPurchaseHistory(gpb.GetPurchaseHistoryRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == UNAUTHENTICATED
    assert own_sim.stats.requests == before


async def test_public_caller_with_a_key_is_served_and_recorded_without_a_user(
    sim_stack: Stack,
) -> None:
    request = gpb.GenerateTextRequest(
        content="[[usage:1000,500]] hi", model="gpt-4o", api_key="sk-caller-own-key"
    )
    reply = await sim_stack.stub.GenerateText(request)  # no authorization metadata at all
    assert reply.text
    assert not reply.HasField("token_usage")
    assert reply.usage_info.tokens_used == 1500
    assert reply.usage_info.estimated_cost_micro_usd == 7500

    last = None
    async for message in sim_stack.stub.StreamText(request):
        last = message
    assert last is not None
    assert last.done
    assert last.usage_info.tokens_used == 1500

    await sim_stack.gateway.gateway.wait_background()
    # Recorded for the operator's analytics (public BYOK calls), under no user: no account.
    rows = await fetchval(
        sim_stack.ledger,
        "SELECT array_agg(DISTINCT user_id || '/' || user_type || '/' || "
        "(input_tokens + output_tokens)::text) || array[count(*)::text] FROM usage_records",
    )
    assert rows == ["/public_byok/1500", "2"]
    assert (
        await fetchval(sim_stack.ledger, "SELECT count(*) FROM accounts WHERE user_id IS NOT NULL")
        == 0
    )
    assert sim_stack.gateway.outbox.pending == 0

    # Eligibility for a public caller: fine with a key, refused without one.
    ok = await sim_stack.stub.CheckRequestEligibility(
        gpb.CheckRequestEligibilityRequest(estimated_tokens=10, has_api_key=True)
    )
    assert ok.can_make_request
    no = await sim_stack.stub.CheckRequestEligibility(
        gpb.CheckRequestEligibilityRequest(estimated_tokens=10, has_api_key=False)
    )
    assert not no.can_make_request


# ---- the caller is the `sub` claim and nothing else ----------------------------------------

_NAMES_A_USER = re.compile(r"user|sub|account|owner|customer|tenant|uid", re.IGNORECASE)


def test_no_request_message_has_a_field_that_names_a_user() -> None:
    service = gpb.DESCRIPTOR.services_by_name["AiGateway"]
    checked = 0
    for method in service.methods:
        for field in method.input_type.fields:
            assert not _NAMES_A_USER.search(field.name), (method.name, field.name)
            checked += 1
    assert checked >= 10


def _smuggle(request: gpb.GenerateTextRequest, victim: str) -> bytes:
    """The request on the wire plus fields it does not define, each naming the victim: a
    `user_id` as other services number it, and a high field number."""
    extra = b""
    for number in (8, 15, 100, 1000):
        value = victim.encode()
        tag = (number << 3) | 2
        varint = b""
        while True:
            byte, tag = tag & 0x7F, tag >> 7
            varint += bytes([byte | (0x80 if tag else 0)])
            if not tag:
                break
        extra += varint + bytes([len(value)]) + value
    return request.SerializeToString() + extra


async def test_no_request_can_act_as_another_user(sim_stack: Stack, own_sim: Sim) -> None:
    stack = sim_stack
    victim, victim_auth = stack.user("victim")
    attacker, attacker_auth = stack.user("attacker")
    await credit(stack.ledger.stub, victim, 1000)
    await stack.stub.GenerateText(  # 800 - 125 = 675 left
        gpb.GenerateTextRequest(content=CALL, max_tokens=100), metadata=victim_auth
    )

    raw_generate: grpc.aio.UnaryUnaryMultiCallable[bytes, gpb.GenerateTextResponse]
    raw_generate = stack.channel.unary_unary(
        "/rpcai.gateway.v1.AiGateway/GenerateText",
        request_serializer=None,
        response_deserializer=gpb.GenerateTextResponse.FromString,
    )
    spoofed_metadata = (
        *attacker_auth,
        ("x-user-id", victim),
        ("x-forwarded-user", victim),
        ("user-id", victim),
    )
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_generate(
            _smuggle(gpb.GenerateTextRequest(content=f"{CALL} as {victim}"), victim),
            metadata=spoofed_metadata,
        )
    # Charged to the attacker, who has nothing: refused, and the victim is untouched.
    assert rpc_error(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    assert own_sim.stats.requests == before

    # A BYOK call with the same tricks is recorded under the attacker.
    await raw_generate(
        _smuggle(gpb.GenerateTextRequest(content=CALL, api_key="sk-own"), victim),
        metadata=spoofed_metadata,
    )
    await stack.gateway.gateway.wait_background()

    victim_balance = await balance(stack.ledger.stub, victim)
    assert (victim_balance.available_tokens, victim_balance.reserved_tokens) == (675, 0)
    assert [r.user_type for r in await usage_rows(stack.ledger, victim)] == ["subscription"]
    assert [r.user_type for r in await usage_rows(stack.ledger, attacker)] == ["byok"]

    # Every read answers about the caller only.
    status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=spoofed_metadata)
    assert (status.available_tokens, status.has_purchases) == (0, False)
    analytics = await stack.stub.GetUsageAnalytics(
        gpb.GetUsageAnalyticsRequest(days=1, include_history=True), metadata=spoofed_metadata
    )
    assert analytics.summary.total_requests == 1
    assert [h.user_type for h in analytics.history] == [gpb.USER_TYPE_BYOK]
    purchases = await stack.stub.GetPurchaseHistory(
        gpb.GetPurchaseHistoryRequest(page_size=10), metadata=spoofed_metadata
    )
    assert list(purchases.purchases) == []
    mine = await stack.stub.GetPurchaseHistory(
        gpb.GetPurchaseHistoryRequest(page_size=10), metadata=victim_auth
    )
    assert [p.tokens_purchased for p in mine.purchases] == [1000]
    await assert_audit_ok(stack.ledger)


# ---- tier and quota claims ------------------------------------------------------------------


async def test_tier_and_quota_claims_appear_in_user_status(sim_stack: Stack) -> None:
    sub = await rich_user(sim_stack)
    status = await sim_stack.stub.GetUserStatus(
        gpb.GetUserStatusRequest(), metadata=bearer(mint(sub, tier="pro", quota=50_000))
    )
    assert status.subscription_tier == "pro"
    assert status.HasField("quota")
    assert status.quota == 50_000
    assert status.available_tokens == 800
    assert status.user_type == gpb.USER_TYPE_SUBSCRIPTION

    plain = await sim_stack.stub.GetUserStatus(
        gpb.GetUserStatusRequest(), metadata=bearer(mint(sub))
    )
    assert plain.subscription_tier == ""
    assert not plain.HasField("quota")

    odd = await sim_stack.stub.GetUserStatus(
        gpb.GetUserStatusRequest(), metadata=bearer(mint(sub, tier=7, quota="lots"))
    )
    assert odd.subscription_tier == ""
    assert not odd.HasField("quota")


async def test_claim_names_are_configurable(ledger: LedgerHarness, own_sim: Sim) -> None:
    async with gateway_on(
        ledger, own_sim.url, jwt_tier_claim="https://rpcai.test/plan", jwt_quota_claim="limit"
    ) as stack:
        extra: dict[str, Any] = {"https://rpcai.test/plan": "team", "limit": 9, "tier": "x"}
        token = mint("someone", **extra)
        status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=bearer(token))
        assert (status.subscription_tier, status.quota) == ("team", 9)
