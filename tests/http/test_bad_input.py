"""Bad input over HTTP, sent as an attacker would, on a real socket: every case is answered 400
(the field named, camelCase) or 401 with the documented JSON error body, never 500 or 503; the
`Server` header names no version; nothing is written to the ledger; no log line (any logger,
aiohttp's own included, at DEBUG) and no answer holds the bearer token or the API key.

Cases: JSON integers of 5,000 digits, NaN, lone surrogates (`"\\ud800"`) and control characters
in each field, public and signed in; `sub` claims the ledger cannot store; headers folded,
duplicated or holding bytes a header may not hold, sent byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import pytest

from tests.e2e.bad_input_support import (
    HUGE,
    LONE_SURROGATE,
    UNSTORABLE_SUBS,
    assert_not_logged,
    ledger_rows,
    token_with,
)
from tests.e2e.conftest import mint
from tests.http.conftest import ORIGIN, Edge, Reply, check_component, check_response
from tests.ledger_service.helpers import credit

OWN_KEY = "sk-own-key-never-echoed"
CONTENT = "[[usage:40,60]] say something"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's included


async def signed_in(edge: Edge) -> tuple[str, dict[str, str]]:
    """A funded user's token and headers (funded, so only the input can be refused)."""
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 10_000)
    return auth["Authorization"].removeprefix("Bearer "), auth


def json_object(fields: Mapping[str, str]) -> str:
    """A JSON object from field -> raw JSON text (escapes and digits kept as written)."""
    return "{" + ", ".join(f'"{name}": {text}' for name, text in fields.items()) + "}"


def expect_refusal(reply: Reply, where: str, status: int, reason: str, field: str | None) -> None:
    assert reply.status == status, (where, reply.body)
    error = reply.error
    assert error["reason"] == reason, (where, error)
    assert error.get("field") == field, (where, error)
    if field is not None:
        assert error["message"].startswith(f"{field}: "), (where, error)
    assert reply.headers["Server"] == "rpcai", where


# ---- request bodies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BadBody:
    fields: dict[str, str]  # field -> raw JSON text, over a valid call
    field: str | None  # the field the answer names
    reason: str = "INVALID_ARGUMENT"


def _surrogate(name: str) -> BadBody:
    return BadBody({name: f'"ab{LONE_SURROGATE}cd"'}, name)


CALL_CASES: dict[str, BadBody] = {
    "huge-max-tokens": BadBody({"maxTokens": HUGE}, "maxTokens"),
    "huge-negative-max-tokens": BadBody({"maxTokens": "-" + HUGE}, "maxTokens"),
    "huge-content": BadBody({"content": HUGE}, "content"),
    "huge-model": BadBody({"model": HUGE}, "model"),
    "huge-api-key": BadBody({"apiKey": HUGE}, "apiKey"),
    "huge-idempotency-key": BadBody({"idempotencyKey": HUGE}, "idempotencyKey"),
    "huge-in-a-list": BadBody({"provider": f"[{HUGE}]"}, "provider"),
    "huge-unknown-field": BadBody({"tokens": HUGE}, "tokens"),
    "nan": BadBody({"maxTokens": "NaN"}, None, "INVALID_JSON"),
    "infinity": BadBody({"maxTokens": "-Infinity"}, None, "INVALID_JSON"),
    "surrogate-content": _surrogate("content"),
    "surrogate-system-prompt": _surrogate("systemPrompt"),
    "surrogate-model": _surrogate("model"),
    "surrogate-provider": _surrogate("provider"),
    "surrogate-api-key": _surrogate("apiKey"),
    "surrogate-idempotency-key": _surrogate("idempotencyKey"),
    "reversed-surrogate-pair": BadBody({"content": '"\\udc00\\ud800"'}, "content"),
    "api-key-crlf": BadBody({"apiKey": '"sk-own\\r\\nX-Injected: 1"'}, "apiKey"),
    "api-key-nul": BadBody({"apiKey": '"sk-own\\u0000"'}, "apiKey"),
    "api-key-not-ascii": BadBody({"apiKey": '"sk-\\u043a\\u043b\\u044e\\u0447"'}, "apiKey"),
    "model-newline": BadBody({"model": '"claude-haiku-4-5\\n"'}, "model"),
    "model-zero-width": BadBody({"model": '"claude\\u200bhaiku"'}, "model"),
    "provider-nul": BadBody({"provider": '"anthropic\\u0000"'}, "provider"),
    "provider-escape": BadBody({"provider": '"\\u001b[2Janthropic"'}, "provider"),
    "idempotency-key-crlf": BadBody({"idempotencyKey": '"key\\r\\n"'}, "idempotencyKey"),
}

