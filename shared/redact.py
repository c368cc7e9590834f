"""Secrets out of log lines: the last guard, for text no code path meant to log.

Our own code never formats a credential, but an exception's message is other people's text: a
provider SDK's error may quote the request, a driver's may quote its connection string, a
caller's bad input may be a pasted key. Every line a formatter writes passes through here.

Two nets: the exact values of this process's own secrets (its settings), and the shapes that a
secret we cannot know in advance has (a BYOK key, a caller's JWT, a password in a URL, a
`token=...` pair). What they catch becomes `[redacted]`; the rest of the line stays readable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# A configured value shorter than this is not looked for: redacting every "test" or "1234" in
# a log would hide more than it protects (and such a secret is not one).
MIN_SECRET_CHARS = 8

# Each shape with the words that must be in a line for it to match: most lines hold none, and a
# substring test is ~50x cheaper than the pattern (an access line a request must not pay 20 us).
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # A JWT (header.payload.signature, base64url; the header always starts {" = eyJ).
    (("eyJ",), re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # Anthropic's and OpenAI's keys: sk-ant-api03-..., sk-proj-..., sk-...
    (("sk-",), re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # A password in a URL's user-info: scheme://user:PASSWORD@host
    (("://",), re.compile(r"(://[^/\s:@]*:)[^@\s/]+(?=@)"), rf"\1{REDACTED}"),
    # Authorization: Bearer X / Basic X
    (
        ("earer", "asic", "EARER", "ASIC"),
        re.compile(r"(?i)\b(bearer|basic)\s+(?!\[redacted)[A-Za-z0-9._~+/=-]{8,}"),
        rf"\1 {REDACTED}",
    ),
    # key=value, "key": "value", key: value, for names that say what they hold
    (
        ("ey", "EY", "ecret", "ECRET", "ass", "ASS", "oken", "OKEN", "uth", "UTH"),
        re.compile(
            r"(?i)((?:api[_-]?key|secret|password|passwd|token|authorization)"
            r"[\"']?\s*[:=]\s*[\"']?)(?!\[redacted)[^\s\"',;}&]{8,}"
        ),
        rf"\1{REDACTED}",
    ),
)


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first: a secret that contains another is replaced whole.
        self._known = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for secret in self._known:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for words, pattern, replacement in _SHAPES:
            if any(word in text for word in words):
                text = pattern.sub(replacement, text)
        return text
