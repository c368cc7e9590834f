"""`python -m bench.grpc_load --config bench/ghz/<file>.json`: a gRPC load run from a ghz config.

ghz (a Go gRPC load tool) is what an operator reaches for against a running stack; this runs the
same configuration files where ghz is not installed (CI, a dev box with only the venv), so the
configs in bench/ghz/ stay tested and the numbers stay comparable. It reads ghz's config keys
(call, host, insecure, total, duration, max-duration, duration-stop, concurrency, connections,
rps, timeout, data, data-file, metadata, metadata-file, skipFirst, count-errors, name, tags and
the template switches), finds the method and its message types by server reflection as ghz does
without `proto`, renders ghz's templates ({{.RequestNumber}}, {{.UUID}} and the other call data,
newUUID, randomString, randomInt, and sprig's env), runs the calls with grpc.aio at the
concurrency (capped at `rps` when set) and prints ghz's JSON report: count, total, average,
fastest, slowest (nanoseconds), rps, latencyDistribution, histogram (marks in seconds),
statusCodeDistribution (grpc-go's code names) and errorDistribution (grpc-go's error text).
`details` (one row per call) is left out.

Beyond ghz: `--followup CONFIG --followup-data PATH` writes, from this run's OK answers, call
data for a second config (each element is that config's `data` with the fields the answer also
has taken from it), so a Settle run can settle exactly the holds a Reserve run made
(bench/ghz/README.md). The exit status is 1 when any call failed (ghz exits 0), 2 when the
run could not start (a config ghz would not run the same way, no server, no such method).

    python -m bench.grpc_load --config bench/ghz/ledger_reserve.json [--host H:P]
        [--metadata JSON] [--data JSON | --data-file PATH] [--total N | --duration 5s]
        [--concurrency N] [--rps N] [--format json|pretty]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import math
import os
import random
import re
import string
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# Every key of ghz's config file (runner.Config's JSON names): a config may hold only these.
GHZ_KEYS = frozenset(
    {
        "proto", "protoset", "call", "cacert", "cert", "key", "count-errors", "skipTLS",
        "skipFirst", "cname", "authority", "insecure", "total", "async", "concurrency",
        "concurrency-schedule", "concurrency-start", "concurrency-end", "concurrency-step",
        "concurrency-step-duration", "concurrency-max-duration", "connections", "rps",
        "duration", "duration-stop", "max-duration", "timeout", "data", "data-file",
        "binary-file", "metadata", "metadata-file", "stream-interval", "stream-call-duration",
        "stream-call-count", "stream-dynamic-messages", "output", "format", "connect-timeout",
        "keepalive", "cpus", "import-paths", "name", "tags", "reflect-metadata", "debug", "host",
        "enable-compression", "load-schedule", "load-start", "load-end", "load-step",
        "load-step-duration", "load-max-duration", "lb-strategy", "max-recv-message-size",
        "max-send-message-size", "disable-template-functions", "disable-template-data",
    }
)  # fmt: skip
# What this runner acts on; "output", "format", "debug" and "cpus" only shape ghz's own output
# and process, so they are accepted and ignored. Any other ghz key is refused, not ignored: a
# run that silently differs from ghz's would not measure the same thing.
SUPPORTED_KEYS = frozenset(
    {
        "call", "host", "insecure", "total", "duration", "duration-stop", "max-duration",
        "concurrency", "connections", "rps", "timeout", "connect-timeout", "data", "data-file",
        "metadata", "metadata-file", "skipFirst", "count-errors", "name", "tags",
        "disable-template-functions", "disable-template-data",
        "output", "format", "debug", "cpus",
    }
)  # fmt: skip

MAX_INT32 = 2**31 - 1  # ghz's total when a duration drives the run
# grpc-go's names of the status codes, which ghz's report uses.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)  # ghz's latencyDistribution
HISTOGRAM_BUCKETS = 10


class ConfigError(Exception):
    """The configuration cannot be run as ghz would run it."""


# --- Go durations ("1.5s", "500ms", "1m30s"), as ghz's config reads them -------------------

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string (time.ParseDuration's syntax, without a sign)."""
    text = text.strip()
    if text == "0":
        return 0.0
    seconds, pos = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ConfigError(f"invalid duration {text!r} (Go syntax: 500ms, 5s, 1m30s)")
    return seconds


