"""Ledger writes that must arrive even when the ledger is down right now.

BYOK usage records (and settles that failed after the provider already answered) are idempotent
ledger calls. When one cannot be delivered at once it goes here: retried with backoff until the
ledger takes it, never lost (a journal file survives restarts), never doubled (the ledger
deduplicates by the call's own key, so a retry after a lost answer changes nothing).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway_service.errors import Failure, GatewayError

log = logging.getLogger(__name__)

# (method name, serialized request) -> delivered; raises GatewayError on failure.
Sender = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    method: str
    payload: bytes


class Outbox:
    def __init__(
        self,
        send: Sender,
        journal: Path | None,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        self._send = send
        self._journal = journal
        self._initial = initial_backoff
        self._max = max_backoff
        self._pending: dict[str, Job] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        for job in await asyncio.to_thread(self._load):
            self._pending[job.id] = job
        # Rewrite the journal with just what is pending: drops a line torn by a crash, so the
        # next record cannot be glued onto it.
        await asyncio.to_thread(self._compact)
        if self._pending:
            log.info("outbox: %d ledger writes left from the last run", len(self._pending))
        self._task = asyncio.create_task(self._run())

    async def submit(self, method: str, payload: bytes) -> None:
        job = Job(uuid.uuid4().hex, method, payload)
        self._pending[job.id] = job
        self._wake.set()
        try:
            await self._append({"add": job.id, "method": method, "payload": _b64(payload)})
        except OSError:
            log.exception("outbox: could not journal a pending %s; it is kept in memory", method)

    async def drain(self, within: float) -> bool:
        """Tries to deliver what is pending within `within` seconds; True when nothing is left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._pending:
                    self._wake.set()
                    await asyncio.sleep(0.05)
        return not self._pending

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._compact)

    async def _run(self) -> None:
        backoff = self._initial
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            delivered_all = True
            for job in list(self._pending.values()):
                try:
                    await self._send(job.method, job.payload)
                except GatewayError as exc:
                    if exc.failure is Failure.UNAVAILABLE:
                        delivered_all = False
                        break  # the ledger is down: keep order, wait, retry
                    # Refused for good (a conflicting key, a bug): retrying cannot help.
                    log.error("outbox: ledger refused %s: %s", job.method, exc.reason)
                except Exception:
                    log.exception("outbox: delivering %s failed", job.method)
                    delivered_all = False
                    break
                self._pending.pop(job.id, None)
                try:
                    await self._append({"done": job.id})
                except OSError:
                    # Delivered; at worst the next start redelivers it, which the key makes a
                    # no-op. The loop must live on whatever the disk does.
                    log.exception("outbox: could not journal a delivery")
            if delivered_all:
                backoff = self._initial
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(self._max, backoff * 2)

    async def _append(self, record: dict[str, str]) -> None:
        if self._journal is not None:
            await asyncio.to_thread(self._write_line, json.dumps(record))

    def _write_line(self, line: str) -> None:
        assert self._journal is not None
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        with self._journal.open("a") as f:
            f.write(line + "\n")

    def _load(self) -> list[Job]:
        if self._journal is None or not self._journal.exists():
            return []
        jobs: dict[str, Job] = {}
        for line in self._journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            if "add" in record:
                jobs[record["add"]] = Job(
                    record["add"], record["method"], base64.b64decode(record["payload"])
                )
            elif "done" in record:
                jobs.pop(record["done"], None)
        return list(jobs.values())

    def _compact(self) -> None:
        if self._journal is None:
            return
        lines = [
            json.dumps({"add": j.id, "method": j.method, "payload": _b64(j.payload)})
            for j in self._pending.values()
        ]
        if not lines:
            self._journal.unlink(missing_ok=True)
            return
        tmp = self._journal.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self._journal)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
