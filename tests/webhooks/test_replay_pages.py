"""`python -m gateway_service replay-dead-letters` walks every page of open dead letters with a
cursor. Here the whole first page stays dead (orders with no user id: no configuration fix
helps them), while later pages hold orders for a variant that was unknown when they arrived
and that the operator has since added. The replay must get past the dead first page, apply
and resolve every later letter (crediting it exactly once), leave the dead ones open, and
finish; a second replay changes nothing."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile

from ledger_service.audit import run_audit
from ledger_service.domain.ledger import MAX_PAGE_SIZE
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH, SERVICE_TOKEN
from tests.ledger_service.helpers import balance, table_counts
from tests.webhooks.conftest import Hooks
from tests.webhooks.payloads import encode, order

# The ledger never answers more than MAX_PAGE_SIZE letters a page (the replay asks for 100),
# so letters this many deep fill at least the whole first page the replay reads.
DEAD_FIRST = MAX_PAGE_SIZE
APPLICABLE = 120  # more than one further page
DEAD_LATER = 10  # dead letters among the later pages too
ADDED_VARIANT = 777  # unknown to the hooks' catalog; the operator's replay adds it
VARIANT_TOKENS = 500  # an order credits 400 of them (20% purchase fee)
CREDITED = 400
DEAD_REASON = "meta.custom_data.user_id is missing"
RUN_TIMEOUT = 120.0


async def _letters(hooks: Hooks, include_resolved: bool = False) -> list[lpb.DeadLetter]:
    letters: list[lpb.DeadLetter] = []
    token = ""
    while True:
        page = await hooks.ledger.stub.ListDeadLetters(
            lpb.ListDeadLettersRequest(
                source="lemonsqueezy",
                include_resolved=include_resolved,
                page_size=MAX_PAGE_SIZE,
                page_token=token,
            ),
            metadata=AUTH,
        )
        letters += page.dead_letters
        token = page.next_page_token
        if not token:
            return letters


async def _replay(data_dir: str, hooks: Hooks) -> tuple[int, str]:
    env = {
        **os.environ,
        "LEDGER_ADDR": hooks.ledger.address,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "JWT_SECRET": "unused-by-this-command",
        "LEMONSQUEEZY_VARIANT_TOKENS": f'{{"111": 1000, "{ADDED_VARIANT}": {VARIANT_TOKENS}}}',
        "DATA_DIR": data_dir,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_service", "replay-dead-letters",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the replay did not finish within {RUN_TIMEOUT}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _outcomes(out: str) -> list[tuple[str, str, str]]:
    """(dead_letter_id, status, detail) for every letter the command reports."""
    return re.findall(r"^([0-9a-f-]{36}) \S+: (\w+) \((.*)\)$", out, flags=re.MULTILINE)


async def _state(hooks: Hooks, users: list[str]) -> tuple[object, ...]:
    conn = await hooks.ledger.db()
    try:
        counts = await table_counts(conn)
        letters = await conn.fetch(
            "SELECT id::text, resolved_at, resolution FROM dead_letters ORDER BY id"
        )
    finally:
        await conn.close()
    balances = [await balance(hooks.ledger.stub, u) for u in users]
    return counts, [tuple(r.values()) for r in letters], balances


async def test_replay_walks_past_a_dead_first_page(hooks: Hooks) -> None:
    dead_bodies: set[bytes] = set()
    live: dict[bytes, str] = {}  # body -> user it credits
    order_id = 50_000
    # Oldest first: a full page of letters that stay dead...
    for _ in range(DEAD_FIRST):
        order_id += 1
        payload = order("order_created", order_id, None, ADDED_VARIANT)
        status, body = await hooks.deliver(payload)
        assert (status, body["status"]) == (200, "dead_letter")
        dead_bodies.add(encode(payload))
    # ...then letters that apply once the variant is known, a few dead ones among them.
    for n in range(APPLICABLE + DEAD_LATER):
        order_id += 1
        user = None if n % 13 == 5 else f"pager-{n}"
        payload = order("order_created", order_id, user, ADDED_VARIANT)
        status, body = await hooks.deliver(payload)
        assert (status, body["status"]) == (200, "dead_letter")
        if user is None:
            dead_bodies.add(encode(payload))
        else:
            assert "unknown variant" in body["detail"]
            live[encode(payload)] = user
    assert (len(dead_bodies), len(live)) == (DEAD_FIRST + DEAD_LATER, APPLICABLE)

    letters = await _letters(hooks)
    assert len(letters) == DEAD_FIRST + DEAD_LATER + APPLICABLE
    # The scenario holds: the first page (as the ledger lists them, oldest first) is all dead.
    assert all(letter.raw_body in dead_bodies for letter in letters[:DEAD_FIRST])
    dead_ids = {letter.dead_letter_id for letter in letters if letter.raw_body in dead_bodies}
    live_ids = {letter.dead_letter_id: live[letter.raw_body] for letter in letters
                if letter.raw_body in live}  # fmt: skip
    assert len(live_ids) == APPLICABLE
    users = sorted(live_ids.values())
    for user in users:
        assert (await balance(hooks.ledger.stub, user)).available_tokens == 0

    with tempfile.TemporaryDirectory(prefix="rpcai-replay-") as data_dir:
        code, out = await _replay(data_dir, hooks)
        # Some letters are still unapplicable: the command says so in its exit status.
        assert code == 1, out
        assert f", {len(dead_ids)} still unapplicable" in out, out
        reported = _outcomes(out)
        assert {status for _, status, _ in reported} == {"applied", "dead_letter"}, out
        # Every later letter was reached and applied exactly once; only dead ones came back,
        # dead now for the reason no configuration fixes.
        applied = [i for i, status, _ in reported if status == "applied"]
        assert sorted(applied) == sorted(live_ids), out
        still = [(i, detail) for i, status, detail in reported if status == "dead_letter"]
        assert {i for i, _ in still} == dead_ids, out
        assert {detail for _, detail in still} == {DEAD_REASON}, out

        # Each buyer credited exactly once, the tokens the added variant sells.
        for user in users:
            b = await balance(hooks.ledger.stub, user)
            assert (b.available_tokens, b.reserved_tokens) == (CREDITED, 0), user
        open_now = await _letters(hooks)
        assert {letter.dead_letter_id for letter in open_now} == dead_ids
        everything = await _letters(hooks, include_resolved=True)
        resolved = {x.dead_letter_id: x for x in everything if x.HasField("resolved_at")}
        assert set(resolved) == set(live_ids)
        assert all(x.resolution.startswith("applied") for x in resolved.values())
        report = await run_audit(hooks.ledger.database_url)
        assert report.ok
        assert report.platform_balances["purchase_fee"] == APPLICABLE * (VARIANT_TOKENS - CREDITED)

        # Replayed again: the dead ones are tried once more and nothing changes.
        before = await _state(hooks, users)
        code, out = await _replay(data_dir, hooks)
        assert code == 1, out
        assert f"{len(dead_ids)} replayed, {len(dead_ids)} still unapplicable" in out, out
        again = _outcomes(out)
        assert sorted(i for i, _, _ in again) == sorted(dead_ids), out
        assert {status for _, status, _ in again} == {"dead_letter"}, out
        assert await _state(hooks, users) == before


async def test_a_letter_the_ledger_refuses_again_does_not_stop_the_replay(hooks: Hooks) -> None:
    """A letter parked because the ledger refused it as invalid (here a user id too long to
    store) is refused again on replay: it stays dead and the replay goes on to the next one."""
    refused = order("order_created", 70_001, "u" * 300)  # a variant the hooks know
    status, body = await hooks.deliver(refused)
    assert (status, body["status"]) == (200, "dead_letter")
    assert body["detail"].startswith("the ledger refused it"), body
    later = order("order_created", 70_002, "after-refused", ADDED_VARIANT)
    assert (await hooks.deliver(later))[1]["status"] == "dead_letter"  # unknown variant, yet

    with tempfile.TemporaryDirectory(prefix="rpcai-replay-") as data_dir:
        code, out = await _replay(data_dir, hooks)
    assert code == 1, out
    assert "Traceback" not in out, out
    reported = {(status, detail.split(":")[0]) for _, status, detail in _outcomes(out)}
    assert reported == {
        ("dead_letter", "the ledger refused it"),
        ("applied", f"credited {CREDITED} tokens"),
    }, out
    b = await balance(hooks.ledger.stub, "after-refused")
    assert (b.available_tokens, b.reserved_tokens) == (CREDITED, 0)