# --- ghz's call templates ------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """What ghz's call data says about the method."""

    fully_qualified_name: str
    method_name: str
    service_name: str
    input_name: str
    output_name: str
    client_streaming: bool
    server_streaming: bool


class CallData:
    """ghz's CallData: the variables a template may read, fresh for each request."""

    def __init__(self, method: MethodInfo, worker_id: str, request_number: int) -> None:
        now = time.time_ns()
        self.values: dict[str, str | int | bool] = {
            "WorkerID": worker_id,
            "RequestNumber": request_number,
            "FullyQualifiedName": method.fully_qualified_name,
            "MethodName": method.method_name,
            "ServiceName": method.service_name,
            "InputName": method.input_name,
            "OutputName": method.output_name,
            "IsClientStreaming": method.client_streaming,
            "IsServerStreaming": method.server_streaming,
            "Timestamp": datetime.fromtimestamp(now / 1e9).astimezone().isoformat("T", "seconds"),
            "TimestampUnix": now // 10**9,
            "TimestampUnixMilli": now // 10**6,
            "TimestampUnixNano": now,
            "UUID": str(uuid.uuid4()),
        }


_CHARSET = string.ascii_letters + string.digits


def _random_string(length: int) -> str:
    if length <= 0:  # ghz: a random length of 2..16
        length = random.randint(2, 16)
    return "".join(random.choices(_CHARSET, k=length))


def _random_int(low: int, high: int) -> int:
    low, high = max(low, 0), high if high > 0 else 1  # ghz's clamping; [low, high)
    if high <= low:
        raise ValueError(f"randomInt {low} {high}: the range is empty")
    return random.randrange(low, high)


# The template functions used here: ghz's own three, and sprig's env (ghz registers sprig's
# FuncMap, env included), which is how a config reads a token without holding it.
FUNCTIONS: dict[str, Callable[..., str | int]] = {
    "newUUID": lambda: str(uuid.uuid4()),
    "randomString": _random_string,
    "randomInt": _random_int,
    "env": lambda name: os.environ.get(name, ""),
}
_FIELDS = frozenset(CallData(MethodInfo("", "", "", "", "", False, False), "", 0).values)

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"\s*(?:(?P<field>\.[A-Za-z_]\w*)|(?P<raw>`[^`]*`)|(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<int>-?\d+)|(?P<ident>[A-Za-z_]\w*))\s*"
)
Arg = str | int | Callable[[CallData], str | int | bool]


