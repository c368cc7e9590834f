"""`make run`: the whole stack on its embedded defaults, in the foreground.

Starts the ledger (on an embedded Postgres unless DATABASE_URL is set), the local provider
server when no provider key is configured, and the gateway; prints where each listens; stops them
all gracefully on Ctrl-C or SIGTERM. Without LEDGER_SERVICE_TOKEN or JWT_SECRET in the
environment it makes random ones for this run (printed only as the command to mint a dev JWT).
"""

from __future__ import annotations

import importlib.util
import secrets
import signal
import sys
import time

from shared import processes
from shared.config import Settings


def main() -> int:
    settings = Settings()
    env: dict[str, str] = {}
    if not settings.ledger_service_token:
        env["LEDGER_SERVICE_TOKEN"] = secrets.token_urlsafe(32)
    started: list[tuple[str, processes.Service]] = []

    def stop_all(*_: object) -> None:
        for name, service in reversed(started):
            code = service.stop()
            print(f"{name} stopped ({code})", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        ledger = processes.start("ledger_service", env, timeout=120, echo=True)
        started.append(("ledger", ledger))
        print(f"ledger    grpc://{ledger.address}", flush=True)
        if importlib.util.find_spec("gateway_service.__main__") is not None:
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
            if not settings.jwt_secret and not settings.jwt_jwks_url:
                gateway_env["JWT_SECRET"] = secrets.token_urlsafe(32)
            gateway = processes.start("gateway_service", gateway_env, echo=True)
            started.append(("gateway", gateway))
            print(f"gateway   grpc://{gateway.address}  http://{settings.http_addr}", flush=True)
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
