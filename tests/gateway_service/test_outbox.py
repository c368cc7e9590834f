"""The outbox keeps a ledger write until the ledger answers definitively: on disk before submit
returns (a process killed right after keeps it), whole after a torn write, retried on every
non-definitive failure, kept (not dropped) when the ledger refuses it for good."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from gateway_service import outbox as outbox_module
from gateway_service.errors import Failure
from gateway_service.ledger_client import LedgerError
from gateway_service.outbox import Outbox

# A child process that queues three writes the ledger cannot take, says so, and waits to die.
CHILD = """
import asyncio, sys
from pathlib import Path
from gateway_service.errors import Failure
from gateway_service.ledger_client import LedgerError
from gateway_service.outbox import Outbox

async def main() -> None:
    async def down(method: str, payload: bytes) -> None:
        raise LedgerError(Failure.UNAVAILABLE, "LEDGER_UNAVAILABLE", "down", definitive=False)
    box = Outbox(down, Path(sys.argv[1]))
    await box.start()
    for n in range(3):
        await box.submit("Settle", bytes([n]))
    print("queued", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    async def __call__(self, method: str, payload: bytes) -> None:
        self.delivered.append((method, payload))


ROOT = Path(__file__).resolve().parents[2]


async def _queued_by_a_killed_process(path: Path) -> None:
    root = ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"queued\n"
    proc.send_signal(signal.SIGKILL)  # no close, no flush: as a crash
    await proc.wait()


def test_workers_that_open_a_new_journal_at_once_all_start(tmp_path: Path) -> None:
    # Gateway workers share one outbox file and start together; CI once lost a worker to
    # "database is locked" from the switch to WAL. Eight openers per new file, many files: without
    # the set-up lock a few in a hundred rounds fail here.
    failures: list[BaseException] = []
    for round_ in range(150):
        path = tmp_path / f"outbox-{round_}.sqlite3"
        start = threading.Barrier(8)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                outbox_module._Journal(path).close()
            except sqlite3.Error as error:
                failures.append(error)

        openers = [threading.Thread(target=open_it) for _ in range(8)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
    assert failures == []


async def test_a_write_queued_just_before_a_crash_is_delivered_after_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    await _queued_by_a_killed_process(path)
    sent = Recorder()
    box = Outbox(sent, path)
    await box.start()
    assert box.pending == 3
    assert await box.drain(5)
    await box.close()
    assert sent.delivered == [("Settle", b"\x00"), ("Settle", b"\x01"), ("Settle", b"\x02")]
    again = Outbox(sent, path)
    await again.start()
    assert again.pending == 0  # delivered ones are gone for good
    await again.close()


async def test_a_torn_write_after_the_last_commit_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    await _queued_by_a_killed_process(path)
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()
    with wal.open("ab") as f:
        f.write(os.urandom(3000))  # a frame half written when the power went
    sent = Recorder()
    box = Outbox(sent, path)
    await box.start()
    assert box.pending == 3
    assert await box.drain(5)
    await box.close()
    assert len(sent.delivered) == 3


async def test_jobs_left_in_the_old_json_journal_are_taken_over(tmp_path: Path) -> None:
    legacy = tmp_path / "outbox.jsonl"
    lines = [
        {"add": "a", "method": "RecordUsage", "payload": base64.b64encode(b"a").decode()},
        {"add": "b", "method": "Settle", "payload": base64.b64encode(b"b").decode()},
        {"done": "a"},
    ]
    legacy.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"add": "torn')
    sent = Recorder()
    box = Outbox(sent, tmp_path / "outbox.sqlite3")
    await box.start()
    assert box.pending == 1
    assert await box.drain(5)
    await box.close()
    assert sent.delivered == [("Settle", b"b")]
    assert not legacy.exists()


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    ],
)
async def test_every_non_definitive_failure_is_retried(
    tmp_path: Path, code: grpc.StatusCode
) -> None:
    failures = 3
    sent = Recorder()

    async def flaky(method: str, payload: bytes) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise LedgerError(Failure.INTERNAL, code.name, "flaky", definitive=False)
        await sent(method, payload)

    box = Outbox(flaky, tmp_path / "outbox.sqlite3", initial_backoff=0.01)
    await box.start()
    await box.submit("Settle", b"x")
    assert await box.drain(5)
    await box.close()
    assert sent.delivered == [("Settle", b"x")]
    assert box.refused == 0


async def test_a_write_refused_for_good_is_kept_for_an_operator(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"

    async def refuse(method: str, payload: bytes) -> None:
        raise LedgerError(Failure.CONFLICT, "IDEMPOTENCY_KEY_REUSED", "no", definitive=True)

    box = Outbox(refuse, path, initial_backoff=0.01)
    await box.start()
    await box.submit("Settle", b"x")
    await box.keep_refused("Settle", b"y", "INVALID_ARGUMENT")
    assert await box.drain(5)  # nothing left to retry...
    await box.close()
    assert box.refused == 2  # ...and nothing dropped
    again = Outbox(Recorder(), path)
    await again.start()
    assert (again.pending, again.refused) == (0, 2)
    await again.close()


async def test_drain_returns_once_the_delivered_writes_are_off_the_disk_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`drain` is what a shutdown waits on before `close`: when it says nothing is left, the
    journal must say so too (a close cancelling a delete still queued for the journal's thread
    left a delivered write to be sent again by the next start)."""
    done = outbox_module._Journal.done

    def slow_done(journal: outbox_module._Journal, job_id: str) -> None:
        time.sleep(0.3)  # a disk slow to sync
        done(journal, job_id)

    monkeypatch.setattr(outbox_module._Journal, "done", slow_done)
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(Recorder(), path)
    await box.start()
    try:
        await box.submit("Settle", b"x")
        assert await box.drain(5)
        on_disk = sqlite3.connect(path)
        try:
            assert on_disk.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        finally:
            on_disk.close()
    finally:
        await box.close()
