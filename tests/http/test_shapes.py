"""The descriptions and the rules they restate agree: each pattern the document carries says what
the Python predicate it stands for says (for every code point, in every regex engine that reads
it), the bounds the edge states are the ledger's and the core's, and the edge reads what JSON can
spell (integral floats, huge numbers, query text) as the document says. Also: declaring a route
is enough for it to be served, checked and documented, and a declaration that cannot be read
fails at import, not at the first request."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError, create_model
from typing_extensions import TypedDict

from gateway_service import core
from gateway_service.auth import Identity
from gateway_service.errors import GatewayError
from gateway_service.http import body as reading
from gateway_service.http import handlers, openapi, shapes
from gateway_service.http.api import ENDPOINTS, Answer, Html, Routes, forget
from gateway_service.http.errors import InvalidInput
from gateway_service.providers.registry import PROVIDER_NAMES, UnknownProviderError, provider_for
from ledger_service.domain import ledger
from tests.e2e.conftest import Stack

ALL_CHARACTERS = [chr(code) for code in range(sys.maxunicode + 1)]


# ---- patterns against the predicates they stand for -------------------------------------------


def _agree(pattern: str, predicate: Any, texts: list[str]) -> None:
    python = re.compile(pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern)
    ecma = jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
    for text in texts:
        expected = predicate(text)
        assert (python.search(text) is not None) == expected, ("re", text)
        assert ecma.is_valid(text) == expected, ("ecma", text)


def _by_pydantic(annotation: Any, text: str) -> bool:
    probe = create_model("Probe", value=(annotation, ...))
    try:
        probe.model_validate({"value": text})
    except ValidationError:
        return False
    return True


def test_printable_is_str_isprintable_for_every_code_point() -> None:
    texts = [c for c in ALL_CHARACTERS if not 0xD800 <= ord(c) <= 0xDFFF]  # no UTF-8 form
    _agree(shapes.PRINTABLE, str.isprintable, texts)
    _agree(shapes.PRINTABLE, str.isprintable, ["", "ab", "a\n", "\n", "ok\u200b", "é\U0001f600"])


def test_not_blank_is_what_strip_keeps_for_every_code_point() -> None:
    texts = [c for c in ALL_CHARACTERS if not 0xD800 <= ord(c) <= 0xDFFF]
    _agree(shapes.NOT_BLANK, lambda text: bool(text.strip()), [*texts, "", "  \t", " a "])


def test_pydantic_reads_the_patterns_as_the_document_does() -> None:
    """The model's validator (Rust regex) on the characters where engines could differ."""
    for char in ["\n", "\u0085", "\u2028", "\u00a0", "\x1c", "\u200b", "\U000e0001", "a", " "]:
        for text in (char, f"a{char}", f"{char}a"):
            assert _by_pydantic(handlers.ModelName, text) == text.isprintable(), repr(text)
            assert _by_pydantic(handlers.Prompt, text) == bool(text.strip()), repr(text)


def _provider_ok(name: str) -> bool:
    if not name.isprintable():
        return False
    try:
        provider_for(name, "")
    except UnknownProviderError:
        return False
    return True


def _model_tells(model: str) -> bool:
    if not model.isprintable():
        return False
    try:
        provider_for("", model)
    except UnknownProviderError:
        return False
    return True


_ODD = st.sampled_from(["", " ", "  ", "\u212a", "\u0130", "\t", "\u00a0", "-", "x"])
_CASED = st.sampled_from([*PROVIDER_NAMES, "claude", "gpt", "o1", "o3", "o4", "chatgpt"]).flatmap(
    lambda word: st.sampled_from([word, word.upper(), word.title(), word[:-1]])
)
_NAMES = st.one_of(
    st.builds(lambda a, w, b: a + w + b, _ODD, _CASED, st.one_of(_ODD, st.text(max_size=3))),
    st.text(max_size=6),
)


@settings(max_examples=600, deadline=None)
@given(name=_NAMES)
def test_the_provider_pattern_is_the_registrys_rule(name: str) -> None:
    _agree(shapes.names_pattern(PROVIDER_NAMES), _provider_ok, [name])


@settings(max_examples=600, deadline=None)
@given(model=_NAMES)
def test_the_model_pattern_is_the_registrys_rule(model: str) -> None:
    """Without a provider, the model's name must tell it: the document's pattern (with the
    printable one beside it) says what `provider_for` does."""
    printable = re.compile(shapes.PRINTABLE.removesuffix("$") + r"\Z")
    family = re.compile(handlers.MODEL_TELLS_PROVIDER)
    documented = printable.search(model) is not None and family.search(model) is not None
    assert documented == _model_tells(model), repr(model)


