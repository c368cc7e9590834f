"""`make bench`: a printed report of the ledger's and the gateway's throughput, latency, CPU per
call and memory, each beside its baseline from the same run on the same machine.

Starts its own embedded Postgres (or uses BENCH_DATABASE_URL) and its own service processes.
BENCH_ONLY (e.g. `ledger,http`; default all of ledger, http, grpc, memory, analytics) picks the
parts (analytics: the operator's reads over a year of history, bench/analytics_bench.py);
BENCH_SECONDS (default 10) sets each figure's length, BENCH_CONCURRENCY (default 32) the callers
of the ledger and gRPC figures, BENCH_MEMORY_SECONDS (default 600; 0 skips it) the length of the
memory run at 32 callers. The HTTP figures need `wrk` (`make bench` installs it when missing).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from bench import analytics_bench, gateway_bench, http_bench, ledger_bench
from bench.ledger_bench import table
from bench.load import run_load
from ledger_service.store.database import plain_url, start_embedded, with_database
from shared import processes

CALLERS = (1, 10, 32)
WARM_SECONDS = 2.0
MEMORY_CALLERS = 32
MEMORY_SAMPLE_SECONDS = 60
# Targets from the issue that asked for this report (docs/scaling.md explains them).
TARGET_RATE = {10: 450.0, 32: 500.0}
TARGET_P50_MS_AT_1 = 5.0
TARGET_SHARE_OF_DIRECT = 0.5


def ledger_env(url: str, workers: int) -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "LEDGER_ADDR": "127.0.0.1:0",
        "LEDGER_SERVICE_TOKEN": ledger_bench.TOKEN,
        "LOG_LEVEL": "WARNING",
        "DB_POOL_MAX": "32",
        "WORKERS": str(workers),
    }


def gateway_env(ledger: str, provider_url: str, workers: int) -> dict[str, str]:
    return {
        "GATEWAY_ADDR": "127.0.0.1:0",
        # A known port: the start-up line the scripts read names the gRPC address only.
        "HTTP_ADDR": f"127.0.0.1:{processes.free_port()}",
        "LEDGER_ADDR": ledger,
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
        "RATE_LIMITS": gateway_bench.NO_LIMITS,
        "WORKERS": str(workers),
    }


@contextmanager
def service(module: str, env: dict[str, str]) -> Iterator[processes.Service]:
    started = processes.start(module, env)
    try:
        if "HTTP_ADDR" in env and not processes.accepting(env["HTTP_ADDR"]):
            raise RuntimeError(f"{module}: nothing accepts on {env['HTTP_ADDR']}")
        yield started
    finally:
        started.stop()


def postgres_pid() -> dict[str, int]:
    """The embedded Postgres (its backends are its children), when the bench runs it."""
    pidfile = Path(".data/bench/postgres/postmaster.pid")
    if os.environ.get("BENCH_DATABASE_URL") or not pidfile.exists():
        return {}
    return {"postgres": int(pidfile.read_text().split()[0])}


def http_of(env: dict[str, str]) -> str:
    return env["HTTP_ADDR"]


class Report:
    """Rows of the HTTP table, printed as they come so a long run shows progress."""

    header = ["path", "callers", "calls/s", "p50 ms", "p99 ms", "non-2xx", "CPU ms/call", "books"]

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(
        self,
        name: str,
        callers: int,
        r: http_bench.WrkResult,
        cpu: dict[str, float] | None = None,
        books: str = "",
    ) -> None:
        spent = " ".join(f"{k} {v:.2f}" for k, v in (cpu or {}).items())
        self.rows.append(
            [
                name,
                str(callers),
                f"{r.rate:.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                str(r.non2xx + r.socket_errors),
                spent,
                books,
            ]
        )
        print(f"  {name}, {callers} callers: {r.rate:.0f}/s p50 {r.p50_ms:.1f} ms", flush=True)

    def render(self) -> str:
        return table(self.header, self.rows)


def metered_figure(
    report: Report,
    name: str,
    http: str,
    pids: dict[str, int],
    url: str,
    callers: int,
    seconds: float,
) -> http_bench.WrkResult:
    target = http_bench.metered_target(http, ledger_bench.USERS)
    since = time.time()
    result: list[http_bench.WrkResult] = []
    with http_bench.cpu_per_call(pids, lambda: result[0].requests if result else 1) as cpu:
        result.append(http_bench.run_wrk(target, callers, seconds))
    books = http_bench.check_books(url, since)
    exact = books.exact_for(result[0].served, callers)
    verdict = "exact" if exact else f"WRONG ({books.recorded} charged, {result[0].served} served)"
    if not books.audit_ok:
        verdict += "\n" + books.audit_text
    report.add(name, callers, result[0], cpu.ms, verdict)
    return result[0]


def http_figures(url: str, ledger: processes.Service, seconds: float) -> str:
    report = Report()
    lines: list[str] = []
    with (
        service("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"}) as sim,
        ExitStack() as gateways,
    ):
        provider_url = f"http://{sim.address}"
        # Both gateways (1 and 2 workers) up front, so that each caller count's four figures
        # run back to back: a ratio then compares figures taken within seconds of each other,
        # not minutes apart across the machine's slow and fast spells.
        envs = {
            # Each its own outbox (DATA_DIR), as two deployments would have.
            w: {**gateway_env(ledger.address, provider_url, w), "DATA_DIR": f".data/bench/x{w}"}
            for w in (1, 2)
        }
        started = {w: gateways.enter_context(service("gateway_service", envs[w])) for w in envs}
        for env in envs.values():
            # Warm (pools open, code paths run once) before the first figure is taken.
            http_bench.run_wrk(
                http_bench.metered_target(http_of(env), ledger_bench.USERS), 4, WARM_SECONDS
            )
        time.sleep(0.5)  # the calls wrk cut at its stop settle before the books' window
        direct: dict[int, http_bench.WrkResult] = {}
        sdk: dict[int, http_bench.WrkResult] = {}
        # (workers, callers) -> figure
        metered: dict[tuple[int, int], http_bench.WrkResult] = {}
        for callers in CALLERS:
            with http_bench.cpu_per_call({"provider": sim.proc.pid}, lambda: 1):
                direct[callers] = http_bench.run_wrk(
                    http_bench.direct_target(provider_url), callers, seconds
                )
            report.add("wrk straight to provider", callers, direct[callers])
            # What an app would do without us: the official SDK, from a Python client.
            loaded = run_load(partial(gateway_bench.direct, provider_url), callers, seconds)
            sdk[callers] = http_bench.WrkResult.of_load(loaded)
            report.add("SDK straight to provider", callers, sdk[callers])
            for workers, gateway in started.items():
                pids = {
                    "gateway": gateway.proc.pid,
                    "ledger": ledger.proc.pid,
                    "provider": sim.proc.pid,
                    **postgres_pid(),
                }
                metered[workers, callers] = metered_figure(
                    report,
                    f"metered, gateway x{workers}",
                    http_of(envs[workers]),
                    pids,
                    url,
                    callers,
                    seconds,
                )
        lines.append(report.render())

        def best(callers: int) -> tuple[int, http_bench.WrkResult]:
            """The gateway's better worker count at this load (an operator sets WORKERS)."""
            return max(((w, metered[w, callers]) for w in (1, 2)), key=lambda f: f[1].rate)

        for callers, target in TARGET_RATE.items():
            workers, figure = best(callers)
            m = figure.rate
            lines.append(
                f"at {callers} callers: {m:.0f}/s metered, gateway x{workers}"
                f" (target >= {target:.0f}); {m / sdk[callers].rate:.0%} of the SDK straight to"
                " provider"
                + (f" (target >= {TARGET_SHARE_OF_DIRECT:.0%})" if callers == 32 else "")
                + f", {m / direct[callers].rate:.0%} of wrk straight to provider"
            )
        p50 = metered[1, 1].p50_ms  # one caller uses one worker: the default's figure
        # Beside the SDK's own p50 from the same minute, so a reader can tell a slow spell of
        # this shared machine (both slower) from a slower gateway (only the ratio grows).
        sdk_p50 = sdk[1].p50_ms
        lines.append(
            f"at 1 caller: p50 {p50:.1f} ms metered (target <= {TARGET_P50_MS_AT_1:.0f} ms),"
            f" {p50 / max(sdk_p50, 0.001):.1f}x the SDK straight to provider ({sdk_p50:.1f} ms),"
            f" {direct[1].p50_ms:.1f} ms wrk straight to provider"
        )
        lines.append(
            "gateway workers: "
            + ", ".join(
                f"{c} callers 1 -> {metered[1, c].rate:.0f}/s, 2 -> {metered[2, c].rate:.0f}/s"
                for c in CALLERS
            )
        )
    return "\n".join(lines)