ELIGIBILITY_CASES: dict[str, BadBody] = {
    "huge-estimated-tokens": BadBody({"estimatedTokens": HUGE}, "estimatedTokens"),
    "huge-negative-estimated": BadBody({"estimatedTokens": "-" + HUGE}, "estimatedTokens"),
    "huge-has-api-key": BadBody({"hasApiKey": HUGE}, "hasApiKey"),
    "huge-max-tokens": BadBody({"content": '"hi"', "maxTokens": HUGE}, "maxTokens"),
    "nan": BadBody({"estimatedTokens": "NaN"}, None, "INVALID_JSON"),
    "surrogate-content": _surrogate("content"),
    "surrogate-system-prompt": BadBody(
        {"content": '"hi"', "systemPrompt": f'"{LONE_SURROGATE}"'}, "systemPrompt"
    ),
}


def call_body(case: BadBody, own_key: bool) -> str:
    fields = {"content": json.dumps(CONTENT), "model": '"claude-haiku-4-5"', "maxTokens": "100"}
    if own_key:
        fields["apiKey"] = json.dumps(OWN_KEY)
    return json_object({**fields, **case.fields})


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
async def test_bad_call_bodies_are_400_naming_the_field(
    edge: Edge, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    token, auth = await signed_in(edge)
    before = await ledger_rows(edge.stack.ledger)
    for name, case in CALL_CASES.items():
        # A public caller with a key, and a signed-in one on a subscription: same answer.
        for who, headers, own_key in (("public", {}, True), ("signed in", auth, False)):
            where = f"{name}, {who}"
            body = call_body(case, own_key)
            reply = await edge.call("POST", path, data=body, headers={**JSON_TYPE, **headers})
            expect_refusal(reply, where, 400, case.reason, case.field)
            assert OWN_KEY not in json.dumps(reply.body), where
    assert await ledger_rows(edge.stack.ledger) == before
    assert_not_logged(caplog, token, OWN_KEY)


async def test_bad_eligibility_bodies_are_400_naming_the_field(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    token, auth = await signed_in(edge)
    before = await ledger_rows(edge.stack.ledger)
    for name, case in ELIGIBILITY_CASES.items():
        for who, headers in (("public", {}), ("signed in", auth)):
            body = json_object(case.fields)
            reply = await edge.call(
                "POST", "/v1/eligibility", data=body, headers={**JSON_TYPE, **headers}
            )
            expect_refusal(reply, f"{name}, {who}", 400, case.reason, case.field)
    assert await ledger_rows(edge.stack.ledger) == before
    assert_not_logged(caplog, token)


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/v1/me/usage", {"days": HUGE}, "days"),
        ("/v1/me/usage", {"days": "-" + HUGE}, "days"),
        ("/v1/me/purchases", {"page_size": HUGE}, "page_size"),
    ],
)
async def test_huge_query_integers_are_400(
    edge: Edge, path: str, query: dict[str, str], field: str
) -> None:
    _, auth = await signed_in(edge)
    reply = await edge.call("GET", path, params=query, headers=auth)
    expect_refusal(reply, path, 400, "INVALID_ARGUMENT", field)


async def test_prompt_text_may_hold_line_breaks_tabs_and_emoji(edge: Edge) -> None:
    """The rules refuse what cannot be text, not text: the same call with a prompt of several
    lines, tabs and a (valid) surrogate pair is served, publicly and signed in."""
    _, auth = await signed_in(edge)
    prompt = '"[[usage:40,60]] line one\\n\\tline two \\ud83d\\ude00\\r\\n"'
    for headers, own_key in (({}, True), (auth, False)):
        body = call_body(BadBody({"content": prompt, "systemPrompt": prompt}, None), own_key)
        reply = await edge.call("POST", "/v1/generate", data=body, headers={**JSON_TYPE, **headers})
        assert reply.status == 200, reply.body
        assert reply.headers["Server"] == "rpcai"


