"""Which address a call comes from, for limits keyed by address (public callers).

The peer's address, unless the peer is one of TRUSTED_PROXIES: then the rightmost address of
`X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the address it saw, so
anything left of the first untrusted hop may be forged by the client). Without trusted proxies
the header is never believed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or single addresses (`10.0.0.0/8`, `127.0.0.1`); a bad entry is a config error."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


class ClientAddresses:
    def __init__(self, trusted_proxies: Sequence[IPNetwork] = ()) -> None:
        self.trusted = tuple(trusted_proxies)

    def _trusted(self, host: str) -> bool:
        address = _address(host)
        return address is not None and any(address in net for net in self.trusted)

    def resolve(self, peer_host: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self._trusted(peer_host):
            return peer_host
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if _address(hop) is None:
                return peer_host  # a malformed hop: believe nothing to its left
            if not self._trusted(hop):
                return hop
        return peer_host

    def of_grpc_peer(self, peer: str, forwarded_for: str | None) -> str:
        """`peer` as grpc gives it: `ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`, `unix:/path`."""
        kind, _, rest = peer.partition(":")
        if kind == "ipv4":
            host = rest.rsplit(":", 1)[0]
        elif kind == "ipv6":
            host = rest.rsplit(":", 1)[0].strip("[]")
        else:
            host = kind or "unknown"
        return self.resolve(host, forwarded_for)
