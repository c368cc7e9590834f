"""Bad input of every field type on every RPC: INVALID_ARGUMENT, an ErrorInfo naming the field,
and not one byte of the database changed. Also NOT_FOUND for unknown holds and purchases, and
UNAUTHENTICATED without the service token (while health and reflection stay open).

One ledger server and one database serve the whole module (the cases only read, or must only
read); it is seeded with a user, a purchase, an open hold and a settled one so that the bad
requests point at real rows that a careless server could change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ledger_service.app import LedgerApp, create_app
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_info, status_info
from tests import pg
from tests.conftest import AUTH, SERVICE_TOKEN, ledger_settings

TIMEOUT = 10.0
TABLES = (
    "accounts",
    "journal_transactions",
    "journal_entries",
    "holds",
    "purchases",
    "usage_records",
    "idempotency_keys",
    "subscriptions",
    "dead_letters",
)
UPDATED_AT = Timestamp(seconds=1_767_225_600)  # 2026-01-01: the seeded subscription's
DAY_SECONDS = 86_400
MAX_RAW_BODY_BYTES = 1024 * 1024


@dataclass
class Seeded:
    app: LedgerApp
    channel: grpc.aio.Channel
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub
    database_url: str
    conn: asyncpg.Connection
    user: str
    purchase_id: str
    external_id: str
    open_hold: str
    settled_hold: str
    subscription_id: str
    dead_letter_id: str


@pytest.fixture(scope="module")
async def seeded(pg_admin_url: str) -> AsyncIterator[Seeded]:
    url = pg.create_database(pg_admin_url)
    app = await create_app(ledger_settings(), url, run_sweeper=False)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    conn: asyncpg.Connection = await asyncpg.connect(url)
    try:
        user, external_id = "seed-user", "order-seed"
        bought = await stub.CreditPurchase(
            pb.CreditPurchaseRequest(
                idempotency_key="seed-buy",
                user_id=user,
                tokens_purchased=1000,
                purchase_type=pb.PURCHASE_TYPE_SUBSCRIPTION,
                external_id=external_id,
                source="test",
            ),
            metadata=AUTH,
        )
        held = await stub.Reserve(
            pb.ReserveRequest(idempotency_key="seed-hold-1", user_id=user, estimated_tokens=100),
            metadata=AUTH,
        )
        done = await stub.Reserve(
            pb.ReserveRequest(idempotency_key="seed-hold-2", user_id=user, estimated_tokens=100),
            metadata=AUTH,
        )
        await stub.Settle(
            pb.SettleRequest(reservation_id=done.reservation_id, usage=_usage()), metadata=AUTH
        )
        await stub.RecordUsage(
            pb.RecordUsageRequest(
                idempotency_key="seed-byok",
                user_id="byok-user",
                user_type=pb.USER_TYPE_BYOK,
                usage=_usage(),
                estimated_cost_micro_usd=1234,
            ),
            metadata=AUTH,
        )
        subscription_id = "sub-seed"
        await stub.UpsertSubscription(
            pb.UpsertSubscriptionRequest(subscription=_subscription(user, subscription_id)),
            metadata=AUTH,
        )
        parked = await stub.RecordDeadLetter(
            pb.RecordDeadLetterRequest(
                source="test",
                event_name="order_created",
                subject="order:seed",
                reason="unknown variant",
                raw_body=b"{}",
                dedupe_key="seed-letter",
            ),
            metadata=AUTH,
        )
        yield Seeded(
            app=app,
            channel=channel,
            stub=stub,
            database_url=url,
            conn=conn,
            user=user,
            purchase_id=bought.purchase_id,
            external_id=external_id,
            open_hold=held.reservation_id,
            settled_hold=done.reservation_id,
            subscription_id=subscription_id,
            dead_letter_id=parked.dead_letter_id,
        )
    finally:
        await conn.close()
        await channel.close()
        await app.close()
        pg.drop_database(pg_admin_url, url)


def _subscription(user: str, external_id: str) -> pb.Subscription:
    return pb.Subscription(
        source="test",
        external_id=external_id,
        user_id=user,
        variant_id="v-1",
        status="active",
        renews_at=Timestamp(seconds=UPDATED_AT.seconds + 30 * 86400),
        ends_at=Timestamp(seconds=UPDATED_AT.seconds + 30 * 86400),
        provider_updated_at=UPDATED_AT,
    )


def _usage(input_tokens: int = 40, output_tokens: int = 60) -> pb.Usage:
    return pb.Usage(
        provider="anthropic",
        model="claude-test",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


SNAPSHOT = " UNION ALL ".join(
    f"SELECT '{table}' AS name, count(*) AS n,"
    f" coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') AS sum FROM {table} t"
    for table in TABLES
)


async def snapshot(conn: asyncpg.Connection) -> dict[str, tuple[int, str]]:
    """Row count and a checksum of every row of every ledger table, in one statement."""
    rows = await conn.fetch(SNAPSHOT)
    assert len(rows) == len(TABLES)
    return {row["name"]: (row["n"], row["sum"]) for row in rows}


def _key() -> str:
    return f"k-{uuid.uuid4()}"


# Valid requests; each case breaks exactly one field of one of them.
def base_request(rpc: str, s: Seeded) -> Message:
    requests: dict[str, Callable[[], Message]] = {
        "CreditPurchase": lambda: pb.CreditPurchaseRequest(
            idempotency_key=_key(),
            user_id=s.user,
            tokens_purchased=1000,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id=f"order-{uuid.uuid4()}",
            source="test",
        ),
        "Reserve": lambda: pb.ReserveRequest(
            idempotency_key=_key(), user_id=s.user, estimated_tokens=10, ttl_seconds=60
        ),
        "Settle": lambda: pb.SettleRequest(
            reservation_id=s.open_hold, usage=_usage(), estimated_cost_micro_usd=10
        ),
        "Release": lambda: pb.ReleaseRequest(reservation_id=s.open_hold),
        "ExtendHold": lambda: pb.ExtendHoldRequest(reservation_id=s.open_hold, ttl_seconds=60),
        "ApplyBatch": lambda: pb.ApplyBatchRequest(
            writes=[
                pb.LedgerWrite(
                    reserve=pb.ReserveRequest(
                        idempotency_key=_key(), user_id=s.user, estimated_tokens=10, ttl_seconds=60
                    )
                )
            ]
        ),
        "ApplyBatches": lambda: pb.ApplyBatchRequest(
            batch_id=1,
            writes=[
                pb.LedgerWrite(
                    reserve=pb.ReserveRequest(
                        idempotency_key=_key(), user_id=s.user, estimated_tokens=10, ttl_seconds=60
                    )
                )
            ],
        ),
        "RefundPurchase": lambda: pb.RefundPurchaseRequest(
            idempotency_key=_key(), purchase_id=s.purchase_id, tokens_to_refund=10
        ),
        "RefundByExternal": lambda: pb.RefundPurchaseRequest(
            idempotency_key=_key(),
            external=pb.PurchaseRef(source="test", external_id=s.external_id),
            tokens_to_refund=10,
        ),
        "RecordUsage": lambda: pb.RecordUsageRequest(
            idempotency_key=_key(),
            user_id=s.user,
            user_type=pb.USER_TYPE_BYOK,
            usage=_usage(),
            estimated_cost_micro_usd=10,
        ),
        "GetBalance": lambda: pb.GetBalanceRequest(user_id=s.user),
        "QuoteReserve": lambda: pb.QuoteReserveRequest(user_id=s.user, estimated_tokens=10),
        "GetUserStatus": lambda: pb.GetUserStatusRequest(user_id=s.user),
        "GetUsageAnalytics": lambda: pb.GetUsageAnalyticsRequest(
            user_id=s.user, days=30, include_history=True
        ),
        "GetPurchaseHistory": lambda: pb.GetPurchaseHistoryRequest(user_id=s.user, page_size=10),
        "GetPlatformAnalytics": lambda: pb.GetPlatformAnalyticsRequest(
            start=UPDATED_AT,
            end=Timestamp(seconds=UPDATED_AT.seconds + DAY_SECONDS),
            granularity=pb.GRANULARITY_DAY,
            top_users=10,
        ),
        "GetUserAccount": lambda: pb.GetUserAccountRequest(user_id=s.user),
        # Newer than the seeded state: valid, it would apply (and change the row).
        "UpsertSubscription": lambda: pb.UpsertSubscriptionRequest(
            subscription=pb.Subscription(
                source="test",
                external_id=s.subscription_id,
                user_id=s.user,
                variant_id="v-1",
                status="cancelled",
                renews_at=Timestamp(seconds=UPDATED_AT.seconds + 3600),
                ends_at=Timestamp(seconds=UPDATED_AT.seconds + 3600),
                provider_updated_at=Timestamp(seconds=UPDATED_AT.seconds + 60),
            )
        ),
        "GetSubscription": lambda: pb.GetSubscriptionRequest(
            source="test", external_id=s.subscription_id
        ),
        "RecordDeadLetter": lambda: pb.RecordDeadLetterRequest(
            source="test",
            event_name="order_created",
            subject="order:1",
            reason="unknown variant",
            raw_body=b'{"meta": {}}',
            dedupe_key=_key(),
        ),
        "ListDeadLetters": lambda: pb.ListDeadLettersRequest(
            source="test", subject="order:seed", include_resolved=True, page_size=10
        ),
        "ResolveDeadLetter": lambda: pb.ResolveDeadLetterRequest(
            dead_letter_id=s.dead_letter_id, resolution="applied"
        ),
    }
    return requests[rpc]()


def method(stub: ledger_pb2_grpc.LedgerServiceAsyncStub, rpc: str) -> Any:
    if rpc == "ApplyBatches":
        return partial(_one_message, stub)
    name = "RefundPurchase" if rpc == "RefundByExternal" else rpc
    return getattr(stub, name)


async def _one_message(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    request: pb.ApplyBatchRequest,
    metadata: tuple[tuple[str, str], ...],
    timeout: float,  # noqa: ASYNC109 (the keyword a gRPC stub method takes)
) -> pb.ApplyBatchResponse:
    """ApplyBatches called as if it were unary: one batch on a stream, and its answer (or the
    stream's status, raised)."""
    call = stub.ApplyBatches(metadata=metadata, timeout=timeout)
    try:
        try:
            await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The stream was refused as it opened, and the write raced the refusal: gRPC's
            # client then reports its own INTERNAL ("Internal error from Core") in place of the
            # ledger's status. A stream opened again, with nothing written, reads that status.
            call.cancel()
            call = stub.ApplyBatches(metadata=metadata, timeout=timeout)
        response = await call.read()
    finally:
        call.cancel()
    assert isinstance(response, pb.ApplyBatchResponse), "the stream ended unanswered"
    return response


def set_field(message: Message, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    target: Any = message
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


async def expect_invalid(s: Seeded, rpc: str, request: Message, field: str) -> None:
    before = await snapshot(s.conn)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(s.stub, rpc)(request, metadata=AUTH, timeout=TIMEOUT)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    info = error_info(err)
    assert info is not None, "no google.rpc.ErrorInfo attached"
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "ledger.rpcai"
    assert info.metadata.get("field") == field, (info.metadata, err.details())
    assert await snapshot(s.conn) == before
    if rpc in BATCHED:
        # The same write inside ApplyBatch: the same answer, for that write alone.
        write = pb.LedgerWrite()
        getattr(write, BATCHED[rpc]).CopyFrom(request)
        batch = pb.ApplyBatchRequest(writes=[write])
        # ...and on the ApplyBatches stream.
        for rpc_of_batch in ("ApplyBatch", "ApplyBatches"):
            reply = await method(s.stub, rpc_of_batch)(batch, metadata=AUTH, timeout=TIMEOUT)
            (result,) = reply.results
            assert result.WhichOneof("result") == "error"
            assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            batched_info = status_info(result.error)
            assert batched_info is not None
            assert (batched_info.reason, batched_info.metadata.get("field")) == (
                "INVALID_ARGUMENT",
                field,
            )
            assert result.error.message == err.details()
            assert await snapshot(s.conn) == before


# --- ids and free-text fields ------------------------------------------------------------------

BAD_IDS = {
    "empty": "",
    "blank": "   ",
    "tab": "\t",
    "too-long": "u" * 257,
    "nul": "a\x00b",
    "newline": "a\nb",
    "escape": "a\x1b[31mb",
    "del": "a\x7fb",
    "bidi-override": "a\u202eb",
}

ID_FIELDS = [
    ("CreditPurchase", "idempotency_key"),
    ("CreditPurchase", "user_id"),
    ("CreditPurchase", "external_id"),
    ("CreditPurchase", "source"),
    ("Reserve", "idempotency_key"),
    ("Reserve", "user_id"),
    ("Settle", "usage.provider"),
    ("Settle", "usage.model"),
    ("RefundPurchase", "idempotency_key"),
    ("RefundByExternal", "external.source"),
    ("RefundByExternal", "external.external_id"),
    ("RecordUsage", "idempotency_key"),
    ("RecordUsage", "user_id"),
    ("RecordUsage", "usage.provider"),
    ("RecordUsage", "usage.model"),
    ("GetBalance", "user_id"),
    ("QuoteReserve", "user_id"),
    ("GetUserStatus", "user_id"),
    ("GetUsageAnalytics", "user_id"),
    ("GetPurchaseHistory", "user_id"),
    ("GetUserAccount", "user_id"),
    ("UpsertSubscription", "subscription.source"),
    ("UpsertSubscription", "subscription.external_id"),
    ("UpsertSubscription", "subscription.user_id"),
    ("UpsertSubscription", "subscription.status"),
    ("GetSubscription", "source"),
    ("GetSubscription", "external_id"),
    ("RecordDeadLetter", "source"),
    ("RecordDeadLetter", "event_name"),
    ("RecordDeadLetter", "dedupe_key"),
    ("ListDeadLetters", "source"),
]


@pytest.mark.parametrize(("kind", "value"), list(BAD_IDS.items()), ids=list(BAD_IDS))
@pytest.mark.parametrize(("rpc", "field"), ID_FIELDS, ids=[f"{r}.{f}" for r, f in ID_FIELDS])
async def test_bad_id(seeded: Seeded, rpc: str, field: str, kind: str, value: str) -> None:
    request = base_request(rpc, seeded)
    set_field(request, field, value)
    await expect_invalid(seeded, rpc, request, field)


# Optional ids: empty means absent, anything else follows the rules of an id.
OPTIONAL_ID_FIELDS = [
    ("Reserve", "attempt_id"),
    ("UpsertSubscription", "subscription.variant_id"),
    ("RecordDeadLetter", "subject"),
    ("ListDeadLetters", "subject"),
]
BAD_OPTIONAL_IDS = {k: v for k, v in BAD_IDS.items() if k != "empty"}


@pytest.mark.parametrize(
    ("kind", "value"), list(BAD_OPTIONAL_IDS.items()), ids=list(BAD_OPTIONAL_IDS)
)
@pytest.mark.parametrize(
    ("rpc", "field"), OPTIONAL_ID_FIELDS, ids=[f"{r}.{f}" for r, f in OPTIONAL_ID_FIELDS]
)
async def test_bad_optional_id(seeded: Seeded, rpc: str, field: str, kind: str, value: str) -> None:
    request = base_request(rpc, seeded)
    set_field(request, field, value)
    await expect_invalid(seeded, rpc, request, field)


# Free text for people (reasons, resolutions): required, one printable line, up to 4096.
BAD_NOTES = {**{k: v for k, v in BAD_IDS.items() if k != "too-long"}, "too-long": "n" * 4097}
NOTE_FIELDS = [("RecordDeadLetter", "reason"), ("ResolveDeadLetter", "resolution")]


@pytest.mark.parametrize(("kind", "value"), list(BAD_NOTES.items()), ids=list(BAD_NOTES))
@pytest.mark.parametrize(("rpc", "field"), NOTE_FIELDS, ids=[f"{r}.{f}" for r, f in NOTE_FIELDS])
async def test_bad_note(seeded: Seeded, rpc: str, field: str, kind: str, value: str) -> None:
    request = base_request(rpc, seeded)
    set_field(request, field, value)
    await expect_invalid(seeded, rpc, request, field)


# --- amounts, enums, references, pagination ----------------------------------------------------

# (rpc, field path, value, the field the error must name)
FIELD_CASES: list[tuple[str, str, object, str]] = [
    ("CreditPurchase", "tokens_purchased", 0, "tokens_purchased"),
    ("CreditPurchase", "tokens_purchased", -1, "tokens_purchased"),
    ("CreditPurchase", "tokens_purchased", 10**13, "tokens_purchased"),
    ("CreditPurchase", "tokens_purchased", 10**12 + 1, "tokens_purchased"),
    ("CreditPurchase", "tokens_purchased", -(2**63), "tokens_purchased"),
    ("CreditPurchase", "tokens_purchased", 2**63 - 1, "tokens_purchased"),
    ("CreditPurchase", "purchase_type", pb.PURCHASE_TYPE_UNSPECIFIED, "purchase_type"),
    ("CreditPurchase", "purchase_type", 99, "purchase_type"),
    ("CreditPurchase", "purchase_type", -1, "purchase_type"),
    ("Reserve", "estimated_tokens", 0, "estimated_tokens"),
    ("Reserve", "estimated_tokens", -1, "estimated_tokens"),
    ("Reserve", "estimated_tokens", 10**10, "estimated_tokens"),
    ("Reserve", "estimated_tokens", 10**9 + 1, "estimated_tokens"),
    ("Reserve", "estimated_tokens", 2**63 - 1, "estimated_tokens"),
    ("Reserve", "ttl_seconds", -1, "ttl_seconds"),
    ("Reserve", "ttl_seconds", -(2**31), "ttl_seconds"),
    ("Reserve", "ttl_seconds", 3601, "ttl_seconds"),
    ("Reserve", "ttl_seconds", 2**31 - 1, "ttl_seconds"),
    ("QuoteReserve", "estimated_tokens", 0, "estimated_tokens"),
    ("QuoteReserve", "estimated_tokens", -1, "estimated_tokens"),
    ("QuoteReserve", "estimated_tokens", 10**10, "estimated_tokens"),
    ("Settle", "reservation_id", "", "reservation_id"),
    ("Settle", "reservation_id", "not-a-uuid", "reservation_id"),
    ("Settle", "reservation_id", "12345", "reservation_id"),
    ("Settle", "reservation_id", "x" * 300, "reservation_id"),
    ("Settle", "reservation_id", "\x00", "reservation_id"),
    ("Settle", "usage.input_tokens", -1, "usage.input_tokens"),
    ("Settle", "usage.input_tokens", 10**9 + 1, "usage.input_tokens"),
    ("Settle", "usage.output_tokens", -1, "usage.output_tokens"),
    ("Settle", "usage.output_tokens", -(2**63), "usage.output_tokens"),
    ("Settle", "usage.output_tokens", 2**63 - 1, "usage.output_tokens"),
    ("Settle", "estimated_cost_micro_usd", -1, "estimated_cost_micro_usd"),
    ("Settle", "estimated_cost_micro_usd", 10**12 + 1, "estimated_cost_micro_usd"),
    ("Release", "reservation_id", "", "reservation_id"),
    ("Release", "reservation_id", "not-a-uuid", "reservation_id"),
    ("Release", "reservation_id", " ", "reservation_id"),
    ("ExtendHold", "reservation_id", "", "reservation_id"),
    ("ExtendHold", "reservation_id", "not-a-uuid", "reservation_id"),
    ("ExtendHold", "ttl_seconds", -1, "ttl_seconds"),
    ("ExtendHold", "ttl_seconds", 3601, "ttl_seconds"),  # beyond RESERVE_MAX_TTL_SECONDS
    ("Reserve", "ttl_seconds", 3601, "ttl_seconds"),
    ("CreditPurchase", "subscription.source", "other", "subscription.source"),
    ("CreditPurchase", "subscription.external_id", "", "subscription.external_id"),
    ("RefundPurchase", "share.total_amount", 0, "share.total_amount"),
    ("RefundPurchase", "share.total_amount", -5, "share.total_amount"),
    ("RefundByExternal", "share.total_amount", 10**16, "share.total_amount"),
    ("RefundPurchase", "wait_for_purchase", True, "wait_for_purchase"),  # only by external id
    ("RefundPurchase", "purchase_id", "not-a-uuid", "purchase_id"),
    ("RefundPurchase", "purchase_id", " ", "purchase_id"),
    ("RefundPurchase", "tokens_to_refund", -1, "tokens_to_refund"),
    ("RefundPurchase", "tokens_to_refund", 10**13, "tokens_to_refund"),
    ("RefundPurchase", "tokens_to_refund", 1001, "tokens_to_refund"),  # > the 1000 remaining
    ("RefundByExternal", "tokens_to_refund", 1001, "tokens_to_refund"),
    ("RecordUsage", "user_type", pb.USER_TYPE_UNSPECIFIED, "user_type"),
    ("RecordUsage", "user_type", 99, "user_type"),
    # A public BYOK call has no user: naming one is refused (an empty one with BYOK is above).
    ("RecordUsage", "user_type", pb.USER_TYPE_PUBLIC_BYOK, "user_id"),
    ("RecordUsage", "usage.input_tokens", -1, "usage.input_tokens"),
    ("RecordUsage", "usage.output_tokens", -5, "usage.output_tokens"),
    ("RecordUsage", "usage.output_tokens", 10**9 + 1, "usage.output_tokens"),
    ("RecordUsage", "estimated_cost_micro_usd", -1, "estimated_cost_micro_usd"),
    ("RecordUsage", "estimated_cost_micro_usd", 10**13, "estimated_cost_micro_usd"),
    ("GetUsageAnalytics", "days", -1, "days"),
    ("GetUsageAnalytics", "days", 367, "days"),
    ("GetUsageAnalytics", "days", 2**31 - 1, "days"),
    ("GetPurchaseHistory", "page_size", -1, "page_size"),
    ("GetPurchaseHistory", "page_size", 101, "page_size"),
    ("GetPurchaseHistory", "page_size", 2**31 - 1, "page_size"),
    ("ListDeadLetters", "page_size", -1, "page_size"),
    ("ListDeadLetters", "page_size", 101, "page_size"),
    ("ListDeadLetters", "page_size", 2**31 - 1, "page_size"),
    ("RecordDeadLetter", "raw_body", b"x" * (MAX_RAW_BODY_BYTES + 1), "raw_body"),
    ("ResolveDeadLetter", "dead_letter_id", "", "dead_letter_id"),
    ("ResolveDeadLetter", "dead_letter_id", "not-a-uuid", "dead_letter_id"),
    ("ResolveDeadLetter", "dead_letter_id", "\x00", "dead_letter_id"),
    ("GetPlatformAnalytics", "granularity", 99, "granularity"),
    ("GetPlatformAnalytics", "granularity", -1, "granularity"),
    ("GetPlatformAnalytics", "top_users", -1, "top_users"),
    ("GetPlatformAnalytics", "top_users", 101, "top_users"),
    ("GetPlatformAnalytics", "top_users", 2**31 - 1, "top_users"),
    ("GetPlatformAnalytics", "end.seconds", UPDATED_AT.seconds, "end"),  # empty range
    ("GetPlatformAnalytics", "end.seconds", UPDATED_AT.seconds - 1, "end"),
    ("GetPlatformAnalytics", "end.seconds", UPDATED_AT.seconds + 745 * DAY_SECONDS, "end"),
    ("GetPlatformAnalytics", "start.nanos", -1, "start"),
    ("GetPlatformAnalytics", "start.seconds", 2**62, "start"),
    ("GetPlatformAnalytics", "end.nanos", 1_000_000_000, "end"),
    ("GetPlatformAnalytics", "end.seconds", 253_402_300_800, "end"),  # 10000-01-01
    # Timestamps: beyond what a Timestamp may hold, nanos out of range, or at/before the epoch.
    *(
        ("UpsertSubscription", f"subscription.{name}.{part}", value, f"subscription.{name}")
        for name in ("provider_updated_at", "renews_at", "ends_at")
        for part, value in (
            ("seconds", 2**62),
            ("seconds", 253_402_300_800),  # 10000-01-01
            ("seconds", -(2**62)),
            ("seconds", -62_135_596_801),  # before 0001-01-01
            ("seconds", 0),  # the epoch: a zero value sent by mistake
            ("seconds", -1),
            ("nanos", -1),
            ("nanos", 1_000_000_000),
        )
    ),
]


@pytest.mark.parametrize(
    ("rpc", "path", "value", "field"),
    FIELD_CASES,
    ids=[f"{r}.{p}={str(v)[:12]!r}" for r, p, v, _ in FIELD_CASES],
)
async def test_bad_field(seeded: Seeded, rpc: str, path: str, value: object, field: str) -> None:
    request = base_request(rpc, seeded)
    set_field(request, path, value)
    await expect_invalid(seeded, rpc, request, field)


@pytest.mark.parametrize("rpc", ["Settle", "RecordUsage"])
async def test_missing_usage(seeded: Seeded, rpc: str) -> None:
    request = base_request(rpc, seeded)
    request.ClearField("usage")
    await expect_invalid(seeded, rpc, request, "usage")


@pytest.mark.parametrize("field", ["start", "end"])
async def test_an_analytics_range_needs_both_ends(seeded: Seeded, field: str) -> None:
    request = base_request("GetPlatformAnalytics", seeded)
    request.ClearField(field)
    await expect_invalid(seeded, "GetPlatformAnalytics", request, field)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("payment.currency", "usd", "payment.currency"),
        ("payment.currency", "US", "payment.currency"),
        ("payment.currency", "ÉUR", "payment.currency"),
        ("payment.amount_minor", -1, "payment.amount_minor"),
        ("payment.amount_minor", 10**11 + 1, "payment.amount_minor"),
        ("payment.amount_usd_cents", -1, "payment.amount_usd_cents"),
        ("payment.amount_usd_cents", 10**11 + 1, "payment.amount_usd_cents"),
        # A US-dollar payment's USD value is its amount.
        ("payment.amount_usd_cents", 1000, "payment.amount_usd_cents"),
    ],
)
async def test_bad_payment(seeded: Seeded, path: str, value: object, field: str) -> None:
    request = base_request("CreditPurchase", seeded)
    assert isinstance(request, pb.CreditPurchaseRequest)
    request.payment.CopyFrom(pb.Payment(currency="USD", amount_minor=999, amount_usd_cents=999))
    set_field(request, path, value)
    await expect_invalid(seeded, "CreditPurchase", request, field)


