"""`python -m bench.money_under_load`: the money tests run while wrk drives metered calls through
a separate stack (32 callers), so batching, workers and load change no answer. Afterwards the
loaded stack's own books are checked as in `make bench`. Exits non-zero if either fails."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import http_bench, ledger_bench
from bench.__main__ import gateway_env, http_of, ledger_env, service
from ledger_service.store.database import start_embedded, with_database

CALLERS = 32
CHUNK_SECONDS = 20
MONEY_TESTS = [
    "tests/e2e/test_money_exact.py",
    "tests/e2e/test_concurrent_calls.py",
    "tests/e2e/test_stream_metering.py",
    "tests/e2e/test_lost_reserve_answer.py",
    "tests/ledger_service/test_money.py",
    "tests/ledger_service/test_money_edges.py",
    "tests/ledger_service/test_group_commit.py",
    "tests/ledger_service/test_concurrency.py",
]


def main() -> int:
    if not http_bench.wrk_available():
        print("wrk is not installed (`make bench` installs it)")
        return 2
    url = ledger_bench.prepare_database(
        with_database(start_embedded(Path(".data/bench")), "postgres")
    )
    with (
        service("ledger_service", ledger_env(url, 2)) as ledger,
        service("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"}) as sim,
    ):
        env = gateway_env(ledger.address, f"http://{sim.address}", 2)
        with service("gateway_service", env):
            since = time.time()
            target = http_bench.metered_target(http_of(env), ledger_bench.USERS)
            tests = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MONEY_TESTS]
            )
            served = runs = 0
            while tests.poll() is None:
                r = http_bench.run_wrk(target, CALLERS, CHUNK_SECONDS)
                served, runs = served + r.served, runs + 1
                print(f"load: {r.rate:.0f} metered calls/s", flush=True)
            books = http_bench.check_books(url, since)
    exact = books.exact_for(served, CALLERS * runs)
    print(
        f"money tests: {'passed' if tests.returncode == 0 else 'FAILED'};"
        f" loaded stack's books: {'exact' if exact else 'WRONG'}"
        f" ({books.recorded} charged, {served} served, {books.open_holds} holds open)"
    )
    return 0 if tests.returncode == 0 and exact else 1


if __name__ == "__main__":
    sys.exit(main())
