"""What the HTTP API's requests and answers look like, each described once as a pydantic model;
validation, serialization, the error a bad request gets and the OpenAPI document all come from
these descriptions (`http.api` turns a handler's signature into its route and its operation).

Four kinds of shape:

- `Body`: a JSON request body. Fields are snake_case in Python and camelCase on the wire; types
  are strict (no strings for numbers, no numbers for booleans); unknown fields are refused;
  `None` (JSON `null`) means "not given".
- `Query` / `PathParams`: a query string or a route's `{placeholders}`. Values arrive as text;
  `QueryInt` and `QueryBool` read them as the document says (`-?[0-9]+`; `true`/`false`, also
  `1`/`0`). Query parameters keep their names (`page_size`); path parameters are camelCase.
- `@reply` on a `TypedDict`: a JSON answer. Every key is always sent (`null` when it does not
  apply) and the document lists every one as required, so a response that drifts fails the
  tests. (Answers are only ever built by our code from typed values: they are serialized, not
  validated, which keeps the hot path as cheap as the dict literals it replaces.)

A field's constraints are its rules, written so that the same text means the same thing in
pydantic (Rust regex), JSON Schema validators (ECMA-262) and Python's `re`: character classes of
explicit code points, never `\\s` or `\\p{..}`, which each engine reads differently. The rules
the gRPC API shares (`gateway_service.validation`, the core's ranges) are the source: the
patterns here are built from the same predicates (`str.isprintable`, `str.isspace`) and the
same constants, and tests/http/test_shapes.py checks that they agree character for character.

`Says` gives a field's refusals their words (`"must not be empty"` for a blank prompt), so a
client reads the same message whichever layer refused it.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    TypeAdapter,
    with_config,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from gateway_service.validation import is_unicode_text

# A number too long to hold is read as this (with its sign): out of every field's range, so it is
# refused as such, without converting thousands of digits.
OUT_OF_RANGE = 10**40
_MAX_QUERY_DIGITS = 20


# ---- rules as patterns ----------------------------------------------------------------------


def _class_items(accept: Callable[[str], bool], escape: Callable[[int], str]) -> str:
    """The code points `accept` takes, as the inside of a regex character class (ranges)."""
    items: list[str] = []
    start: int | None = None
    for code in range(sys.maxunicode + 2):
        taken = code <= sys.maxunicode and accept(chr(code))
        if taken and start is None:
            start = code
        elif not taken and start is not None:
            last = code - 1
            items.append(escape(start) if start == last else f"{escape(start)}-{escape(last)}")
            start = None
    return "".join(items)


def _literal(code: int) -> str:
    """A printable code point as itself inside a character class (escaped where it is special)."""
    char = chr(code)
    return "\\" + char if char in "\\]^-[" else char


def _hex(code: int) -> str:
    return f"\\u{code:04x}"  # \uXXXX: the same in ECMA-262, Rust's regex and Python's re


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


# Printable, as `str.isprintable` says (no control, format, surrogate, private-use, unassigned or
# separator characters but the space): names and keys (`gateway_service.validation`).
PRINTABLE = f"^[{_class_items(str.isprintable, _literal)}]*$"
# Printable ASCII: a BYOK key (`validation.check_api_key`).
PRINTABLE_ASCII = "^[ -~]*$"
# Holds a character `str.strip()` keeps: a prompt that is not blank (the core's rule).
NOT_BLANK = f"[^{_class_items(str.isspace, _hex)}]"


def names_pattern(names: tuple[str, ...]) -> str:
    """One of `names` in any ASCII case, or nothing, with spaces around: what
    `name.strip().lower() in names` accepts of printable text (no printable character but the
    space is whitespace, and none but ASCII letters lower to the letters of a provider's name)."""
    return "^ *(?:" + "|".join(_any_case(name) for name in names) + ")? *$"


def prefixes_pattern(prefixes: tuple[str, ...]) -> str:
    """Starts (after spaces) with one of `prefixes` in any case, or is blank: what
    `text.strip().lower().startswith(prefixes) or not text.strip()` accepts of printable text."""
    return "^ *(?:" + "|".join(_any_case(prefix) for prefix in prefixes) + "|$)"


# ---- field types ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Says:
    """The words of a field's refusals, by pydantic error type: `Says(string_pattern_mismatch=
    "must not be empty")`. Ranges need none ("must be within LOW..HIGH" is derived)."""

    messages: tuple[tuple[str, str], ...]  # hashable: it sits in type annotations

    def __init__(self, **messages: str) -> None:
        object.__setattr__(self, "messages", tuple(messages.items()))


def _unicode_text(value: str) -> str:
    if not is_unicode_text(value):
        raise PydanticCustomError("string_unicode", "must be Unicode text")
    return value


# Free text (prompts): anything but a lone surrogate, which JSON's `\ud800` can spell and no UTF-8
# can carry. (A pattern refuses one by itself: its engine needs UTF-8.)
Text = Annotated[str, AfterValidator(_unicode_text)]
Printable = Annotated[
    str,
    StringConstraints(pattern=PRINTABLE),
    Says(string_pattern_mismatch="must not contain control or other non-printable characters"),
]


def _query_int(value: object) -> object:
    """`-?[0-9]+` as an int (longer than any field holds: out of range); anything else refused."""
    if not isinstance(value, str):
        return value
    digits = value.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise PydanticCustomError("int_parsing", "must be an integer")
    if len(digits) > _MAX_QUERY_DIGITS:
        return -OUT_OF_RANGE if value.startswith("-") else OUT_OF_RANGE
    return int(value)


def _query_bool(value: object) -> object:
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise PydanticCustomError("bool_parsing", "must be true or false")


# Query and path values: text read as the document's types say. Bounds go before the reader,
# `Annotated[int, Interval(ge=1, le=100), FROM_TEXT]`, so that the document states them.
FROM_TEXT = BeforeValidator(_query_int)
QueryInt = Annotated[int, FROM_TEXT]
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]


