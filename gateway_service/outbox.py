"""Ledger writes that must arrive even when the ledger cannot take them right now.

BYOK usage records, settles whose answer was lost (or that the ledger failed) after the provider
had answered, and releases are idempotent ledger calls. One that cannot be delivered at once is
queued here and retried with backoff until the ledger gives a definitive answer (the one
classification in `ledger_client.is_definitive`): never lost, never doubled (the ledger
deduplicates by the call's own key or reservation, so a retry after a lost answer changes nothing).

The queue is a SQLite database under DATA_DIR in WAL mode with synchronous=FULL: a job is on disk
before `submit` returns, and a crash (or a torn write) loses nothing that was committed. A job the
ledger refuses for good is kept, marked refused, and logged at ERROR for an operator: never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from gateway_service.errors import GatewayError
from gateway_service.ledger_client import is_definitive

log = logging.getLogger(__name__)
T = TypeVar("T")

# (method name, serialized request) -> delivered; raises GatewayError on failure.
Sender = Callable[[str, bytes], Awaitable[None]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  method TEXT NOT NULL,
  payload BLOB NOT NULL,
  created_at REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  refused TEXT
)
"""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    method: str
    payload: bytes


class _Journal:
    """The jobs table, used from one thread (every call goes through the outbox's executor)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Gateway workers share the file and start together. Switching a new file to WAL takes an
        # exclusive lock, and SQLite refuses a contender at once ("database is locked") rather
        # than wait in its busy handler, so the set-up runs under a lock file, one at a time.
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(SCHEMA)

    def pending(self) -> list[Job]:
        rows = self.db.execute(
            "SELECT id, method, payload FROM jobs WHERE refused IS NULL ORDER BY created_at, id"
        ).fetchall()
        return [Job(r[0], r[1], bytes(r[2])) for r in rows]

    def refused(self) -> int:
        count: int = self.db.execute(
            "SELECT count(*) FROM jobs WHERE refused IS NOT NULL"
        ).fetchone()[0]
        return count

    def add(self, job: Job) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO jobs (id, method, payload, created_at) VALUES (?, ?, ?, ?)",
            (job.id, job.method, job.payload, time.time()),
        )

    def done(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def attempted(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (job_id,))

    def refuse(self, job_id: str, reason: str) -> None:
        self.db.execute("UPDATE jobs SET refused = ? WHERE id = ?", (reason, job_id))

    def close(self) -> None:
        self.db.close()


def _legacy_jobs(path: Path) -> list[Job]:
    """Jobs left in the JSON-lines journal of earlier versions (a torn last line is skipped)."""
    jobs: dict[str, Job] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "add" in record:
            jobs[record["add"]] = Job(
                record["add"], record["method"], base64.b64decode(record["payload"])
            )
        elif "done" in record:
            jobs.pop(record["done"], None)
    return list(jobs.values())


class Outbox:
    def __init__(
        self,
        send: Sender,
        journal: Path | None,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        self._send = send
        self._path = journal
        self._initial = initial_backoff
        self._max = max_backoff
        self._pending: dict[str, Job] = {}
        self._refused = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._journal: _Journal | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")

    @property
    def path(self) -> Path | None:
        """Where the queue is kept (None: in memory only)."""
        return self._path

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def refused(self) -> int:
        """Jobs the ledger refused for good, kept for an operator."""
        return self._refused

    async def _io(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def start(self) -> None:
        if self._path is not None:
            path = self._path
            self._journal = await self._io(lambda: _Journal(path))
            await self._io(self._import_legacy)
            for job in await self._io(self._journal.pending):
                self._pending[job.id] = job
            self._refused = await self._io(self._journal.refused)
        if self._pending:
            log.info("outbox: %d ledger writes left from the last run", len(self._pending))
        if self._refused:
            log.error(
                "outbox: %d ledger writes were refused by the ledger and wait for an operator",
                self._refused,
            )
        self._task = asyncio.create_task(self._run())

    def _import_legacy(self) -> None:
        assert self._path is not None
        assert self._journal is not None
        legacy = self._path.with_suffix(".jsonl")
        if not legacy.exists():
            return
        for job in _legacy_jobs(legacy):
            self._journal.add(job)
        legacy.unlink()

    async def submit(self, method: str, payload: bytes) -> None:
        """Queues a ledger write; it is on disk (when there is a journal) once this returns."""
        job = Job(uuid.uuid4().hex, method, payload)
        if self._journal is not None:
            journal = self._journal
            try:
                await self._io(lambda: journal.add(job))
            except sqlite3.Error:
                log.exception("outbox: could not journal a pending %s; kept in memory", method)
        self._pending[job.id] = job
        self._wake.set()

    async def keep_refused(self, method: str, payload: bytes, reason: str) -> None:
        """Keeps a write the ledger refused for good, for an operator (never dropped)."""
        job = Job(uuid.uuid4().hex, method, payload)
        self._refused += 1
        if self._journal is not None:
            journal = self._journal

            def keep() -> None:
                journal.add(job)
                journal.refuse(job.id, reason)

            try:
                await self._io(keep)
            except sqlite3.Error:
                log.exception("outbox: could not keep a refused %s", method)

    async def drain(self, within: float) -> bool:
        """Tries to deliver what is pending within `within` seconds; True when nothing is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._pending:
                    self._wake.set()
                    await asyncio.sleep(0.05)
        return not self._pending

    async def close(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._journal is not None:
            await self._io(self._journal.close)
            self._journal = None
        self._executor.shutdown(wait=True)

    async def _journaled(self, action: Callable[[_Journal, str], None], job_id: str) -> None:
        journal = self._journal
        if journal is None:
            return
        try:
            await self._io(lambda: action(journal, job_id))
        except sqlite3.Error:
            # At worst the next start redelivers a delivered job, which its key makes a no-op.
            log.exception("outbox: could not update the journal")

    def _refuse(self, job_id: str, reason: str) -> None:
        if self._journal is not None:
            try:
                self._journal.refuse(job_id, reason)
            except sqlite3.Error:
                log.exception("outbox: could not mark a refused job")

    async def _run(self) -> None:
        backoff = self._initial
        while not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            delivered_all = True
            for job in list(self._pending.values()):
                try:
                    await self._send(job.method, job.payload)
                except GatewayError as exc:
                    if not is_definitive(exc):
                        delivered_all = False
                        await self._journaled(_Journal.attempted, job.id)
                        break  # not the ledger's last word: keep order, wait, retry
                    # Refused for good (a conflicting key, a bug): kept and shouted about.
                    log.error(
                        "outbox: the ledger refused %s (%s); kept for an operator",
                        job.method,
                        exc.reason,
                    )
                    self._refused += 1
                    await self._io(partial(self._refuse, job.id, exc.reason))
                    self._pending.pop(job.id, None)
                    continue
                except Exception:
                    log.exception("outbox: delivering %s failed", job.method)
                    delivered_all = False
                    break
                # Journal first, then forget: `drain` returns once nothing is pending, and a close
                # right after it must not cancel a delete still waiting for the journal's thread
                # (the next start would send the job again: a no-op, but a needless one).
                await self._journaled(_Journal.done, job.id)
                self._pending.pop(job.id, None)
            if delivered_all:
                backoff = self._initial
                continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancellation that
            # lands as the event is set (drain sets it), and the loop outlived close() by the
            # whole backoff ladder.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            backoff = min(self._max, backoff * 2)
