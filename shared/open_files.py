"""Each service raises its open-file soft limit to the hard limit when it starts.

Every connection (HTTP, gRPC, each provider call, the database) is a file descriptor. The soft
limit a process inherits is often 1024, far below what the connection caps allow: past it
accept() fails and a server stops answering everyone instead of refusing the excess with a 503.
The hard limit is what an unprivileged process may raise itself to, so the service takes all of
it and logs both, so an operator sees what it got (raising the hard limit is the system's job:
`ulimit -Hn`, systemd's LimitNOFILE, a container's nofile ulimit).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_open_file_limit() -> tuple[int, int]:
    """Soft limit := hard limit; returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS refuses an unlimited soft limit
            log.warning(
                "open files: could not raise the soft limit %d to the hard limit %s (%s)",
                soft,
                _show(hard),
                exc,
            )
            return soft, hard
    raised, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info(
        "open files: soft limit %s (was %s), hard limit %s", _show(raised), _show(soft), _show(hard)
    )
    return raised, hard


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