# ---- what a field's refusals say ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldRules:
    low: int | None = None
    high: int | None = None
    says: dict[str, str] = field(default_factory=dict)

    def problem(self, error_type: str, fallback: str) -> str:
        if error_type in self.says:
            return self.says[error_type]
        if error_type in _RANGE_ERRORS:
            return f"must be within {self.low}..{self.high}"
        return _PROBLEMS.get(error_type, fallback)


_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal", "greater_than", "less_than"})
_PROBLEMS = {
    "missing": "required",
    "string_type": "must be a string",
    "string_unicode": "must be Unicode text (it holds a lone surrogate)",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def _metadata(annotation: Any) -> Iterator[object]:
    """Every Annotated metadata object in `annotation`, unions and aliases included."""
    if get_origin(annotation) is Annotated:
        base, *extras = get_args(annotation)
        yield from extras
        yield from _metadata(base)
    else:
        for arg in get_args(annotation):
            yield from _metadata(arg)


def rules_of(annotation: Any, metadata: Iterable[object] = ()) -> FieldRules:
    """A field's rules from its type (`annotation`) and the metadata pydantic lifted off it."""
    low: int | None = None
    high: int | None = None
    says: dict[str, str] = {}
    for item in (*metadata, *_metadata(annotation)):
        if isinstance(item, annotated_types.Interval):
            low = item.ge if isinstance(item.ge, int) else low
            high = item.le if isinstance(item.le, int) else high
        elif isinstance(item, annotated_types.Ge) and isinstance(item.ge, int):
            low = item.ge
        elif isinstance(item, annotated_types.Le) and isinstance(item.le, int):
            high = item.le
        elif isinstance(item, Says):
            says.update(dict(item.messages))
    return FieldRules(low, high, says)


# ---- models ---------------------------------------------------------------------------------

# The names body fields have on the wire, by their Python (and gRPC) names: how a refusal from
# the core, which names fields as the gRPC API does, is told in the HTTP API's words. (Query
# parameters keep the core's names.)
WIRE_NAMES: dict[str, str] = {}


def wire_name(name: str) -> str:
    return WIRE_NAMES.get(name, name)


class _Request(BaseModel):
    """What every request model shares: strict, frozen, unknown names refused."""

    known: ClassVar[str] = "field"  # what an unknown name is called in a refusal
    rules: ClassVar[dict[str, FieldRules]] = {}  # by wire name

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.rules = {}
        for name, info in cls.model_fields.items():
            wire = info.alias or name
            cls.rules[wire] = rules_of(info.annotation, info.metadata)
            if issubclass(cls, Body) and WIRE_NAMES.setdefault(name, wire) != wire:
                raise TypeError(f"{cls.__name__}.{name}: {wire!r}, elsewhere {WIRE_NAMES[name]!r}")


class Body(_Request):
    """A JSON request body (see the module docstring)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        extra="forbid",
        strict=True,
        frozen=True,
        use_attribute_docstrings=True,
    )


class Query(_Request):
    """A query string: parameters keep their names (`page_size`)."""

    known: ClassVar[str] = "query parameter"
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True
    )


class PathParams(_Request):
    """A route's `{placeholders}`, named in camelCase in the route (`/users/{userId}`)."""

    known: ClassVar[str] = "path parameter"
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        extra="forbid",
        strict=True,
        frozen=True,
        use_attribute_docstrings=True,
    )


# Answers are typed dicts: built as cheaply as the dict literals they replace (and checked by
# mypy as they are built), serialized in Rust by their TypeAdapter. A total TypedDict is an
# answer whose every key is always sent; `NotRequired[...]` marks the rare key that may be left
# out (an error's `field`).
REPLY_CONFIG = ConfigDict(
    alias_generator=to_camel,
    serialize_by_alias=True,
    extra="forbid",
    use_attribute_docstrings=True,
)
ReplyT = TypeVar("ReplyT")


def reply(cls: type[ReplyT]) -> type[ReplyT]:
    """Declares a TypedDict (`typing_extensions.TypedDict`) a JSON answer: keys snake_case in
    Python, camelCase on the wire, unknown keys refused by the document."""
    return with_config(REPLY_CONFIG)(cls)


@functools.cache
def adapter(shape: Any) -> TypeAdapter[Any]:
    return TypeAdapter(shape)


def to_json(shape: Any, value: object) -> bytes:
    """`value` (an instance of `shape`, a reply TypedDict or a model) as JSON bytes."""
    return adapter(shape).serializer.to_json(value, by_alias=True)


def to_data(shape: Any, value: object) -> dict[str, Any]:
    """`value` as the JSON object it is sent as (camelCase keys), for code that encodes it."""
    data: dict[str, Any] = adapter(shape).dump_python(value, by_alias=True, mode="json")
    return data
