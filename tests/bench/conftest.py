"""The bench tests run on the e2e stack: a ledger on a fresh database (tests/conftest.py), the
provider stand-in and a gateway, in this process on real ports (tests/e2e/conftest.py)."""

from __future__ import annotations

from tests.e2e.conftest import sim_url, stack

__all__ = ["sim_url", "stack"]
