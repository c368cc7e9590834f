"""Start the project's services as real processes and wait until they listen: for `make run`,
the benchmarks and the end-to-end tests."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (?:\w+://)?(\S+:\d+)")


def _forward(proc: subprocess.Popen[str]) -> None:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    threading.Thread(target=pump, daemon=True).start()


class Service:
    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc = proc
        self.address = address

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start(module: str, env: dict[str, str], timeout: float = 60, echo: bool = False) -> Service:
    """Runs `python -m module` and waits for its 'listening on host:port' line. With `echo`, the
    service's output goes on to this process's stdout (for `make run`)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    # Read byte by byte from the descriptor, not through proc.stdout: its buffer could swallow
    # the listening line behind a log line, where select() never reports it, and whatever
    # follows the line must stay unread for the caller.
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    line = bytearray()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            byte = os.read(fd, 1)
            if not byte:
                break
            line += byte
            if byte != b"\n":
                continue
            text = line.decode(errors="replace")
            line.clear()
            seen.append(text)
            match = LISTENING.search(text)
            if match:
                if echo:
                    _forward(proc)
                return Service(proc, match.group(1))
        elif proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{module} did not start:\n{''.join(seen)[-4000:]}")


def start_redis(port: int, timeout: float = 10) -> Service:
    """A throwaway `redis-server` on 127.0.0.1:port, keeping nothing on disk."""
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if accepting(f"127.0.0.1:{port}", timeout):
        return Service(proc, f"127.0.0.1:{port}")
    proc.kill()
    raise RuntimeError("redis-server did not start")


def accepting(address: str, timeout: float = 10) -> bool:
    """Whether host:port accepts a connection within `timeout` (a service's second listener,
    the HTTP edge, opens after the line `start` waits for)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