async def test_an_amount_without_a_currency_is_refused(seeded: Seeded) -> None:
    request = base_request("CreditPurchase", seeded)
    assert isinstance(request, pb.CreditPurchaseRequest)
    request.payment.CopyFrom(pb.Payment(amount_minor=500))
    await expect_invalid(seeded, "CreditPurchase", request, "payment.amount_minor")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("subscription", "subscription"),
        ("subscription.provider_updated_at", "subscription.provider_updated_at"),
    ],
)
async def test_missing_subscription_parts(seeded: Seeded, path: str, field: str) -> None:
    request = base_request("UpsertSubscription", seeded)
    *parents, leaf = path.split(".")
    target: Any = request
    for part in parents:
        target = getattr(target, part)
    target.ClearField(leaf)
    await expect_invalid(seeded, "UpsertSubscription", request, field)


async def test_an_empty_subscription_names_a_field(seeded: Seeded) -> None:
    request = pb.UpsertSubscriptionRequest(subscription=pb.Subscription())
    assert request.HasField("subscription")
    await expect_invalid(seeded, "UpsertSubscription", request, "subscription.provider_updated_at")


async def test_refund_without_a_purchase_reference(seeded: Seeded) -> None:
    request = pb.RefundPurchaseRequest(idempotency_key=_key(), tokens_to_refund=10)
    assert request.WhichOneof("purchase") is None
    await expect_invalid(seeded, "RefundPurchase", request, "purchase")


