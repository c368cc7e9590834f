"""A real Redis for the tests: REDIS_URL if given, else a `redis-server` of our own on a free
port (no persistence), never the machine's own Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None
    workdir: Path

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        """(Re)starts our server on the same port (a test stops and revives it)."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    given = os.environ.get("REDIS_URL")
    workdir = Path(tempfile.mkdtemp(prefix="rpcai-redis-"))
    if given:
        yield RedisServer(given, 0, None, workdir)
        return
    port = free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, None, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