# ---- tokens ---------------------------------------------------------------------------------

REFUSED_TOKENS: dict[str, Callable[[], str]] = {
    **{f"sub-{name}": partial(token_with, sub=sub) for name, sub in UNSTORABLE_SUBS.items()},
    "huge-claim": lambda: token_with(seq=HUGE),
    "huge-exp": lambda: token_with(exp=HUGE),
    "infinite-exp": lambda: token_with(exp="1e400"),
    "nan-exp": lambda: token_with(exp="NaN"),
}


async def test_tokens_naming_no_storable_user_are_401(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    before = await ledger_rows(edge.stack.ledger)
    tokens: list[str] = []
    for name, make in REFUSED_TOKENS.items():
        token = make()
        tokens.append(token)
        for path in ("/v1/generate", "/v1/eligibility"):
            body = json_object({"content": json.dumps(CONTENT)})
            headers = {**JSON_TYPE, "Authorization": f"Bearer {token}"}
            reply = await edge.call("POST", path, data=body, headers=headers)
            expect_refusal(reply, f"{name} on {path}", 401, "INVALID_TOKEN", None)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert token not in json.dumps(reply.body), name
    assert await ledger_rows(edge.stack.ledger) == before
    assert_not_logged(caplog, *tokens)


async def test_odd_but_valid_claims_are_served(edge: Edge) -> None:
    """A sub of exactly 256 characters is a user; an expiry of hundreds of digits is valid
    (and cached); a tier that is not printable and a quota beyond int64 are ignored, as a tier
    that is not a string is."""
    cases = {
        "sub-256-chars": (token_with(sub=json.dumps("u" * 256)), None, None),
        "exp-400-digits": (token_with(exp="9" * 400, tier='"gold"'), "gold", None),
        "tier-surrogate": (token_with(tier=f'"gold{LONE_SURROGATE}"'), None, None),
        "tier-control": (token_with(tier='"gold\\n"', quota="7"), None, 7),
        "quota-past-int64": (token_with(quota="9" * 40), None, None),
    }
    for name, (token, tier, quota) in cases.items():
        for _ in range(2):  # the second is served from the verified-token cache
            reply = await edge.call(
                "GET", "/v1/me/status", headers={"Authorization": f"Bearer {token}"}
            )
            assert reply.status == 200, (name, reply.body)
            assert (reply.body["subscriptionTier"], reply.body["quota"]) == (tier, quota), name


# ---- headers, byte for byte -------------------------------------------------------------------


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False)


async def send_raw(edge: Edge, request: bytes) -> RawReply:
    """One request written as given; the answer read until the server closes the connection."""
    host, _, port = edge.url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawReply(int(status_line.split()[1]), headers, body, raw)


ELIGIBILITY = b'{"hasApiKey": true}'


def post(header_lines: bytes, body: bytes = ELIGIBILITY, framing: bytes | None = None) -> bytes:
    """POST /v1/eligibility with these header lines (each ending CRLF), framed by
    Content-Length unless `framing` says otherwise."""
    if framing is None:
        framing = b"Content-Length: %d\r\n" % len(body)
    return (
        b"POST /v1/eligibility HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n" + framing + header_lines + b"\r\n" + body
    )


def bearer(token: bytes) -> bytes:
    return b"Authorization: Bearer " + token + b"\r\n"