async def test_refund_with_an_empty_purchase_id_names_purchase_id(seeded: Seeded) -> None:
    request = pb.RefundPurchaseRequest(idempotency_key=_key(), purchase_id="", tokens_to_refund=1)
    assert request.WhichOneof("purchase") == "purchase_id"
    await expect_invalid(seeded, "RefundPurchase", request, "purchase_id")


@pytest.mark.parametrize("rpc", ["RefundPurchase", "RefundByExternal"])
@pytest.mark.parametrize("total", [1001, 10**12, 10**12 + 1])
async def test_a_cumulative_total_beyond_the_purchase(seeded: Seeded, rpc: str, total: int) -> None:
    request = base_request(rpc, seeded)
    set_field(request, "cumulative", True)
    set_field(request, "tokens_to_refund", total)
    await expect_invalid(seeded, rpc, request, "tokens_to_refund")


async def test_tokens_to_refund_beyond_what_remains_after_a_partial_refund(
    seeded: Seeded,
) -> None:
    # A purchase of its own, so the module's seed stays untouched.
    user = f"refund-{uuid.uuid4()}"
    bought = await seeded.stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=_key(),
            user_id=user,
            tokens_purchased=100,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id=f"order-{uuid.uuid4()}",
            source="test",
        ),
        metadata=AUTH,
    )
    await seeded.stub.RefundPurchase(
        pb.RefundPurchaseRequest(
            idempotency_key=_key(), purchase_id=bought.purchase_id, tokens_to_refund=60
        ),
        metadata=AUTH,
    )
    request = pb.RefundPurchaseRequest(
        idempotency_key=_key(), purchase_id=bought.purchase_id, tokens_to_refund=41
    )
    await expect_invalid(seeded, "RefundPurchase", request, "tokens_to_refund")


