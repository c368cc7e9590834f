"""`make run`: the whole stack on its embedded defaults, in the foreground.

Starts the ledger (on an embedded Postgres unless DATABASE_URL is set), the local provider
server when no provider key is configured, and the gateway (gRPC and HTTP); prints where each
listens; stops them all gracefully on Ctrl-C or SIGTERM. Secrets not given in the environment
come from .data/dev.env (made on first run): `python -m scripts.dev_token USER` mints a JWT for
this stack and `python -m scripts.sign_webhook FILE` signs a test webhook.
"""

from __future__ import annotations

import signal
import sys
import time

from scripts import devsecrets
from shared import processes
from shared.config import Settings

DEV_ADMIN_CLAIM = "role"
DEV_ADMIN_VALUE = "admin"


def main() -> int:
    settings = Settings()
    env = devsecrets.load()
    if not settings.lemonsqueezy_variant_tokens.strip("{} "):
        env["LEMONSQUEEZY_VARIANT_TOKENS"] = devsecrets.DEV_CATALOG
    if settings.prompts_dir is None:
        env["PROMPTS_DIR"] = "prompts"  # the example prompt library (prompts/*.toml)
    if not settings.jwt_admin_claim:
        # The dev stack has an operator role: `dev_token NAME --admin` mints its JWTs.
        env |= {"JWT_ADMIN_CLAIM": DEV_ADMIN_CLAIM, "JWT_ADMIN_VALUE": DEV_ADMIN_VALUE}
    started: list[tuple[str, processes.Service]] = []

    def stop_all(*_: object) -> None:
        for name, service in reversed(started):
            code = service.stop()
            print(f"{name} stopped ({code})", flush=True)

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does

    signal.signal(signal.SIGTERM, terminate)
    try:
        ledger = processes.start("ledger_service", env, timeout=120, echo=True)
        started.append(("ledger", ledger))
        print(f"ledger    grpc://{ledger.address}", flush=True)
        gateway_env = {**env, "LEDGER_ADDR": ledger.address}
        if not (settings.anthropic_api_key or settings.openai_api_key):
            sim = processes.start("provider_sim", {}, echo=True)
            started.append(("provider", sim))
            base = f"http://{sim.address}"
            gateway_env |= {
                "ANTHROPIC_BASE_URL": base,
                "OPENAI_BASE_URL": f"{base}/v1",
                "ANTHROPIC_API_KEY": "sim-platform-key",
                "OPENAI_API_KEY": "sim-platform-key",
            }
            print(f"provider  http://{sim.address} (local stand-in for both providers)")
        if settings.jwt_jwks_url:
            gateway_env.pop("JWT_SECRET", None)
        gateway = processes.start("gateway_service", gateway_env, echo=True)
        started.append(("gateway", gateway))
        print(f"gateway   grpc://{gateway.address}  http://{settings.http_addr}", flush=True)
        http = f"http://{settings.http_addr}"
        mint = ".venv/bin/python -m scripts.dev_token"
        print(f"a JWT for this stack: {mint} alice  (an operator's: {mint} ops --admin)")
        print(f"pages     {http}/usage#token=$({mint} alice)", flush=True)
        print(f"          {http}/dashboard#token=$({mint} ops --admin)", flush=True)
        print("ready; Ctrl-C stops everything", flush=True)
        while all(s.proc.poll() is None for _, s in started):
            time.sleep(0.5)
        print("a service exited; stopping the rest", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
