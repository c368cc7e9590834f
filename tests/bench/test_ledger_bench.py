"""The ledger bench's three ways of making a Reserve+Settle pair (gRPC calls, the gateway's ledger
client, the SQL functions straight from asyncpg) still run against the current schema and charge
what a pair charges: a bench that broke with a migration would only be found by `make bench`."""

from __future__ import annotations

import pytest

from bench import ledger_bench
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.ledger_service.helpers import balance

# 100 tokens used + 25% fee.
CHARGED_PER_PAIR = 125


@pytest.mark.parametrize("path", ["grpc", "client", "raw"])
async def test_each_way_of_making_a_pair_runs_and_charges_a_pair(
    ledger: LedgerHarness, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_bench, "TOKEN", SERVICE_TOKEN)
    await ledger_bench.seed(ledger.database_url)
    before = await balance(ledger.stub, ledger_bench.HOT_USER)
    if path == "grpc":
        op, cleanup = await ledger_bench.grpc_pairs(ledger.address, 1, 0, 1)
    elif path == "client":
        op, cleanup = await ledger_bench.client_pairs(ledger.address, 1, 0, 1)
    else:
        op, cleanup = await ledger_bench.raw_pairs(ledger.database_url, 1, 0, 1)
    try:
        for _ in range(3):
            await op(0)
    finally:
        await cleanup()
    after = await balance(ledger.stub, ledger_bench.HOT_USER)
    assert before.available_tokens - after.available_tokens == 3 * CHARGED_PER_PAIR
    assert after.reserved_tokens == before.reserved_tokens == 0