def _tokens(body: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(body):
        match = _TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            raise ConfigError(
                f"template action {{{{{body}}}}}: grpc_load reads a call data field, or a"
                " function with literal or field arguments"
            )
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _compile_action(body: str, with_functions: bool) -> Callable[[CallData], str]:
    if '\\"' in body:
        # ghz templates the JSON text of data and metadata, where a double quote reads \":
        # Go's template parser refuses it (for metadata ghz then sends the text as it is).
        raise ConfigError(
            f"template action {{{{{body}}}}}: in a JSON config write string arguments in"
            " backquotes ({{env `NAME`}}), as ghz needs too"
        )
    tokens = _tokens(body)
    if not tokens:
        raise ConfigError("empty template action {{}}")
    kind, text = tokens[0]
    if kind == "field":
        if len(tokens) != 1 or text[1:] not in _FIELDS:
            raise ConfigError(f"template action {{{{{body}}}}}: no such call data field")
        return lambda cd: _go_text(cd.values[text[1:]])
    if kind != "ident" or text not in FUNCTIONS:
        raise ConfigError(f"template action {{{{{body}}}}}: not a function grpc_load knows")
    if not with_functions:
        raise ConfigError(f"template action {{{{{body}}}}}: template functions are disabled")
    fn = FUNCTIONS[text]
    args: list[Arg] = []
    for arg_kind, arg in tokens[1:]:
        if arg_kind == "int":
            args.append(int(arg))
        elif arg_kind == "raw":
            args.append(arg[1:-1])
        elif arg_kind == "str":
            args.append(str(json.loads(arg)))
        elif arg_kind == "field" and arg[1:] in _FIELDS:
            args.append(_field(arg[1:]))
        else:
            raise ConfigError(f"template action {{{{{body}}}}}: argument {arg} not understood")

    def call(cd: CallData) -> str:
        values = [a(cd) if callable(a) else a for a in args]
        return _go_text(fn(*values))

    return call


def _field(name: str) -> Callable[[CallData], str | int | bool]:
    return lambda cd: cd.values[name]


def _go_text(value: str | int | bool) -> str:
    """A value as Go's text/template prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Template:
    """A ghz template, parsed once: literal text and actions, rendered per request."""

    parts: tuple[str | Callable[[CallData], str], ...]

    @classmethod
    def parse(cls, text: str, *, enabled: bool = True, functions: bool = True) -> Template:
        if not enabled:  # ghz's disable-template-data: the text is sent as it is
            return cls((text,))
        parts: list[str | Callable[[CallData], str]] = []
        pos = 0
        for match in _ACTION.finditer(text):
            literal = text[pos : match.start()]
            if match.group(1):  # {{- trims the space before it
                literal = literal.rstrip()
            if literal:
                parts.append(literal)
            parts.append(_compile_action(match.group(2).strip(), functions))
            pos = match.end()
            if match.group(3):  # -}} trims the space after it
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        if text[pos:]:
            parts.append(text[pos:])
        return cls(tuple(parts))

    @property
    def static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, cd: CallData) -> str:
        return "".join(p if isinstance(p, str) else p(cd) for p in self.parts)


# --- configuration ---------------------------------------------------------------------------


@dataclass
class LoadConfig:
    """A ghz config, with ghz's defaults."""

    call: str
    host: str
    insecure: bool = False
    total: int = 200
    duration: float = 0.0
    max_duration: float = 0.0
    duration_stop: str = "close"
    concurrency: int = 50
    connections: int = 1
    rps: int = 0
    timeout: float = 20.0
    connect_timeout: float = 10.0
    data: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    skip_first: int = 0
    count_errors: bool = False
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    template_functions: bool = True
    template_data: bool = True

    @property
    def run_seconds(self) -> float:
        """How long the run may last (0: until `total`); max-duration wins, as in ghz."""
        return self.max_duration or self.duration

    @property
    def requests(self) -> int:
        """ghz: a duration without max-duration ignores total."""
        return MAX_INT32 if self.duration and not self.max_duration else self.total


def _json_file(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _check_data(data: Any, origin: str) -> dict[str, Any] | list[dict[str, Any]]:
    """ghz's checkData: an object, or a non-empty array of objects."""
    if isinstance(data, dict):
        return data
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        return data
    raise ConfigError(f"{origin}: data must be an object or a non-empty array of objects")


def _check_metadata(metadata: Any, origin: str) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ConfigError(f"{origin}: metadata must be an object of strings")
    return metadata


def load_config(path: str) -> LoadConfig:
    raw = _json_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a ghz config is a JSON object")
    unknown = set(raw) - GHZ_KEYS
    if unknown:
        raise ConfigError(f"{path}: not ghz config keys: {', '.join(sorted(unknown))}")
    unsupported = set(raw) - SUPPORTED_KEYS
    if unsupported:
        raise ConfigError(
            f"{path}: ghz keys grpc_load does not run: {', '.join(sorted(unsupported))}"
        )
    if "call" not in raw or "host" not in raw:
        raise ConfigError(f"{path}: call and host are required")

    def seconds(key: str, default: float) -> float:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(f'{path}: {key} is a Go duration string, e.g. "5s"')
        return parse_duration(value)

    def count(key: str, default: int) -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path}: {key} must be a whole number >= 0")
        return value

    cfg = LoadConfig(
        call=str(raw["call"]),
        host=str(raw["host"]),
        insecure=bool(raw.get("insecure", False)),
        total=count("total", 200),
        duration=seconds("duration", 0.0),
        max_duration=seconds("max-duration", 0.0),
        duration_stop=str(raw.get("duration-stop", "close")).lower(),
        concurrency=count("concurrency", 50),
        connections=count("connections", 1),
        rps=count("rps", 0),
        timeout=seconds("timeout", 20.0),
        connect_timeout=seconds("connect-timeout", 10.0),
        skip_first=count("skipFirst", 0),
        count_errors=bool(raw.get("count-errors", False)),
        name=str(raw.get("name", "")),
        tags=dict(raw.get("tags", {})),
        template_functions=not raw.get("disable-template-functions", False),
        template_data=not raw.get("disable-template-data", False),
    )
    if cfg.duration_stop not in ("close", "wait", "ignore"):
        cfg.duration_stop = "close"  # ghz's fallback
    if raw.get("data-file"):  # ghz: a data file wins over inline data
        cfg.data = _check_data(_json_file(str(raw["data-file"])), str(raw["data-file"]))
    elif "data" in raw:
        cfg.data = _check_data(raw["data"], path)
    if raw.get("metadata-file"):
        cfg.metadata = _check_metadata(_json_file(str(raw["metadata-file"])), path)
    elif "metadata" in raw:
        cfg.metadata = _check_metadata(raw["metadata"], path)
    return cfg


def _validate(cfg: LoadConfig) -> None:
    if cfg.concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    if cfg.connections < 1 or cfg.connections > cfg.concurrency:
        raise ConfigError("connections must be within 1..concurrency (ghz's rule)")
    if not cfg.run_seconds and cfg.total < 1:
        raise ConfigError("total must be at least 1 without a duration")
    if cfg.skip_first and cfg.skip_first >= cfg.requests:
        raise ConfigError("you cannot skip more requests than those run (ghz's rule)")


# --- the method, by reflection -----------------------------------------------------------


@dataclass(frozen=True)
class Method:
    info: MethodInfo
    path: str
    request_class: type[Message]
    response_class: type[Message]


def split_call(call: str) -> tuple[str, str]:
    """ghz accepts 'package.Service/Method' and 'package.Service.Method'."""
    service, sep, method = call.replace("/", ".").rpartition(".")
    if not sep or not service or not method:
        raise ConfigError(f"call {call!r}: expected package.Service.Method")
    return service, method


def resolve_method(host: str, call: str, insecure: bool, timeout: float = 10.0) -> Method:
    """Finds the method and builds its message classes from the server's reflection service
    (blocking: run it off an event loop that serves the same process's servers)."""
    service_name, method_name = split_call(call)
    channel = (
        grpc.insecure_channel(host)
        if insecure
        else grpc.secure_channel(host, grpc.ssl_channel_credentials())
    )
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConfigError(f"cannot connect to {host} within {timeout:g}s") from None
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            raise ConfigError(f"{host} does not serve {service_name} (by reflection)") from None
        except grpc.RpcError as exc:
            raise ConfigError(f"reflection on {host} failed: {exc}") from None
        descriptor: MethodDescriptor | None = service.methods_by_name.get(method_name)
        if descriptor is None:
            raise ConfigError(f"{service_name} has no method {method_name}")
        if descriptor.client_streaming:
            raise ConfigError(
                f"{call} is client streaming: grpc_load runs unary and server streams"
            )
        info = MethodInfo(
            fully_qualified_name=descriptor.full_name,
            method_name=descriptor.name,
            service_name=service.name,
            input_name=descriptor.input_type.name,
            output_name=descriptor.output_type.name,
            client_streaming=descriptor.client_streaming,
            server_streaming=descriptor.server_streaming,
        )
        return Method(
            info,
            f"/{service.full_name}/{descriptor.name}",
            message_factory.GetMessageClass(descriptor.input_type),
            message_factory.GetMessageClass(descriptor.output_type),
        )
    finally:
        channel.close()


# --- requests --------------------------------------------------------------------------------


class Requests:
    """The request bytes and metadata of each request number, from the config's templates.
    An array of data is sent round-robin by request number, as ghz does for unary calls."""

    def __init__(self, cfg: LoadConfig, method: Method) -> None:
        self.method = method
        elements = cfg.data if isinstance(cfg.data, list) else [cfg.data]
        self.data = [
            Template.parse(
                json.dumps(d, ensure_ascii=False),
                enabled=cfg.template_data,
                functions=cfg.template_functions,
            )
            for d in elements
        ]
        # Data without actions is encoded once (ghz caches those messages too).
        self.cached: list[bytes | None] = [
            self._encode(t.render(_NO_CALL_DATA)) if t.static else None for t in self.data
        ]
        self.metadata = Template.parse(
            json.dumps(cfg.metadata, ensure_ascii=False),
            enabled=cfg.template_data,
            functions=cfg.template_functions,
        )
        self.static_metadata = (
            self._metadata(self.metadata.render(_NO_CALL_DATA)) if self.metadata.static else None
        )
        self.dynamic = not (
            all(c is not None for c in self.cached) and self.static_metadata is not None
        )

    def _encode(self, text: str) -> bytes:
        message = self.method.request_class()
        try:
            json_format.Parse(text, message)
        except json_format.ParseError as exc:
            raise ValueError(f"data does not fit {self.method.info.input_name}: {exc}") from None
        return message.SerializeToString()

    @staticmethod
    def _metadata(text: str) -> tuple[tuple[str, str | bytes], ...]:
        pairs: list[tuple[str, str | bytes]] = []
        for key, value in json.loads(text).items():
            key = key.lower()  # gRPC metadata keys are lower case (grpc-go lowers them too)
            # ghz decodes -bin values from base64, as binary headers are given in JSON.
            pairs.append((key, base64.b64decode(value) if key.endswith("-bin") else value))
        return tuple(pairs)

    def build(
        self, worker_id: str, number: int
    ) -> tuple[bytes, tuple[tuple[str, str | bytes], ...]]:
        index = number % len(self.data)
        cd = CallData(self.method.info, worker_id, number) if self.dynamic else _NO_CALL_DATA
        payload = self.cached[index]
        if payload is None:
            payload = self._encode(self.data[index].render(cd))
        metadata = self.static_metadata
        if metadata is None:
            metadata = self._metadata(self.metadata.render(cd))
        return payload, metadata


_NO_CALL_DATA = CallData(MethodInfo("", "", "", "", "", False, False), "", 0)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Result:
    status: str
    error: str
    latency_ns: int
    response: Message | None = None


@dataclass
class RunOutcome:
    results: list[Result]
    total_ns: int
    end_reason: str


def _status_of(exc: grpc.aio.AioRpcError) -> tuple[str, str]:
    name = GO_CODE_NAMES.get(exc.code(), "Unknown")
    return name, f"rpc error: code = {name} desc = {exc.details() or ''}"


async def run_load(cfg: LoadConfig, method: Method, keep_responses: bool = False) -> RunOutcome:
    """Runs the calls: `concurrency` workers on `connections` channels, each taking the next
    request number until `total` (or the duration) is reached; with `rps`, request i starts no
    sooner than i/rps seconds into the run (ghz's constant schedule)."""
    _validate(cfg)
    try:
        requests = Requests(cfg, method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(cfg.data, list) and not cfg.run_seconds and cfg.total > len(cfg.data):
        print(
            f"grpc_load: {cfg.total} requests over {len(cfg.data)} data elements: requests past"
            f" the {len(cfg.data)}th repeat them (round-robin, as in ghz)",
            file=sys.stderr,
        )
    credentials = None if cfg.insecure else grpc.ssl_channel_credentials()
    channels = [
        grpc.aio.insecure_channel(cfg.host)
        if credentials is None
        else grpc.aio.secure_channel(cfg.host, credentials)
        for _ in range(cfg.connections)
    ]
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.channel_ready() for c in channels)), cfg.connect_timeout
            )
        except TimeoutError:
            raise ConfigError(f"cannot connect to {cfg.host}") from None
        callers: list[Any] = [
            c.unary_stream(method.path, None, method.response_class.FromString)
            if method.info.server_streaming
            else c.unary_unary(method.path, None, method.response_class.FromString)
            for c in channels
        ]
        return await _drive(cfg, requests, callers, keep_responses)
    finally:
        for channel in channels:
            await channel.close(None)


