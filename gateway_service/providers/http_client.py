"""The HTTP client both provider SDKs send through: their own defaults (a pool of up to 1000
connections, TCP keepalive, redirects followed), plus a bounded receive buffer on every provider
connection.

Why the bound: a stream is read from its provider only as fast as its client takes the text.
On uvloop, each time the SDK asks for more, everything the kernel has received by then is read
into the process at once (anyio's read queue), and a provider sends ahead as far as the receive
window lets it, which Linux grows to megabytes. A stream whose client stopped reading then kept
megabytes of its provider's reply in the gateway (measured: about 5 MB per stalled stream against
a fast provider). With the receive buffer bounded to RECEIVE_BUFFER_BYTES, TCP holds the provider
back instead, and a stalled stream keeps about that much. 128 KiB still carries about 1 MB/s at a
100 ms round trip, far more than a model streams.
"""

from __future__ import annotations

import socket

import httpx2

RECEIVE_BUFFER_BYTES = 128 * 1024
# As the SDKs' own clients: a pool shared by every call, idle connections kept for reuse.
LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


def _socket_options() -> list[tuple[int, int, int]]:
    options = [
        (socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES),
        # Find a provider connection that died silently (as the Anthropic SDK does by default).
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5)):
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return options


def provider_http_client() -> httpx2.AsyncClient:
    """A new client (one pool) for one provider SDK; the SDK closes it with itself. Timeouts
    are the SDK's, sent with every request."""
    transport = httpx2.AsyncHTTPTransport(limits=LIMITS, socket_options=_socket_options())
    return httpx2.AsyncClient(transport=transport, follow_redirects=True)
