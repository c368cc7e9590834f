"""Dead letters through the real gRPC server on a real Postgres: webhook events that could not be
applied are kept with their raw body (byte for byte), stored once per (source, dedupe_key) however
often and however concurrently they are parked, listed oldest first, and resolved exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg
import grpc
import pytest

from ledger_service.domain.ledger import MAX_DEAD_LETTER_PAGE_BYTES, MAX_RAW_BODY_BYTES
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import failure

SOURCE = "lemonsqueezy"


def body(n: int = 0) -> bytes:
    return b'{"meta": {"event_name": "order_created", "n": %d}, "data": {}}' % n


async def park(
    ledger: LedgerHarness,
    raw_body: bytes,
    subject: str = "order:1",
    reason: str = "unknown variant '999'",
    source: str = SOURCE,
    dedupe_key: str | None = None,
    event_name: str = "order_created",
) -> pb.RecordDeadLetterResponse:
    response: pb.RecordDeadLetterResponse = await ledger.stub.RecordDeadLetter(
        pb.RecordDeadLetterRequest(
            source=source,
            event_name=event_name,
            subject=subject,
            reason=reason,
            raw_body=raw_body,
            dedupe_key=dedupe_key or hashlib.sha256(raw_body).hexdigest(),
        ),
        metadata=AUTH,
    )
    return response


async def listed(
    ledger: LedgerHarness,
    subject: str = "",
    include_resolved: bool = False,
    page_size: int = 0,
    source: str = SOURCE,
) -> list[pb.DeadLetter]:
    response: pb.ListDeadLettersResponse = await ledger.stub.ListDeadLetters(
        pb.ListDeadLettersRequest(
            source=source, subject=subject, include_resolved=include_resolved, page_size=page_size
        ),
        metadata=AUTH,
    )
    return list(response.dead_letters)


async def resolve(ledger: LedgerHarness, letter_id: str, resolution: str) -> pb.DeadLetter:
    response: pb.ResolveDeadLetterResponse = await ledger.stub.ResolveDeadLetter(
        pb.ResolveDeadLetterRequest(dead_letter_id=letter_id, resolution=resolution),
        metadata=AUTH,
    )
    return response.dead_letter


async def count_letters(ledger: LedgerHarness) -> int:
    conn: asyncpg.Connection = await ledger.db()
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM dead_letters")
        return n
    finally:
        await conn.close()


async def test_a_dead_letter_keeps_everything_it_was_given(ledger: LedgerHarness) -> None:
    raw = bytes(range(256)) * 3  # not even UTF-8: kept byte for byte
    parked = await park(ledger, raw, subject="subscription:42", reason="unknown subscription")
    assert not parked.replayed
    uuid.UUID(parked.dead_letter_id)
    [letter] = await listed(ledger)
    assert letter.dead_letter_id == parked.dead_letter_id
    assert (letter.source, letter.event_name, letter.subject, letter.reason) == (
        SOURCE,
        "order_created",
        "subscription:42",
        "unknown subscription",
    )
    assert letter.raw_body == raw
    assert letter.HasField("created_at")
    assert not letter.HasField("resolved_at")
    assert letter.resolution == ""


async def test_a_letter_may_be_about_nothing_in_particular(ledger: LedgerHarness) -> None:
    parked = await park(ledger, b"not json at all", subject="", event_name="unknown")
    [letter] = await listed(ledger)
    assert (letter.dead_letter_id, letter.subject) == (parked.dead_letter_id, "")


async def test_the_same_event_parked_twice_is_stored_once(ledger: LedgerHarness) -> None:
    first = await park(ledger, body(1))
    # The same delivery again, even with another reason: the first letter stands, unchanged.
    again = await park(ledger, body(1), reason="a later attempt failed differently")
    assert again.replayed
    assert again.dead_letter_id == first.dead_letter_id
    assert await count_letters(ledger) == 1
    [letter] = await listed(ledger)
    assert letter.reason == "unknown variant '999'"


async def test_concurrent_copies_of_one_event_store_one_letter(ledger: LedgerHarness) -> None:
    replies = await asyncio.gather(*(park(ledger, body(7)) for _ in range(25)))
    assert len({r.dead_letter_id for r in replies}) == 1
    assert sorted(r.replayed for r in replies) == [False] + [True] * 24
    assert await count_letters(ledger) == 1


async def test_dedupe_keys_are_per_source(ledger: LedgerHarness) -> None:
    live = await park(ledger, body(1), dedupe_key="same")
    test = await park(ledger, body(1), dedupe_key="same", source="lemonsqueezy-test")
    other = await park(ledger, body(2), dedupe_key="other")
    assert [live.replayed, test.replayed, other.replayed] == [False, False, False]
    assert len({live.dead_letter_id, test.dead_letter_id, other.dead_letter_id}) == 3
    assert [d.dead_letter_id for d in await listed(ledger)] == [
        live.dead_letter_id,
        other.dead_letter_id,
    ]
    assert [d.dead_letter_id for d in await listed(ledger, source="lemonsqueezy-test")] == [
        test.dead_letter_id
    ]


async def test_a_letter_of_the_largest_body_is_kept_whole(ledger: LedgerHarness) -> None:
    raw = b"x" * MAX_RAW_BODY_BYTES
    await park(ledger, raw)
    [letter] = await listed(ledger)
    assert letter.raw_body == raw


async def test_the_table_refuses_a_larger_body_too(ledger: LedgerHarness) -> None:
    """Defence in depth: a caller that skipped the domain cannot store more either."""
    conn: asyncpg.Connection = await ledger.db()
    try:
        with pytest.raises(asyncpg.exceptions.CheckViolationError):
            await conn.fetchrow(
                "SELECT * FROM ledger_record_dead_letter('s', 'e', '', 'r', $1, 'k')",
                b"x" * (MAX_RAW_BODY_BYTES + 1),
            )
    finally:
        await conn.close()
    assert await count_letters(ledger) == 0


# --- listing -----------------------------------------------------------------------------------


async def test_listing_is_oldest_first_filtered_and_sized(ledger: LedgerHarness) -> None:
    ids = [(await park(ledger, body(i), subject=f"order:{i % 2}")).dead_letter_id for i in range(6)]
    assert [d.dead_letter_id for d in await listed(ledger)] == ids
    assert [d.dead_letter_id for d in await listed(ledger, subject="order:1")] == ids[1::2]
    assert [d.dead_letter_id for d in await listed(ledger, subject="order:0")] == ids[0::2]
    assert await listed(ledger, subject="order:9") == []
    assert [d.dead_letter_id for d in await listed(ledger, page_size=4)] == ids[:4]
    assert [d.dead_letter_id for d in await listed(ledger, page_size=1)] == ids[:1]
    assert await listed(ledger, source="another-provider") == []


async def test_resolved_letters_are_listed_only_on_request(ledger: LedgerHarness) -> None:
    ids = [(await park(ledger, body(i), subject="order:5")).dead_letter_id for i in range(3)]
    await resolve(ledger, ids[1], "applied: credited 800 tokens")
    assert [d.dead_letter_id for d in await listed(ledger)] == [ids[0], ids[2]]
    assert [d.dead_letter_id for d in await listed(ledger, subject="order:5")] == [ids[0], ids[2]]
    every = await listed(ledger, subject="order:5", include_resolved=True)
    assert [d.dead_letter_id for d in every] == ids
    assert [d.HasField("resolved_at") for d in every] == [False, True, False]
    assert every[1].resolution == "applied: credited 800 tokens"


async def test_a_page_of_large_letters_stays_within_a_grpc_message(ledger: LedgerHarness) -> None:
    """Five letters of 1 MiB would make a 5 MiB answer, past the 4 MiB a gRPC client takes by
    default: a page stops early, and resolving what it showed brings the rest."""
    ids = [(await park(ledger, bytes([i]) * MAX_RAW_BODY_BYTES)).dead_letter_id for i in range(5)]
    seen: list[str] = []
    while page := await listed(ledger, page_size=100):
        assert sum(len(d.raw_body) for d in page) <= MAX_DEAD_LETTER_PAGE_BYTES
        for letter in page:
            assert letter.raw_body == bytes([ids.index(letter.dead_letter_id)]) * len(
                letter.raw_body
            )
            await resolve(ledger, letter.dead_letter_id, "replayed")
        seen.extend(d.dead_letter_id for d in page)
    assert seen == ids


# --- resolving ---------------------------------------------------------------------------------


async def test_resolving_sets_the_resolution_once(ledger: LedgerHarness) -> None:
    letter_id = (await park(ledger, body(1))).dead_letter_id
    first = await resolve(ledger, letter_id, "applied after the catalog was fixed")
    assert first.dead_letter_id == letter_id
    assert first.HasField("resolved_at")
    assert first.resolution == "applied after the catalog was fixed"
    assert first.raw_body == body(1)
    # Again, even with another note: the stored resolution, unchanged.
    second = await resolve(ledger, letter_id, "something else")
    assert second == first


async def test_concurrent_resolutions_agree_on_one(ledger: LedgerHarness) -> None:
    letter_id = (await park(ledger, body(1))).dead_letter_id
    replies = await asyncio.gather(*(resolve(ledger, letter_id, f"note {i}") for i in range(20)))
    assert len({(r.resolution, r.resolved_at.ToMicroseconds()) for r in replies}) == 1
    [stored] = await listed(ledger, include_resolved=True)
    assert stored.resolution == replies[0].resolution


async def test_a_redelivered_event_does_not_reopen_its_resolved_letter(
    ledger: LedgerHarness,
) -> None:
    letter_id = (await park(ledger, body(3))).dead_letter_id
    await resolve(ledger, letter_id, "applied")
    again = await park(ledger, body(3))
    assert (again.dead_letter_id, again.replayed) == (letter_id, True)
    assert await listed(ledger) == []


async def test_an_unknown_letter_is_not_found(ledger: LedgerHarness) -> None:
    await park(ledger, body(1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(ledger, str(uuid.uuid4()), "applied")
    assert failure(caught.value) == (grpc.StatusCode.NOT_FOUND, "DEAD_LETTER_NOT_FOUND")
    assert [d.HasField("resolved_at") for d in await listed(ledger, include_resolved=True)] == [
        False
    ]