# ---- bounds stated at the edge are the owners' ------------------------------------------------


def test_bounds_are_the_ledgers_and_the_cores() -> None:
    assert handlers.MAX_USAGE_DAYS == ledger.MAX_ANALYTICS_DAYS
    assert handlers.DEFAULT_USAGE_DAYS == ledger.DEFAULT_ANALYTICS_DAYS
    assert handlers.MAX_PAGE_SIZE == ledger.MAX_PAGE_SIZE
    assert handlers.DEFAULT_PAGE_SIZE == ledger.DEFAULT_PAGE_SIZE
    schema = handlers.GenerateRequest.model_json_schema()
    (max_tokens,) = [b for b in schema["properties"]["maxTokens"]["anyOf"] if "maximum" in b]
    assert max_tokens["maximum"] == core.MAX_OUTPUT_TOKENS


async def test_the_estimate_bound_is_the_cores(stack: Stack) -> None:
    """The core takes an estimate up to MAX_ESTIMATED_TOKENS and refuses one past it (it states
    the number inline), in the words the edge uses for the same refusal."""
    gateway = stack.gateway.gateway
    bound = handlers.MAX_ESTIMATED_TOKENS
    assert (await gateway.eligibility(None, bound, True)).can_make_request
    with pytest.raises(GatewayError) as core_refused:
        await gateway.eligibility(None, bound + 1, True)
    with pytest.raises(InvalidInput) as edge_refused:
        reading.body_of(handlers.EligibilityRequest, {"estimatedTokens": bound + 1})
    assert core_refused.value.metadata["field"] == "estimated_tokens"
    assert (
        edge_refused.value.message
        == "estimatedTokens" + core_refused.value.message.removeprefix("estimated_tokens")
    )


# ---- what JSON can spell ----------------------------------------------------------------------


def _generate(raw: str) -> handlers.GenerateRequest:
    return reading.body_of(handlers.GenerateRequest, reading.parse_json(raw.encode()))


@pytest.mark.parametrize(("number", "read"), [("5.0", 5), ("1e2", 100), ("-0.0", 0), ("7", 7)])
def test_a_number_with_a_zero_fraction_is_the_integer_it_equals(number: str, read: int) -> None:
    """JSON Schema's `integer` is any number with a zero fraction: the document allows 5.0, so
    the handler takes it (as 5). A fraction is still refused."""
    assert _generate(f'{{"content": "hi", "maxTokens": {number}}}').max_tokens == read
    validator = jsonschema_rs.validator_for(
        {
            "$ref": "#/components/schemas/GenerateRequest",
            "components": openapi.document()["components"],
        }
    )
    assert validator.is_valid(json.loads(f'{{"content": "hi", "maxTokens": {number}}}'))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"content": "hi", "maxTokens": 5.5}', "maxTokens: must be an integer"),
        ('{"content": "hi", "maxTokens": 1e400}', "maxTokens: must be an integer"),
        ('{"content": "hi", "maxTokens": 1e300}', "maxTokens: must be within 0..128000"),
        ('{"content": "hi", "maxTokens": -' + "9" * 5000 + "}", "maxTokens: must be within"),
        ('{"content": "hi", "maxTokens": true}', "maxTokens: must be an integer"),
        ('{"content": "   "}', "content: must not be empty"),
        ('{"content": "\\u2028\\u3000"}', "content: must not be empty"),
        ('{"content": "hi", "systemPrompt": "\\udfff"}', "systemPrompt: must be Unicode text"),
        ('{"content": "hi", "model": "gpt\\u200b"}', "model: must not contain control"),
        ('{"content": "hi", "model": "llama"}', "provider: cannot tell the provider of model"),
        ('{"content": "hi", "provider": "acme"}', "provider: unknown provider 'acme'"),
        ('{"content": "hi", "apiKey": "k\\u00e9"}', "apiKey: must be printable ASCII"),
        ('{"content": "hi", "idempotencyKey": "' + "k" * 201 + '"}', "idempotencyKey: at most 200"),
        ('{"content": "hi", "max_tokens": 1, "model": 5}', "max_tokens: unknown field (known: "),
        ('{"model": "gpt-4o"}', "content: required"),
    ],
)
def test_each_refusal_names_its_field_in_our_words(raw: str, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        _generate(raw)
    assert refused.value.message.startswith(message), refused.value.message


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("days=", "days: must be an integer"),  # empty is not a number (the document agrees)
        ("days=+5", "days: must be an integer"),
        ("days= 5", "days: must be an integer"),
        ("days=5.0", "days: must be an integer"),
        ("days=--5", "days: must be an integer"),
        ("days=367", "days: must be within 1..366"),
        ("days=" + "9" * 30, "days: must be within 1..366"),
        ("include_history=", "include_history: must be true or false"),
        ("include_history=yes", "include_history: must be true or false"),
        ("days=1&days=1", "days: given more than once"),
        ("Days=1", "Days: unknown query parameter (known: days, include_history)"),
    ],
)
def test_query_text_is_read_as_the_document_says(query: str, message: str) -> None:
    pairs = [tuple(part.split("=", 1)) for part in query.split("&")]
    with pytest.raises(InvalidInput) as refused:
        reading.query_of(handlers.UsageQuery, pairs)
    assert refused.value.message == message


