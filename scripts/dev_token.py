"""`python -m scripts.dev_token USER_ID [--tier T] [--quota N]`: a JWT for the `make run` stack
(HS256 with its dev secret), valid for a day. Prints only the token."""

from __future__ import annotations

import argparse
import os
import sys
import time

import jwt

from scripts import devsecrets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--tier")
    parser.add_argument("--quota", type=int)
    args = parser.parse_args()
    secret = os.environ.get("JWT_SECRET") or devsecrets.load()["JWT_SECRET"]
    now = int(time.time())
    claims: dict[str, object] = {"sub": args.user_id, "iat": now, "exp": now + 86400}
    if os.environ.get("JWT_ISSUER"):
        claims["iss"] = os.environ["JWT_ISSUER"]
    if os.environ.get("JWT_AUDIENCE"):
        claims["aud"] = os.environ["JWT_AUDIENCE"]
    if args.tier:
        claims["tier"] = args.tier
    if args.quota is not None:
        claims["quota"] = args.quota
    print(jwt.encode(claims, secret, algorithm="HS256"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
