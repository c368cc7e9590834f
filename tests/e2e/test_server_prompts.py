"""Server-held prompts over the real stack (ledger on its database, provider stand-in, gateway on
both transports), with PROMPTS_DIR in a temporary directory:

- a call by prompt_id is held and charged exactly like the same call with the rendered system
  prompt sent by the caller (the ledger's own rows compared: hold amount, charge, usage counts);
- the prompt's text appears in no answer, no refusal and no log line;
- ListPrompts and GET /v1/prompts list prompts without their text;
- the usage record carries the prompt's id and version;
- an unknown id is NOT_FOUND / 404 PROMPT_NOT_FOUND; a prompt and a system prompt together are
  INVALID_ARGUMENT / 400.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH, LedgerHarness
from tests.e2e.conftest import Stack
from tests.e2e.e2e_support import gateway_on, rpc_error
from tests.ledger_service.helpers import credit

SECRET = "CONFIDENTIAL-PROMPT-TEXT-7f3a"
PROMPT_FILE = f"""
version = "4"
description = "Reviews code"
system = '''{SECRET} Review this $language code for a ${{level}} reader. {{"format": "json"}} $$1'''
max_tokens = 40

[variables.language]
type = "string"

[variables.level]
type = "string"
default = "senior"
"""
# The same prompt rendered by hand (the caller-sent twin of a call by id).
RENDERED = f'{SECRET} Review this Go code for a junior reader. {{"format": "json"}} $1'
CONTENT = "[[usage:30,5]] func main() {}"


@pytest.fixture
async def prompts_stack(
    ledger: LedgerHarness, sim_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Stack, str]]:
    (tmp_path / "review.toml").write_text(PROMPT_FILE)
    async with gateway_on(ledger, sim_url, prompts_dir=tmp_path, prompts_reload_seconds=0) as stack:
        port = await stack.gateway.start_http("127.0.0.1:0")
        yield stack, f"http://127.0.0.1:{port}"


async def _funded(stack: Stack) -> tuple[str, tuple[tuple[str, str]]]:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 100_000)
    return user, auth


async def _rows(ledger: LedgerHarness, user: str) -> list[dict[str, Any]]:
    """The ledger's facts of a user's calls: each hold and the usage record of its settle."""
    conn: asyncpg.Connection = await ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT h.amount, h.status, u.input_tokens, u.output_tokens, u.tokens_charged,"
            " u.usage_fee_tokens, u.provider, u.model, u.prompt_id, u.prompt_version"
            " FROM holds h JOIN usage_records u ON u.hold_id = h.id AND u.user_id = h.user_id"
            " WHERE h.user_id = $1 ORDER BY h.created_at",
            user,
        )
        balance = await conn.fetchval("SELECT available FROM accounts WHERE user_id = $1", user)
    finally:
        await conn.close()
    return [{**dict(row), "available": balance} for row in rows]


def _without_prompt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in row.items() if k not in ("prompt_id", "prompt_version")} for row in rows
    ]


async def test_a_grpc_call_by_prompt_is_held_and_charged_like_the_rendered_prompt(
    prompts_stack: tuple[Stack, str], caplog: pytest.LogCaptureFixture
) -> None:
    stack, _ = prompts_stack
    by_id, by_id_auth = await _funded(stack)
    by_text, by_text_auth = await _funded(stack)
    with caplog.at_level(logging.DEBUG):  # every log line of the call by id, SDKs' included
        named = await stack.stub.GenerateText(
            pb.GenerateTextRequest(
                content=CONTENT, prompt_id="review", variables={"language": "Go", "level": "junior"}
            ),
            metadata=by_id_auth,
        )
    logged = caplog.text
    sent = await stack.stub.GenerateText(
        pb.GenerateTextRequest(content=CONTENT, system_prompt=RENDERED, max_tokens=40),
        metadata=by_text_auth,
    )
    assert named.token_usage.tokens_charged == sent.token_usage.tokens_charged > 0
    assert named.token_usage.remaining_balance == sent.token_usage.remaining_balance
    id_rows, text_rows = await _rows(stack.ledger, by_id), await _rows(stack.ledger, by_text)
    assert len(id_rows) == 1
    assert _without_prompt(id_rows) == _without_prompt(text_rows)
    assert (id_rows[0]["prompt_id"], id_rows[0]["prompt_version"]) == ("review", "4")
    assert (text_rows[0]["prompt_id"], text_rows[0]["prompt_version"]) == (None, None)
    # The hold is sized from the rendered text (held_for's rule, computed apart) plus the
    # prompt's max_tokens: a byte per UTF-8 byte, 16 framing + 16 a message, then the fee.
    tokens = len(CONTENT.encode()) + len(RENDERED.encode()) + 16 + 32 + 40
    assert id_rows[0]["amount"] == tokens + -(-tokens * 25 // 100)
    assert SECRET not in str(named)
    assert "Review this" not in str(named)
    assert "rpcai.access" in logged  # the call was logged, and
    assert SECRET not in logged  # its prompt was not


async def test_an_http_call_and_stream_by_prompt_match_the_rendered_prompt(
    prompts_stack: tuple[Stack, str], caplog: pytest.LogCaptureFixture
) -> None:
    stack, url = prompts_stack
    by_id, by_id_auth = await _funded(stack)
    by_text, by_text_auth = await _funded(stack)
    bodies = []
    async with aiohttp.ClientSession() as session:
        with caplog.at_level(logging.DEBUG):
            for path in ("/v1/generate", "/v1/generate/stream"):
                async with session.post(
                    url + path,
                    json={
                        "content": CONTENT,
                        "promptId": "review",
                        "variables": {"language": "Go", "level": "junior"},
                    },
                    headers=dict(by_id_auth),
                ) as response:
                    bodies.append(await response.text())
                    assert response.status == 200, bodies[-1]
        logged = caplog.text
        for path in ("/v1/generate", "/v1/generate/stream"):
            async with session.post(
                url + path,
                json={"content": CONTENT, "systemPrompt": RENDERED, "maxTokens": 40},
                headers=dict(by_text_auth),
            ) as response:
                assert response.status == 200, await response.text()
    id_rows, text_rows = await _rows(stack.ledger, by_id), await _rows(stack.ledger, by_text)
    assert len(id_rows) == 2
    assert _without_prompt(id_rows) == _without_prompt(text_rows)
    assert {(row["prompt_id"], row["prompt_version"]) for row in id_rows} == {("review", "4")}
    assert json.loads(bodies[0])["tokenUsage"]["tokensCharged"] == id_rows[0]["tokens_charged"]
    for text in (*bodies, logged):
        assert SECRET not in text
        assert "Review this" not in text


async def test_prompts_are_listed_without_their_text(prompts_stack: tuple[Stack, str]) -> None:
    stack, url = prompts_stack
    listed = await stack.stub.ListPrompts(pb.ListPromptsRequest())  # any caller
    assert [(p.id, p.version, p.description, p.max_tokens) for p in listed.prompts] == [
        ("review", "4", "Reviews code", 40)
    ]
    assert [(v.name, v.type, v.required) for v in listed.prompts[0].variables] == [
        ("language", "string", True),
        ("level", "string", False),
    ]
    assert listed.prompts[0].variables[1].default_value == "senior"
    assert SECRET not in str(listed)
    assert "Review this" not in str(listed)
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/prompts") as response:
        assert response.status == 200
        text = await response.text()
    assert json.loads(text)["prompts"][0]["variables"][1] == {
        "name": "level",
        "type": "string",
        "required": False,
        "default": "senior",
        "description": "",
    }
    assert SECRET not in text
    assert "Review this" not in text


async def test_refusals_name_the_problem_never_the_text(
    prompts_stack: tuple[Stack, str], caplog: pytest.LogCaptureFixture
) -> None:
    stack, url = prompts_stack
    user, auth = await _funded(stack)
    refusals: list[str] = []
    with caplog.at_level(logging.DEBUG):
        cases = [
            (pb.GenerateTextRequest(content=CONTENT, prompt_id="nope"), "NOT_FOUND"),
            (
                pb.GenerateTextRequest(content=CONTENT, prompt_id="review", system_prompt="mine"),
                "INVALID_ARGUMENT",
            ),
            (pb.GenerateTextRequest(content=CONTENT, prompt_id="review"), "INVALID_ARGUMENT"),
            (
                pb.GenerateTextRequest(
                    content=CONTENT, prompt_id="review", variables={"language": "Go", "x": "1"}
                ),
                "INVALID_ARGUMENT",
            ),
        ]
        for request, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stack.stub.GenerateText(request, metadata=auth)
            code_got, reason = rpc_error(exc.value)
            assert code_got.name == code, (code_got, reason)
            refusals.append(str(exc.value.details()))
        assert rpc_error(exc.value)[1] == "INVALID_ARGUMENT"
        async with aiohttp.ClientSession() as session:
            for body, status, reason, field in [
                ({"content": CONTENT, "promptId": "nope"}, 404, "PROMPT_NOT_FOUND", "promptId"),
                (
                    {"content": CONTENT, "promptId": "review", "systemPrompt": "mine"},
                    400,
                    "INVALID_ARGUMENT",
                    "systemPrompt",
                ),
                (
                    {"content": CONTENT, "promptId": "review", "variables": {"language": 3}},
                    400,
                    "INVALID_ARGUMENT",
                    "variables.language",
                ),
            ]:
                async with session.post(
                    url + "/v1/generate", json=body, headers=dict(auth)
                ) as response:
                    text = await response.text()
                    error = json.loads(text)["error"]
                    assert (response.status, error["reason"], error.get("field")) == (
                        status,
                        reason,
                        field,
                    ), text
                    refusals.append(text)
    assert await _rows(stack.ledger, user) == []  # nothing held, nothing charged
    for text in (*refusals, caplog.text):
        assert SECRET not in text
        assert "Review this" not in text


async def test_the_ledger_checks_and_stores_the_prompt_of_a_usage_record(
    prompts_stack: tuple[Stack, str],
) -> None:
    """RecordUsage (BYOK) with a prompt: stored whole; not an id (blank, control character, over
    256 characters), or half a prompt, is INVALID_ARGUMENT naming it; the prompt is part of
    what a replay must match."""
    stack, _ = prompts_stack
    ledger = stack.ledger.stub

    def usage(prompt_id: str, version: str) -> lpb.RecordUsageRequest:
        request = lpb.RecordUsageRequest(
            idempotency_key=f"byok-{uuid.uuid4()}",
            user_id="prompt-user",
            user_type=lpb.USER_TYPE_BYOK,
            usage=lpb.Usage(provider="anthropic", model="m", input_tokens=3, output_tokens=4),
        )
        request.usage.prompt.id = prompt_id
        request.usage.prompt.version = version
        return request

    for prompt_id, version, field in [
        ("", "1", "usage.prompt.id"),
        ("a\nb", "1", "usage.prompt.id"),
        ("x" * 257, "1", "usage.prompt.id"),
        ("review", "", "usage.prompt.version"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await ledger.RecordUsage(usage(prompt_id, version), metadata=AUTH)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(exc.value.details())
    first = usage("review", "4")
    recorded = await ledger.RecordUsage(first, metadata=AUTH)
    conn: asyncpg.Connection = await stack.ledger.db()
    try:
        row = await conn.fetchrow(
            "SELECT prompt_id, prompt_version FROM usage_records WHERE id = $1",
            uuid.UUID(recorded.usage_id),
        )
    finally:
        await conn.close()
    assert tuple(row) == ("review", "4")
    assert (await ledger.RecordUsage(first, metadata=AUTH)).replayed
    other = lpb.RecordUsageRequest()
    other.CopyFrom(first)
    other.usage.prompt.version = "5"
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await ledger.RecordUsage(other, metadata=AUTH)
    assert rpc_error(reused.value)[1] == "IDEMPOTENCY_KEY_REUSED"


async def test_eligibility_by_prompt_sizes_the_hold_from_the_rendered_text(
    prompts_stack: tuple[Stack, str],
) -> None:
    """Eligibility names what the call by id would hold: the rendered text and the prompt's
    max_tokens, as its Reserve takes them (the call then holds exactly that)."""
    stack, url = prompts_stack
    user, auth = await _funded(stack)
    variables = {"language": "Go", "level": "junior"}
    checked = await stack.stub.CheckRequestEligibility(
        pb.CheckRequestEligibilityRequest(content=CONTENT, prompt_id="review", variables=variables),
        metadata=auth,
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/v1/eligibility",
            json={"content": CONTENT, "promptId": "review", "variables": variables},
            headers=dict(auth),
        ) as response:
            assert response.status == 200, await response.text()
            over_http = await response.json()
        async with session.post(
            url + "/v1/eligibility",
            json={"content": CONTENT, "promptId": "nope"},
            headers=dict(auth),
        ) as response:
            assert response.status == 404
            assert (await response.json())["error"]["reason"] == "PROMPT_NOT_FOUND"
    await stack.stub.GenerateText(
        pb.GenerateTextRequest(content=CONTENT, prompt_id="review", variables=variables),
        metadata=auth,
    )
    [row] = await _rows(stack.ledger, user)
    assert checked.can_make_request
    assert checked.required_tokens == over_http["requiredTokens"] == row["amount"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.CheckRequestEligibility(
            pb.CheckRequestEligibilityRequest(content=CONTENT, prompt_id="review"),
            metadata=auth,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # `language` is required
    # A prompt is sized with the content it is for: without it, refused (never ignored).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.CheckRequestEligibility(
            pb.CheckRequestEligibilityRequest(prompt_id="review", variables=variables),
            metadata=auth,
        )
    assert rpc_error(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/eligibility",
            json={"promptId": "nope", "variables": variables},
            headers=dict(auth),
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "content"


async def test_usage_analytics_break_usage_down_by_prompt(
    prompts_stack: tuple[Stack, str],
) -> None:
    stack, url = prompts_stack
    user, auth = await _funded(stack)
    by_id = pb.GenerateTextRequest(content=CONTENT, prompt_id="review", variables={"language": "C"})
    for request in (by_id, by_id, pb.GenerateTextRequest(content=CONTENT, max_tokens=40)):
        await stack.stub.GenerateText(request, metadata=auth)
    rows = await _rows(stack.ledger, user)
    by_prompt = [r for r in rows if r["prompt_id"] == "review"]
    analytics = await stack.stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(days=1, include_history=True), metadata=auth
    )
    assert [(p.prompt_id, p.prompt_version) for p in analytics.by_prompt] == [("review", "4")]
    summary = analytics.by_prompt[0].summary
    assert (summary.total_requests, summary.tokens_charged) == (
        2,
        sum(r["tokens_charged"] for r in by_prompt),
    )
    assert analytics.summary.total_requests == 3  # the call without a prompt is in no entry
    assert sorted((h.prompt_id, h.prompt_version) for h in analytics.history) == [
        ("", ""),
        ("review", "4"),
        ("review", "4"),
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url + "/v1/me/usage?days=1&include_history=true", headers=dict(auth)
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    assert [
        (p["promptId"], p["promptVersion"], p["summary"]["totalRequests"]) for p in body["byPrompt"]
    ] == [("review", "4", 2)]
    assert sorted(str(h["promptId"]) for h in body["history"]) == ["None", "review", "review"]
