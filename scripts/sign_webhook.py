"""`python -m scripts.sign_webhook FILE`: the X-Signature LemonSqueezy would send for FILE's
bytes (hex HMAC-SHA256 with the `make run` stack's dev webhook secret)."""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from pathlib import Path

from scripts import devsecrets


def main() -> int:
    body = Path(sys.argv[1]).read_bytes()
    secret = (
        os.environ.get("LEMONSQUEEZY_WEBHOOK_SECRET")
        or devsecrets.load()["LEMONSQUEEZY_WEBHOOK_SECRET"]
    )
    print(hmac.new(secret.encode(), body, hashlib.sha256).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
