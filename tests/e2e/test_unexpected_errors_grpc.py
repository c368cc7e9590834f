"""A failure the gateway has no answer for (a defect) is INTERNAL "internal error" with ErrorInfo
reason INTERNAL on every gRPC method, unary or streaming, as the HTTP edge's 500: never gRPC's
UNKNOWN "Unexpected <class>: <message>", whose message may quote a caller's input, a key or a
provider's reply. The log keeps the exception."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.rich_errors import error_reason
from tests.e2e.conftest import Stack

QUOTED = "words-of-a-callers-prompt"  # what an exception's text may carry


def defect(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(f"a defect quoting {QUOTED}")


async def defective_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    raise RuntimeError(f"a defect quoting {QUOTED}")
    yield  # an async generator, as Gateway.stream is


def assert_internal(exc: grpc.aio.AioRpcError) -> None:
    assert (exc.code(), exc.details(), error_reason(exc)) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
        "INTERNAL",
    )
    assert QUOTED not in str(exc.debug_error_string()) + str(exc.trailing_metadata())


async def test_a_defect_is_internal_and_quotes_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, metadata = stack.user()
    monkeypatch.setattr(stack.gateway.gateway, "user_status", defect)
    monkeypatch.setattr(stack.gateway.gateway, "stream", defective_stream)
    request = gpb.GenerateTextRequest(content="hello", max_tokens=10)
    with caplog.at_level(logging.ERROR, logger="gateway_service.servicer"):
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=metadata)
        assert_internal(unary.value)
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            async for _ in stack.stub.StreamText(request, metadata=metadata):
                pass
        assert_internal(streaming.value)
    logged = [r for r in caplog.records if r.exc_info and QUOTED in str(r.exc_info[1])]
    assert [r.getMessage() for r in logged] == ["GetUserStatus failed", "StreamText failed"]
