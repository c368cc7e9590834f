"""Generate the Python stubs from protos/ into shared/gen/ (reproducibly).

`python scripts/gen_protos.py` writes them; `--check` regenerates into a temporary folder and exits
non-zero when the committed stubs differ from what the .proto files give (CI runs it).
The generated modules import each other as `rpcai...`; we rewrite that to `shared.gen.rpcai...` so
the stubs live inside the project's own package instead of claiming a top-level name.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "shared" / "gen"
IMPORT_RE = re.compile(r"^(from|import) rpcai\.", re.MULTILINE)


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # google/rpc/*.proto ship with googleapis-common-protos (a pinned dependency).
    googleapis = Path(status_pb2.__file__).resolve().parent.parent.parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"-I{googleapis}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter in the venv.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = IMPORT_RE.sub(lambda m: f"{m.group(1)} shared.gen.rpcai.", text)
        if fixed != text:
            path.write_text(fixed)
    # Every folder is a package, so mypy and importlib agree on module names.
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def same_tree(a: Path, b: Path) -> list[str]:
    names_a = {
        p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    names_b = {
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    drift = sorted(str(n) for n in names_a ^ names_b)
    drift += sorted(
        str(n) for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False)
    )
    return drift


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when shared/gen drifts")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            drift = same_tree(Path(tmp), OUT) if OUT.exists() else ["shared/gen is missing"]
        if drift:
            print("generated stubs drift from protos/ (run `make proto`):", *drift, sep="\n  ")
            return 1
        print("generated stubs match protos/")
        return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    generate(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
