"""Background task that expires due holds, by the database clock, from any number of replicas."""

from __future__ import annotations

import asyncio
import logging

from ledger_service.domain.ledger import Ledger

log = logging.getLogger(__name__)


async def sweep_forever(ledger: Ledger, interval: float, batch: int) -> None:
    while True:
        try:
            # Drain in batches: a backlog is cleared without one long transaction.
            while (swept := await ledger.sweep_expired(batch)) > 0:
                log.info("expired %d holds", swept)
                if swept < batch:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hold sweep failed; will retry")
        await asyncio.sleep(interval)