async def _drive(
    cfg: LoadConfig, requests: Requests, callers: Sequence[Any], keep: bool
) -> RunOutcome:
    results: list[Result] = []
    limit = cfg.requests
    next_number = 0
    timeout = cfg.timeout or None  # ghz: 0 is no timeout
    start = time.perf_counter()
    deadline = start + cfg.run_seconds if cfg.run_seconds else math.inf
    stopping = False  # past the deadline with duration-stop close/ignore

    async def one(caller: Any, worker_id: str, number: int) -> None:
        try:
            payload, metadata = requests.build(worker_id, number)
        except (ValueError, KeyError) as exc:  # a template that renders no valid request
            results.append(Result("Unknown", str(exc), 0))
            return
        began = time.perf_counter_ns()
        response: Message | None = None
        try:
            if requests.method.info.server_streaming:
                # The call ends with its last message, which is what a follow-up reads.
                async for message in caller(payload, timeout=timeout, metadata=metadata):
                    response = message
            else:
                response = await caller(payload, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            status, error = _status_of(exc)
            results.append(Result(status, error, time.perf_counter_ns() - began))
            return
        except asyncio.CancelledError:
            # Cut at the deadline: duration-stop close reports it (grpc-go's closed-connection
            # error); ignore drops it.
            if cfg.duration_stop == "close":
                error = "rpc error: code = Canceled desc = grpc: the client connection is closing"
                results.append(Result("Canceled", error, time.perf_counter_ns() - began))
            raise
        latency = time.perf_counter_ns() - began
        results.append(Result("OK", "", latency, response if keep else None))

    async def worker(index: int) -> None:
        nonlocal next_number
        caller = callers[index % len(callers)]
        worker_id = f"g0c{index % len(callers)}w{index}"
        while not stopping:
            number = next_number
            if number >= limit:
                return
            next_number += 1
            if cfg.rps:
                wait = start + number / cfg.rps - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            if time.perf_counter() >= deadline or stopping:
                return
            await one(caller, worker_id, number)

    tasks = [asyncio.create_task(worker(i)) for i in range(cfg.concurrency)]
    end_reason = "normal"
    if math.isinf(deadline):
        await asyncio.gather(*tasks)
    else:
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - start))
        if pending:
            end_reason = "timeout"
            if cfg.duration_stop == "wait":  # in-flight calls finish and count
                await asyncio.gather(*pending)
            else:
                stopping = True
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # surfaces a bug in a worker instead of a short report
    total_ns = int((time.perf_counter() - start) * 1e9)
    return RunOutcome(results[cfg.skip_first :], total_ns, end_reason)


