"""What the text of a call may hold: one set of rules for both transports, so the gRPC API and
the HTTP API refuse the same input alike (400 / INVALID_ARGUMENT naming the field), before it can
reach a provider, the ledger or a log line.

- Prompt text (`content`, `system_prompt`) is free text, newlines and tabs included, but it must
  be Unicode text: a lone surrogate (which JSON's `\\ud800` escapes can produce; protobuf strings
  cannot hold one) has no UTF-8 form, so no provider could be sent it.
- Names and keys (`provider`, `model`, `idempotency_key`) must be printable: a control character
  in them is never meaningful, and the ledger refuses to store one.
- A BYOK API key must be printable ASCII: it is sent to the provider as an HTTP header, where a CR
  or LF would split the header. The provider's SDK refuses such a key, and that refusal used to
  look like a provider outage (503, "retry") although no retry can help.
- A caller's id (the JWT `sub`) must be one the ledger can store (`is_storable_id`, the ledger's
  own rule for ids), checked when the token is verified: a token naming a user the ledger cannot
  hold is a bad token (401), not the caller's bad input (400) or our failure (500).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway_service.errors import invalid

if TYPE_CHECKING:
    from gateway_service.core import GenerateRequest

# The ledger's bound on ids (its MAX_ID_CHARS).
MAX_ID_CHARS = 256


def is_unicode_text(value: str) -> bool:
    """False when `value` holds a lone surrogate, the one thing a str can hold that UTF-8 cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_storable_id(value: str) -> bool:
    """The ledger's rule for an id: not blank, at most MAX_ID_CHARS, printable (which also rules
    out control characters and lone surrogates)."""
    return bool(value.strip()) and len(value) <= MAX_ID_CHARS and value.isprintable()


def check_prompt_text(field: str, value: str) -> None:
    if not is_unicode_text(value):
        raise invalid(field, "must be Unicode text (it holds a lone surrogate)")


def check_printable(field: str, value: str) -> None:
    if not value.isprintable():
        raise invalid(field, "must not contain control or other non-printable characters")


def check_api_key(value: str) -> None:
    if not (value.isascii() and value.isprintable()):
        raise invalid("api_key", "must be printable ASCII (no line breaks or control characters)")


def check_call(req: GenerateRequest) -> None:
    """Refuses a call whose text fields break the rules above (the first field at fault)."""
    check_prompt_text("content", req.content)
    check_prompt_text("system_prompt", req.system_prompt)
    check_printable("provider", req.provider)
    check_printable("model", req.model)
    check_printable("idempotency_key", req.idempotency_key)
    check_api_key(req.api_key)
