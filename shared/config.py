"""The one configuration class: every setting comes from the environment (or a `.env` file)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting's error would print every value read, secrets too
    # (it is raised before logging, and its redactor, is set up).
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", hide_input_in_errors=True)

    # --- where things listen and live
    ledger_addr: str = "127.0.0.1:50051"
    gateway_addr: str = "127.0.0.1:50052"
    http_addr: str = "127.0.0.1:8080"
    # Empty: an embedded Postgres keeps its data under data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    db_pool_min: int = Field(default=4, ge=1)
    db_pool_max: int = Field(default=16, ge=1)
    # Ledger group commit (ledger_service/store/group_commit.py): concurrent hot-path calls leave
    # together, at most this many, after at most this wait, with at most this many batches (and
    # so pool connections) in flight. A lone call never waits.
    batch_max_items: int = Field(default=64, ge=1, le=1000)
    batch_max_wait_ms: float = Field(default=2.0, ge=0, le=100)
    batches_in_flight: int = Field(default=4, ge=1)
    log_level: str = "INFO"

    # --- operating it (README "Operating it")
    # json: one JSON object a line; text: for a person at a terminal. Unset: json unless stderr
    # is a terminal.
    log_format: Literal["json", "text"] | None = None
    # One line per request (method, status, latency, user type, tokens charged) at INFO.
    access_log: bool = True
    # The ledger's Prometheus endpoint (`/metrics`); empty: none. The gateway serves `/metrics`
    # on its HTTP edge.
    metrics_addr: str = ""
    # OpenTelemetry: traces are exported over OTLP/HTTP when the endpoint is set, and nothing is
    # instrumented otherwise. The OTEL_* variables of the OpenTelemetry SDK apply as documented.
    otel_exporter_otlp_endpoint: str = ""
    otel_service_name: str = ""

    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Worker processes sharing the service's addresses (SO_REUSEPORT; shared/workers.py). Unset:
    # the ledger runs one per available core; the gateway too when REDIS_URL is set, else one
    # (without Redis each process would enforce the rate limits on its own).
    workers: int | None = Field(default=None, ge=1)

    # --- the money rules (every journal transaction records the rates it used)
    purchase_user_share_percent: int = Field(default=80, ge=0, le=100)
    usage_fee_percent: int = Field(default=25, ge=0, le=1000)

    # --- holds
    reserve_default_ttl_seconds: int = Field(default=300, ge=1)
    reserve_max_ttl_seconds: int = Field(default=3600, ge=1)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    sweep_batch_size: int = Field(default=500, ge=1)

    # --- ledger: what only serves replays, and how long it is kept (0: forever)
    # The answer a keyed call settled with, kept with its hold so a retry gets it back.
    answer_max_bytes: int = Field(default=256 * 1024, ge=0, le=16 * 1024 * 1024)
    answer_retention_seconds: int = Field(default=86_400, ge=0)
    # Idempotency keys the gateway made up for keyless calls (they only dedupe transport retries).
    transient_key_retention_seconds: int = Field(default=86_400, ge=0)
    # Keys callers chose (GenerateText, payments, refunds). Payments stay deduplicated by their
    # (source, external_id) after their key is gone.
    idempotency_key_retention_seconds: int = Field(default=30 * 86_400, ge=0)
    # Resolved dead letters and applied parked payment events.
    resolved_retention_seconds: int = Field(default=90 * 86_400, ge=0)
    retention_interval_seconds: float = Field(default=60.0, gt=0)
    # How often the analytics rollups (usage_daily, usage_monthly) catch up: a day is rolled
    # once it is closed; until then the figures read its records (the answers are the same).
    analytics_rollup_interval_seconds: float = Field(default=300.0, gt=0)
    # Monthly quotas count calendar months in this time zone (an IANA name, e.g. Europe/Paris).
    quota_timezone: str = "UTC"

    # --- service-to-service auth: the ledger mints money, only holders of this token may call it
    ledger_service_token: SecretStr | None = None
    ledger_timeout_seconds: float = Field(default=5.0, gt=0)

    # --- gateway: providers
    anthropic_base_url: str | None = None
    anthropic_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    provider_timeout_seconds: float = Field(default=60.0, gt=0)
    default_max_tokens: int = Field(default=1024, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)

    # --- gateway: server-held prompts (gateway_service/prompts.py documents the files)
    # One TOML file a prompt; unset: no prompts (a call naming one is NOT_FOUND).
    prompts_dir: Path | None = None
    # How often changed files are read again; 0: only on SIGHUP.
    prompts_reload_seconds: float = Field(default=5.0, ge=0)

    # --- gateway: provider retries and circuit breakers (gateway_service/providers/retry.py and
    # breaker.py state the rules). Attempts per call, 1: no retry; waits with full jitter.
    provider_max_attempts: int = Field(default=3, ge=1, le=10)
    provider_retry_base_seconds: float = Field(default=0.25, ge=0)
    provider_retry_max_seconds: float = Field(default=4.0, ge=0)
    # A provider's breaker opens when at least this share of at least BREAKER_MIN_CALLS attempts
    # in the last BREAKER_WINDOW_SECONDS failed, and stays open BREAKER_OPEN_SECONDS.
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_min_calls: int = Field(default=10, ge=1)
    breaker_window_seconds: float = Field(default=30.0, gt=0)
    breaker_open_seconds: float = Field(default=30.0, gt=0)
    # Subscription calls a provider cannot serve now go on down a chain of provider/model pairs
    # (gateway_service/providers/fallback.py), e.g. "anthropic/* > openai/gpt-4o-mini"; empty: none.
    provider_fallbacks: str = ""

    # --- gateway: holds and the calls they pay for
    # A call's hold lives this long and is extended while the call runs; a call that can no
    # longer keep its hold alive is cut (and settled) before the hold expires.
    hold_ttl_seconds: int = Field(default=120, ge=3)
    # A stream's total length, whatever the provider and the client do.
    stream_max_seconds: float = Field(default=3600.0, gt=0)
    # A stream whose client reads nothing for this long is cut and settled for what it got.
    stream_write_timeout_seconds: float = Field(default=20.0, gt=0)

    # --- gateway: rate limits (gateway_service/limits/config.py documents the format)
    # JSON overriding the default limits, or a .json/.toml file of them.
    rate_limits: str = ""
    rate_limits_file: Path | None = None
    # Shared counters for every gateway replica; without it each process limits on its own.
    redis_url: SecretStr | None = None
    # While Redis cannot answer: limit each process on its own ("local") or refuse ("refuse").
    rate_limit_redis_failure: Literal["local", "refuse"] = "local"
    rate_limit_redis_timeout_seconds: float = Field(default=0.25, gt=0)
    # Proxies whose X-Forwarded-For is believed (CIDRs or addresses, comma-separated).
    trusted_proxies: Annotated[list[str], NoDecode] = []

    # --- gateway: JWT
    jwt_secret: SecretStr | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_leeway_seconds: int = Field(default=30, ge=0)
    jwt_tier_claim: str = "tier"
    jwt_quota_claim: str = "quota"
    # Operators: a JWT whose claim JWT_ADMIN_CLAIM holds JWT_ADMIN_VALUE (or a list containing
    # it, e.g. "roles": ["admin"]) may read every user's figures (/v1/admin, GatewayAdmin).
    # Both unset: nobody is an admin.
    jwt_admin_claim: str | None = None
    jwt_admin_value: str | None = None

    # --- gateway: HTTP edge (served on http_addr beside the gRPC API)
    # Browser origins allowed to call it (CORS), comma-separated, e.g.
    # "chrome-extension://abcdefgh,https://app.example.com"; `*` in an entry matches any run of
    # characters ("vscode-webview://*"). Empty: no cross-origin browser calls.
    http_cors_origins: Annotated[list[str], NoDecode] = []
    # Largest request body; a larger one is refused with 413 before it is parsed.
    http_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)

    # --- gateway: what abuse cannot exhaust (connection timeouts and caps; both transports)
    # gateway_service/http/connections.py and stream_slots.py state the rules and why.
    # A new connection's first request must have sent its headers within this many seconds; a
    # later request on the connection, within this many seconds of its first byte (slowloris).
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    # A request's body must have arrived this many seconds after its headers, else 408.
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    # A keep-alive connection with no request under way is closed after this many seconds.
    http_idle_timeout_seconds: float = Field(default=15.0, gt=0)
    # Open HTTP connections at most; the next one is answered 503 TOO_MANY_CONNECTIONS, closed.
    http_max_connections: int = Field(default=10_000, ge=1)
    # Each HTTP connection's kernel send buffer (0: the kernel's own, which grows to megabytes):
    # a client that reads nothing blocks the stream's writes after this much, not minutes later.
    http_send_buffer_bytes: int = Field(default=64 * 1024, ge=0)
    # Streams running at once in this process, gRPC StreamText and HTTP together; the next is
    # refused (HTTP 503 / gRPC RESOURCE_EXHAUSTED, reason TOO_MANY_STREAMS).
    max_concurrent_streams: int = Field(default=1000, ge=1)
    # gRPC servers (the gateway's and the ledger's): a connection must finish its handshake
    # within this many seconds; one with no call for the idle time is closed (GOAWAY; 0: never).
    grpc_handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    grpc_max_connection_idle_seconds: float = Field(default=60.0, ge=0)
    # Keepalive enforcement: a client pinging more often than this with no data is struck, and
    # told to go away after max strikes; pings with no call under way only if permitted.
    grpc_min_ping_interval_seconds: float = Field(default=10.0, gt=0)
    grpc_max_ping_strikes: int = Field(default=2, ge=0)
    grpc_keepalive_permit_without_calls: bool = False
    # Calls at once on one HTTP/2 connection to the gateway's gRPC API (the ledger has none: its
    # one client, the gateway, carries every call on one connection).
    grpc_max_concurrent_streams: int = Field(default=256, ge=1)

    # --- gateway: LemonSqueezy webhooks
    lemonsqueezy_webhook_secret: SecretStr | None = None
    # Server-side catalog: variant id -> tokens per purchase (or per renewal), as JSON, e.g.
    # {"123456": 1000, "654321": {"tokens": 5000, "subscription": true}}. Never from the buyer.
    lemonsqueezy_variant_tokens: str = "{}"
    # Test-mode events: "ignore" them, or "credit" them to a separate test ledger (user ids
    # prefixed "test-mode:"), never to live balances.
    lemonsqueezy_test_mode: Literal["ignore", "credit"] = "ignore"

    @field_validator("quota_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"QUOTA_TIMEZONE: unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        if self.reserve_default_ttl_seconds > self.reserve_max_ttl_seconds:
            raise ValueError("RESERVE_DEFAULT_TTL_SECONDS must not exceed RESERVE_MAX_TTL_SECONDS")
        if self.hold_ttl_seconds > self.reserve_max_ttl_seconds:
            raise ValueError("HOLD_TTL_SECONDS must not exceed RESERVE_MAX_TTL_SECONDS")
        if self.stream_write_timeout_seconds * 2 > self.hold_ttl_seconds:
            # A stalled write must end well before a hold the gateway could not extend expires.
            raise ValueError("STREAM_WRITE_TIMEOUT_SECONDS must be at most HOLD_TTL_SECONDS / 2")
        if self.provider_retry_base_seconds > self.provider_retry_max_seconds:
            raise ValueError(
                "PROVIDER_RETRY_BASE_SECONDS must not exceed PROVIDER_RETRY_MAX_SECONDS"
            )
        if bool(self.jwt_admin_claim) != bool(self.jwt_admin_value):
            raise ValueError("set both JWT_ADMIN_CLAIM and JWT_ADMIN_VALUE, or neither")
        if 0 < self.transient_key_retention_seconds < self.reserve_max_ttl_seconds:
            # A transport retry of a Reserve must still find its key while the hold can live.
            raise ValueError(
                "TRANSIENT_KEY_RETENTION_SECONDS must be at least RESERVE_MAX_TTL_SECONDS"
            )
        return self

    def secret_values(self) -> Iterator[str]:
        """Every secret this process holds, for the log redactor (shared.redact)."""
        urls = [self.database_url or ""]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                yield value.get_secret_value()
                urls.append(value.get_secret_value())  # REDIS_URL: its password alone too
        for url in urls:
            if "://" in url and (password := urlsplit(url).password):
                yield password
                yield unquote(password)  # as a driver has it, and may quote it

    @field_validator("jwt_algorithms", "http_cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        # `JWT_ALGORITHMS=RS256,ES256` reads better in an environment than a JSON list.
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