# --- ghz's report --------------------------------------------------------------------------


def _latencies(ordered: list[int]) -> list[dict[str, int]]:
    """ghz's latencyDistribution: the value at rank p% (ghz's own rounding of the rank)."""
    out = []
    n = len(ordered)
    for p in PERCENTILES:
        rank = p / 100 * n
        index = int(rank)
        if rank == index:
            index -= 1
        value = ordered[max(index, 0)]
        # ghz leaves a zero latency as an empty entry.
        out.append(
            {"percentage": p, "latency": value} if value > 0 else {"percentage": 0, "latency": 0}
        )
    return out


def _histogram(ordered: list[int]) -> list[dict[str, float | int]]:
    """ghz's histogram: 10 equal buckets from fastest to slowest, marks in seconds."""
    fastest, slowest = ordered[0] / 1e9, ordered[-1] / 1e9
    step = (slowest - fastest) / HISTOGRAM_BUCKETS
    marks = [fastest + step * i for i in range(HISTOGRAM_BUCKETS)] + [slowest]
    counts = [0] * len(marks)
    bucket = 0
    for latency in (x / 1e9 for x in ordered):
        while latency > marks[bucket] and bucket < len(marks) - 1:
            bucket += 1
        counts[bucket] += 1
    return [
        {"mark": mark, "count": c, "frequency": c / len(ordered)}
        for mark, c in zip(marks, counts, strict=True)
    ]


