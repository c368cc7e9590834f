"""N worker processes of one service behind one listening address (WORKERS=N).

Each worker is the same module run again with WORKER_ENV set: a complete single-process service
that binds the shared address with SO_REUSEPORT, so the kernel spreads new connections over the
workers. The supervisor does what must happen once: it resolves port 0 to one concrete port
(every worker must bind the same one; the supervisor keeps a SO_REUSEPORT socket bound on it, not
listening, so no other program takes it while a worker restarts), lets the service prepare shared
state first (the ledger's embedded Postgres and migrations), waits until every worker listens,
prints the service's "listening on" lines exactly once (scripts read the first one), forwards
SIGTERM/SIGINT so every worker drains, and replaces a worker that dies unexpectedly.

A worker dies with its supervisor (PR_SET_PDEATHSIG, SIGTERM: it drains), so a killed supervisor
leaves no orphan serving on the port. WORKERS=1 runs no supervisor at all."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from shared.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

log = logging.getLogger(__name__)

# Set in a worker's environment: its index (0..N-1), and the supervisor's pid.
WORKER_ENV = "RPCAI_WORKER"
SUPERVISOR_ENV = "RPCAI_SUPERVISOR_PID"
LISTENING = re.compile(r"listening on (?:\w+://)?(\S+:\d+)")
# A replacement that dies before it listens this many times in a row means something is broken
# (the port, the database, the configuration): stop instead of restarting forever.
MAX_FAILED_STARTS = 5
PR_SET_PDEATHSIG = 1


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def worker_index() -> int | None:
    """This process's index when it is one of a supervisor's workers, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value else None


def is_worker() -> bool:
    return worker_index() is not None


def become_worker() -> None:
    """In a worker: die (gracefully, SIGTERM) with the supervisor. The supervisor may already be
    gone by the time this runs, hence the parent check after setting the signal."""
    if not is_worker():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(os.environ[SUPERVISOR_ENV]):
        sys.exit("worker: the supervisor is gone")


