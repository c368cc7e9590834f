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

from bench import gateway_bench, ledger_bench
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
    started = [ledger]
    try:
        figures = ledger_bench.measure(ledger.address, url, concurrency, seconds)
        print(ledger_bench.render(figures, concurrency), "", sep="\n", flush=True)

        sim = processes.start("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"})
        started.append(sim)
        provider_url = f"http://{sim.address}"
        gateway_env = {
            "GATEWAY_ADDR": "127.0.0.1:0",
            "HTTP_ADDR": "127.0.0.1:0",
            "LEDGER_ADDR": ledger.address,
            "LEDGER_SERVICE_TOKEN": ledger_bench.TOKEN,
            "JWT_SECRET": gateway_bench.JWT_SECRET,
            "JWT_ISSUER": "",
            "JWT_AUDIENCE": "",
            "ANTHROPIC_BASE_URL": provider_url,
            "ANTHROPIC_API_KEY": "bench-key",
            "OPENAI_BASE_URL": f"{provider_url}/v1",
            "OPENAI_API_KEY": "bench-key",
            "LOG_LEVEL": "WARNING",
            "DATA_DIR": ".data/bench",
        }
        unlimited = processes.start(
            "gateway_service", {**gateway_env, "RATE_LIMITS": gateway_bench.NO_LIMITS}
        )
        started.append(unlimited)
        redis = processes.start_redis(processes.free_port())
        started.append(redis)
        limited = processes.start(
            "gateway_service",
            {
                **gateway_env,
                "RATE_LIMITS": gateway_bench.HIGH_LIMITS,
                "REDIS_URL": f"redis://{redis.address}/0",
            },
        )
        started.append(limited)
        result = gateway_bench.measure(
            unlimited.address,
            limited.address,
            provider_url,
            ledger_bench.USERS,
            concurrency,
            seconds,
        )
        print(gateway_bench.render(result, concurrency), flush=True)
    finally:
        for service in reversed(started):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
