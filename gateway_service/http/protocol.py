"""What the HTTP connection itself answers and logs, before any route runs, and the `Server`
header of every response.

aiohttp answers a request it cannot parse (a folded or malformed header line, a byte a header may
not hold, a duplicated Content-Length) in `RequestHandler.handle_error`. By default it answers in
plain text quoting the bytes that failed, and logs that text with a traceback at ERROR. Those bytes
are often a header value, and the header is often `Authorization`: the bearer token went back to
whoever sent it (and to every proxy in between) and into the log. Here such a request is answered
with the API's JSON error body, which names no value, and is logged at DEBUG by its kind alone.

The `Server` header says `rpcai` and no version, so a response does not tell a scanner which
known bugs to try: set on routed responses by `server_header` (an on_response_prepare hook the app
installs), on the connection's own answers here. `HttpServer` runs the app with `EdgeRunner`, an
aiohttp AppRunner whose connections are `EdgeRequestHandler`s.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway_service.http.errors import error_response

SERVER = "rpcai"

# The connection's own answers: status -> (message, reason). Fixed texts: nothing of the request.
_ANSWERS = {
    HTTPStatus.BAD_REQUEST: ("malformed HTTP request", "MALFORMED_REQUEST"),
    HTTPStatus.GATEWAY_TIMEOUT: ("the request took too long", "TIMEOUT"),
}
_INTERNAL = ("internal error", "INTERNAL")


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the Server header of every routed response."""
    response.headers[hdrs.SERVER] = SERVER


class EdgeRequestHandler(web.RequestHandler):
    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's ERROR log with a traceback, except for the request's own bytes that could
        not be parsed or decoded (here, or when the rest of a body is read after the answer):
        their text quotes those bytes, so only their kind is logged, at DEBUG."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            self.logger.debug("malformed HTTP request (%s)", type(exc).__name__)
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The JSON error body for a request aiohttp could not parse (400) or whose handler
        failed outside our middleware (500, 504). Never quotes `message` or `exc`: for a parse
        error both hold the raw bytes that failed."""
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp: too late for another response
            raise ConnectionError("the response had started; the connection is dropped")
        text, reason = _ANSWERS.get(HTTPStatus(status), _INTERNAL)
        response = error_response(status, text, reason, headers={hdrs.SERVER: SERVER})
        response.force_close()
        return response


class EdgeServer(web.Server):
    """aiohttp's Server (one per runner, the factory of its connections) making
    EdgeRequestHandlers, built as aiohttp's own `__call__` builds its handlers."""

    def __call__(self) -> web.RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections answer and log parse errors as above."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the app up, and freezes it
        return EdgeServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
