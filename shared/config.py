"""The one configuration class: every setting comes from the environment (or a `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # --- where things listen and live
    ledger_addr: str = "127.0.0.1:50051"
    gateway_addr: str = "127.0.0.1:50052"
    http_addr: str = "127.0.0.1:8080"
    # Empty: an embedded Postgres keeps its data under data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    db_pool_min: int = Field(default=4, ge=1)
    db_pool_max: int = Field(default=16, ge=1)
    log_level: str = "INFO"
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    # --- the money rules (every journal transaction records the rates it used)
    purchase_user_share_percent: int = Field(default=80, ge=0, le=100)
    usage_fee_percent: int = Field(default=25, ge=0, le=1000)

    # --- holds
    reserve_default_ttl_seconds: int = Field(default=300, ge=1)
    reserve_max_ttl_seconds: int = Field(default=3600, ge=1)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    sweep_batch_size: int = Field(default=500, ge=1)

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

    # --- gateway: JWT
    jwt_secret: SecretStr | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_leeway_seconds: int = Field(default=30, ge=0)
    jwt_tier_claim: str = "tier"
    jwt_quota_claim: str = "quota"

    # --- gateway: HTTP edge (served on http_addr beside the gRPC API)
    # Browser origins allowed to call it (CORS), comma-separated, e.g.
    # "chrome-extension://abcdefgh,https://app.example.com"; `*` in an entry matches any run of
    # characters ("vscode-webview://*"). Empty: no cross-origin browser calls.
    http_cors_origins: Annotated[list[str], NoDecode] = []
    # Largest request body; a larger one is refused with 413 before it is parsed.
    http_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)

    # --- gateway: LemonSqueezy webhooks
    lemonsqueezy_webhook_secret: SecretStr | None = None
    # Server-side catalog: variant id -> tokens per purchase (or per renewal), as JSON, e.g.
    # {"123456": 1000, "654321": {"tokens": 5000, "subscription": true}}. Never from the buyer.
    lemonsqueezy_variant_tokens: str = "{}"
    # Test-mode events: "ignore" them, or "credit" them to a separate test ledger (user ids
    # prefixed "test-mode:"), never to live balances.
    lemonsqueezy_test_mode: Literal["ignore", "credit"] = "ignore"

    @field_validator("jwt_algorithms", "http_cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        # `JWT_ALGORITHMS=RS256,ES256` reads better in an environment than a JSON list.
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
