"""Bad input over gRPC, on a real socket: never UNKNOWN, never a server exception's name or the
bytes sent in an answer. A message that is not valid protobuf is INVALID_ARGUMENT /
MALFORMED_REQUEST on every method (health and reflection included); a text field holding
control characters is INVALID_ARGUMENT with ErrorInfo metadata `field`, as over HTTP; a token
naming a user the ledger cannot store, or several `authorization` entries, is UNAUTHENTICATED.
Nothing is written to the ledger, and no log line (any logger, at DEBUG) holds a token."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from gateway_service.interceptor import MALFORMED_MESSAGE
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.rich_errors import error_info
from tests.e2e.bad_input_support import (
    HUGE,
    LONE_SURROGATE,
    UNSTORABLE_SUBS,
    assert_not_logged,
    ledger_rows,
    token_with,
)
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import own_sim, sim_stack
from tests.ledger_service.helpers import credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

OWN_KEY = "sk-own-key-never-echoed"
CONTENT = "[[usage:40,60]] say something"
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, gRPC's included


async def signed_in(stack: Stack) -> tuple[str, Metadata]:
    user, metadata = stack.user()
    await credit(stack.ledger.stub, user, 10_000)
    return metadata[0][1].removeprefix("Bearer "), metadata


def refusal(exc: BaseException) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """Code, ErrorInfo reason and metadata, and details of a failed call."""
    assert isinstance(exc, grpc.aio.AioRpcError), repr(exc)
    info = error_info(exc)
    assert info is not None, (exc.code(), exc.details())
    return exc.code(), info.reason, dict(info.metadata), exc.details() or ""


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


# ---- messages that are not protobuf -----------------------------------------------------------


@dataclass(frozen=True)
class Method:
    path: str
    request: Descriptor
    server_streaming: bool
    client_streaming: bool = False


def _service_methods() -> list[Method]:
    service = gpb.DESCRIPTOR.services_by_name["AiGateway"]
    methods = [
        Method(f"/{service.full_name}/{m.name}", m.input_type, m.server_streaming)
        for m in service.methods
    ]
    health = health_pb2.HealthCheckRequest.DESCRIPTOR
    reflection = reflection_pb2.ServerReflectionRequest.DESCRIPTOR
    return [
        *methods,
        Method("/grpc.health.v1.Health/Check", health, False),
        Method("/grpc.health.v1.Health/Watch", health, True),
        Method(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            reflection,
            True,
            client_streaming=True,
        ),
    ]


METHODS = _service_methods()


def bad_utf8(request: Descriptor) -> bytes | None:
    """The message's first string field holding bytes that are not UTF-8 (None: no string)."""
    for field in request.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return bytes([field.number << 3 | 2, 2]) + b"\xc3\x28"
    return None


def garbage(request: Descriptor) -> dict[str, bytes]:
    payloads = {
        "corrupt": b"\xff\xff\xff",  # a tag whose varint never ends
        "truncated": b"\x0a\x10abc",  # 16 bytes announced, 3 sent
        "bad-wire-type": b"\x0f",  # field 1 of wire type 7, which does not exist
    }
    if (invalid := bad_utf8(request)) is not None:
        payloads["bad-utf8"] = invalid
    return payloads


async def call_raw(
    stack: Stack, method: Method, payload: bytes, metadata: Metadata
) -> BaseException:
    """The method called with `payload` as its request's bytes; the error it must end with."""
    channel = stack.channel
    try:
        if method.client_streaming:
            bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes]
            bidi = channel.stream_stream(method.path)
            async for _ in bidi(iter([payload]), metadata=metadata):
                pass
        elif method.server_streaming:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
            stream = channel.unary_stream(method.path)
            async for _ in stream(payload, metadata=metadata):
                pass
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
            unary = channel.unary_unary(method.path)
            await unary(payload, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"{method.path} accepted {payload!r}")


async def test_malformed_messages_are_invalid_argument(
    sim_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    token, auth = await signed_in(sim_stack)
    before = await ledger_rows(sim_stack.ledger)
    for method in METHODS:
        for name, payload in garbage(method.request).items():
            for who, metadata in (("public", ()), ("signed in", auth)):
                where = f"{method.path} {name} {who}"
                code, reason, info, details = refusal(
                    await call_raw(sim_stack, method, payload, metadata)
                )
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"), (
                    where,
                    details,
                )
                assert details == MALFORMED_MESSAGE, where  # no class name, no bytes
                assert info == {}, where
    assert await ledger_rows(sim_stack.ledger) == before
    assert_not_logged(caplog, token)
    assert_no_errors_logged(caplog)


async def test_a_bad_token_is_refused_before_the_message_is_read(sim_stack: Stack) -> None:
    generate = next(m for m in METHODS if m.path.endswith("/GenerateText"))
    exc = await call_raw(sim_stack, generate, b"\xff\xff\xff", bearer("not.a.jwt"))
    assert refusal(exc)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


# ---- text fields --------------------------------------------------------------------------------

