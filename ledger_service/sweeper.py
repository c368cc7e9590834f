"""Background tasks of the ledger, safe to run from any number of replicas: expire due holds
(by the database clock), delete what outlived its retention, and roll complete days of usage up
for the operator's analytics."""

from __future__ import annotations

import asyncio
import logging

from ledger_service import metrics
from ledger_service.domain.ledger import Ledger
from ledger_service.domain.types import RetentionPolicy

log = logging.getLogger(__name__)

# A day not rolled up yet is read from the usage records themselves: the rollup's freshness only
# makes analytics faster, so checking every few minutes is plenty.
ROLLUP_INTERVAL_SECONDS = 300.0


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


async def rollup_forever(ledger: Ledger, interval: float = ROLLUP_INTERVAL_SECONDS) -> None:
    while True:
        try:
            # A backlog (the first run on a long history) is taken a few days per transaction.
            while (rolled := await ledger.rollup_usage()) > 0:
                log.info("analytics: rolled up %d days and months of usage", rolled)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("usage rollup failed; will retry")
        await asyncio.sleep(interval)
