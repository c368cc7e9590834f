"""WORKERS=N: N real worker processes of a service share one port (SO_REUSEPORT) under a
supervisor. Which worker serves a connection is read from the kernel (the owner of the accepted
socket), not from anything the service says about itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import psutil
import pytest

from provider_sim import start_provider_sim
from shared import processes
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.processes import LISTENING
from tests.conftest import AUTH, SERVICE_TOKEN, LedgerHarness
from tests.e2e.conftest import gateway_process_env, mint
from tests.e2e.e2e_support import charge_for
from tests.ledger_service.helpers import credit

pytestmark = pytest.mark.timeout(120)
CONNECTIONS = 16  # all on one worker of two by chance: 2**-15


class Output:
    """A service's stdout, read to the end in a thread (a full pipe would block it)."""

    def __init__(self, service: processes.Service) -> None:
        self.lines: list[str] = []
        self.proc = service.proc
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def listening(self) -> list[str]:
        return [line for line in self.lines if LISTENING.search(line)]


def workers_of(proc: subprocess.Popen[str]) -> set[int]:
    return {child.pid for child in psutil.Process(proc.pid).children()}


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.05)


def owners(port: int, expected: int) -> Counter[int]:
    """Which process holds each accepted connection on `port` (the server side of every
    ESTABLISHED socket whose local port is `port`), once `expected` of them are accepted."""
    counted: Counter[int] = Counter()

    def accepted() -> bool:
        counted.clear()
        for conn in psutil.net_connections(kind="tcp"):
            accepted_here = conn.laddr and conn.laddr.port == port
            if accepted_here and conn.status == psutil.CONN_ESTABLISHED and conn.pid is not None:
                counted[conn.pid] += 1
        return sum(counted.values()) >= expected

    wait_for(accepted, 10, f"{expected} accepted connections on {port}")
    return counted


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def ledger_env(database_url: str, workers: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "LEDGER_ADDR": "127.0.0.1:0",
        "WORKERS": str(workers),
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE_SECONDS": "5",
        **extra,
    }


async def calls_on_fresh_channels(address: str, user: str, n: int) -> list[grpc.aio.Channel]:
    """n channels (one connection each), each having made one real call; left open."""
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    answers = await asyncio.gather(
        *(
            ledger_pb2_grpc.LedgerServiceStub(channel).GetBalance(
                pb.GetBalanceRequest(user_id=user), metadata=AUTH, timeout=10
            )
            for channel in channels
        )
    )
    assert [answer.balance.available_tokens for answer in answers] == [800] * n
    return channels


@pytest.fixture
def ledger_service(database_url: str) -> Iterator[tuple[processes.Service, Output]]:
    service = processes.start("ledger_service", ledger_env(database_url, 2))
    output = Output(service)
    try:
        yield service, output
    finally:
        service.stop()


async def test_two_ledger_workers_serve_one_port_and_replace_a_killed_one(
    ledger_service: tuple[processes.Service, Output],
) -> None:
    service, output = ledger_service
    first = workers_of(service.proc)
    assert len(first) == 2
    async with grpc.aio.insecure_channel(service.address) as channel:
        await credit(ledger_pb2_grpc.LedgerServiceStub(channel), "workers-user", 1000)

    channels = await calls_on_fresh_channels(service.address, "workers-user", CONNECTIONS)
    try:
        served = await asyncio.to_thread(owners, port_of(service.address), CONNECTIONS)
        assert set(served) == first, f"connections by owner {served}, workers {first}"
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))

    killed = min(first)
    psutil.Process(killed).kill()
    await asyncio.to_thread(
        wait_for, lambda: len(workers_of(service.proc) - first) == 1, 30, "a replacement worker"
    )
    now = workers_of(service.proc)
    assert first - {killed} <= now  # the other worker served on undisturbed
    # The replacement serves too: eventually a fresh connection lands on it.
    replacement = (now - first).pop()
    deadline = time.monotonic() + 30
    while True:
        channels = await calls_on_fresh_channels(service.address, "workers-user", CONNECTIONS)
        try:
            if replacement in await asyncio.to_thread(
                owners, port_of(service.address), CONNECTIONS
            ):
                break
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))
        assert time.monotonic() < deadline, "the replacement never served"

    assert service.proc.poll() is None
    service.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(service.proc.wait, 30) == 0
    assert not any(psutil.pid_exists(pid) for pid in now)
    # The listening line once, whatever the number of workers, and the restart was logged.
    assert len(output.listening()) == 0  # the first was consumed by processes.start
    log = "\n".join(output.lines)
    assert "exited unexpectedly (signal SIGKILL); starting a replacement" in log, log


