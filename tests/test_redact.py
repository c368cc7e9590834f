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
        "password=short token: 1234",  # too short to be one: left, not guessed at
        "https://api.anthropic.com/v1/messages returned 529",
        "skeleton sk-short",
    ],
)
def test_what_is_not_a_secret_is_left_as_it_is(text: str) -> None:
    assert Redactor(["configured-secret-value"])(text) == text


def test_the_processes_own_secrets_are_redacted_wherever_they_appear() -> None:
    redact = Redactor(["plain-looking-secret", "plain-looking-secret-longer", "tiny"])
    assert redact("a plain-looking-secret-longer and plain-looking-secret, tiny") == (
        f"a {REDACTED} and {REDACTED}, tiny"
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
    assert "ValueError" in err
    assert "SystemError: uncaught, quoting" in err
    assert err.count(REDACTED) >= 4 * len(secrets)
    assert "rpcai:[redacted]@127.0.0.1:1" in err
    if fmt == "json":
        lines = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert [line["level"] for line in lines] == ["WARNING", "ERROR", "CRITICAL", "CRITICAL"]