def _b64(data: object) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode()


GARBAGE_PAGE_TOKENS = {
    "not-base64": "this is not a token!",
    "bad-padding": "abc",
    "not-json": _b64(b"\xff\xfe not json"),
    "json-list": _b64([1, 2]),
    "json-number": _b64(7),
    "missing-id": _b64({"t": "2026-01-01T00:00:00+00:00"}),
    "bad-time": _b64({"t": "yesterday", "id": str(uuid.uuid4())}),
    "time-not-string": _b64({"t": 12345, "id": str(uuid.uuid4())}),
}


@pytest.mark.parametrize("token", list(GARBAGE_PAGE_TOKENS.values()), ids=list(GARBAGE_PAGE_TOKENS))
async def test_garbage_page_token(seeded: Seeded, token: str) -> None:
    request = pb.GetPurchaseHistoryRequest(user_id=seeded.user, page_token=token)
    await expect_invalid(seeded, "GetPurchaseHistory", request, "page_token")


async def test_forged_page_token_with_an_id_that_is_not_a_uuid(seeded: Seeded) -> None:
    token = _b64({"t": "2026-01-01T00:00:00+00:00", "id": "not-a-uuid"})
    request = pb.GetPurchaseHistoryRequest(user_id=seeded.user, page_token=token)
    await expect_invalid(seeded, "GetPurchaseHistory", request, "page_token")


