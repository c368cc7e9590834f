"""`python -m scripts.dev_token USER_ID [--tier T] [--quota N] [--admin]`: a JWT for the
`make run` stack (HS256 with its dev secret), valid for a day; `--admin` adds the operator role
the stack is configured with (JWT_ADMIN_CLAIM / JWT_ADMIN_VALUE). Prints only the token."""

from __future__ import annotations

import argparse
import os
import sys
import time

import jwt

from scripts import devsecrets
from scripts.devstack import DEV_ADMIN_CLAIM, DEV_ADMIN_VALUE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--tier")
    parser.add_argument("--quota", type=int)
    parser.add_argument("--admin", action="store_true", help="the operator role")
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
    if args.admin:
        claim = os.environ.get("JWT_ADMIN_CLAIM") or DEV_ADMIN_CLAIM
        claims[claim] = os.environ.get("JWT_ADMIN_VALUE") or DEV_ADMIN_VALUE
    print(jwt.encode(claims, secret, algorithm="HS256"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