def reserve_address(addr: str) -> tuple[str, socket.socket | None]:
    """`addr` with port 0 resolved to a free port, and a socket (SO_REUSEPORT, bound, not
    listening) that holds that port for the workers; a concrete port is returned unchanged."""
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    if int(port) != 0:
        return addr, None
    bind_host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":0" means every interface
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        bind_host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(sockaddr)
    return f"{host}:{holder.getsockname()[1]}", holder


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[str]
    expect_lines: int
    listening: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    """Runs `python -m module *argv` `count` times with `env` added; see the module docstring.
    `expect_lines` is how many "listening on" lines a worker prints once it serves."""

    def __init__(
        self,
        module: str,
        argv: Sequence[str],
        count: int,
        env: Mapping[str, str],
        *,
        expect_lines: int,
        grace: float,
        forward: Sequence[int] = (),
    ) -> None:
        self.module = module
        self.forward = tuple(forward)
        self.argv = list(argv)
        self.count = count
        self.env = dict(env)
        self.expect_lines = expect_lines
        self.grace = grace
        self.workers: list[_Worker] = []
        self.stopping = threading.Event()
        self._out = threading.Lock()

    def _spawn(self, index: int) -> _Worker:
        env = {
            **os.environ,
            **self.env,
            WORKER_ENV: str(index),
            SUPERVISOR_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        # Spawned from the main thread only: PR_SET_PDEATHSIG fires when the forking thread
        # ends, not the process.
        proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.argv],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        worker = _Worker(index, proc, self.expect_lines)
        threading.Thread(target=self._read, args=(worker,), daemon=True).start()
        log.info("worker %d started (pid %d)", index, proc.pid)
        return worker

    def _read(self, worker: _Worker) -> None:
        """A worker's stdout: its listening lines are kept (the supervisor prints them once),
        anything else goes on to the supervisor's stdout."""
        assert worker.proc.stdout is not None
        for line in worker.proc.stdout:
            if not worker.ready.is_set() and LISTENING.search(line):
                worker.listening.append(line)
                if len(worker.listening) >= worker.expect_lines:
                    worker.ready.set()
                continue
            with self._out:
                sys.stdout.write(line)
                sys.stdout.flush()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """A signal the workers act on (the gateway's SIGHUP: reload the prompts), sent to each
        that listens: one still starting has not set its handler yet, and reads everything
        fresh anyway."""
        for worker in self.workers:
            if worker.ready.is_set() and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT; 0 when every worker then stopped cleanly, 1 when a worker
        could not start."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for forwarded in self.forward:
            signal.signal(forwarded, self._pass_on)
        self.workers = [self._spawn(i) for i in range(self.count)]
        try:
            started = self._wait_ready()
            if started is not True:
                return 1 if started is False or not self._stop() else 0
            log.info("%d workers listening (pids %s)", self.count, self.pids())
            print("".join(self.workers[0].listening), end="", flush=True)
            if not self._watch():
                return 1
            return 0 if self._stop() else 1
        finally:
            self._kill_all()

    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self.workers]

    def _wait_ready(self) -> bool | None:
        """True once every worker listens; False when one died first; None on a stop signal."""
        while not all(worker.ready.is_set() for worker in self.workers):
            for worker in self.workers:
                code = worker.proc.poll()
                if code is not None and not worker.ready.is_set():
                    log.error("worker %d exited with %d before it listened", worker.index, code)
                    self._stop()
                    return False
            if self.stopping.wait(0.05):
                return None
        return True

    def _watch(self) -> bool:
        """Replaces workers that exit while no stop was asked for. False when replacements keep
        dying before they listen."""
        failed_starts = 0
        while not self.stopping.wait(0.1):
            for position, worker in enumerate(self.workers):
                code = worker.proc.poll()
                if code is None:
                    if worker.ready.is_set():
                        failed_starts = 0
                    continue
                if self.stopping.is_set():
                    break
                if not worker.ready.is_set():
                    failed_starts += 1
                    if failed_starts >= MAX_FAILED_STARTS:
                        log.error(
                            "worker %d failed to start %d times in a row; stopping",
                            worker.index,
                            failed_starts,
                        )
                        self._stop()
                        return False
                    time.sleep(min(0.1 * 2**failed_starts, 5.0))
                log.warning(
                    "worker %d (pid %d) exited unexpectedly (%s); starting a replacement",
                    worker.index,
                    worker.proc.pid,
                    _describe(code),
                )
                if MULTIPROC_ENV in self.env:
                    mark_process_dead(worker.proc.pid, self.env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
                self.workers[position] = self._spawn(worker.index)
        return True

    def _stop(self) -> bool:
        """SIGTERM to every worker, then wait for their drain; True when all exited with 0."""
        live = [worker for worker in self.workers if worker.proc.poll() is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 10
        clean = True
        for worker in live:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killed", worker.index)
                worker.proc.kill()
                worker.proc.wait()
                clean = False
                continue
            if code != 0:
                log.error("worker %d stopped with %s", worker.index, _describe(code))
                clean = False
        return clean

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def supervise(
    module: str,
    argv: Sequence[str],
    count: int,
    env: Mapping[str, str],
    *,
    expect_lines: int,
    grace: float,
    forward: Sequence[int] = (),
) -> int:
    """`forward`: signals the supervisor passes on to its workers (else their default action
    applies to the supervisor itself)."""
    # Prometheus values of every worker in one directory (shared/metrics.py), so that a scrape
    # answered by any worker counts them all: the operator's PROMETHEUS_MULTIPROC_DIR, else ours.
    given = os.environ.get(MULTIPROC_ENV)
    directory = given or tempfile.mkdtemp(prefix=f"rpcai-{module}-metrics-")
    prepare_multiprocess_dir(directory)
    try:
        return Supervisor(
            module,
            argv,
            count,
            {**env, MULTIPROC_ENV: directory},
            expect_lines=expect_lines,
            grace=grace,
            forward=forward,
        ).run()
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)