def grpc_and_limits(url: str, ledger: processes.Service, concurrency: int, seconds: float) -> str:
    """The gRPC GenerateText path (internal callers), with rate limits off and on (Redis)."""
    with service("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"}) as sim:
        provider_url = f"http://{sim.address}"
        redis = processes.start_redis(processes.free_port())
        try:
            env = gateway_env(ledger.address, provider_url, 2)
            limited_env = {
                # Its own HTTP port and outbox (DATA_DIR), as a second deployment would have.
                **gateway_env(ledger.address, provider_url, 2),
                "DATA_DIR": ".data/bench/limited",
                "RATE_LIMITS": gateway_bench.HIGH_LIMITS,
                "REDIS_URL": f"redis://{redis.address}/0",
            }
            with (
                service("gateway_service", env) as unlimited,
                service("gateway_service", limited_env) as limited,
            ):
                result = gateway_bench.measure(
                    unlimited.address,
                    limited.address,
                    provider_url,
                    ledger_bench.USERS,
                    concurrency,
                    seconds,
                )
        finally:
            redis.stop()
    return gateway_bench.render(result, concurrency)


def memory_run(url: str, ledger: processes.Service, seconds: float) -> str:
    """RSS of every service, sampled each minute of a long run at 32 callers: flat means the
    samples after the first minute stay within 10% of each other."""
    with service("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"}) as sim:
        provider_url = f"http://{sim.address}"
        env = gateway_env(ledger.address, provider_url, 2)
        with service("gateway_service", env) as gateway:
            pids = {
                "gateway": gateway.proc.pid,
                "ledger": ledger.proc.pid,
                "provider": sim.proc.pid,
            }
            target = http_bench.metered_target(http_of(env), ledger_bench.USERS)
            samples: dict[str, list[int]] = {name: [] for name in pids}
            calls = 0
            since = time.time()
            remaining = seconds
            runs = 0
            while remaining > 0:
                runs += 1
                chunk = min(MEMORY_SAMPLE_SECONDS, remaining)
                calls += http_bench.run_wrk(target, MEMORY_CALLERS, chunk).served
                remaining -= chunk
                for name, pid in pids.items():
                    samples[name].append(http_bench.rss_bytes(pid))
            books = http_bench.check_books(url, since)
    rows = []
    for name, values in samples.items():
        settled = values[1:] or values
        spread = (max(settled) - min(settled)) / min(settled) if settled else 0.0
        rows.append(
            [
                name,
                " ".join(f"{v / 2**20:.0f}" for v in values),
                f"{spread:.1%}",
                "flat" if spread <= 0.10 else "GROWS",
            ]
        )
    title = (
        f"Memory: RSS (MiB) each {MEMORY_SAMPLE_SECONDS:.0f}s of {seconds:.0f}s at"
        f" {MEMORY_CALLERS} callers, {calls} calls"
    )
    # Each of the `runs` wrk runs may stop with one call per connection still being served.
    exact = books.exact_for(calls, MEMORY_CALLERS * runs)
    verdict = f"books: {'exact' if exact else 'WRONG'} ({books.recorded} charged, {calls} served)"
    body = table(["service", "RSS samples", "spread after 1st", "verdict"], rows)
    return f"{title}\n{body}\n{verdict}"


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "32"))
    memory_seconds = float(os.environ.get("BENCH_MEMORY_SECONDS", "600"))
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
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    wanted = only.__contains__ if only else (lambda part: True)
    figures = []
    for workers in (1, 2) if wanted("ledger") else ():
        with service("ledger_service", ledger_env(url, workers)) as ledger:
            group = ledger_bench.measure(ledger.address, url, concurrency, seconds)
        for f in group:
            f.name = f"{f.name}, ledger x{workers}"
        figures.append(group)
    if figures:
        print(ledger_bench.render([f for group in figures for f in group], concurrency), "")
    if wanted("analytics"):
        # A database of its own (next to this one), loaded with a year of history.
        print(analytics_bench.run(admin_url), "", sep="\n", flush=True)
    if not any(wanted(part) for part in ("http", "grpc", "memory")):
        return 0
    with service("ledger_service", ledger_env(url, 2)) as ledger:
        if not wanted("http"):
            pass
        elif http_bench.wrk_available():
            print("HTTP edge: POST /v1/generate driven by wrk", flush=True)
            print(http_figures(url, ledger, seconds), "", sep="\n", flush=True)
        else:
            print("HTTP edge: skipped (wrk is not installed; `make bench` installs it)\n")
        if wanted("grpc"):
            print(grpc_and_limits(url, ledger, concurrency, seconds), "", sep="\n", flush=True)
        if wanted("memory") and memory_seconds > 0 and http_bench.wrk_available():
            print(memory_run(url, ledger, memory_seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
