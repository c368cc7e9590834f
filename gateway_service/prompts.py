"""Server-held prompts: named system prompts the gateway renders itself, so a client sends a
prompt's id (and its variables) instead of shipping the prompt's text where anyone can read it.

The invariant: a prompt's text never leaves the server. It is never in a response, an error, a
log line, a metric or a trace; listings say ids, versions, descriptions and variables only; a
refusal names the variable or the file at fault, never the text around it.

Files: one TOML file a prompt in `PROMPTS_DIR`, the file's name (without `.toml`) is its id:

    version = "3"                       # a string (or an integer), recorded with every call's usage
    description = "Explains code"       # optional
    system = '''You explain $language code to a ${level} programmer. Prices in $$.'''
    provider = "anthropic"              # optional defaults, used when the call leaves them empty
    model = "claude-sonnet-4-5"
    max_tokens = 800

    [variables.language]
    type = "string"                     # string | integer | boolean
    description = "the code's language"
    [variables.level]
    type = "string"
    default = "senior"                  # a default makes a variable optional

Placeholders are `string.Template`'s: `$name` or `${name}`, and `$$` for a literal dollar sign
(braces in the text need no escaping: prompts often quote JSON). Every placeholder must be a
declared variable, checked when the file is loaded. A boolean renders as `true`/`false`.

Loading: a file that cannot be read, parsed or validated is logged (its name and what is wrong,
never its text) and the prompt's previous version stays in service; a deleted file drops its
prompt. The directory is read again on `reload()`: on SIGHUP and, every `PROMPTS_RELOAD_SECONDS`
(0: SIGHUP only), when a file's modification time or size changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import signal
import string
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway_service.errors import Failure, GatewayError, invalid
from gateway_service.validation import is_storable_id, is_unicode_text

log = logging.getLogger(__name__)

# A prompt's id is its file's name: short, and safe in a URL, a log line and the ledger.
PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Integers a variable may take (either sign): 18 digits, whatever the transport.
MAX_INTEGER = 10**18 - 1
MAX_VERSION_CHARS = 64
MAX_DESCRIPTION_CHARS = 1000
MAX_VARIABLES = 64
MAX_FILE_BYTES = 256 * 1024
_TOP_KEYS = {"version", "description", "system", "provider", "model", "max_tokens", "variables"}
_VARIABLE_KEYS = {"type", "description", "required", "default"}

Value = str | int | bool


class VariableType(enum.StrEnum):
    STRING = "string"
    INTEGER = "integer"
    BOOLEAN = "boolean"


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    type: VariableType
    # Required exactly when it has no default.
    default: Value | None = None
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    @property
    def default_text(self) -> str | None:
        """The default as it renders (and as gRPC's text map would carry it)."""
        return None if self.default is None else _text(self.default)

    def parse(self, value: Value) -> Value:
        """The value as its type, from JSON (typed) or from gRPC's map (text: `5`, `true`)."""
        where = f"variables.{self.name}"
        if self.type is VariableType.STRING:
            if not isinstance(value, str):
                raise invalid(where, "must be a string")
            if not is_unicode_text(value):
                raise invalid(where, "must be Unicode text (it holds a lone surrogate)")
            return value
        if self.type is VariableType.BOOLEAN:
            if isinstance(value, bool):
                return value
            if value in ("true", "false"):
                return value == "true"
            raise invalid(where, "must be a boolean (true or false)")
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INTEGER:
                raise invalid(where, f"must be within -{MAX_INTEGER}..{MAX_INTEGER}")
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
            return int(value)
        raise invalid(where, "must be an integer")


@dataclass(frozen=True, slots=True)
class Prompt:
    id: str
    version: str
    description: str
    # Never shown: not in repr, nor in any listing (`repr=False`).
    system: str = field(repr=False)
    variables: tuple[Variable, ...] = ()
    provider: str = ""
    model: str = ""
    max_tokens: int = 0

    def render(self, values: Mapping[str, Value]) -> str:
        """The system prompt with `values` filled in. Refusals (INVALID_ARGUMENT) name the
        variable: unknown, missing although required, or of the wrong type."""
        declared = {variable.name: variable for variable in self.variables}
        for name in sorted(values):
            if name not in declared:
                shown = name if is_storable_id(name) and len(name) <= 64 else "(unprintable)"
                raise invalid(f"variables.{shown}", f"prompt {self.id} has no such variable")
        filled: dict[str, str] = {}
        for variable in self.variables:
            if variable.name in values:
                value = variable.parse(values[variable.name])
            elif variable.default is not None:
                value = variable.default
            else:
                raise invalid(f"variables.{variable.name}", "is required")
            filled[variable.name] = _text(value)
        return string.Template(self.system).substitute(filled)


@dataclass(frozen=True, slots=True)
class PromptRef:
    """What a call's usage record says of its prompt."""

    id: str
    version: str


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class PromptFileError(ValueError):
    """A prompt file that cannot be served; the message never quotes the file's text."""


def parse_prompt(prompt_id: str, data: bytes) -> Prompt:
    """A prompt from its file's bytes, validated; PromptFileError says what is wrong."""
    if not PROMPT_ID.fullmatch(prompt_id):
        raise PromptFileError("the file name must be an id: letters, digits, '.', '_', '-'")
    if len(data) > MAX_FILE_BYTES:
        raise PromptFileError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PromptFileError("not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        # Its message says where (line and column), not what is written there.
        raise PromptFileError(f"not valid TOML: {exc}") from None
    if unknown := sorted(set(table) - _TOP_KEYS):
        raise PromptFileError(f"unknown keys: {', '.join(unknown[:5])}")
    version = table.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not is_storable_id(version):
        raise PromptFileError("version: required, a string of printable characters")
    if len(version) > MAX_VERSION_CHARS:
        raise PromptFileError(f"version: at most {MAX_VERSION_CHARS} characters")
    description = _string(table, "description")
    if len(description) > MAX_DESCRIPTION_CHARS or not description.isprintable():
        raise PromptFileError(f"description: at most {MAX_DESCRIPTION_CHARS} printable characters")
    system = table.get("system")
    if not isinstance(system, str) or not system.strip():
        raise PromptFileError("system: required, the prompt's text")
    provider = _string(table, "provider")
    model = _string(table, "model")
    for name, value in (("provider", provider), ("model", model)):
        if value and not is_storable_id(value):
            raise PromptFileError(f"{name}: must be printable")
    max_tokens = table.get("max_tokens", 0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise PromptFileError("max_tokens: a whole number, 0 or more")
    variables = _variables(table.get("variables", {}))
    template = string.Template(system)
    if not template.is_valid():
        raise PromptFileError("system: a '$' that starts no placeholder (write '$$' for '$')")
    names = {variable.name for variable in variables}
    if undeclared := sorted(set(template.get_identifiers()) - names):
        raise PromptFileError(f"system: undeclared variables: {', '.join(undeclared[:5])}")
    return Prompt(
        id=prompt_id,
        version=version,
        description=description,
        system=system,
        variables=variables,
        provider=provider,
        model=model,
        max_tokens=max_tokens,
    )


def _string(table: Mapping[str, object], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise PromptFileError(f"{key}: must be a string")
    return value


_TYPES_OF = {
    VariableType.STRING: (str,),
    VariableType.INTEGER: (int,),
    VariableType.BOOLEAN: (bool,),
}


def _variables(table: object) -> tuple[Variable, ...]:
    if not isinstance(table, dict):
        raise PromptFileError("variables: a table of tables ([variables.NAME])")
    if len(table) > MAX_VARIABLES:
        raise PromptFileError(f"variables: at most {MAX_VARIABLES}")
    found: list[Variable] = []
    for name, spec in table.items():
        where = f"variables.{name}" if VARIABLE_NAME.fullmatch(name) else ""
        if not where:
            raise PromptFileError("variables: names are identifiers ([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(spec, dict):
            raise PromptFileError(f"{where}: a table (type, description, default)")
        if unknown := sorted(set(spec) - _VARIABLE_KEYS):
            raise PromptFileError(f"{where}: unknown keys: {', '.join(unknown[:5])}")
        try:
            kind = VariableType(spec.get("type", "string"))
        except ValueError:
            raise PromptFileError(f"{where}.type: string, integer or boolean") from None
        default = spec.get("default")
        if default is not None:
            if isinstance(default, bool) != (kind is VariableType.BOOLEAN) or not isinstance(
                default, _TYPES_OF[kind]
            ):
                raise PromptFileError(f"{where}.default: must be of type {kind}")
            if spec.get("required") is True:
                raise PromptFileError(f"{where}: a required variable has no default")
        elif spec.get("required") is False:
            raise PromptFileError(f"{where}: an optional variable needs a default")
        description = spec.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise PromptFileError(f"{where}.description: a string")
        value: Value | None = default if isinstance(default, str | int) else None
        found.append(Variable(name, kind, value, description))
    return tuple(found)


def prompt_not_found(prompt_id: str) -> GatewayError:
    shown = prompt_id if PROMPT_ID.fullmatch(prompt_id) else "(not a prompt id)"
    return GatewayError(
        Failure.NOT_FOUND, "PROMPT_NOT_FOUND", f"no prompt {shown}", {"field": "prompt_id"}
    )


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a file looked like when it was last read (its stat), to skip unchanged files."""

    mtime_ns: int
    size: int


class PromptLibrary:
    """The prompts of one directory, reloaded on demand (`reload`), on SIGHUP and by polling
    (`start`). Readers get a consistent snapshot: a reload swaps the whole table at once."""

    def __init__(self, directory: Path | None, reload_seconds: float = 5.0) -> None:
        self.directory = directory
        self.reload_seconds = reload_seconds
        self._prompts: dict[str, Prompt] = {}
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._signalled = False
        self._wake = asyncio.Event()
        if directory is not None:
            self.reload()

    def get(self, prompt_id: str) -> Prompt:
        prompt = self._prompts.get(prompt_id)
        if prompt is None:
            raise prompt_not_found(prompt_id)
        return prompt

    def list(self) -> list[Prompt]:
        return sorted(self._prompts.values(), key=lambda prompt: prompt.id)

    def reload(self, force: bool = False) -> int:
        """Reads the files that changed (all of them with `force`); returns how many prompts
        were (re)loaded. Bad files keep their previous version; deleted files drop theirs."""
        if self.directory is None:
            return 0
        with self._lock:
            return self._reload(self.directory, force)

    def _reload(self, directory: Path, force: bool) -> int:
        try:
            paths = {path.stem: path for path in directory.glob("*.toml") if path.is_file()}
        except OSError as exc:
            log.error("prompts: cannot list %s (%s); keeping what is loaded", directory, exc)
            return 0
        prompts = dict(self._prompts)
        seen = dict(self._seen)
        for gone in set(seen) - set(paths):
            seen.pop(gone)
            if prompts.pop(gone, None) is not None:
                log.info("prompts: %s dropped (its file is gone)", gone)
        loaded = 0
        for prompt_id, path in sorted(paths.items()):
            try:
                stat = path.stat()
                now = _Seen(stat.st_mtime_ns, stat.st_size)
                if not force and seen.get(prompt_id) == now:
                    continue
                seen[prompt_id] = now
                prompt = parse_prompt(prompt_id, path.read_bytes())
            except (OSError, PromptFileError) as exc:
                kept = prompts.get(prompt_id)
                log.error(
                    "prompts: %s not loaded: %s; %s",
                    path.name,
                    exc,
                    f"version {kept.version} stays" if kept else "it is not served",
                )
                continue
            previous = prompts.get(prompt_id)
            prompts[prompt_id] = prompt
            loaded += 1
            if previous is None or previous != prompt:
                log.info("prompts: %s version %s loaded", prompt_id, prompt.version)
        self._prompts = prompts
        self._seen = seen
        return loaded

    # ---- reloading while serving ------------------------------------------------------------

    def start(self) -> None:
        """SIGHUP reloads (forced), and every `reload_seconds` the changed files are read."""
        if self.directory is None:
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            log.warning("prompts: SIGHUP not available here; polling only")
        self._poller = asyncio.create_task(self._poll(), name="prompts-reload")

    def _on_sighup(self) -> None:
        log.info("prompts: SIGHUP, reloading %s", self.directory)
        self._signalled = True
        self._wake.set()

    async def _poll(self) -> None:
        wake = self._wake
        while True:
            timeout = self.reload_seconds if self.reload_seconds > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
            wake.clear()
            force, self._signalled = self._signalled, False
            try:
                await asyncio.to_thread(self.reload, force)
            except Exception:  # never let one bad reload stop the next
                log.exception("prompts: reload failed")

    async def stop(self) -> None:
        if self._poller is None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Removing it restores SIGHUP's default action, which would end a draining process.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)
        self._poller = None