# name: (the request, made from a token; status; reason)
RAW_CASES: dict[str, tuple[Callable[[bytes], bytes], int, str]] = {
    "folded-authorization": (
        lambda t: post(b"Authorization: Bearer\r\n " + t + b"\r\n"),
        400,
        "MALFORMED_REQUEST",
    ),
    "folded-after-token": (
        lambda t: post(bearer(t) + b"\t" + t + b"\r\n"),
        400,
        "MALFORMED_REQUEST",
    ),
    "control-byte-in-token": (lambda t: post(bearer(t + b"\x01")), 400, "MALFORMED_REQUEST"),
    "nul-in-token": (lambda t: post(bearer(t + b"\x00")), 400, "MALFORMED_REQUEST"),
    "bare-cr-in-token": (lambda t: post(bearer(t + b"\rX-Injected: 1")), 400, "MALFORMED_REQUEST"),
    "space-before-colon": (
        lambda t: post(b"Authorization : Bearer " + t + b"\r\n"),
        400,
        "MALFORMED_REQUEST",
    ),
    "header-line-too-long": (
        lambda t: post(bearer(t + b"A" * 9000)),
        400,
        "MALFORMED_REQUEST",
    ),
    "too-many-headers": (
        lambda t: post(b"".join(b"X-Copy-%d: %s\r\n" % (n, t) for n in range(200)) + bearer(t)),
        400,
        "MALFORMED_REQUEST",
    ),
    "duplicated-content-length": (
        lambda t: post(bearer(t) + b"Content-Length: 3\r\n"),
        400,
        "MALFORMED_REQUEST",
    ),
    "content-length-and-chunked": (
        lambda t: post(bearer(t) + b"Transfer-Encoding: chunked\r\n"),
        400,
        "MALFORMED_REQUEST",
    ),
    "bad-chunk-size": (
        lambda t: post(
            bearer(t), b"zz" + t + b"\r\n{}\r\n0\r\n\r\n", b"Transfer-Encoding: chunked\r\n"
        ),
        400,
        "MALFORMED_REQUEST",
    ),
    "undecodable-gzip-body": (
        lambda t: post(bearer(t) + b"Content-Encoding: gzip\r\n", b"not gzip at all " + t),
        400,
        "MALFORMED_REQUEST",
    ),
    "non-ascii-byte-in-token": (lambda t: post(bearer(t + b"\xff")), 401, "INVALID_TOKEN"),
    "duplicated-authorization": (lambda t: post(bearer(t) + bearer(t)), 401, "INVALID_TOKEN"),
    "duplicated-authorization-other-case": (
        lambda t: post(bearer(t) + b"authorization: Bearer " + t + b"\r\n"),
        401,
        "INVALID_TOKEN",
    ),
    "one-valid-one-garbage": (
        lambda t: post(b"Authorization: Bearer garbage\r\n" + bearer(t)),
        401,
        "INVALID_TOKEN",
    ),
}


async def test_malformed_headers_never_echo_or_log_a_token(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    token = mint("header-user")
    signature = token.rpartition(".")[2].encode()
    before = await ledger_rows(edge.stack.ledger)
    control = await send_raw(edge, post(bearer(token.encode())))
    assert control.status == 200, control  # the same request, well formed, is served
    check_response("/v1/eligibility", "post", 200, json.loads(control.body))
    for name, (make, status, reason) in RAW_CASES.items():
        reply = await send_raw(edge, make(token.encode()))
        assert reply.status == status, (name, reply)
        assert reply.headers["content-type"].startswith("application/json"), name
        body = json.loads(reply.body)
        check_component("Error", body)
        assert (body["error"]["code"], body["error"]["reason"]) == (status, reason), name
        assert reply.headers["server"] == "rpcai", name
        assert signature not in reply.raw, f"{name}: the answer echoes the token"
    assert await ledger_rows(edge.stack.ledger) == before
    assert_not_logged(caplog, token, signature.decode())
    # The check above can fail: aiohttp's connection did log each malformed request, at DEBUG.
    parse_logs = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert any("malformed HTTP request" in r.getMessage() for r in parse_logs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no warning or error"


async def test_server_header_names_no_version(edge: Edge) -> None:
    replies = [
        await edge.call("GET", "/healthz"),
        await edge.call("GET", "/no/such/route"),
        await edge.call("DELETE", "/v1/generate"),
        await edge.call("GET", "/v1/me/status"),
        await edge.call("POST", "/v1/eligibility", data="{", headers=JSON_TYPE),
    ]
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    async with edge.session.options(edge.url + "/v1/generate", headers=preflight) as response:
        replies.append(Reply(response.status, response.headers, None))
    call = {"content": CONTENT, "model": "claude-haiku-4-5", "apiKey": OWN_KEY}
    async with edge.session.post(edge.url + "/v1/generate/stream", json=call) as response:
        assert response.content_type == "text/event-stream"
        await response.read()
        replies.append(Reply(response.status, response.headers, None))
    for reply in replies:
        assert reply.headers["Server"] == "rpcai", reply.status
    folded = await send_raw(edge, post(b"X-Folded: a\r\n b\r\n"))
    assert (folded.status, folded.headers["server"]) == (400, "rpcai")