# name: (the field set, its value)
BAD_FIELDS: dict[str, tuple[str, str]] = {
    "api-key-crlf": ("api_key", "sk-own\r\nX-Injected: 1"),
    "api-key-nul": ("api_key", "sk-own\x00"),
    "api-key-not-ascii": ("api_key", "sk-ключ"),
    "model-newline": ("model", "claude-haiku-4-5\n"),
    "model-zero-width": ("model", "claude\u200bhaiku"),
    "provider-nul": ("provider", "anthropic\x00"),
    "provider-escape": ("provider", "\x1b[2Janthropic"),
    "idempotency-key-crlf": ("idempotency_key", "key\r\n"),
}


def call(own_key: bool, **fields: str) -> gpb.GenerateTextRequest:
    request = gpb.GenerateTextRequest(content=CONTENT, model="claude-haiku-4-5", max_tokens=100)
    if own_key:
        request.api_key = OWN_KEY
    for name, value in fields.items():
        setattr(request, name, value)
    return request


async def generate_error(
    stack: Stack, stream: bool, request: gpb.GenerateTextRequest, metadata: Metadata
) -> BaseException:
    try:
        if stream:
            async for _ in stack.stub.StreamText(request, metadata=metadata):
                pass
        else:
            await stack.stub.GenerateText(request, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call was served")


@pytest.mark.parametrize("stream", [False, True], ids=["GenerateText", "StreamText"])
async def test_control_characters_in_text_fields_are_invalid_argument(
    sim_stack: Stack, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    token, auth = await signed_in(sim_stack)
    before = await ledger_rows(sim_stack.ledger)
    for name, (field, value) in BAD_FIELDS.items():
        for who, metadata, own_key in (("public", (), True), ("signed in", auth, False)):
            request = call(own_key, **{field: value})
            exc = await generate_error(sim_stack, stream, request, metadata)
            code, reason, info, details = refusal(exc)
            where = f"{name}, {who}"
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), (
                where,
                details,
            )
            assert info == {"field": field}, where
            assert value not in details, where
            assert OWN_KEY not in details, where
    assert await ledger_rows(sim_stack.ledger) == before
    assert_not_logged(caplog, token, OWN_KEY, "sk-own\r\n")


async def test_prompt_text_may_hold_line_breaks_tabs_and_emoji(sim_stack: Stack) -> None:
    _, auth = await signed_in(sim_stack)
    prompt = "[[usage:40,60]] line one\n\tline two \U0001f600\r\n"
    for metadata, own_key in (((), True), (auth, False)):
        request = call(own_key, content=prompt, system_prompt=prompt)
        answer = await sim_stack.stub.GenerateText(request, metadata=metadata)
        assert answer.text


# ---- tokens -------------------------------------------------------------------------------------

REFUSED_TOKENS: dict[str, Callable[[], str]] = {
    **{f"sub-{name}": partial(token_with, sub=sub) for name, sub in UNSTORABLE_SUBS.items()},
    "huge-claim": lambda: token_with(seq=HUGE),
    "huge-exp": lambda: token_with(exp=HUGE),
    "infinite-exp": lambda: token_with(exp="1e400"),
}


async def test_tokens_naming_no_storable_user_are_unauthenticated(
    sim_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    before = await ledger_rows(sim_stack.ledger)
    tokens: list[str] = []
    for name, make in REFUSED_TOKENS.items():
        tokens.append(token := make())
        for stream in (False, True):
            exc = await generate_error(sim_stack, stream, call(False), bearer(token))
            code, reason, _, details = refusal(exc)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"), (
                name,
                details,
            )
    assert await ledger_rows(sim_stack.ledger) == before
    assert_not_logged(caplog, *tokens)
    assert_no_errors_logged(caplog)


async def test_several_authorization_entries_are_unauthenticated(
    sim_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Never "the first": a public BYOK call is refused too, since it named a caller."""
    token, _ = await signed_in(sim_stack)
    other = mint("someone-else")
    before = await ledger_rows(sim_stack.ledger)
    entries = {
        "same-twice": (token, token),
        "two-users": (token, other),
        "valid-then-garbage": (token, "garbage"),
        "garbage-then-valid": ("garbage", token),
    }
    for name, (first, second) in entries.items():
        metadata = (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}"))
        for own_key in (False, True):
            exc = await generate_error(sim_stack, False, call(own_key), metadata)
            assert refusal(exc)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"), name
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await sim_stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert await ledger_rows(sim_stack.ledger) == before
    assert_not_logged(caplog, token, other)


async def test_odd_but_valid_claims_are_served(sim_stack: Stack) -> None:
    """An expiry of hundreds of digits is valid; a tier that is not printable and a quota
    beyond int64 are ignored (they were UNKNOWN: the quota did not fit the response's int64)."""
    cases = {
        "sub-256-chars": (token_with(sub='"' + "u" * 256 + '"'), "", None),
        "exp-400-digits": (token_with(exp="9" * 400, tier='"gold"'), "gold", None),
        "tier-surrogate": (token_with(tier=f'"gold{LONE_SURROGATE}"', quota="7"), "", 7),
        "quota-past-int64": (token_with(quota="9" * 40), "", None),
    }
    for name, (token, tier, quota) in cases.items():
        status = await sim_stack.stub.GetUserStatus(
            gpb.GetUserStatusRequest(), metadata=bearer(token)
        )
        got_quota = status.quota if status.HasField("quota") else None
        assert (status.subscription_tier, got_quota) == (tier, quota), name
