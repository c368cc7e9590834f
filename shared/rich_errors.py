"""Rich gRPC errors: a status code, a message, and a google.rpc.ErrorInfo with a stable reason.

Servers build them with `rich_status`; clients read the reason back with `error_info`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DETAILS_KEY = "grpc-status-details-bin"


class _Fields(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _Status(_Fields, grpc.Status):
    """What `abort_with_status` takes: code, message, trailing metadata."""


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    extra: Sequence[Message] = (),
    trailing: Sequence[tuple[str, str]] = (),
) -> grpc.Status:
    """`extra`: further google.rpc details (RetryInfo, QuotaFailure...) after the ErrorInfo;
    `trailing`: plain metadata sent beside them."""
    status = rpc_status.to_status(status_proto(code, message, reason, domain, metadata, extra))
    return _Status(status.code, status.details, (*status.trailing_metadata, *trailing))


def status_proto(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    extra: Sequence[Message] = (),
) -> status_pb2.Status:
    """The google.rpc.Status a rich error carries (what a batch answers for one failed item)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata or {}))
    details = []
    for message_detail in (info, *extra):
        detail = any_pb2.Any()
        detail.Pack(message_detail)
        details.append(detail)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def status_info(proto: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo among a google.rpc.Status's details, if any."""
    for detail in proto.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a server attached to a failed call, if any."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    # aio errors give a Metadata of (key, value) tuples, sync ones a tuple of namedtuples.
    for key, value in cast("Iterable[tuple[str, str | bytes]]", trailing or ()):
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        return status_info(status_pb2.Status.FromString(value))
    return None


def error_reason(error: grpc.RpcError) -> str | None:
    info = error_info(error)
    return info.reason if info else None
