"""What an operator sees, on real processes: each service's `/metrics` (two workers each, so the
values of both must add up) moves by exactly what a webhook purchase, a metered call and a stream
did, and the JSON log lines name each request without ever carrying a prompt, key or token.

The ledger's answers are the reference: tokens charged on `/metrics` must equal the sum of the
charges the calls were answered with, and tokens credited what the purchase credited."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import processes
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.logging_setup import JsonFormatter
from tests.chaos.harness import free_port, ledger_env
from tests.conftest import SERVICE_TOKEN
from tests.e2e.conftest import (
    JWT_SECRET,
    PLATFORM_KEY,
    Stack,
    bearer,
    gateway_process_env,
    mint,
)
from tests.ledger_service.helpers import credit
from tests.webhooks.payloads import CATALOG, ONE_TIME_VARIANT, SECRET, encode, order, sign

pytestmark = [pytest.mark.timeout(120)]

MARKER = "MARKER-PROMPT-7f3a9c"
PURCHASED = 1000  # the catalog's one-time variant
CREDITED = 800  # its user share
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Proc:
    service: processes.Service
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=5000))

    def drain(self) -> None:
        def pump() -> None:
            assert self.service.proc.stdout is not None
            for line in self.service.proc.stdout:
                self.lines.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()

    def json_lines(self) -> list[dict[str, object]]:
        """Every log line, parsed: anything that is not JSON fails the test (the start-up lines
        scripts read are the only plain lines)."""
        parsed = []
        for line in list(self.lines):
            if "listening on" in line and not line.startswith("{"):
                continue
            parsed.append(json.loads(line))
        return parsed


@dataclass
class Services:
    ledger: Proc
    gateway: Proc
    http: str
    ledger_metrics: str


@pytest.fixture
def services(database_url: str, sim_url: str, tmp_path: Path) -> Iterator[Services]:
    metrics_addr = f"127.0.0.1:{free_port()}"
    ledger = processes.start(
        "ledger_service",
        {
            **ledger_env(database_url, free_port()),
            "WORKERS": "2",
            "METRICS_ADDR": metrics_addr,
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
        },
    )
    env = gateway_process_env(
        ledger.address,
        sim_url,
        str(tmp_path),
        WORKERS="2",
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        LEMONSQUEEZY_WEBHOOK_SECRET=SECRET,
        LEMONSQUEEZY_VARIANT_TOKENS=CATALOG,
    )
    gateway = processes.start("gateway_service", env)
    try:
        assert gateway.proc.stdout is not None
        second = gateway.proc.stdout.readline()
        assert second.startswith("gateway http listening on "), second
        running = Services(
            Proc(ledger),
            Proc(gateway),
            "http://" + second.rsplit(" ", 1)[1].strip(),
            f"http://{metrics_addr}/metrics",
        )
        running.ledger.drain()
        running.gateway.drain()
        yield running
    finally:
        gateway.stop()
        ledger.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample of the exposition, parsed by prometheus-client's own parser. Two scrapes
    (the workers share the port: either may answer) must agree on what no call moved."""
    async with session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def settled_scrape(session: aiohttp.ClientSession, url: str, ready: str) -> Samples:
    """A scrape once `ready` (a counter the last step moves) has moved: the workers write their
    values as calls end, which may be a moment after the caller got its answer."""
    deadline = time.monotonic() + 10
    while True:
        samples = await scrape(session, url)
        if value(samples, ready) > 0 or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def test_each_worker_reports_its_garbage_collectors_pauses(services: Services) -> None:
    # Every worker (WORKERS=2 for both) sweeps its heap once at start-up: a full collection each.
    async with aiohttp.ClientSession() as session:
        for url in (services.ledger_metrics, f"{services.http}/metrics"):
            deadline = time.monotonic() + 10
            while True:
                samples = await scrape(session, url)
                full = value(samples, "rpcai_gc_pause_seconds_count", generation="2")
                if full >= 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert full >= 2, f"{url}: {full} full collections reported"
            assert value(samples, "rpcai_gc_pause_seconds_sum", generation="2") > 0