def test_a_worker_that_cannot_start_fails_the_supervisor(database_url: str) -> None:
    # The supervisor migrates without the token; every worker refuses to serve without it.
    env = ledger_env(database_url, 2, LEDGER_SERVICE_TOKEN="")
    proc = subprocess.run(
        [sys.executable, "-m", "ledger_service"],
        cwd=processes.ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "LEDGER_SERVICE_TOKEN is required" in proc.stderr
    assert "before it listened" in proc.stderr


def test_one_worker_is_one_process_with_its_port_alone(database_url: str) -> None:
    service = processes.start("ledger_service", ledger_env(database_url, 1))
    try:
        Output(service)
        assert workers_of(service.proc) == set()
        # No SO_REUSEPORT: a second ledger on the same address fails instead of sharing it.
        env = ledger_env(database_url, 1, LEDGER_ADDR=service.address)
        with pytest.raises(RuntimeError, match="did not start"):
            processes.start("ledger_service", env, timeout=60)
    finally:
        assert service.stop() == 0


@pytest.fixture
async def sim_url() -> AsyncIterator[str]:
    runner, port = await start_provider_sim("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_two_gateway_workers_share_both_ports_and_meter_exactly(
    ledger: LedgerHarness, sim_url: str, tmp_path: Path
) -> None:
    env = gateway_process_env(
        ledger.address,
        sim_url,
        str(tmp_path),
        WORKERS="2",
        SHUTDOWN_GRACE_SECONDS="5",
        LOG_LEVEL="INFO",
    )
    service = processes.start("gateway_service", env)
    try:
        assert service.proc.stdout is not None
        second = await asyncio.to_thread(service.proc.stdout.readline)
        assert second.startswith("gateway http listening on 127.0.0.1:"), second
        output = Output(service)
        http = second.rsplit(" ", 1)[1].strip()
        workers = workers_of(service.proc)
        assert len(workers) == 2

        user = "gateway-workers-user"
        await credit(ledger.stub, user, 10_000)  # 8000 usable
        auth = {"Authorization": f"Bearer {mint(user)}"}
        sessions = [aiohttp.ClientSession() for _ in range(CONNECTIONS)]
        try:

            async def generate(session: aiohttp.ClientSession) -> int:
                async with session.post(
                    f"http://{http}/v1/generate",
                    json={"content": "[[usage:40,60]] hi", "maxTokens": 100},
                    headers=auth,
                ) as response:
                    body = await response.json()
                    assert response.status == 200, body
                    charged: int = body["tokenUsage"]["tokensCharged"]
                    return charged

            charged = await asyncio.gather(*(generate(session) for session in sessions))
            served = await asyncio.to_thread(owners, port_of(http), CONNECTIONS)
            assert set(served) == workers, f"HTTP connections by owner {served}, {workers}"
        finally:
            await asyncio.gather(*(session.close() for session in sessions))
        assert charged == [charge_for(100)] * CONNECTIONS
        got = await ledger.stub.GetBalance(pb.GetBalanceRequest(user_id=user), metadata=AUTH)
        assert got.balance.available_tokens == 8000 - CONNECTIONS * charge_for(100)

        service.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.proc.wait, 30) == 0
        assert output.listening() == []  # each line printed once, by the supervisor
    finally:
        service.stop()


def test_the_gateway_without_redis_defaults_to_one_worker() -> None:
    from gateway_service.__main__ import worker_count
    from shared.config import Settings
    from shared.workers import available_cores

    assert worker_count(Settings(redis_url=None, workers=None)) == 1
    assert worker_count(Settings(redis_url="redis://127.0.0.1:1", workers=None)) == (
        available_cores()
    )
    assert worker_count(Settings(redis_url=None, workers=3)) == 3


