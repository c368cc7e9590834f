"""The ledger bench's three ways of making a Reserve+Settle pair (gRPC calls, the gateway's ledger
client, the SQL functions straight from asyncpg) still run against the current schema and charge
what a pair charges: a bench that broke with a migration would only be found by `make bench`."""

from __future__ import annotations

import pytest

from bench import ledger_bench
from bench.load import LoadResult
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


def _figures(name: str, grpc: int, raw: int) -> ledger_bench.LedgerFigures:
    def run(ops: int) -> LoadResult:
        return LoadResult(ops=ops, errors=0, seconds=10.0, latencies_ms=[1.0])

    return ledger_bench.LedgerFigures(name, run(grpc), run(grpc // 2), run(raw))


def test_the_report_sets_each_worker_counts_ratios_beside_their_targets() -> None:
    figures = [
        _figures("1,000 users, ledger x1", grpc=10_900, raw=11_730),
        _figures("one hot user, ledger x1", grpc=10_640, raw=4_330),
        _figures("1,000 users, ledger x2", grpc=13_890, raw=11_680),
        _figures("one hot user, ledger x2", grpc=10_480, raw=3_800),
    ]
    report = ledger_bench.render(figures, 32)
    assert report.splitlines()[-2:] == [
        "ledger x1: via gRPC 0.93x raw PG (target >= 1.0x); one hot user 0.98x the rate of"
        " 1,000 users (target >= 0.8x)",
        "ledger x2: via gRPC 1.19x raw PG (target >= 1.0x); one hot user 0.75x the rate of"
        " 1,000 users (target >= 0.8x)",
    ]