def test_query_defaults_and_spellings() -> None:
    assert reading.query_of(handlers.UsageQuery, []) == handlers.UsageQuery(
        days=30, include_history=False
    )
    read = reading.query_of(handlers.UsageQuery, [("days", "007"), ("include_history", "TRUE")])
    assert (read.days, read.include_history) == (7, True)
    page = reading.query_of(handlers.PurchasesQuery, [("page_token", "")])
    assert (page.page_size, page.page_token) == (20, "")


# ---- declaring a route ------------------------------------------------------------------------


class ThingPath(shapes.PathParams):
    thing_id: str
    """whose thing"""


class ThingQuery(shapes.Query):
    limit: shapes.QueryInt = 10


class ThingBody(shapes.Body):
    note: shapes.Text


@shapes.reply
class Thing(TypedDict):
    """One thing."""

    thing_id: str
    note_length: int


def test_a_declared_route_is_served_checked_and_documented() -> None:
    """The example of `http.api`'s docstring, end to end: path, query, body and caller read from
    the signature; the document lists them and the reply; the route is an aiohttp route."""
    routes = Routes()

    @routes.post("/test/things/{thingId}", summary="Make a thing", errors=(404,))
    async def make_thing(
        request: web.Request,
        identity: Identity,
        thing: ThingPath,
        query: ThingQuery,
        body: ThingBody,
    ) -> Answer[Thing]:
        """Makes one thing."""
        return Answer(Thing(thing_id=thing.thing_id, note_length=len(body.note)), {"X-N": "1"})

    try:
        (route,) = list(routes)
        assert (route.method, route.path) == ("POST", "/test/things/{thingId}")
        document = openapi.document({("POST", "/test/things/{thingId}")})
        operation = document["paths"]["/test/things/{thingId}"]["post"]
        assert operation["operationId"] == "makeThing"
        assert operation["description"] == "Makes one thing."
        assert operation["security"] == [{"bearer": []}]
        assert [(p["name"], p["in"], p["required"]) for p in operation["parameters"]] == [
            ("thingId", "path", True),
            ("limit", "query", False),
        ]
        assert set(operation["responses"]) == {
            "200",
            "400",
            "401",
            "404",
            "408",
            "413",
            "415",
            "500",
        }
        assert document["components"]["schemas"]["Thing"]["required"] == ["thingId", "noteLength"]
        assert document["components"]["schemas"]["ThingBody"]["additionalProperties"] is False
    finally:
        forget("POST", "/test/things/{thingId}")


def test_a_page_is_declared_by_its_return_type() -> None:
    routes = Routes()

    @routes.get("/test/page", summary="A page")
    async def page(request: web.Request) -> Html:
        return Html("<p>hi</p>")

    try:
        operation = openapi.document({("GET", "/test/page")})["paths"]["/test/page"]["get"]
        assert list(operation["responses"]["200"]["content"]) == ["text/html"]
        assert operation["security"] == []
    finally:
        forget("GET", "/test/page")


@pytest.mark.parametrize(
    ("path", "signature", "words"),
    [
        ("/test/a/{id}", "request: web.Request, thing: ThingPath", "the path names"),
        ("/test/b", "request: web.Request, who: str", "must be an Identity"),
        ("/test/c", "req: int", "first parameter must be `request: web.Request`"),
        ("/test/d", "request: web.Request, a: ThingBody, b: ThingBody", "more than one body"),
    ],
)
def test_a_declaration_that_cannot_be_read_fails_at_import(
    path: str, signature: str, words: str
) -> None:
    namespace: dict[str, Any] = {**globals()}
    exec(  # noqa: S102 - a handler with the signature under test
        f"async def handler({signature}) -> Thing: ...", namespace
    )
    with pytest.raises(TypeError, match=re.escape(words)):
        Routes().get(path, summary="bad")(namespace["handler"])
    assert ("GET", path) not in ENDPOINTS


def test_a_route_cannot_be_described_twice() -> None:
    async def again(request: web.Request) -> Thing:
        raise AssertionError

    with pytest.raises(ValueError, match="described twice"):
        Routes().get("/healthz", summary="again")(again)