async def test_every_base_request_of_the_reads_is_valid(seeded: Seeded) -> None:
    """The cases above break one field of these; unbroken, they succeed."""
    reads = (
        "GetBalance",
        "QuoteReserve",
        "GetUserStatus",
        "GetUsageAnalytics",
        "GetPurchaseHistory",
        "GetSubscription",
        "ListDeadLetters",
        "GetPlatformAnalytics",
        "GetUserAccount",
    )
    for rpc in reads:
        await method(seeded.stub, rpc)(base_request(rpc, seeded), metadata=AUTH, timeout=TIMEOUT)
    history = await seeded.stub.GetPurchaseHistory(
        pb.GetPurchaseHistoryRequest(user_id=seeded.user, page_size=1), metadata=AUTH
    )
    assert [p.purchase_id for p in history.purchases] == [seeded.purchase_id]
    found = await seeded.stub.GetSubscription(
        pb.GetSubscriptionRequest(source="test", external_id=seeded.subscription_id),
        metadata=AUTH,
    )
    assert found.subscription == _subscription(seeded.user, seeded.subscription_id)
    letters = await seeded.stub.ListDeadLetters(
        pb.ListDeadLettersRequest(source="test", subject="order:seed"), metadata=AUTH
    )
    assert [d.dead_letter_id for d in letters.dead_letters] == [seeded.dead_letter_id]