def _redacted(metadata: dict[str, str]) -> dict[str, str]:
    """The options echo the metadata as configured: a template stays (it names where the token
    comes from), a literal credential given with --metadata does not go into a report."""
    return {
        k: v if "{{" in v or k.lower() not in ("authorization", "x-api-key") else "<redacted>"
        for k, v in metadata.items()
    }


def build_report(cfg: LoadConfig, outcome: RunOutcome) -> dict[str, Any]:
    results = outcome.results
    count = len(results)
    total_s = outcome.total_ns / 1e9
    # ghz's field order; `name` and `tags` only when set, as ghz omits them empty.
    report: dict[str, Any] = {"name": cfg.name} if cfg.name else {}
    report |= {
        "endReason": outcome.end_reason,
        "date": datetime.now().astimezone().isoformat("T", "seconds"),
        "options": {
            "call": cfg.call,
            "host": cfg.host,
            "insecure": cfg.insecure,
            "rps": cfg.rps,
            "concurrency": cfg.concurrency,
            "total": cfg.requests,
            "connections": cfg.connections,
            "duration": int(cfg.run_seconds * 1e9),
            "timeout": int(cfg.timeout * 1e9),
            # A data file of thousands of requests (a Settle run's) is shown by its first.
            "data": cfg.data[:1] if isinstance(cfg.data, list) else cfg.data,
            "dataCount": len(cfg.data) if isinstance(cfg.data, list) else 1,
            "metadata": _redacted(cfg.metadata),
            "skipFirst": cfg.skip_first,
            "count-errors": cfg.count_errors,
        },
        "count": count,
        "total": outcome.total_ns,
        "average": 0,
        "fastest": 0,
        "slowest": 0,
        "rps": 0.0,
        "errorDistribution": dict(Counter(r.error for r in results if r.error)),
        "statusCodeDistribution": dict(Counter(r.status for r in results)),
        "latencyDistribution": None,
        "histogram": None,
    }
    if cfg.tags:
        report["tags"] = cfg.tags
    if count:
        report["average"] = sum(r.latency_ns for r in results) // count
        report["rps"] = count / total_s if total_s else 0.0
        # Like ghz: fastest, slowest and the distributions are of the calls that succeeded,
        # unless count-errors includes the failed ones.
        ordered = sorted(r.latency_ns for r in results if not r.error or cfg.count_errors)
        if ordered:
            report["fastest"] = ordered[0]
            report["slowest"] = ordered[-1]
            report["latencyDistribution"] = _latencies(ordered)
            report["histogram"] = _histogram(ordered)
    return report


