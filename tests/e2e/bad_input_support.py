"""What the bad-input tests of both transports share: JWTs built from raw JSON text (a claim of
5,000 digits or a `\\ud800` escape cannot be made by PyJWT, whose encoder refuses both), the
`sub` claims the ledger cannot store, and the two checks every case ends with: the ledger was
not written to, and no log line holds a token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from tests.conftest import LedgerHarness
from tests.e2e.conftest import AUDIENCE, ISSUER, JWT_SECRET

HUGE = "9" * 5000  # digits: past Python's int-from-string limit (4300)
LONE_SURROGATE = "\\ud800"  # JSON text: decodes to a str with no UTF-8 form

# name: the `sub` claim as JSON text. Each is a token the ledger could not store as a user id.
UNSTORABLE_SUBS: dict[str, str] = {
    "empty": '""',
    "blank": '"   "',
    "257-chars": json.dumps("u" * 257),
    "newline": '"alice\\n"',
    "nul": '"alice\\u0000"',
    "escape-char": '"alice\\u001b[31m"',
    "zero-width-space": '"\\u200b"',
    "lone-surrogate": f'"{LONE_SURROGATE}"',
    "surrogate-in-name": f'"ali{LONE_SURROGATE}ce"',
    "number": "12345",
    "huge-number": HUGE,
}

LEDGER_TABLES = ("holds", "usage_records", "idempotency_keys")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(payload: str) -> str:
    """An HS256 JWT, signed with the test secret, whose payload is exactly this JSON text."""
    signing_input = _b64url(b'{"alg":"HS256","typ":"JWT"}') + b"." + _b64url(payload.encode())
    signature = hmac.new(JWT_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64url(signature)).decode()


def token_with(**raw_claims: str) -> str:
    """A valid token whose listed claims are given as raw JSON text (overriding the defaults)."""
    now = int(time.time())
    defaults: dict[str, Any] = {
        "sub": "bad-input-user",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    claims = {name: json.dumps(value) for name, value in defaults.items()}
    claims.update(raw_claims)
    return signed("{" + ", ".join(f'"{name}": {text}' for name, text in claims.items()) + "}")


async def ledger_rows(ledger: LedgerHarness) -> dict[str, int]:
    """Rows in the tables a call writes to: equal before and after means nothing was written."""
    conn = await ledger.db()
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in LEDGER_TABLES
        }
    finally:
        await conn.close()


def assert_not_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """No captured record (message, arguments or traceback, any logger, any level) holds any of
    `secrets`."""
    text = caplog.text
    for secret in secrets:
        assert secret not in text, f"a log line holds {secret[:12]}..."
    for record in caplog.records:
        assert not any(secret in repr(record.args) for secret in secrets), record.name
