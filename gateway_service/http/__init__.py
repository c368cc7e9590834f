"""The gateway's HTTP+JSON edge for editor extensions: the same core as the gRPC API, with
Server-Sent Events for streams, CORS, an OpenAPI document, health and readiness."""

from gateway_service.http.app import HttpServer, create_http_app

__all__ = ["HttpServer", "create_http_app"]
