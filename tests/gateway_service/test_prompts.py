"""The prompt library: loading and validating files, keeping the last good version of a bad
file, dropping deleted ones, reloading on change and on SIGHUP, and rendering with its refusals
(which name the variable and never quote the prompt's text)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from gateway_service.errors import Failure, GatewayError
from gateway_service.prompts import PromptFileError, PromptLibrary, parse_prompt

SECRET = "TOP-SECRET-INSTRUCTIONS"

GOOD = f"""
version = "2"
description = "Explains code"
system = '''{SECRET}: explain $language code to a ${{level}} reader \
in $points points. {{json}} $$5'''
provider = "anthropic"
model = "claude-haiku-4-5"
max_tokens = 300

[variables.language]
type = "string"
description = "the language"

[variables.level]
type = "string"
default = "senior"

[variables.points]
type = "integer"
default = 3

[variables.terse]
type = "boolean"
default = false
"""


def write(directory: Path, name: str, text: str, bump: int = 0) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    # A distinct modification time, as a later edit has (the poller compares them).
    stamp = time.time_ns() + bump * 10**9
    os.utime(path, ns=(stamp, stamp))
    return path


def refusal(exc: pytest.ExceptionInfo[GatewayError]) -> tuple[Failure, str, str]:
    return exc.value.failure, exc.value.metadata.get("field", ""), exc.value.message


def test_a_prompt_loads_with_its_variables_and_defaults(tmp_path: Path) -> None:
    write(tmp_path, "explain-code", GOOD)
    library = PromptLibrary(tmp_path)
    prompt = library.get("explain-code")
    assert (prompt.id, prompt.version, prompt.description) == ("explain-code", "2", "Explains code")
    assert (prompt.provider, prompt.model, prompt.max_tokens) == (
        "anthropic",
        "claude-haiku-4-5",
        300,
    )
    assert [(v.name, v.type.value, v.required) for v in prompt.variables] == [
        ("language", "string", True),
        ("level", "string", False),
        ("points", "integer", False),
        ("terse", "boolean", False),
    ]
    assert SECRET not in repr(prompt)
    assert SECRET not in repr(library.list())


def test_rendering_fills_placeholders_and_keeps_braces_and_dollars(tmp_path: Path) -> None:
    write(tmp_path, "explain-code", GOOD)
    prompt = PromptLibrary(tmp_path).get("explain-code")
    text = prompt.render({"language": "Rust", "points": "7"})  # gRPC's map carries text
    assert text == f"{SECRET}: explain Rust code to a senior reader in 7 points. {{json}} $5"
    assert prompt.render({"language": "Go", "level": "new", "points": 2, "terse": True}) == (
        f"{SECRET}: explain Go code to a new reader in 2 points. {{json}} $5"
    )


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({}, "variables.language"),  # required and missing
        ({"language": "Go", "colour": "red"}, "variables.colour"),  # not declared
        ({"language": 5}, "variables.language"),  # a string expected
        ({"language": "Go", "points": "many"}, "variables.points"),
        ({"language": "Go", "points": 10**18}, "variables.points"),  # past the bound
        ({"language": "Go", "points": True}, "variables.points"),  # a boolean is no integer
        ({"language": "Go", "terse": "yes"}, "variables.terse"),
        ({"language": "Go", "terse": 1}, "variables.terse"),
        ({"language": "a\ud800"}, "variables.language"),  # no UTF-8 form
    ],
)
def test_bad_variables_are_refused_by_name_without_the_text(
    tmp_path: Path, values: dict[str, str | int | bool], field: str
) -> None:
    write(tmp_path, "explain-code", GOOD)
    prompt = PromptLibrary(tmp_path).get("explain-code")
    with pytest.raises(GatewayError) as exc:
        prompt.render(values)
    failure, named, message = refusal(exc)
    assert (failure, named) == (Failure.INVALID_ARGUMENT, field)
    assert SECRET not in message
    assert "code to a" not in message


def test_an_unknown_id_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(GatewayError) as exc:
        PromptLibrary(tmp_path).get("nope")
    assert (exc.value.failure, exc.value.reason) == (Failure.NOT_FOUND, "PROMPT_NOT_FOUND")
    with pytest.raises(GatewayError) as unset:
        PromptLibrary(None).get("nope")  # no PROMPTS_DIR: no prompts at all
    assert unset.value.reason == "PROMPT_NOT_FOUND"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("system = 'x'", "version"),
        ("version = '1'", "system"),
        ("version = '1'\nsystem = '''$who'''", "undeclared variables: who"),
        ("version = '1'\nsystem = '''costs $5'''", "'$$'"),
        ("version = '1'\nsystem = 'x'\ncolour = 1", "unknown keys: colour"),
        ("version = '1'\nsystem = 'x'\n[variables.n]\ntype = 'float'", "variables.n.type"),
        ("version = '1'\nsystem = 'x'\n[variables.n]\ntype='integer'\ndefault='2'", "default"),
        ("version = '1'\nsystem = 'x'\n[variables.n]\nrequired = false", "needs a default"),
        ("version = '1'\nsystem = 'x'\nmax_tokens = -1", "max_tokens"),
        (f"version = '1'\nsystem = '''{SECRET}", "not valid TOML"),
    ],
)
def test_invalid_files_are_refused_without_quoting_them(text: str, problem: str) -> None:
    with pytest.raises(PromptFileError) as exc:
        parse_prompt("p", text.encode())
    assert problem in str(exc.value)
    assert SECRET not in str(exc.value)


def test_a_bad_file_keeps_the_previous_version_and_is_logged_without_its_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "explain-code", GOOD)
    library = PromptLibrary(tmp_path)
    broken = GOOD.replace('version = "2"', 'version = "3"').replace("$language", "$lang")
    write(tmp_path, "explain-code", broken, bump=1)
    with caplog.at_level(logging.INFO, logger="gateway_service.prompts"):
        assert library.reload() == 0
    assert library.get("explain-code").version == "2"
    assert "explain-code.toml not loaded" in caplog.text
    assert "version 2 stays" in caplog.text
    assert SECRET not in caplog.text
    # A bad new file is not served at all.
    write(tmp_path, "fresh", "version = '1'", bump=1)
    library.reload()
    with pytest.raises(GatewayError):
        library.get("fresh")


def test_a_changed_file_is_reloaded_and_a_deleted_one_dropped(tmp_path: Path) -> None:
    path = write(tmp_path, "explain-code", GOOD)
    write(tmp_path, "other", "version = 'a'\nsystem = 'Be brief.'")
    library = PromptLibrary(tmp_path)
    assert [p.id for p in library.list()] == ["explain-code", "other"]
    assert library.reload() == 0  # nothing changed: nothing read
    write(tmp_path, "explain-code", GOOD.replace('version = "2"', 'version = "3"'), bump=1)
    assert library.reload() == 1
    assert library.get("explain-code").version == "3"
    path.unlink()
    library.reload()
    assert [p.id for p in library.list()] == ["other"]


async def test_polling_picks_up_a_change(tmp_path: Path) -> None:
    write(tmp_path, "explain-code", GOOD)
    library = PromptLibrary(tmp_path, reload_seconds=0.05)
    library.start()
    try:
        write(tmp_path, "explain-code", GOOD.replace('version = "2"', 'version = "9"'), bump=1)
        deadline = asyncio.get_running_loop().time() + 5
        while library.get("explain-code").version != "9":
            assert asyncio.get_running_loop().time() < deadline, "not reloaded"
            await asyncio.sleep(0.02)
    finally:
        await library.stop()


async def test_sighup_reloads_even_when_polling_is_off(tmp_path: Path) -> None:
    write(tmp_path, "explain-code", GOOD)
    library = PromptLibrary(tmp_path, reload_seconds=0)
    library.start()
    try:
        # Same size and modification time: only a forced reload (SIGHUP) reads it again.
        path = tmp_path / "explain-code.toml"
        stat = path.stat()
        path.write_text(GOOD.replace('version = "2"', 'version = "8"'))
        os.utime(path, ns=(stat.st_mtime_ns, stat.st_mtime_ns))
        await asyncio.sleep(0.1)
        assert library.get("explain-code").version == "2"  # polling is off
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 5
        while library.get("explain-code").version != "8":
            assert asyncio.get_running_loop().time() < deadline, "SIGHUP did not reload"
            await asyncio.sleep(0.02)
    finally:
        await library.stop()
