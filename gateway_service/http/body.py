"""Strict reading of request bodies, query strings and path parameters into their models
(`http.shapes`), and the one refusal (400 naming the field) a model's errors become.

A body must be one JSON object (`Content-Type: application/json`, or none; another media type is
415). The model checks every field; a field the endpoint does not define is refused (400 naming
it) rather than ignored, so a misspelt `max_tokens` cannot silently fall back to a default.
`null` counts as "not given" for optional fields. Query strings are read the same way: unknown
or repeated parameters are refused.

JSON can say things a field cannot hold, and each is bad input (400), never a crash:

- a key given twice in one object (which decoder keeps which?): 400 naming it;
- an integer of thousands of digits (Python refuses to convert past 4300, and no field takes more
  than 19): read as out of range, so refused as such, naming the field;
- a string with a lone surrogate (`"\\ud800"` decodes to a str that has no UTF-8 form): 400
  naming the field;
- `NaN` / `Infinity`, which Python's decoder accepts although JSON has no such values: 400
  `INVALID_JSON`.

A number with a zero fraction (`5.0`, `1e2`) is the integer it equals: JSON has one kind of
number, and JSON Schema's `integer` is "a number with a zero fraction", so a client written from
the document may send one. `5.5` is refused where an integer is expected.

The JSON is parsed by the standard library's C decoder with hooks for the cases above, then
validated by the model's compiled pydantic validator: both in C or Rust, with one Python call per
object and per number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import hdrs, web
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway_service.http.errors import HttpRefusal, InvalidInput
from gateway_service.http.shapes import OUT_OF_RANGE, Body, PathParams, Query, _Request

_MAX_INT_CHARS = 32  # longer integers (sign included) are out of every field's range
_MAX_NAME_ECHO = 64  # longest field name repeated back in an error message

B = TypeVar("B", bound=Body)
Q = TypeVar("Q", bound=Query)
P = TypeVar("P", bound=PathParams)
R = TypeVar("R", bound=_Request)


def bad(field: str, problem: str) -> InvalidInput:
    return InvalidInput(field, f"{field}: {problem}")


def not_json(problem: str) -> InvalidInput:
    return InvalidInput(None, problem, "INVALID_JSON")


def _echo(name: str) -> str:
    name = name if name.isprintable() else repr(name)
    return name if len(name) <= _MAX_NAME_ECHO else name[:_MAX_NAME_ECHO] + "..."


def _integer(text: str) -> int:
    if len(text) <= _MAX_INT_CHARS:
        return int(text)
    return -OUT_OF_RANGE if text.startswith("-") else OUT_OF_RANGE


def _number(text: str) -> int | float:
    """A number with a fraction or exponent: the integer it equals when it is one."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _not_json(constant: str) -> Any:
    raise not_json(f"the body is not valid JSON: {constant} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise bad(_echo(key), "given more than once")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_int=_integer,
    parse_float=_number,
    parse_constant=_not_json,
)


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, read by the rules above."""
    if not raw.strip():
        raise not_json("the body must be a JSON object")
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise not_json("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the content.
        raise not_json(f"the body is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise not_json("the body is nested too deeply") from None


def body_of(model: type[B], data: Any) -> B:
    """`data` (parsed JSON) as `model`, or the refusal naming the first field at fault."""
    if not isinstance(data, dict):
        raise not_json("the body must be a JSON object")
    try:
        body: B = model.__pydantic_validator__.validate_python(data)
    except ValidationError as exc:
        raise refusal(model, exc) from None
    return body


async def read_body(request: web.Request, model: type[B]) -> B:
    """The body as `model`. Raises 413 (aiohttp's HTTPRequestEntityTooLarge) past the app's
    client_max_size, 415 for another media type, 400 for anything the model refuses."""
    declared = request.headers.get(hdrs.CONTENT_TYPE)
    if declared is not None and request.content_type != "application/json":
        raise HttpRefusal(415, "send the body as Content-Type: application/json")
    return body_of(model, parse_json(await request.read()))


def query_of(model: type[Q], items: Any) -> Q:
    """Query parameters (name, value pairs in order) as `model`: each given at most once."""
    values: dict[str, str] = {}
    for key, value in items:
        if key not in model.rules:
            raise _unknown(model, key)
        if key in values:
            raise bad(key, "given more than once")
        values[key] = value
    return _validated(model, values)


def read_query(request: web.Request, model: type[Q]) -> Q:
    return query_of(model, request.query.items())


def read_path(request: web.Request, model: type[P]) -> P:
    return _validated(model, dict(request.match_info))


def _validated(model: type[R], values: Mapping[str, str]) -> R:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise refusal(model, exc) from None


# ---- a model's errors as our one refusal ------------------------------------------------------


def _unknown(model: type[_Request], name: str) -> InvalidInput:
    known = ", ".join(sorted(model.rules))
    return bad(_echo(name), f"unknown {model.known} (known: {known})")


def _first(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error a client is told about: an unknown field first (it may be a misspelt one that
    explains the others), else the first field in the model's order."""
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def refusal(model: type[_Request], exc: ValidationError) -> InvalidInput:
    error = _first(exc.errors(include_url=False, include_input=False))
    context = error.get("ctx") or {}
    if "field" in context:  # a rule across fields names the one it blames
        return bad(str(context["field"]), str(context["problem"]))
    name = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        return _unknown(model, name)
    rules = model.rules.get(name)
    if rules is None:
        return bad(_echo(name), error["msg"])
    return bad(name, rules.problem(error["type"], error["msg"]))
