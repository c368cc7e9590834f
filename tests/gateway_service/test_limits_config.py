"""The rate-limit configuration as an operator meets it:

- it loads from each documented source: `RATE_LIMITS` (JSON in the environment) and
  `RATE_LIMITS_FILE` (a .json or a .toml file), each overriding only what it names (a tier it
  adds starts from the `default` tier, whatever order the tiers are written in);
- `0` means unlimited, per limit and for the failed-key attempts;
- a bad configuration is refused with an error naming what is wrong, and the gateway process
  does not start on it;
- with no configuration at all, a fresh install is protected: public callers, failed key
  attempts and every caller's calls in flight are limited, with the numbers the README states;
  the edge's connection timeouts default to seconds, as the README states them.

The limits are exercised through the gateway's own gate (`build_rate_gate`, the local limiter)
with its clock held still, so every count is exact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_service.app import build_rate_gate
from gateway_service.errors import GatewayError
from gateway_service.http.connections import ConnectionLimits
from gateway_service.limits.config import DEFAULT_TIER, Limit, LimitsConfig, load_limits
from gateway_service.limits.gate import Admission, Caller, RateGate
from gateway_service.limits.limiter import LocalLimiter
from shared.config import Settings
from shared.grpc_server import server_options

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# What the README's "Rate limits and monthly quotas" table states as the defaults.
README_PUBLIC = Limit(requests_per_minute=30, calls_in_flight=4)
README_BYOK = Limit(requests_per_minute=1200, calls_in_flight=16)
README_SUBSCRIPTION = Limit(requests_per_minute=600, calls_in_flight=16)
README_FAILED_KEYS_PER_MINUTE = 10

# One configuration, written three ways.
OVERRIDES = {
    "public": {"requests_per_minute": 7},
    "subscription": {"pro": {"tokens_per_minute": 5000, "monthly_quota": 90000}},
    "failed_key_attempts_per_minute": 3,
}
OVERRIDES_TOML = """\
failed_key_attempts_per_minute = 3

[public]
requests_per_minute = 7

