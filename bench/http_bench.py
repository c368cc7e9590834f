"""HTTP edge benchmark: `POST /v1/generate` driven by wrk (a C load generator, so the client's
own CPU stays small on a 2-core machine), metered through the gateway and straight to the
provider stand-in from the same client in the same run. After each metered figure the ledger's
books are checked: every call the gateway served is charged exactly, no hold is left open, and
the ledger's audit finds nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

from bench.gateway_bench import MAX_TOKENS, MODEL, PROMPT, token_for
from bench.load import LoadResult
from ledger_service.audit import run_audit

CHARGED_PER_CALL = 40  # the prompt's [[usage:20,12]]: 32 used + 8 fee
# wrk's `done` hook prints one line of JSON; latencies in microseconds.
_WRK_SCRIPT = r"""
local bodies = {}
local n = 0
init = function(args)
  for _, auth in ipairs(AUTHS) do
    local headers = {["Content-Type"] = "application/json"}
    for k, v in pairs(HEADERS) do headers[k] = v end
    if auth ~= "" then headers["Authorization"] = auth end
    bodies[#bodies + 1] = wrk.format("POST", PATH, headers, BODY)
  end
end
request = function()
  n = n + 1
  return bodies[(n % #bodies) + 1]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d,'
    .. ' "p50": %d, "p90": %d, "p99": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


@dataclass
class Target:
    """One endpoint wrk drives: a path, a body, fixed headers and rotating Authorization values."""

    url: str
    path: str
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    auths: list[str] = field(default_factory=lambda: [""])

    def script(self) -> str:
        auths = ", ".join(_lua_string(a) for a in self.auths)
        headers = ", ".join(
            f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in self.headers.items()
        )
        return (
            f"PATH = {_lua_string(self.path)}\nBODY = {_lua_string(json.dumps(self.body))}\n"
            f"AUTHS = {{{auths}}}\nHEADERS = {{{headers}}}\n{_WRK_SCRIPT}"
        )


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def of_load(cls, r: LoadResult) -> WrkResult:
        """The same figures from the Python load generator (bench/load.py)."""
        return cls(
            requests=r.ops + r.errors,
            seconds=r.seconds,
            non2xx=r.errors,
            socket_errors=0,
            p50_ms=r.percentile(50),
            p90_ms=r.percentile(90),
            p99_ms=r.percentile(99),
        )

    @property
    def served(self) -> int:
        return self.requests - self.non2xx


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(target: Target, connections: int, seconds: float) -> WrkResult:
    threads = max(1, min(2, connections))
    with tempfile.TemporaryDirectory() as tmp:
        # The script holds bench JWTs: a private temporary file, removed after the run.
        script = Path(tmp, "bench.lua")
        script.write_text(target.script())
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            target.url,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"wrk failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}"
            )
        out = done.stdout
    match = re.search(r"^WRKJSON (.*)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
    raw = json.loads(match.group(1))
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non2xx=raw["non2xx"],
        socket_errors=raw["socket_errors"],
        p50_ms=raw["p50"] / 1000,
        p90_ms=raw["p90"] / 1000,
        p99_ms=raw["p99"] / 1000,
    )


def metered_target(http_address: str, users: int) -> Target:
    return Target(
        url=f"http://{http_address}",
        path="/v1/generate",
        body={"content": PROMPT, "model": MODEL, "maxTokens": MAX_TOKENS},
        auths=[f"Bearer {token_for(f'user-{i}')}" for i in range(min(users, 200))],
    )


def direct_target(provider_url: str) -> Target:
    return Target(
        url=provider_url,
        path="/v1/messages",
        body={
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}],
        },
        headers={"x-api-key": "bench-key", "anthropic-version": "2023-06-01"},
    )


# ---- the processes under test: CPU per call and memory ---------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    """A service and its worker processes (a supervisor's children)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_bytes(pid: int) -> int:
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass
class CpuPerCall:
    ms: dict[str, float]


@contextmanager
def cpu_per_call(pids: dict[str, int], calls: Callable[[], int]) -> Iterator[CpuPerCall]:
    """Each named process tree's CPU time over the block, per call counted by `calls()`."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = CpuPerCall({})
    yield result
    n = max(1, calls())
    result.ms = {name: (cpu_seconds(pid) - before[name]) * 1000 / n for name, pid in pids.items()}


# ---- the books after a metered run -----------------------------------------------------------


@dataclass
class Books:
    recorded: int  # usage records written during the figure
    wrong_charge: int  # records not charged exactly CHARGED_PER_CALL
    open_holds: int
    audit_ok: bool
    audit_text: str

    def exact_for(self, served: int, connections: int) -> bool:
        # wrk stops with up to one call per connection in flight: the gateway serves (and
        # charges) those too, so the ledger may hold up to `connections` more than wrk counted.
        return (
            self.wrong_charge == 0
            and self.open_holds == 0
            and self.audit_ok
            and served <= self.recorded <= served + connections
        )


async def _books(url: str, since: float) -> Books:
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 30
        while True:  # calls cut off by wrk's stop finish within a moment
            open_holds = await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'held'")
            if open_holds == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        row = await conn.fetchrow(
            """SELECT count(*) AS n, count(*) FILTER (WHERE tokens_charged <> $2) AS wrong
                 FROM usage_records WHERE created_at >= to_timestamp($1)""",
            since,
            CHARGED_PER_CALL,
        )
    finally:
        await conn.close()
    report = await run_audit(url)
    return Books(row["n"], row["wrong"], open_holds, report.ok, report.render())


def check_books(url: str, since: float) -> Books:
    return asyncio.run(_books(url, since))


def env_workers(default: str) -> str:
    return os.environ.get("BENCH_GATEWAY_WORKERS", default)
