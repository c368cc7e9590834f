"""JWT verification: HS256 with a secret, RS256/ES256 from a JWKS served over HTTP, key rotation,
and every refusal the gateway promises."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway_service.auth import AuthError, Identity, JwtVerifier

SECRET = "test-jwt-secret-that-is-at-least-32-bytes-long"
ISSUER = "https://issuer.test"
AUDIENCE = "rpcai-gateway"


@dataclass
class Jwks:
    url: str
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    status: int = 200
    hits: int = 0


@dataclass(frozen=True)
class Keys:
    rsa_old: rsa.RSAPrivateKey
    rsa_new: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_old=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_new=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


@pytest.fixture
async def jwks(keys: Keys) -> AsyncIterator[Jwks]:
    state = Jwks(url="")

    async def serve(_request: web.Request) -> web.Response:
        state.hits += 1
        if state.status != 200:
            return web.Response(status=state.status)
        return web.json_response(state.document)

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    state.document = {"keys": [rsa_jwk(keys.rsa_old, "rsa-1"), ec_jwk(keys.ec, "ec-1")]}
    yield state
    await runner.cleanup()


@pytest.fixture
async def make_verifier() -> AsyncIterator[Callable[..., JwtVerifier]]:
    made: list[JwtVerifier] = []

    def make(**overrides: Any) -> JwtVerifier:
        options: dict[str, Any] = {
            "secret": SECRET,
            "jwks_url": None,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["HS256"],
            "leeway_seconds": 30,
        }
        options.update(overrides)
        verifier = JwtVerifier(**options)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.aclose()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "user-42",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "tier": "pro",
        "quota": 5000,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, for forgeries PyJWT refuses to produce (alg none, HS with a PEM)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


async def refused(verifier: JwtVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(token)
    error = caught.value
    # A refusal never echoes the token, nor any of its parts.
    message = str(error)
    assert all(part not in message for part in token.split(".") if len(part) > 8)
    # Nor is PyJWT's exception (whose traceback holds the token) chained for display.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


async def test_valid_hs256(make_verifier: Callable[..., JwtVerifier]) -> None:
    verifier = make_verifier()
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    identity = await verifier.verify(token)
    assert identity == Identity(
        user_id="user-42",
        tier="pro",
        quota=5000,
        claims=jwt.decode(token, options={"verify_signature": False}),
    )


async def test_tier_and_quota_claim_names_are_configurable(
    make_verifier: Callable[..., JwtVerifier],
) -> None:
    verifier = make_verifier(tier_claim="plan", quota_claim="monthly_tokens")
    token = jwt.encode(claims(plan="team", monthly_tokens=70, tier=None), SECRET, algorithm="HS256")
    identity = await verifier.verify(token)
    assert (identity.tier, identity.quota) == ("team", 70)
    # Claims of the wrong type are not trusted as tier or quota.
    token = jwt.encode(claims(plan=3, monthly_tokens="lots"), SECRET, algorithm="HS256")
    identity = await verifier.verify(token)
    assert (identity.tier, identity.quota) == (None, None)


async def test_leeway_accepts_recently_expired(make_verifier: Callable[..., JwtVerifier]) -> None:
    verifier = make_verifier(leeway_seconds=30)
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).user_id == "user-42"


async def test_valid_rs256_and_es256_from_jwks(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256", "ES256"])
    rs = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(sub="user-7"), keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await verifier.verify(rs)).user_id == "user-42"
    assert (await verifier.verify(es)).user_id == "user-7"
    assert jwks.hits == 1  # keys are cached


async def test_concurrent_cold_verifies_fetch_once(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    token = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    identities = await asyncio.gather(*(verifier.verify(token) for _ in range(10)))
    assert {i.user_id for i in identities} == {"user-42"}
    assert jwks.hits == 1


async def test_rotated_key_is_picked_up(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(
        secret=None, jwks_url=jwks.url, algorithms=["RS256"], jwks_min_refetch_seconds=0.2
    )
    old = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await verifier.verify(old)).user_id == "user-42"

    new = jwt.encode(claims(sub="after"), keys.rsa_new, algorithm="RS256", headers={"kid": "rsa-2"})
    # Unknown kid and the rate limit not yet passed: no refetch, refused.
    assert (await refused(verifier, new)).reason == "UNKNOWN_KEY"
    assert jwks.hits == 1
    jwks.document = {"keys": [rsa_jwk(keys.rsa_old, "rsa-1"), rsa_jwk(keys.rsa_new, "rsa-2")]}
    await asyncio.sleep(0.25)
    assert (await verifier.verify(new)).user_id == "after"
    assert jwks.hits == 2


async def test_unknown_kids_cannot_hammer_the_jwks(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(
        secret=None, jwks_url=jwks.url, algorithms=["RS256"], jwks_min_refetch_seconds=60
    )
    for i in range(20):
        token = jwt.encode(claims(), keys.rsa_new, algorithm="RS256", headers={"kid": f"spray-{i}"})
        assert (await refused(verifier, token)).reason == "UNKNOWN_KEY"
    assert jwks.hits == 1


async def test_jwks_unavailable(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    jwks.status = 503
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    token = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await refused(verifier, token)).reason == "KEYS_UNAVAILABLE"


async def test_forged_signature(make_verifier: Callable[..., JwtVerifier]) -> None:
    token = jwt.encode(claims(), "another-secret-of-sufficient-length-000", algorithm="HS256")
    assert str(await refused(make_verifier(), token)) == "token signature invalid"


async def test_tampered_payload(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    token = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    header, _, signature = token.split(".")
    forged_payload = b64(json.dumps(claims(sub="admin")).encode())
    error = await refused(verifier, f"{header}.{forged_payload}.{signature}")
    assert str(error) == "token signature invalid"


async def test_expired(make_verifier: Callable[..., JwtVerifier]) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256")
    assert (await refused(make_verifier(leeway_seconds=30), token)).reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aud": "some-other-service"}, "token audience not accepted"),
        ({"iss": "https://evil.test"}, "token issuer not accepted"),
        ({"exp": None}, "token lacks the exp claim"),
        ({"aud": None}, "token lacks the aud claim"),
        ({"sub": None}, "token lacks the sub claim"),
        ({"sub": ""}, "token lacks the sub claim"),
    ],
)
async def test_claim_refusals(
    make_verifier: Callable[..., JwtVerifier], overrides: dict[str, Any], message: str
) -> None:
    token = jwt.encode(claims(**overrides), SECRET, algorithm="HS256")
    assert str(await refused(make_verifier(), token)) == message


async def test_alg_none(make_verifier: Callable[..., JwtVerifier]) -> None:
    token = hand_signed({"alg": "none", "typ": "JWT"}, claims(), key=None)
    assert (await refused(make_verifier(), token)).reason == "ALGORITHM_NOT_ALLOWED"
    token = hand_signed({"alg": "None", "typ": "JWT"}, claims(), key=None)
    assert (await refused(make_verifier(), token)).reason == "ALGORITHM_NOT_ALLOWED"


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_hs_rs_confusion_with_only_rs256(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    # The classic attack: HS256 "signed" with the RSA public key, which a naive verifier would
    # use as the HMAC secret.
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    token = hand_signed({"alg": "HS256", "kid": "rsa-1"}, claims(), key=public_pem(keys.rsa_old))
    assert (await refused(verifier, token)).reason == "ALGORITHM_NOT_ALLOWED"


async def test_hs_rs_confusion_with_both_configured(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(jwks_url=jwks.url, algorithms=["HS256", "RS256"])
    token = hand_signed({"alg": "HS256", "kid": "rsa-1"}, claims(), key=public_pem(keys.rsa_old))
    assert str(await refused(verifier, token)) == "token signature invalid"
    # ...while real tokens of both kinds pass.
    assert (await verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))).user_id
    rs = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await verifier.verify(rs)).user_id == "user-42"


async def test_key_only_verifies_its_own_algorithm(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    # An ES256 token pointing at the RSA key's kid: the key is bound to RS256.
    verifier = make_verifier(secret=None, jwks_url=jwks.url, algorithms=["RS256", "ES256"])
    token = jwt.encode(claims(), keys.ec, algorithm="ES256", headers={"kid": "rsa-1"})
    assert (await refused(verifier, token)).reason == "ALGORITHM_NOT_ALLOWED"


@pytest.mark.parametrize("alg", ["HS512", "HS384"])
async def test_unconfigured_hmac_algorithm(
    make_verifier: Callable[..., JwtVerifier], alg: str
) -> None:
    token = jwt.encode(claims(), SECRET + SECRET, algorithm=alg)
    assert (await refused(make_verifier(), token)).reason == "ALGORITHM_NOT_ALLOWED"


async def test_unconfigured_asymmetric_algorithm(
    make_verifier: Callable[..., JwtVerifier], jwks: Jwks, keys: Keys
) -> None:
    verifier = make_verifier(jwks_url=jwks.url, algorithms=["HS256", "ES256"])
    token = jwt.encode(claims(), keys.rsa_old, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await refused(verifier, token)).reason == "ALGORITHM_NOT_ALLOWED"
    assert jwks.hits == 0  # refused before any key lookup


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "x" * 9000, "Bearer abc.def.ghi"],
)
async def test_garbage(make_verifier: Callable[..., JwtVerifier], token: str) -> None:
    assert str(await refused(make_verifier(), token)) in {
        "malformed token",
        "token algorithm not allowed",
    }


@pytest.mark.parametrize(
    "options",
    [
        {"algorithms": ["none"]},
        {"algorithms": []},
        {"algorithms": ["HS256"], "secret": None},
        {"algorithms": ["RS256"], "jwks_url": None},
    ],
)
def test_misconfiguration_fails_at_start(options: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "secret": SECRET,
        "jwks_url": None,
        "issuer": None,
        "audience": None,
        "algorithms": ["HS256"],
    }
    values.update(options)
    with pytest.raises(ValueError, match=r"JWT|JWKS|algorithms"):
        JwtVerifier(**values)


async def test_a_verified_token_is_cached_until_it_expires() -> None:
    verifier = JwtVerifier(
        secret="cache-secret-long-enough-for-hs256-0001",
        jwks_url=None,
        issuer=None,
        audience=None,
        algorithms=["HS256"],
        leeway_seconds=0,
    )
    token = jwt.encode(
        {"sub": "cached", "exp": int(time.time()) + 2},
        "cache-secret-long-enough-for-hs256-0001",
        algorithm="HS256",
    )
    first = await verifier.verify(token)
    assert (await verifier.verify(token)) is first  # served from the cache
    await asyncio.sleep(2.2)
    with pytest.raises(AuthError):
        await verifier.verify(token)  # expired: the cache does not outlive `exp`