async def test_every_base_request_of_the_new_mutations_is_valid(seeded: Seeded) -> None:
    """Unbroken, they succeed (pointed at rows of their own, so that the seed stays as it is)."""
    upsert = base_request("UpsertSubscription", seeded)
    assert isinstance(upsert, pb.UpsertSubscriptionRequest)
    upsert.subscription.external_id = f"sub-{uuid.uuid4()}"
    upserted = await seeded.stub.UpsertSubscription(upsert, metadata=AUTH, timeout=TIMEOUT)
    assert upserted.applied
    assert upserted.subscription == upsert.subscription
    record = base_request("RecordDeadLetter", seeded)
    assert isinstance(record, pb.RecordDeadLetterRequest)
    parked = await seeded.stub.RecordDeadLetter(record, metadata=AUTH, timeout=TIMEOUT)
    assert not parked.replayed
    resolve = base_request("ResolveDeadLetter", seeded)
    assert isinstance(resolve, pb.ResolveDeadLetterRequest)
    resolve.dead_letter_id = parked.dead_letter_id
    resolved = await seeded.stub.ResolveDeadLetter(resolve, metadata=AUTH, timeout=TIMEOUT)
    assert resolved.dead_letter.resolution == "applied"
    cumulative = base_request("RefundPurchase", seeded)
    assert isinstance(cumulative, pb.RefundPurchaseRequest)
    cumulative.cumulative = True
    cumulative.tokens_to_refund = 0  # a total of zero: refunds nothing, changes no balance
    before = await seeded.stub.GetBalance(pb.GetBalanceRequest(user_id=seeded.user), metadata=AUTH)
    refund = await seeded.stub.RefundPurchase(cumulative, metadata=AUTH, timeout=TIMEOUT)
    assert (refund.tokens_refunded, refund.balance) == (0, before.balance)


