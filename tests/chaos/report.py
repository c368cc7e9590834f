"""Reports of chaos runs, shown in pytest's terminal summary whether or not output is captured."""

from __future__ import annotations

REPORTS: list[str] = []
