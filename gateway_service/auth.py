"""JWT verification: HS* with a shared secret, RS*/PS*/ES*/EdDSA with keys from a JWKS URL.

The algorithm decides the key source, and only configured algorithms are accepted, so a token
cannot pick its own verification path: `alg: none` and unconfigured algorithms are refused
before any key is touched, an HS token is only ever checked against the shared secret (never
against a public key, which defeats HS/RS confusion), and a JWKS key only verifies the one
algorithm it is bound to (PyJWK). The JWKS is fetched with aiohttp, never on a blocking call;
signature checks themselves are CPU work of tens of microseconds and run inline.

A verified token still has to name a caller the gateway can serve: a `sub` the ledger could not
store (blank, over 256 characters, control characters, lone surrogates) is a bad token (401),
refused here rather than by the ledger as bad input (400) or as a crash (500). Optional claims
that do not fit what they feed (a tier that is not printable, a quota beyond int64) are ignored,
as a tier that is not a string already is. Nothing in a claim can make verification fail other
than with an AuthError: a JWT is ASCII, so any other token is malformed before it is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt

from gateway_service.validation import is_storable_id

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MAX_TOKEN_LENGTH = 8192
_VERIFIED_CACHE_SIZE = 10_000
_INT64 = range(-(2**63), 2**63)
# A verified token is cached until it expires, or until this moment if it names a later one
# (9999-12-31T23:59:59Z): an `exp` of hundreds of digits is valid, and has no float.
_LATEST_EXPIRY = 253_402_300_799


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    tier: str | None
    quota: int | None
    claims: Mapping[str, Any]
    # The operator role (JWT_ADMIN_CLAIM / JWT_ADMIN_VALUE): may read every user's figures.
    admin: bool = False


class AuthError(Exception):
    """A refused token. The message is safe to return to the caller: it never quotes the token."""

    def __init__(self, message: str, reason: str = "INVALID_TOKEN") -> None:
        super().__init__(message)
        self.reason = reason


def bearer_token(values: Sequence[str]) -> str | None:
    """The JWT of `Authorization: Bearer <JWT>`, given every value the request carried under
    that name (an HTTP header or gRPC metadata, the same rule for both). None: no header, a
    public caller. More than one is refused, never "the first": a proxy and a client may each
    have set one, and they need not agree on who is calling."""
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("send one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


class JwtVerifier:
    def __init__(
        self,
        secret: str | None,
        jwks_url: str | None,
        issuer: str | None,
        audience: str | None,
        algorithms: Sequence[str],
        leeway_seconds: int = 30,
        tier_claim: str = "tier",
        quota_claim: str = "quota",
        admin_claim: str | None = None,
        admin_value: str | None = None,
        *,
        jwks_cache_seconds: float = 300.0,
        jwks_min_refetch_seconds: float = 10.0,
        jwks_timeout_seconds: float = 5.0,
    ) -> None:
        algs = frozenset(algorithms)
        unknown = algs - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if not algs or unknown:
            raise ValueError(f"unsupported JWT algorithms: {sorted(unknown) or 'none given'}")
        if algs & HMAC_ALGORITHMS and not secret:
            raise ValueError("HS* algorithms need a JWT secret")
        if algs & ASYMMETRIC_ALGORITHMS and not jwks_url:
            raise ValueError("RS*/PS*/ES*/EdDSA algorithms need a JWKS URL")
        self._secret = secret.encode() if secret else None
        self._algorithms = algs
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway_seconds
        self._tier_claim = tier_claim
        self._quota_claim = quota_claim
        self._admin = (admin_claim, admin_value) if admin_claim and admin_value else None
        required = ["exp", "sub"]
        required += ["iss"] if self._issuer else []
        required += ["aud"] if self._audience else []
        self._options: dict[str, Any] = {"require": required}
        # Verified tokens: the check of `exp` (with leeway) is all a repeat needs.
        self._verified: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._jwks = JwksCache(
            jwks_url, jwks_cache_seconds, jwks_min_refetch_seconds, jwks_timeout_seconds
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier:
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        return cls(
            secret=secret,
            jwks_url=settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            leeway_seconds=settings.jwt_leeway_seconds,
            tier_claim=settings.jwt_tier_claim,
            quota_claim=settings.jwt_quota_claim,
            admin_claim=settings.jwt_admin_claim,
            admin_value=settings.jwt_admin_value,
        )

    async def verify(self, token: str) -> Identity:
        # A client sends the same token on every call until it expires: verify it once.
        cached = self._verified.get(token)
        if cached is not None:
            identity, valid_until = cached
            if time.time() < valid_until:
                return identity
            del self._verified[token]
        identity = await self._verify(token)
        exp = identity.claims.get("exp")
        if isinstance(exp, int | float):
            valid_until = float(min(exp, _LATEST_EXPIRY)) + self._leeway
            self._verified[token] = (identity, valid_until)
            if len(self._verified) > _VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return identity

    async def _verify(self, token: str) -> Identity:
        if not token or len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("token algorithm not allowed", "ALGORITHM_NOT_ALLOWED")
        key: jwt.PyJWK | bytes
        if alg in HMAC_ALGORITHMS:
            assert self._secret is not None  # guaranteed by __init__
            key = self._secret
        else:
            kid = header.get("kid")
            key = await self._jwks.key(kid if isinstance(kid, str) else None)
        claims = self._decode(token, key, alg)
        return self._identity(claims)

    def _decode(self, token: str, key: jwt.PyJWK | bytes, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        # `from None`: PyJWT's messages are safe, but its traceback frames hold the token.
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", "TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed", "ALGORITHM_NOT_ALLOWED") from None
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise AuthError("token lacks the sub claim")
        if not is_storable_id(sub):
            raise AuthError("token sub is not a user id (at most 256 printable characters)")
        tier = claims.get(self._tier_claim)
        quota = claims.get(self._quota_claim)
        return Identity(
            user_id=sub,
            tier=tier if isinstance(tier, str) and is_storable_id(tier) else None,
            quota=quota if type(quota) is int and quota in _INT64 else None,
            claims=claims,
            admin=self._is_admin(claims),
        )

    def _is_admin(self, claims: Mapping[str, Any]) -> bool:
        """Exactly the configured value, as the claim or one item of a list claim: never a
        prefix, a case variant or a truthy stand-in."""
        if self._admin is None:
            return False
        claim, value = self._admin
        held = claims.get(claim)
        if isinstance(held, str):
            return held == value
        if isinstance(held, list):
            return any(isinstance(item, str) and item == value for item in held)
        return False

    async def aclose(self) -> None:
        await self._jwks.aclose()


class JwksCache:
    """Public keys by kid. Refreshed when stale, or when a token names an unknown kid (a rotation),
    but at most once per `min_refetch_seconds` so random kids cannot make us hammer the IdP."""

    def __init__(self, url: str | None, max_age: float, min_refetch: float, timeout: float) -> None:
        self._url = url
        self._max_age = max_age
        self._min_refetch = min_refetch
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def key(self, kid: str | None) -> jwt.PyJWK:
        found = self._lookup(kid)
        if found is not None and (not self._stale() or self._lock.locked()):
            return found  # fresh, or a refresh is under way: serve the key we have
        async with self._lock:
            # Re-read: the task that held the lock may just have fetched this kid.
            found = self._lookup(kid)
            if (found is None or self._stale()) and self._may_refetch():
                await self._refresh()
                found = self._lookup(kid)
        if found is None:
            if not self._keys:
                raise AuthError("token signing keys unavailable", "KEYS_UNAVAILABLE")
            raise AuthError("token signed with an unknown key", "UNKNOWN_KEY")
        return found

    def _stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at > self._max_age

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            # A token without kid is accepted only when the set leaves no choice.
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    def _may_refetch(self) -> bool:
        last = self._attempted_at
        return last is None or time.monotonic() - last >= self._min_refetch

    async def _refresh(self) -> None:
        """Fetch the key set; called with the lock held. A failed fetch keeps the old keys."""
        self._attempted_at = time.monotonic()
        try:
            data = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("JWKS fetch failed: %s", type(exc).__name__)
            return
        keys = _parse_jwks(data)
        if keys:
            self._keys = keys
            self._fetched_at = time.monotonic()
        else:
            log.warning("JWKS fetch returned no usable signing keys")

    async def _fetch(self) -> Any:
        assert self._url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self._url) as response:
            response.raise_for_status()
            return await response.json(content_type=None)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _parse_jwks(data: Any) -> dict[str | None, jwt.PyJWK]:
    keys: dict[str | None, jwt.PyJWK] = {}
    entries = data.get("keys") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue  # symmetric keys never come from a JWKS here: HS* uses the shared secret
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            continue
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) else None] = key
    return keys
