"""`make bench`: a printed report of the ledger's (and gateway's) throughput and latency.

Starts its own embedded Postgres (or uses BENCH_DATABASE_URL) and its own service processes.
BENCH_SECONDS (default 10) sets each measurement's length, BENCH_CONCURRENCY (default 32) the
number of concurrent callers.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from bench import ledger_bench
from ledger_service.store.database import plain_url, start_embedded, with_database
from shared import processes


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "32"))
    given = os.environ.get("BENCH_DATABASE_URL")
    admin_url = (
        plain_url(given)
        if given
        else with_database(start_embedded(Path(".data/bench")), "postgres")
    )
    url = ledger_bench.prepare_database(admin_url)
    print(
        f"rpcai bench: {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {seconds:.0f}s per figure",
        flush=True,
    )
    ledger = processes.start(
        "ledger_service",
        {
            "DATABASE_URL": url,
            "LEDGER_ADDR": "127.0.0.1:0",
            "LEDGER_SERVICE_TOKEN": ledger_bench.TOKEN,
            "LOG_LEVEL": "WARNING",
            "DB_POOL_MAX": "32",
        },
    )
    try:
        figures = ledger_bench.measure(ledger.address, url, concurrency, seconds)
        print(ledger_bench.render(figures, concurrency), flush=True)
    finally:
        ledger.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
