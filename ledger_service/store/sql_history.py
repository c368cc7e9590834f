"""The ledger's SQL functions as an earlier migration defined them, read from that migration's own
text: a later migration restores them on its downgrade, or derives its own from them, without a
second copy of the text that could drift from the first."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

VERSIONS = Path(__file__).resolve().parents[2] / "migrations" / "versions"
_DEFINITION = re.compile(
    r"CREATE (?:OR REPLACE )?FUNCTION (\w+)\(.*?\n(?:END )?\$\$;", re.DOTALL | re.MULTILINE
)


def definitions(revision: str, attributes: Sequence[str] = ("FUNCTIONS",)) -> dict[str, str]:
    """The CREATE FUNCTION statements in the named module-level strings of a revision's module,
    by function name."""
    [path] = VERSIONS.glob(f"{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"_rpcai_migration_{revision}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "\n".join(
        value for name in attributes if isinstance(value := getattr(module, name, None), str)
    )
    return {m.group(1): m.group(0) for m in _DEFINITION.finditer(text)}


def replaceable(definition: str) -> str:
    return definition.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def restored(revisions: Mapping[str, Sequence[str]]) -> str:
    """CREATE OR REPLACE statements for the named functions of each revision, as it had them."""
    return "\n".join(
        replaceable(definitions(revision)[name])
        for revision, names in revisions.items()
        for name in names
    )