OUTBOX_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway_service.outbox import Outbox

    async def down(method: str, payload: bytes) -> None:
        raise ConnectionError("the ledger is down")

    async def main() -> None:
        outbox = Outbox(down, Path(sys.argv[1]), initial_backoff=30)
        await outbox.start()
        for i in range(int(sys.argv[3])):
            await outbox.submit("Settle", f"{sys.argv[2]}-{i}".encode())
        print("queued", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_outboxes_of_killed_workers_are_all_drained_by_the_next_start(
    tmp_path: Path,
) -> None:
    """Workers share one outbox file: two processes queue into it at once and die (SIGKILL);
    one later start delivers every job of both, each once."""
    from gateway_service.outbox import Outbox

    path = tmp_path / "gateway-outbox.sqlite3"
    per_worker = 50
    workers = [
        await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", OUTBOX_WORKER, str(path), name, str(per_worker)],
            cwd=processes.ROOT,
            stdout=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert await worker.stdout.readline() == b"queued\n"
    finally:
        for worker in workers:
            worker.kill()
            await worker.wait()

    delivered: list[bytes] = []

    async def up(method: str, payload: bytes) -> None:
        assert method == "Settle"
        delivered.append(payload)

    outbox = Outbox(up, path)
    await outbox.start()
    try:
        assert await outbox.drain(10)
    finally:
        await outbox.close()
    expected = {f"{name}-{i}".encode() for name in ("a", "b") for i in range(per_worker)}
    assert sorted(delivered) == sorted(expected)

    again = Outbox(up, path)
    await again.start()
    assert again.pending == 0
    await again.close()


async def test_sighup_to_the_supervisor_reloads_every_workers_prompts(
    ledger: LedgerHarness, sim_url: str, tmp_path: Path
) -> None:
    """The operator signals the gateway's pid (the supervisor's): each worker reloads its
    prompts, and the supervisor lives on (SIGHUP's default action would end it and its
    workers)."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    prompt = prompts / "hello.toml"
    prompt.write_text('version = "1"\ndescription = "d"\nsystem = "s"\n')
    env = gateway_process_env(
        ledger.address,
        sim_url,
        str(tmp_path),
        WORKERS="2",
        PROMPTS_DIR=str(prompts),
        PROMPTS_RELOAD_SECONDS="0",  # SIGHUP only
        SHUTDOWN_GRACE_SECONDS="5",
    )
    service = processes.start("gateway_service", env)
    try:
        assert service.proc.stdout is not None
        second = await asyncio.to_thread(service.proc.stdout.readline)
        assert second.startswith("gateway http listening on 127.0.0.1:"), second
        Output(service)
        http = second.rsplit(" ", 1)[1].strip()
        workers = workers_of(service.proc)

        async def versions() -> set[str]:
            """The version each of CONNECTIONS fresh connections is told (both workers)."""
            seen: set[str] = set()
            for _ in range(CONNECTIONS):
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://{http}/v1/prompts") as response,
                ):
                    seen.add((await response.json())["prompts"][0]["version"])
            return seen

        assert await versions() == {"1"}
        prompt.write_text('version = "2"\ndescription = "d"\nsystem = "s"\n')
        service.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (seen := await versions()) != {"2"} and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert seen == {"2"}
        assert service.proc.poll() is None
        assert workers_of(service.proc) == workers  # the same workers: none died of it
        service.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.proc.wait, 30) == 0
    finally:
        service.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_without_prompts_ends_no_process(
    ledger: LedgerHarness, sim_url: str, tmp_path: Path, workers: str
) -> None:
    """Log rotation and `systemctl reload` send SIGHUP too: with nothing to reload, its default
    action must not end a worker (cutting its calls) or a single-process gateway."""
    env = gateway_process_env(
        ledger.address, sim_url, str(tmp_path), WORKERS=workers, SHUTDOWN_GRACE_SECONDS="5"
    )
    service = processes.start("gateway_service", env)
    try:
        assert service.proc.stdout is not None
        second = await asyncio.to_thread(service.proc.stdout.readline)
        assert second.startswith("gateway http listening on 127.0.0.1:"), second
        output = Output(service)
        before = workers_of(service.proc)
        service.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(2)
        assert service.proc.poll() is None
        assert workers_of(service.proc) == before
        assert not [line for line in output.lines if "exited unexpectedly" in line]
        service.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.proc.wait, 30) == 0
    finally:
        service.stop()
