"""Strict reading of request bodies and query strings.

A body must be one JSON object (`Content-Type: application/json`, or none). Every field is
type-checked; a field the endpoint does not define is refused (400 naming it) rather than
ignored, so a misspelt `max_tokens` cannot silently fall back to a default. `null` counts as
"not given" for optional fields. Integers are JSON integers (no strings, floats or booleans).
Query strings are read the same way: unknown or repeated parameters are refused.

JSON can say things a field cannot hold, and each is bad input (400 naming the field), never a
crash: an integer of thousands of digits (Python refuses to convert past 4300, and no field takes
more than 19), a string with a lone surrogate (`"\\ud800"` decodes to a str that has no UTF-8
form), and `NaN` / `Infinity`, which Python's decoder accepts although JSON has no such values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import hdrs, web

from gateway_service.http.errors import HttpRefusal, InvalidInput
from gateway_service.validation import is_unicode_text

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_MAX_INT_CHARS = 32  # longer integers (sign included) are out of every field's range
_MAX_NAME_ECHO = 64  # longest field name repeated back in an error message


def bad(field: str, problem: str) -> InvalidInput:
    return InvalidInput(field, f"{field}: {problem}")


def not_json(problem: str) -> InvalidInput:
    return InvalidInput(None, problem, "INVALID_JSON")


def _echo(name: str) -> str:
    name = name if name.isprintable() else repr(name)
    return name if len(name) <= _MAX_NAME_ECHO else name[:_MAX_NAME_ECHO] + "..."


class _HugeInteger:
    """A JSON integer too long to convert: out of range wherever it stands."""


def _integer(text: str) -> int | _HugeInteger:
    return int(text) if len(text) <= _MAX_INT_CHARS else _HugeInteger()


def _not_json(constant: str) -> Any:
    raise not_json(f"the body is not valid JSON: {constant} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise bad(_echo(key), "given more than once")
        obj[key] = value
    return obj


async def read_object(request: web.Request, fields: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object whose keys are all in `fields`. Raises 413 (aiohttp's
    HTTPRequestEntityTooLarge) past the app's client_max_size, 415 for another media type."""
    declared = request.headers.get(hdrs.CONTENT_TYPE)
    if declared is not None and request.content_type != "application/json":
        raise HttpRefusal(415, "send the body as Content-Type: application/json")
    raw = await request.read()
    if not raw.strip():
        raise not_json("the body must be a JSON object")
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text, object_pairs_hook=_unique_keys, parse_int=_integer, parse_constant=_not_json
        )
    except UnicodeDecodeError:
        raise not_json("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the content.
        raise not_json(f"the body is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise not_json("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise not_json("the body must be a JSON object")
    for key in data:
        if key not in fields:
            raise bad(_echo(key), f"unknown field (known: {', '.join(sorted(fields))})")
    return data


def string(obj: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise bad(name, "required")
        return ""
    if not isinstance(value, str):
        raise bad(name, "must be a string")
    if not is_unicode_text(value):
        raise bad(name, "must be Unicode text (it holds a lone surrogate)")
    return value


def integer(obj: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if value is None:
        return 0
    if isinstance(value, _HugeInteger):
        raise bad(name, f"must be within {low}..{high}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, "must be an integer")
    if not low <= value <= high:
        raise bad(name, f"must be within {low}..{high}")
    return value


def boolean(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, "must be true or false")
    return value


# ---- query strings ------------------------------------------------------------------------


def query(request: web.Request, params: frozenset[str]) -> dict[str, str]:
    """The query parameters, each given at most once and all in `params`."""
    values: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in params:
            raise bad(_echo(key), f"unknown query parameter (known: {', '.join(sorted(params))})")
        if key in values:
            raise bad(key, "given more than once")
        values[key] = value
    return values


def query_int(values: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = values.get(name)
    if text is None or text == "":
        return default
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > 20:
        raise bad(name, "must be an integer")
    value = int(text)
    if not low <= value <= high:
        raise bad(name, f"must be within {low}..{high}")
    return value


def query_bool(values: Mapping[str, str], name: str, default: bool) -> bool:
    text = values.get(name)
    if text is None or text == "":
        return default
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad(name, "must be true or false")