# --- follow-up data ----------------------------------------------------------------------------


def followup_data(template: dict[str, Any], responses: list[Message]) -> list[dict[str, Any]]:
    """One element per answer: `template` with the fields the answer also has (by proto field
    name, when set) taken from the answer, e.g. a Reserve's reservation_id into a Settle."""
    out = []
    shared: set[str] = set()
    for response in responses:
        answer = json_format.MessageToDict(response, preserving_proto_field_name=True)
        element = copy.deepcopy(template)
        for name in template.keys() & answer.keys():
            element[name] = answer[name]
            shared.add(name)
        out.append(element)
    if responses and not shared:
        raise ConfigError(
            f"no field of the follow-up data ({', '.join(template)}) is in the answers"
        )
    return out


# --- command line ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.grpc_load",
        description="Runs a ghz config file with grpc.aio and prints ghz's JSON report.",
    )
    parser.add_argument("--config", required=True, help="a ghz JSON config (bench/ghz/*.json)")
    parser.add_argument("--host", help="overrides the config's host")
    parser.add_argument("--metadata", help="JSON object; replaces the config's metadata (ghz's -m)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="JSON; replaces the config's data (ghz's -d)")
    source.add_argument("--data-file", help="a JSON data file (ghz's -D); wins over data")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--total", type=int, help="requests to run (drops a config duration)")
    amount.add_argument("--duration", help="run for this long, e.g. 5s (drops a total)")
    parser.add_argument("--concurrency", type=int, help="workers running calls at once")
    parser.add_argument("--rps", type=int, help="requests per second at most (0: no cap)")
    parser.add_argument("--insecure", action="store_true", default=None, help="plaintext")
    parser.add_argument("--followup", help="a config whose data to fill from this run's answers")
    parser.add_argument("--followup-data", help="where to write that data (a JSON array)")
    parser.add_argument("--format", choices=("json", "pretty"), default="json")
    args = parser.parse_args(argv)
    if bool(args.followup) != bool(args.followup_data):
        parser.error("--followup and --followup-data go together")
    return args