[subscription.pro]
tokens_per_minute = 5000
monthly_quota = 90000
"""
EXPECTED = LimitsConfig(
    # Only what is named changes: the public calls in flight stay at their default.
    public=Limit(requests_per_minute=7, calls_in_flight=4),
    byok=README_BYOK,
    subscription={
        DEFAULT_TIER: README_SUBSCRIPTION,
        # A new tier starts from the default tier's limits.
        "pro": Limit(
            requests_per_minute=600, tokens_per_minute=5000, calls_in_flight=16, monthly_quota=90000
        ),
    },
    failed_key_attempts_per_minute=3,
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with none of the settings set (whatever the machine running us has)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class FrozenClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def gate_of(config: LimitsConfig) -> RateGate:
    """The gate `build_rate_gate` builds without Redis, on a clock that does not move."""
    return RateGate(LocalLimiter(clock=FrozenClock()), config, lease_seconds=3660)


def public(address: str = "203.0.113.7", key: str = "sk-caller") -> Caller:
    return Caller(None, False, None, address, key)


def subscriber(user: str = "user-1", tier: str | None = None) -> Caller:
    return Caller(user, False, tier)


def byok(user: str = "user-1") -> Caller:
    return Caller(user, True)


async def admitted(gate: RateGate, caller: Caller, calls: int) -> list[Admission]:
    """Admits `calls` calls of `caller` (left in flight), failing if any is refused."""
    return [await gate.admit(caller, 100) for _ in range(calls)]


async def refusal(gate: RateGate, caller: Caller) -> str:
    with pytest.raises(GatewayError) as refused:
        await gate.admit(caller, 100)
    return refused.value.reason


# ---- each documented source --------------------------------------------------------------------


def test_rate_limits_json_in_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("RATE_LIMITS", json.dumps(OVERRIDES))
    gate = build_rate_gate(Settings(_env_file=None))
    assert gate.config == EXPECTED
    assert gate.limit_of(public()) == EXPECTED.public
    assert gate.limit_of(subscriber(tier="pro")) == EXPECTED.subscription["pro"]
    # The tier's monthly quota applies unless the JWT's quota claim sets one.
    assert gate.monthly_quota("pro", None) == 90000
    assert gate.monthly_quota("pro", 1234) == 1234
    assert gate.monthly_quota(None, None) == 0


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_rate_limits_file(env: pytest.MonkeyPatch, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"limits{suffix}"
    path.write_text(json.dumps(OVERRIDES) if suffix == ".json" else OVERRIDES_TOML)
    env.setenv("RATE_LIMITS_FILE", str(path))
    settings = Settings(_env_file=None)
    assert settings.rate_limits_file == path
    assert build_rate_gate(settings).config == EXPECTED


def test_a_tier_starts_from_the_configured_default_whatever_the_order(tmp_path: Path) -> None:
    """JSON objects and TOML tables have no order that means anything: a tier written before
    `default` inherits the configured default just as one written after it."""
    default_first = tmp_path / "default-first.toml"
    default_first.write_text(
        "[subscription.default]\ncalls_in_flight = 2\n\n[subscription.pro]\ntokens_per_minute = 9\n"
    )
    pro_first = tmp_path / "pro-first.toml"
    pro_first.write_text(
        "[subscription.pro]\ntokens_per_minute = 9\n\n[subscription.default]\ncalls_in_flight = 2\n"
    )
    expected = Limit(requests_per_minute=600, tokens_per_minute=9, calls_in_flight=2)
    assert load_limits("", default_first).subscription["pro"] == expected
    assert load_limits("", pro_first).subscription["pro"] == expected
    inline = (
        '{"subscription": {"pro": {"tokens_per_minute": 9}, "default": {"calls_in_flight": 2}}}'
    )
    assert load_limits(inline, None).subscription["pro"] == expected


def test_a_tier_the_configuration_does_not_name_gets_the_default_tier() -> None:
    config = load_limits(json.dumps(OVERRIDES), None)
    assert config.for_tier("enterprise-trial") == config.subscription[DEFAULT_TIER]
    assert config.for_tier(None) == config.subscription[DEFAULT_TIER]


# ---- 0 means unlimited -------------------------------------------------------------------------


async def test_zero_means_unlimited() -> None:
    zero = {"requests_per_minute": 0, "tokens_per_minute": 0, "calls_in_flight": 0}
    config = load_limits(
        json.dumps(
            {
                "public": zero,
                "byok": zero,
                "subscription": {"default": zero},
                "failed_key_attempts_per_minute": 0,
            }
        ),
        None,
    )
    assert config.public.unlimited
    assert config.byok.unlimited
    assert config.for_tier(None).unlimited
    gate = gate_of(config)
    for caller in (public(), byok(), subscriber()):
        # Far past any default, all at once and none finished: nothing is refused.
        await admitted(gate, caller, 200)
    for _ in range(50):
        await gate.key_refused(public())
    await admitted(gate, public(), 1)


async def test_zero_lifts_only_the_limit_it_names() -> None:
    config = load_limits('{"public": {"requests_per_minute": 0}}', None)
    assert config.public == Limit(requests_per_minute=0, calls_in_flight=4)
    gate = gate_of(config)
    calls = await admitted(gate, public(), 4)
    assert await refusal(gate, public()) == "TOO_MANY_CALLS_IN_FLIGHT"
    for call in calls:
        await call.finish(0)
    # Requests per minute are not limited: far past the default 30, on the same frozen clock.
    for _ in range(100):
        for call in await admitted(gate, public(), 1):
            await call.finish(0)


# ---- bad configurations ------------------------------------------------------------------------


BAD = [
    ('{"publik": {"requests_per_minute": 5}}', "unknown section(s) publik"),
    ('{"public": {"requests_per_second": 5}}', "public.requests_per_second is not a limit"),
    ('{"byok": {"calls_in_flight": -1}}', "byok.calls_in_flight must be a whole number >= 0"),
    ('{"public": {"requests_per_minute": 1.5}}', "public.requests_per_minute must be a whole"),
    ('{"public": {"requests_per_minute": "30"}}', "public.requests_per_minute must be a whole"),
    ('{"public": {"calls_in_flight": true}}', "public.calls_in_flight must be a whole"),
    ('{"public": 30}', "public must be a table of limits"),
    ('{"subscription": [1, 2]}', "subscription must be a table of tiers"),
    ('{"subscription": {"pro": 5}}', "subscription.pro must be a table of limits"),
    (
        '{"subscription": {"pro": {"monthly_quota": -5}}}',
        "subscription.pro.monthly_quota must be a whole number >= 0",
    ),
    ('{"failed_key_attempts_per_minute": -1}', "failed_key_attempts_per_minute must be a whole"),
    ('{"failed_key_attempts_per_minute": "10"}', "failed_key_attempts_per_minute must be a"),
    ('{"failed_key_attempts_per_minute": false}', "failed_key_attempts_per_minute must be a"),
    ("[1, 2]", "the configuration must be a table"),
]


@pytest.mark.parametrize(("raw", "message"), BAD)
def test_a_bad_configuration_is_refused_with_a_clear_error(
    env: pytest.MonkeyPatch, raw: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        load_limits(raw, None)
    assert str(refused.value).startswith("rate limits: ")
    # The gateway builds its gate the same way, from the same setting.
    env.setenv("RATE_LIMITS", raw)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_rate_gate(Settings(_env_file=None))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("broken.json", '{"public": {"requests_per_minute": 5}', "line 1"),
        ("broken.toml", "[public\nrequests_per_minute = 5\n", "line 1"),
        ("negative.toml", "[public]\nrequests_per_minute = -5\n", "public.requests_per_minute"),
        ("array.json", "[]", "the configuration must be a table"),
    ],
)
def test_a_bad_rate_limits_file_is_refused(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_limits("", path)


def test_a_missing_rate_limits_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "limits.toml"
    with pytest.raises(OSError, match=re.escape(str(missing))):
        load_limits("", missing)


def test_the_gateway_does_not_start_on_a_bad_configuration(tmp_path: Path) -> None:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in Settings.model_fields and not k.startswith("PYTEST")
    }
    environment.update(
        {
            "LEDGER_ADDR": "127.0.0.1:9",
            "LEDGER_SERVICE_TOKEN": "any-token",
            "JWT_SECRET": "a-jwt-secret-that-is-long-enough-for-hs256",
            "GATEWAY_ADDR": "127.0.0.1:0",
            "HTTP_ADDR": "127.0.0.1:0",
            "DATA_DIR": str(tmp_path),
            "RATE_LIMITS": '{"public": {"requests_per_minute": -30}}',
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "gateway_service"],
        cwd=tmp_path,  # no .env of the checkout's
        env={**environment, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0
    assert "listening" not in run.stdout
    assert "rate limits: public.requests_per_minute must be a whole number >= 0" in run.stderr


# ---- the defaults ------------------------------------------------------------------------------


def _readme_row(first_cell: str) -> str:
    row = next(line for line in README.splitlines() if line.startswith(f"| {first_cell} |"))
    return row.replace(",", "")


def test_the_readme_states_the_default_limits_this_test_expects() -> None:
    """The numbers below are the README's; if the README changes, so must this test."""
    assert "600 requests/min 16 calls in flight" in _readme_row("subscription (JWT, no key)")
    assert "1200 requests/min 16 calls in flight" in _readme_row("BYOK (JWT + own key)")
    assert "30 requests/min 4 calls in flight" in _readme_row("public (own key, no JWT)")
    assert "10 refused keys/min" in _readme_row("public, provider key refused")


