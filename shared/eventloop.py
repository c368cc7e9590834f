"""The event loop every process runs on: uvloop (libuv) when available, else asyncio's own.

uvloop cuts the per-call cost of sockets and callbacks, which is most of what a gRPC service,
asyncpg and an HTTP client spend outside our code. RPCAI_EVENT_LOOP=asyncio opts out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    if os.environ.get("RPCAI_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is pinned; other platforms may lack it
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
