"""`python -m bench.grpc_load` run as a command against the real services with every ghz config
in bench/ghz/: the report has ghz's fields and only OK calls; a Settle run settles the holds of
the Reserve run before it (the ledger's balance says so); a wrong token is counted as errors and
fails the command. Plus the parts that need no server: templates, durations, the configs' keys."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.grpc_load import (
    GHZ_KEYS,
    CallData,
    ConfigError,
    MethodInfo,
    Result,
    RunOutcome,
    Template,
    build_report,
    load_config,
    parse_duration,
)
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH, SERVICE_TOKEN, LedgerHarness
from tests.e2e.conftest import Stack, mint

ROOT = Path(__file__).resolve().parents[2]
GHZ = ROOT / "bench" / "ghz"
CONFIGS = {
    "ledger_credit.json",
    "ledger_reserve.json",
    "ledger_settle.json",
    "gateway_generate_text.json",
    "gateway_user_status.json",
}
REPORT_FIELDS = {
    "count",
    "total",
    "average",
    "fastest",
    "slowest",
    "rps",
    "latencyDistribution",
    "histogram",
    "statusCodeDistribution",
    "errorDistribution",
}
BENCH_USER = "bench-user"  # the user the configs name
CREDITED = 800_000_000_000  # ledger_credit.json buys 10**12 tokens; 80% are usable
RUN = "1.5s"


async def grpc_load(*args: str, **env: str) -> tuple[int, dict[str, Any], str]:
    """Runs the command (its own process, so the servers in this one keep serving) and returns
    its exit status, its report and its stderr."""
    base = {k: v for k, v in os.environ.items() if k not in ("LEDGER_SERVICE_TOKEN", "RPCAI_JWT")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.grpc_load",
        *args,
        cwd=ROOT,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    report = json.loads(out) if out.strip() else {}
    return proc.returncode, report, err.decode()


def assert_all_ok(report: dict[str, Any]) -> None:
    assert report.keys() >= REPORT_FIELDS
    assert report["count"] > 0
    assert report["statusCodeDistribution"] == {"OK": report["count"]}, report
    assert report["errorDistribution"] == {}
    # ghz's units: durations in nanoseconds, ordered as their names say.
    assert 0 < report["fastest"] <= report["average"] <= report["slowest"] < report["total"]
    assert [d["percentage"] for d in report["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    latencies = [d["latency"] for d in report["latencyDistribution"]]
    assert latencies == sorted(latencies)
    assert report["fastest"] <= latencies[0] <= latencies[-1] <= report["slowest"]
    assert sum(b["count"] for b in report["histogram"]) == report["count"]
    assert report["rps"] == pytest.approx(report["count"] / (report["total"] / 1e9))


def config(name: str) -> str:
    return str(GHZ / name)


async def test_ledger_reserve_then_settle_settles_real_holds(
    ledger: LedgerHarness, tmp_path: Path
) -> None:
    token = {"LEDGER_SERVICE_TOKEN": SERVICE_TOKEN}
    host = ("--host", ledger.address)
    code, credit, err = await grpc_load("--config", config("ledger_credit.json"), *host, **token)
    assert code == 0, err
    assert_all_ok(credit)
    assert credit["count"] == 1

    holds_file = tmp_path / "settle-data.json"
    code, reserve, err = await grpc_load(
        "--config",
        config("ledger_reserve.json"),
        *host,
        "--duration",
        RUN,
        "--concurrency",
        "16",
        "--followup",
        config("ledger_settle.json"),
        "--followup-data",
        str(holds_file),
        **token,
    )
    assert code == 0, err
    assert_all_ok(reserve)
    assert reserve["endReason"] == "timeout"  # ghz's word for a run its duration ended
    holds = json.loads(holds_file.read_text())
    assert len(holds) == reserve["count"]
    assert len({h["reservation_id"] for h in holds}) == len(holds)
    assert all(h["user_id"] == BENCH_USER and h["usage"]["input_tokens"] == 30 for h in holds)
    balance = await ledger.stub.GetBalance(lpb.GetBalanceRequest(user_id=BENCH_USER), metadata=AUTH)
    assert balance.balance.reserved_tokens == 125 * len(holds)  # 100 + the 25% fee, each

    code, settle, err = await grpc_load(
        "--config",
        config("ledger_settle.json"),
        *host,
        "--data-file",
        str(holds_file),
        "--total",
        str(len(holds)),
        "--concurrency",
        "16",
        **token,
    )
    assert code == 0, err
    assert_all_ok(settle)
    assert settle["count"] == len(holds)
    assert settle["endReason"] == "normal"
    # Every hold settled once, for 80 used + 20 fee; nothing left on hold.
    balance = await ledger.stub.GetBalance(lpb.GetBalanceRequest(user_id=BENCH_USER), metadata=AUTH)
    assert balance.balance.reserved_tokens == 0
    assert balance.balance.available_tokens == CREDITED - 100 * len(holds)


async def test_gateway_configs(stack: Stack) -> None:
    await stack.ledger.stub.CreditPurchase(
        lpb.CreditPurchaseRequest(
            idempotency_key="bench-credit",
            user_id=BENCH_USER,
            tokens_purchased=10**12,
            purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
            external_id="bench-credit",
            source="test",
        ),
        metadata=AUTH,
    )
    jwt = {"RPCAI_JWT": mint(BENCH_USER)}
    host = ("--host", f"127.0.0.1:{stack.gateway.grpc.port}")
    code, generate, err = await grpc_load(
        "--config",
        config("gateway_generate_text.json"),
        *host,
        "--duration",
        RUN,
        "--concurrency",
        "8",
        **jwt,
    )
    assert code == 0, err
    assert_all_ok(generate)
    # Each call charged 32 used + 8 fee (the prompt's [[usage:20,12]]).
    status = await stack.ledger.stub.GetBalance(
        lpb.GetBalanceRequest(user_id=BENCH_USER), metadata=AUTH
    )
    assert status.balance.available_tokens == CREDITED - 40 * generate["count"]

    # With an rps cap: request i starts i/rps seconds into the run, at most.
    code, user_status, err = await grpc_load(
        "--config",
        config("gateway_user_status.json"),
        *host,
        "--duration",
        RUN,
        "--concurrency",
        "4",
        "--rps",
        "20",
        **jwt,
    )
    assert code == 0, err
    assert_all_ok(user_status)
    assert 10 <= user_status["count"] <= 31


async def test_a_wrong_token_is_counted_as_errors_and_fails(stack: Stack) -> None:
    code, report, _ = await grpc_load(
        "--config",
        config("ledger_reserve.json"),
        "--host",
        stack.ledger.address,
        "--total",
        "20",
        "--concurrency",
        "4",
        LEDGER_SERVICE_TOKEN="not-the-service-token",
    )
    assert code == 1
    assert report["count"] == 20
    assert report["statusCodeDistribution"] == {"Unauthenticated": 20}
    assert sum(report["errorDistribution"].values()) == 20
    assert all(
        e.startswith("rpc error: code = Unauthenticated") for e in report["errorDistribution"]
    )
    assert report["latencyDistribution"] is None  # ghz: no successful call, no distribution

    # ghz's -m: --metadata replaces the config's metadata, token included (and the report does
    # not echo a literal credential).
    code, report, _ = await grpc_load(
        "--config",
        config("gateway_user_status.json"),
        "--host",
        f"127.0.0.1:{stack.gateway.grpc.port}",
        "--total",
        "5",
        "--concurrency",
        "5",
        "--metadata",
        json.dumps({"authorization": "Bearer not-a-jwt"}),
    )
    assert code == 1
    assert report["statusCodeDistribution"] == {"Unauthenticated": 5}
    assert report["options"]["metadata"] == {"authorization": "<redacted>"}

    # The Settle config run without a Reserve run's data names no hold: it says so.
    code, report, _ = await grpc_load(
        "--config",
        config("ledger_settle.json"),
        "--host",
        stack.ledger.address,
        "--total",
        "3",
        "--concurrency",
        "3",
        LEDGER_SERVICE_TOKEN=SERVICE_TOKEN,
    )
    assert code == 1
    assert report["statusCodeDistribution"] == {"NotFound": 3}


def test_every_config_is_run_here_and_is_a_ghz_config_without_a_token() -> None:
    assert {p.name for p in GHZ.glob("*.json")} == CONFIGS
    for name in CONFIGS:
        raw = json.loads((GHZ / name).read_text())
        assert set(raw) <= GHZ_KEYS, name
        assert "proto" not in raw
        assert "protoset" not in raw
        assert raw["metadata"]["authorization"].startswith("Bearer {{env `"), name
        load_config(str(GHZ / name))  # and grpc_load runs it as it is


def test_templates_render_ghz_call_data_and_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_TEST_TOKEN", "s3cret")
    info = MethodInfo("p.S.M", "M", "S", "MReq", "MResp", False, False)
    cd = CallData(info, "g0c0w1", 7)
    text = Template.parse(
        "{{.RequestNumber}}|{{ .MethodName }}|{{.UUID}}|{{newUUID}}|{{randomString 8}}"
        "|{{randomInt 3 4}}|{{env `BENCH_TEST_TOKEN`}}|{{.IsServerStreaming}}"
    ).render(cd)
    number, method, call_uuid, new_uuid, random8, three, token, streaming = text.split("|")
    assert (number, method, three, token, streaming) == ("7", "M", "3", "s3cret", "false")
    assert len(call_uuid) == len(new_uuid) == 36
    assert call_uuid != new_uuid
    assert len(random8) == 8
    assert random8.isalnum()
    assert Template.parse("{{.UUID}}", enabled=False).render(cd) == "{{.UUID}}"
    # In a JSON config a double-quoted argument reads \" and Go's parser refuses it: say so.
    with pytest.raises(ConfigError, match="backquotes"):
        Template.parse('Bearer {{env \\"TOKEN\\"}}')
    with pytest.raises(ConfigError):
        Template.parse("{{.NoSuchField}}")
    with pytest.raises(ConfigError):
        Template.parse("{{newUUID}}", functions=False)


def test_go_durations_and_ghz_report_arithmetic() -> None:
    assert parse_duration("1m30s") == 90
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration("1.5s") == pytest.approx(1.5)
    with pytest.raises(ConfigError):
        parse_duration("5")
    cfg = load_config(config("ledger_settle.json"))
    results = [Result("OK", "", ms * 1_000_000) for ms in range(1, 11)]
    results.append(Result("NotFound", "rpc error: code = NotFound desc = x", 50_000_000))
    report = build_report(cfg, RunOutcome(results, 1_000_000_000, "normal"))
    assert report["count"] == 11
    assert report["rps"] == 11.0
    assert report["average"] == (55 + 50) * 1_000_000 // 11  # every call, as ghz averages
    assert (report["fastest"], report["slowest"]) == (1_000_000, 10_000_000)  # OK calls only
    # ghz's ranks: p10 of 10 values is the 1st, p50 the 5th, p95 and p99 the 10th.
    by_percent = {d["percentage"]: d["latency"] for d in report["latencyDistribution"]}
    assert by_percent == {
        10: 1_000_000,
        25: 3_000_000,
        50: 5_000_000,
        75: 8_000_000,
        90: 9_000_000,
        95: 10_000_000,
        99: 10_000_000,
    }
    assert report["statusCodeDistribution"] == {"OK": 10, "NotFound": 1}