def test_the_defaults_are_the_documented_ones(env: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    assert (settings.rate_limits, settings.rate_limits_file) == ("", None)
    config = build_rate_gate(settings).config
    assert config == LimitsConfig()
    assert config.public == README_PUBLIC
    assert config.byok == README_BYOK
    assert dict(config.subscription) == {DEFAULT_TIER: README_SUBSCRIPTION}
    assert config.failed_key_attempts_per_minute == README_FAILED_KEYS_PER_MINUTE
    # What a fresh install must never be without.
    assert config.public.requests_per_minute > 0
    assert config.failed_key_attempts_per_minute > 0
    for limit in (config.public, config.byok, config.for_tier(None), config.for_tier("x")):
        assert limit.calls_in_flight > 0
        assert not limit.unlimited
    # No monthly quota unless one is configured or claimed.
    assert config.for_tier(None).monthly_quota == 0


async def test_a_fresh_install_limits_public_callers(env: pytest.MonkeyPatch) -> None:
    gate = gate_of(build_rate_gate(Settings(_env_file=None)).config)
    # Calls in flight: 4 from one address at once, the 5th waits.
    calls = await admitted(gate, public(key="sk-a"), 4)
    assert await refusal(gate, public(key="sk-b")) == "TOO_MANY_CALLS_IN_FLIGHT"
    for call in calls:
        await call.finish(0)
    # Requests per minute: 30 from one address (4 taken above), then refused; different keys
    # do not help, and another address is counted apart.
    for n in range(26):
        for call in await admitted(gate, public(key=f"sk-{n}"), 1):
            await call.finish(0)
    assert await refusal(gate, public(key="sk-new")) == "RATE_LIMITED"
    await admitted(gate, public(address="198.51.100.1", key="sk-other"), 1)


async def test_a_fresh_install_limits_failed_key_attempts(env: pytest.MonkeyPatch) -> None:
    gate = gate_of(build_rate_gate(Settings(_env_file=None)).config)
    for _ in range(9):
        await gate.key_refused(public(key="sk-stolen"))
    for call in await admitted(gate, public(key="sk-good"), 1):
        await call.finish(0)
    await gate.key_refused(public(key="sk-stolen"))  # the 10th refused key
    assert await refusal(gate, public(key="sk-good")) == "RATE_LIMITED"
    # Another address has tested no key.
    await admitted(gate, public(address="198.51.100.2", key="sk-good"), 1)


@pytest.mark.parametrize(
    "caller",
    [subscriber(), subscriber(tier="no-such-tier"), byok()],
    ids=["subscription", "unknown-tier", "byok"],
)
async def test_a_fresh_install_limits_every_callers_calls_in_flight(
    env: pytest.MonkeyPatch, caller: Caller
) -> None:
    gate = gate_of(build_rate_gate(Settings(_env_file=None)).config)
    calls = await admitted(gate, caller, 16)
    assert await refusal(gate, caller) == "TOO_MANY_CALLS_IN_FLIGHT"
    await calls[0].finish(0)
    await admitted(gate, caller, 1)
    # Another user has slots of its own.
    await admitted(gate, Caller("user-2", caller.byok, caller.tier), 1)


# ---- the edge's connection timeouts ------------------------------------------------------------

# Seconds, as the README's tables state them.
EDGE_TIMEOUTS = {
    "HTTP_HEADER_TIMEOUT_SECONDS": 10,
    "HTTP_BODY_TIMEOUT_SECONDS": 30,
    "HTTP_IDLE_TIMEOUT_SECONDS": 15,
    "GRPC_HANDSHAKE_TIMEOUT_SECONDS": 10,
    "GRPC_MAX_CONNECTION_IDLE_SECONDS": 60,
}


def test_the_readme_states_the_edge_timeouts_this_test_expects() -> None:
    for name, seconds in EDGE_TIMEOUTS.items():
        assert f"| `{name}` | `{seconds}` |" in README, name


def test_the_edge_connection_timeouts_default_to_seconds(env: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    for name, seconds in EDGE_TIMEOUTS.items():
        assert getattr(settings, name.lower()) == seconds, name
        assert 0 < seconds <= 60, name  # seconds, never minutes or "forever"
    # And that is what the servers are given.
    limits = ConnectionLimits.from_settings(settings)
    assert (limits.header_timeout, limits.body_timeout, limits.idle_timeout) == (10, 30, 15)
    options = dict(server_options(settings, per_connection_streams=True))
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 60_000
