"""Development secrets for `make run`: made once, kept in .data/dev.env (mode 0600), reused on
every run so tokens minted for it keep working. Never used when the real ones are configured."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PATH = Path(".data/dev.env")
NAMES = ("LEDGER_SERVICE_TOKEN", "JWT_SECRET", "LEMONSQUEEZY_WEBHOOK_SECRET")
# The dev catalog: LemonSqueezy variant 1 is 1000 tokens, variant 2 a 5000-token subscription.
DEV_CATALOG = '{"1": 1000, "2": {"tokens": 5000, "subscription": true}}'


def load() -> dict[str, str]:
    values: dict[str, str] = {}
    if PATH.exists():
        for line in PATH.read_text().splitlines():
            name, _, value = line.partition("=")
            if name in NAMES and value:
                values[name] = value
    missing = [n for n in NAMES if n not in values]
    if missing:
        values.update({n: secrets.token_urlsafe(32) for n in missing})
        PATH.parent.mkdir(parents=True, exist_ok=True)
        PATH.write_text("".join(f"{n}={values[n]}\n" for n in NAMES))
        PATH.chmod(0o600)
    # Real configuration wins over the dev defaults.
    return {n: v for n, v in values.items() if not os.environ.get(n)}
