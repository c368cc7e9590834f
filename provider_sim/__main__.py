"""`python -m provider_sim`: serve on PROVIDER_SIM_ADDR (default 127.0.0.1:8090) until signalled.

PROVIDER_SIM_API_KEYS (comma separated), when set, turns on the API key check.
"""

from __future__ import annotations

import asyncio
import os
import signal

from provider_sim.server import start_provider_sim
from shared import eventloop


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def _main() -> None:
    host, port = _split_addr(os.environ.get("PROVIDER_SIM_ADDR", "127.0.0.1:8090"))
    keys_env = os.environ.get("PROVIDER_SIM_API_KEYS", "")
    keys = [k.strip() for k in keys_env.split(",") if k.strip()] or None
    runner, bound = await start_provider_sim(host, port, api_keys=keys)
    print(f"provider_sim listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    eventloop.run(_main())