async def test_metrics_move_by_what_happened_and_logs_keep_no_secret(services: Services) -> None:
    user = f"ops-{uuid.uuid4().hex[:8]}"
    token = mint(user)
    auth = {"Authorization": f"Bearer {token}"}
    gateway_metrics = f"{services.http}/metrics"
    async with aiohttp.ClientSession() as session:
        ledger_before = await scrape(session, services.ledger_metrics)
        gateway_before = await scrape(session, gateway_metrics)

        body = encode(order("order_created", 9_100_001, user, ONE_TIME_VARIANT))
        async with session.post(
            f"{services.http}/webhooks/lemonsqueezy",
            data=body,
            headers={"X-Signature": sign(body), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["status"] == "applied"

        async with session.post(
            f"{services.http}/v1/generate",
            json={"content": f"[[usage:20,12]] {MARKER}", "maxTokens": 64},
            headers={**auth, "traceparent": TRACEPARENT, "X-Request-Id": "req-unary-1"},
        ) as response:
            assert response.status == 200, await response.text()
            assert response.headers["X-Request-Id"] == "req-unary-1"
            unary_charged = (await response.json())["tokenUsage"]["tokensCharged"]

        stream_charged = None
        async with session.post(
            f"{services.http}/v1/generate/stream",
            json={"content": f"[[usage:30,10]] {MARKER} stream", "maxTokens": 64},
            headers=auth,
        ) as response:
            assert response.status == 200
            stream_request_id = response.headers["X-Request-Id"]
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if "tokenUsage" in event:
                        stream_charged = event["tokenUsage"]["tokensCharged"]
        assert stream_charged is not None
        assert len(stream_request_id) == 32  # none offered: a fresh one

        ledger_after = await settled_scrape(
            session, services.ledger_metrics, "rpcai_ledger_tokens_charged_total"
        )
        gateway_after = await scrape(session, gateway_metrics)

    # The ledger: money moved exactly as answered; every hold opened was settled.
    assert moved(ledger_before, ledger_after, "rpcai_ledger_tokens_charged_total") == (
        unary_charged + stream_charged
    )
    assert moved(ledger_before, ledger_after, "rpcai_ledger_tokens_credited_total") == CREDITED
    assert (
        moved(ledger_before, ledger_after, "rpcai_ledger_purchase_fee_tokens_total")
        == PURCHASED - CREDITED
    )
    # The fee is a quarter of provider usage (32 and 40 tokens), part of what was charged.
    assert moved(ledger_before, ledger_after, "rpcai_ledger_usage_fee_tokens_total") == 8 + 10
    assert moved(ledger_before, ledger_after, "rpcai_ledger_holds_total", event="opened") == 2
    assert moved(ledger_before, ledger_after, "rpcai_ledger_holds_total", event="settled") == 2
    assert moved(ledger_before, ledger_after, "rpcai_ledger_holds_total", event="released") == 0
    assert value(ledger_after, "rpcai_ledger_holds_open") == 0
    assert value(ledger_after, "rpcai_ledger_dead_letters_open") == 0
    assert (
        moved(
            ledger_before,
            ledger_after,
            "rpcai_grpc_server_handled_total",
            grpc_service="rpcai.ledger.v1.LedgerService",
            grpc_method="CreditPurchase",
            grpc_code="OK",
        )
        == 1
    )
    assert "rpcai_ledger_db_pool_connections_in_use" in {name for name, _ in ledger_after}

    # The gateway: one request per route, the provider twice, one webhook applied.
    for route in ("/v1/generate", "/v1/generate/stream", "/webhooks/lemonsqueezy"):
        assert (
            moved(
                gateway_before,
                gateway_after,
                "rpcai_http_requests_total",
                route=route,
                method="POST",
                status="200",
            )
            == 1
        ), route
    assert (
        moved(
            gateway_before,
            gateway_after,
            "rpcai_provider_calls_total",
            provider="anthropic",
            model="claude-haiku-4-5",
            outcome="ok",
        )
        == 2
    )
    assert (
        moved(
            gateway_before,
            gateway_after,
            "rpcai_provider_time_to_first_token_seconds_count",
            provider="anthropic",
            model="claude-haiku-4-5",
        )
        == 1
    )
    assert (
        moved(
            gateway_before,
            gateway_after,
            "rpcai_webhook_events_total",
            source="lemonsqueezy",
            kind="order_created",
            outcome="applied",
        )
        == 1
    )
    assert value(gateway_after, "rpcai_gateway_outbox_depth") == 0
    # The hot-path writes travel on one stream; the gateway counts and times each.
    for write in ("reserve", "settle"):
        assert (
            moved(
                gateway_before,
                gateway_after,
                "rpcai_ledger_client_writes_total",
                write=write,
                outcome="ok",
            )
            == 2
        ), write
        assert (
            moved(
                gateway_before,
                gateway_after,
                "rpcai_ledger_client_write_duration_seconds_count",
                write=write,
            )
            == 2
        ), write

    # The logs: JSON, one access line per request naming it, and no secret anywhere.
    gateway_lines = services.gateway.json_lines()
    ledger_lines = services.ledger.json_lines()
    unary_line = next(
        line
        for line in gateway_lines
        if line.get("logger") == "rpcai.access" and line.get("request_id") == "req-unary-1"
    )
    assert unary_line["trace_id"] == TRACE_ID
    assert unary_line["method"] == "POST /v1/generate"
    assert unary_line["status"] == "200"
    assert unary_line["user_type"] == "subscription"
    assert unary_line["tokens_charged"] == unary_charged
    assert isinstance(unary_line["latency_ms"], float)
    # One line per request: aiohttp's own access line (the caller's address, the request line)
    # is not written beside ours.
    assert [line for line in gateway_lines if line.get("request_id") == "req-unary-1"] == [
        unary_line
    ]
    assert not [line for line in gateway_lines if line.get("logger") == "aiohttp.access"]
    stream_line = next(
        line for line in gateway_lines if line.get("request_id") == stream_request_id
    )
    assert stream_line["tokens_charged"] == stream_charged
    assert any(
        line.get("logger") == "rpcai.access"
        and str(line.get("method")).startswith("/rpcai.ledger.v1.LedgerService/")
        for line in ledger_lines
    )
    everything = "\n".join([*services.gateway.lines, *services.ledger.lines])
    for secret in (MARKER, token, PLATFORM_KEY, SERVICE_TOKEN, SECRET, JWT_SECRET):
        assert secret not in everything, secret[:12]


async def test_grpc_calls_name_their_request_in_trailers_and_one_access_line(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Over gRPC the request id comes back in the trailers, also when the call is refused (the
    servicer's own trailers, such as rate state and rich errors, are kept beside it), and each
    call is one access line with its code and what it charged."""
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 10_000)
    caplog.set_level(logging.INFO, logger="rpcai.access")
    call = stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=f"[[usage:20,12]] {MARKER}", max_tokens=64),
        metadata=(*auth, ("x-request-id", "grpc-req-1"), ("traceparent", TRACEPARENT)),
    )
    reply = await call
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "grpc-req-1"

    refused = stack.stub.GenerateText(
        gpb.GenerateTextRequest(content="hello"), metadata=bearer("not-a-jwt")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused_trailers = dict(caught.value.trailing_metadata() or ())
    assert len(str(refused_trailers["x-request-id"])) == 32
    assert "grpc-status-details-bin" in refused_trailers  # the rich error is still there

    lines = [r for r in caplog.records if r.name == "rpcai.access"]
    ours = [r for r in lines if getattr(r, "request_id", "") == "grpc-req-1"]
    assert len(ours) == 1
    line = ours[0]
    assert line.__dict__["method"] == "/rpcai.gateway.v1.AiGateway/GenerateText"
    assert line.__dict__["status"] == "OK"
    assert line.__dict__["trace_id"] == TRACE_ID
    assert line.__dict__["tokens_charged"] == reply.token_usage.tokens_charged
    assert line.__dict__["user_type"] == "subscription"
    refused_line = [
        r for r in lines if r.__dict__["request_id"] == refused_trailers["x-request-id"]
    ]
    assert [r.__dict__["status"] for r in refused_line] == ["UNAUTHENTICATED"]
    formatted = JsonFormatter("gateway").format(line)
    assert json.loads(formatted)["request_id"] == "grpc-req-1"
    assert MARKER not in formatted
