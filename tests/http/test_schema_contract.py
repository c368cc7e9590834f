"""The document's request schemas accept exactly what the handlers accept.

- schemathesis (its engine, as `schemathesis run` drives it: examples, coverage, fuzzing) against
  a live edge (a real ledger on its own database, the provider stand-in), with every check on
  (not_a_server_error, status and content-type conformance, response schemas and headers,
  positive data acceptance, negative data rejection, missing required headers, ignored auth,
  unsupported methods, ...), over every operation, signed in as a funded user: it must find
  nothing.
- Two hypothesis properties on the values schemathesis draws rarely (names in odd cases, every
  kind of blank, control, format, astral and unassigned characters, lone surrogates, numbers at
  and past each bound, integral floats): for any JSON body, the document's schema accepts it
  exactly when the request model does (no network), and the model accepts it exactly when the
  live handler does (anything but 400).

Both can fail: `test_a_drifted_schema_is_caught` loosens a schema and watches schemathesis
report it.

Two things a schema cannot say, and what the run does about them:
- `page_token` is a token this server issued (`nextPageToken`); any other string is refused,
  by contract. The run sends an issued one (the empty token: the first page) wherever a page
  token was drawn.
- The webhook's `X-Signature` is an HMAC of the body with the server's secret. Where the run
  sends one, it sends the right one, so the body is what is tested (a missing header is still
  sent missing).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import random
from collections.abc import MutableMapping
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core import NotSet
from schemathesis.engine import Status, events
from schemathesis.engine import from_schema as engine_for

from gateway_service.http import body as reading
from gateway_service.http import handlers
from gateway_service.http.errors import InvalidInput
from gateway_service.http.shapes import Body
from gateway_service.validation import is_unicode_text
from tests.http.conftest import OPENAPI, Edge
from tests.ledger_service.helpers import credit

WEBHOOK_SECRET = b"test-webhook-secret"  # what tests/http/conftest.py configures
MAX_EXAMPLES = 50


def _sign_and_issue(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    """The two values the schema cannot describe, made real (see the module docstring)."""
    if isinstance(case.query, MutableMapping) and case.query.get("page_token"):
        case.query["page_token"] = ""
    if isinstance(case.headers, MutableMapping) and "X-Signature" in case.headers:
        raw = b"" if isinstance(case.body, NotSet) else json.dumps(case.body).encode()
        kwargs["data"] = raw  # sent as signed: these exact bytes
        case.headers["X-Signature"] = hmac.new(WEBHOOK_SECRET, raw, hashlib.sha256).hexdigest()


def _failures(run: Any) -> list[str]:
    found: list[str] = []
    for event in run:
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{event.recorder.label}: {check.name}: {failure.title}\n"
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            found.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            found.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            found += [f"{failure.title}: {failure.message}" for failure in event.failures]
    return found


def run_schemathesis(
    document: dict[str, Any], url: str, headers: dict[str, str], seed: int
) -> list[str]:
    """Every failure a full schemathesis run against `url` reports (none: the contract holds)."""
    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            "base-url": url,
            "headers": headers,
            "checks": {"enabled": True},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "warnings": False,
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    hooks = schemathesis.hooks.GLOBAL_HOOK_DISPATCHER  # before_call is global-only
    hooks.register_hook_with_name(_sign_and_issue, "before_call")
    try:
        return _failures(engine_for(schema).execute())
    finally:
        hooks.unregister(_sign_and_issue)


async def funded_headers(edge: Edge) -> dict[str, str]:
    # An admin too, so that /v1/admin is exercised rather than refused (403) throughout.
    user, auth = edge.user(role="admin")
    await credit(edge.stack.ledger.stub, user, 10**11)  # every generated call is affordable
    return auth


async def test_schemathesis_finds_nothing(edge: Edge) -> None:
    served = await edge.call("GET", "/openapi.json")
    headers = await funded_headers(edge)
    seed = random.getrandbits(32)
    # Synchronous HTTP in a thread; the edge keeps serving on this loop.
    failures = await asyncio.to_thread(run_schemathesis, served.body, edge.url, headers, seed)
    assert not failures, f"seed {seed}:\n\n" + "\n\n".join(failures[:10])


async def test_a_drifted_schema_is_caught(edge: Edge) -> None:
    """The run above can fail: a document that allows more than the handler (estimates up to
    twice the core's bound) gets a schema-valid request refused, and one that allows less
    (maxTokens up to 10 for a call) gets a schema-invalid request served."""
    drifted = copy.deepcopy((await edge.call("GET", "/openapi.json")).body)
    schemas = drifted["components"]["schemas"]
    bounds = {"EligibilityRequest": ("estimatedTokens", 2 * handlers.MAX_ESTIMATED_TOKENS)}
    bounds["GenerateRequest"] = ("maxTokens", 10)
    for name, (field, maximum) in bounds.items():
        for branch in schemas[name]["properties"][field]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = maximum
    headers = await funded_headers(edge)
    only = {"/v1/eligibility", "/v1/generate"}
    drifted["paths"] = {path: ops for path, ops in drifted["paths"].items() if path in only}
    failures = await asyncio.to_thread(
        run_schemathesis, drifted, edge.url, headers, random.getrandbits(32)
    )
    text = "\n".join(failures)
    assert "positive_data_acceptance" in text, text[:2000]
    assert "negative_data_rejection" in text, text[:2000]


# ---- the property, without the network ------------------------------------------------------

_VALIDATORS = {
    name: jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}
    )
    for name in ("GenerateRequest", "EligibilityRequest")
}
MODELS: dict[str, type[Body]] = {
    "GenerateRequest": handlers.GenerateRequest,
    "EligibilityRequest": handlers.EligibilityRequest,
}

# Values that sit on every rule's edge: names in odd cases and spaces, blanks of every kind,
# control and format characters, astral and unassigned code points, lone surrogates, numbers at
# and past each bound, integral and fractional floats, and the wrong types.
_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "\t\n",
            "\u3000",
            "\x1c",
            "\u200b",
            "\u0085",
            "claude-haiku-4-5",
            "  Claude-x ",
            "gpt-4o",
            "O3-mini",
            "chatGPT",
            "llama",
            "anthropic",
            " OpenAI ",
            "ANTHROPIC\n",
            "acme",
            "sk-\u043a\u043b",
            "sk-own\r\n",
            "\U0001f600 hi",
            "\U000e0001",
            "\ud800",
            "a\udc00",
            "\u0378",
            "x" * 201,
        ]
    ),
    st.text(max_size=12),
    st.text(st.characters(codec="ascii"), max_size=12),
)
_NUMBER = st.one_of(
    st.sampled_from([0, 1, -1, 100, 128_000, 128_001, 10**9, 10**9 + 1, 2**31, 10**40, -(10**40)]),
    st.sampled_from([5.0, 1e2, 5.5, -0.0, 1e300]),
    st.integers(),
)
_VALUE = st.one_of(_TEXT, _NUMBER, st.booleans(), st.none(), st.lists(st.integers(), max_size=2))


_PRINTABLE_TEXT = st.text(st.characters(categories=["L", "N", "P", "S"]), max_size=8)
_FAMILY_MODEL = st.builds(  # a family's prefix (any case, spaces before), then anything
    lambda spaces, prefix, rest: spaces + prefix + rest,
    st.sampled_from(["", " ", "  "]),
    st.sampled_from(["claude", "gpt", "o1", "o3", "o4", "chatgpt"]).flatmap(
        lambda word: st.sampled_from([word, word.upper(), word.title()])
    ),
    _PRINTABLE_TEXT,
)
# Per field: values its rules accept (mostly), and values on or past their edges.
_GOOD: dict[str, st.SearchStrategy[Any]] = {
    "content": st.text(min_size=1, max_size=16),
    "systemPrompt": st.one_of(st.none(), st.text(max_size=8)),
    "provider": st.one_of(
        st.none(), st.sampled_from(["", " ", "anthropic", "openai", " OpenAI ", "ANTHROPIC"])
    ),
    "model": st.one_of(st.none(), _FAMILY_MODEL, _PRINTABLE_TEXT),
    "maxTokens": st.one_of(st.none(), st.integers(0, 128_000), st.just(100.0)),
    "apiKey": st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126))),
    "idempotencyKey": st.one_of(st.none(), _PRINTABLE_TEXT, st.just("k" * 200)),
    "estimatedTokens": st.one_of(st.none(), st.integers(0, 10**9)),
    "hasApiKey": st.one_of(st.none(), st.booleans()),
    # No prompt is configured here: a well-formed id is 404, which the schema cannot know.
    "promptId": st.none(),
    "variables": st.none(),
}
_EDGE: dict[str, st.SearchStrategy[Any]] = {
    "content": st.sampled_from(["", " ", "\t\n", "\u3000", "\x1c", "\u0085", "\ud800"]),
    "systemPrompt": st.sampled_from(["\ud800", "a\udc00", 5]),
    "provider": st.sampled_from(["acme", "openai\t", "anthr\u200bopic", "\u212aopenai", 1]),
    "model": st.sampled_from(["llama", "claude\n", "gpt\u200b", "\U000e0001", "\u0378", "\ud800"]),
    "maxTokens": st.one_of(
        st.integers(128_000, 2**31),
        st.sampled_from([-1, 10**40, -(10**40), 5.5, 1e300, "5", True]),
    ),
    "apiKey": st.sampled_from(["sk-\u043a\u043b", "sk-own\r\n", "\x7f", ""]),
    "idempotencyKey": st.sampled_from(["k" * 201, "key\r\n", "\u200b", "\ud800"]),
    "estimatedTokens": st.one_of(
        st.integers(10**9, 2**63), st.sampled_from([-1, 10**40, 2.5, "1", False])
    ),
    "hasApiKey": st.sampled_from([0, 1, "true", 1.0]),
    "promptId": st.sampled_from(["", " x", "a/b", "x" * 129, "\ud800", 5]),
    "variables": st.sampled_from([{"n": 1.5}, {"n": [1]}, {"n": 10**18}, {"n": None}, []]),
}


@st.composite
def _bodies(draw: st.DrawFn, model: type[Body]) -> dict[str, Any]:
    """A body whose fields mostly keep their rules, with one field (or a required one) broken
    now and then, or an unknown field added."""
    names = list(model.rules)
    body = draw(st.fixed_dictionaries({}, optional={name: _GOOD[name] for name in names}))
    if "content" in names and draw(st.integers(0, 9)):  # required by one model: mostly there
        body.setdefault("content", draw(_GOOD["content"]))
    mutation = draw(st.sampled_from(["none", "edge", "edge", "anything", "unknown"]))
    name = draw(st.sampled_from(names))
    if mutation == "edge":
        body[name] = draw(_EDGE[name])
    elif mutation == "anything":
        body[name] = draw(_VALUE)
    elif mutation == "unknown":
        body[draw(st.sampled_from(["max_tokens", "extra", "Content"]))] = draw(_VALUE)
    return body


def _model_accepts(model: type[Body], raw: bytes) -> bool:
    try:
        reading.body_of(model, reading.parse_json(raw))
    except InvalidInput as refusal:
        named = refusal.metadata.get("field")
    else:
        return True
    assert named, raw  # a refusal names the field at fault
    return False


def _lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return not is_unicode_text(value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(_lone_surrogate(v) for v in value)


def _schema_accepts(name: str, raw: bytes) -> bool:
    value = json.loads(raw)
    # The document's bodies are I-JSON (RFC 7493): no lone surrogates, whatever the schema.
    return not _lone_surrogate(value) and _VALIDATORS[name].is_valid(value)


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_schema_and_model_agree(name: str, data: st.DataObject) -> None:
    raw = json.dumps(data.draw(_bodies(MODELS[name]))).encode()  # as a client sends it
    assert _schema_accepts(name, raw) == _model_accepts(MODELS[name], raw), raw


async def test_models_and_handlers_agree(edge: Edge) -> None:
    loop = asyncio.get_running_loop()
    signed_in = await funded_headers(edge)
    paths = {"GenerateRequest": "/v1/generate", "EligibilityRequest": "/v1/eligibility"}

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def agree(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(MODELS)))
        raw = json.dumps(data.draw(_bodies(MODELS[name]))).encode()
        headers = {
            "Content-Type": "application/json",
            **data.draw(st.sampled_from([{}, signed_in])),
        }
        call = edge.call("POST", paths[name], data=raw, headers=headers)
        reply = asyncio.run_coroutine_threadsafe(call, loop).result()
        assert reply.status < 500, (raw, reply.body)
        served = reply.status != 400
        assert served == _model_accepts(MODELS[name], raw), (raw, reply.status, reply.body)

    await asyncio.to_thread(agree)  # the edge keeps serving on this loop