# --- unknown references ------------------------------------------------------------------------


async def _expect_not_found(s: Seeded, rpc: str, request: Message, reason: str) -> None:
    before = await snapshot(s.conn)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(s.stub, rpc)(request, metadata=AUTH, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == reason
    assert await snapshot(s.conn) == before


async def test_settle_of_an_unknown_reservation_is_not_found(seeded: Seeded) -> None:
    request = pb.SettleRequest(reservation_id=str(uuid.uuid4()), usage=_usage())
    await _expect_not_found(seeded, "Settle", request, "RESERVATION_NOT_FOUND")


async def test_release_of_an_unknown_reservation_is_not_found(seeded: Seeded) -> None:
    request = pb.ReleaseRequest(reservation_id=str(uuid.uuid4()))
    await _expect_not_found(seeded, "Release", request, "RESERVATION_NOT_FOUND")


async def test_refund_of_an_unknown_purchase_id_is_not_found(seeded: Seeded) -> None:
    request = pb.RefundPurchaseRequest(idempotency_key=_key(), purchase_id=str(uuid.uuid4()))
    await _expect_not_found(seeded, "RefundPurchase", request, "PURCHASE_NOT_FOUND")


async def test_refund_of_an_unknown_external_payment_is_not_found(seeded: Seeded) -> None:
    request = pb.RefundPurchaseRequest(
        idempotency_key=_key(), external=pb.PurchaseRef(source="test", external_id="no-such")
    )
    await _expect_not_found(seeded, "RefundPurchase", request, "PURCHASE_NOT_FOUND")


@pytest.mark.parametrize(
    ("source", "external_id"), [("test", "no-such"), ("other-provider", "sub-seed")]
)
async def test_an_unknown_subscription_is_not_found(
    seeded: Seeded, source: str, external_id: str
) -> None:
    request = pb.GetSubscriptionRequest(source=source, external_id=external_id)
    await _expect_not_found(seeded, "GetSubscription", request, "SUBSCRIPTION_NOT_FOUND")


async def test_resolving_an_unknown_dead_letter_is_not_found(seeded: Seeded) -> None:
    request = pb.ResolveDeadLetterRequest(dead_letter_id=str(uuid.uuid4()), resolution="applied")
    await _expect_not_found(seeded, "ResolveDeadLetter", request, "DEAD_LETTER_NOT_FOUND")


# --- authentication ----------------------------------------------------------------------------

RPCS = [
    "CreditPurchase",
    "Reserve",
    "ExtendHold",
    "Settle",
    "Release",
    "RefundPurchase",
    "RecordUsage",
    "GetBalance",
    "QuoteReserve",
    "GetUserStatus",
    "GetUsageAnalytics",
    "GetPurchaseHistory",
    "UpsertSubscription",
    "GetSubscription",
    "RecordDeadLetter",
    "ListDeadLetters",
    "ResolveDeadLetter",
    "ApplyBatch",
    "ApplyBatches",
    "GetPlatformAnalytics",
    "GetUserAccount",
]
# The writes ApplyBatch carries: every bad-input case of these is also sent inside a batch.
BATCHED = {
    "Reserve": "reserve",
    "ExtendHold": "extend_hold",
    "Settle": "settle",
    "Release": "release",
    "RecordUsage": "record_usage",
}


def test_every_rpc_of_the_service_is_covered() -> None:
    """A method added to the service without cases here fails this test."""
    service = pb.DESCRIPTOR.services_by_name["LedgerService"]
    assert set(RPCS) == set(service.methods_by_name)
    # Methods keyed by a UUID only (their cases are in FIELD_CASES).
    by_uuid = {"Settle", "Release", "ExtendHold", "ResolveDeadLetter"}
    # Methods with no id at all (their cases are in FIELD_CASES too).
    no_id = {"RefundPurchase", "ApplyBatch", "ApplyBatches", "GetPlatformAnalytics"}
    assert {rpc for rpc, _ in ID_FIELDS} | by_uuid >= set(RPCS) - no_id
    assert no_id - {"ApplyBatch", "ApplyBatches"} <= {rpc for rpc, *_ in FIELD_CASES}
    assert set(BATCHED) | {"ApplyBatch", "ApplyBatches"} <= set(RPCS)
    assert by_uuid <= {rpc for rpc, *_ in FIELD_CASES}


BAD_CREDENTIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "none": (),
    "wrong-token": (("authorization", "Bearer not-the-token"),),
    "no-scheme": (("authorization", SERVICE_TOKEN),),
    "empty-bearer": (("authorization", "Bearer "),),
    "token-prefix": (("authorization", f"Bearer {SERVICE_TOKEN[:-1]}"),),
    "token-suffix": (("authorization", f"Bearer {SERVICE_TOKEN}x"),),
    "other-header": (("x-api-key", SERVICE_TOKEN),),
}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS.values()), ids=list(BAD_CREDENTIALS))
@pytest.mark.parametrize("rpc", RPCS)
async def test_unauthenticated(
    seeded: Seeded, rpc: str, credentials: tuple[tuple[str, str], ...]
) -> None:
    # Valid requests: without the token, even these must do nothing.
    before = await snapshot(seeded.conn)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(seeded.stub, rpc)(
            base_request(rpc, seeded), metadata=credentials, timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "UNAUTHENTICATED"
    assert await snapshot(seeded.conn) == before


@pytest.mark.parametrize("service", ["", "rpcai.ledger.v1.LedgerService"])
async def test_health_check_needs_no_token(seeded: Seeded, service: str) -> None:
    health = health_pb2_grpc.HealthStub(seeded.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(seeded: Seeded) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(seeded.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
    )
    names = [s.name async for response in call for s in response.list_services_response.service]
    assert "rpcai.ledger.v1.LedgerService" in names
