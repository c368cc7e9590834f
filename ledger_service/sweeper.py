"""Background tasks of the ledger, safe to run from any number of replicas: expire due holds
(by the database clock) and delete what outlived its retention."""

from __future__ import annotations

import asyncio
import logging

from ledger_service import metrics
from ledger_service.domain.ledger import Ledger
from ledger_service.domain.types import RetentionPolicy

log = logging.getLogger(__name__)


async def sweep_forever(ledger: Ledger, interval: float, batch: int) -> None:
    while True:
        try:
            # Drain in batches: a backlog is cleared without one long transaction.
            while (swept := await ledger.sweep_expired(batch)) > 0:
                metrics.expired(swept)
                log.info("expired %d holds", swept)
                if swept < batch:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hold sweep failed; will retry")
        await asyncio.sleep(interval)


async def retain_forever(ledger: Ledger, policy: RetentionPolicy, interval: float) -> None:
    while True:
        try:
            while (deleted := await ledger.apply_retention(policy)) > 0:
                log.info("retention: deleted %d rows past their retention", deleted)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention sweep failed; will retry")
        await asyncio.sleep(interval)