def configure(args: argparse.Namespace) -> LoadConfig:
    cfg = load_config(args.config)
    if args.host:
        cfg.host = args.host
    if args.metadata is not None:
        cfg.metadata = _check_metadata(json.loads(args.metadata), "--metadata")
    if args.data is not None:
        cfg.data = _check_data(json.loads(args.data), "--data")
    if args.data_file:
        cfg.data = _check_data(_json_file(args.data_file), args.data_file)
    if args.total is not None:
        cfg.total, cfg.duration, cfg.max_duration = args.total, 0.0, 0.0
    if args.duration:
        cfg.duration, cfg.max_duration = parse_duration(args.duration), 0.0
    if args.concurrency is not None:
        cfg.concurrency = args.concurrency
        cfg.connections = min(cfg.connections, cfg.concurrency)
    if args.rps is not None:
        cfg.rps = args.rps
    if args.insecure:
        cfg.insecure = True
    return cfg


async def _main(args: argparse.Namespace) -> int:
    cfg = configure(args)
    followup = load_config(args.followup) if args.followup else None
    if followup is not None and not isinstance(followup.data, dict):
        raise ConfigError(f"{args.followup}: its data must be one object to fill")
    # Reflection is a blocking client: off the loop, like everything that may share it.
    method = await asyncio.to_thread(
        resolve_method, cfg.host, cfg.call, cfg.insecure, cfg.connect_timeout
    )
    outcome = await run_load(cfg, method, keep_responses=followup is not None)
    report = build_report(cfg, outcome)
    print(json.dumps(report, indent=2 if args.format == "pretty" else None))
    if followup is not None:
        assert isinstance(followup.data, dict)
        answers = [r.response for r in outcome.results if r.response is not None]
        if not answers:
            raise ConfigError("no call succeeded: no follow-up data written")
        data = followup_data(followup.data, answers)
        await asyncio.to_thread(Path(args.followup_data).write_text, json.dumps(data))
        print(
            f"grpc_load: {len(data)} requests for {followup.call} written to {args.followup_data}",
            file=sys.stderr,
        )
    failed = sum(1 for r in outcome.results if r.status != "OK")
    return 1 if failed or not outcome.results else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(f"grpc_load: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
