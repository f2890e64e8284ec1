"""Generate the Python code (messages, gRPC stubs, .pyi type stubs) for every .proto in protos/.

python tools/gen_protos.py          # write opconnect/ (never edit it by hand)
python tools/gen_protos.py --check  # exit 1 if opconnect/ is out of sync with protos/
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.api import field_behavior_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "opconnect"
BIN = Path(sys.executable).parent


def generate(into: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # google/api/field_behavior.proto as the installed googleapis-common-protos ships it: the
    # generated code imports that package's field_behavior_pb2 at run time.
    googleapis = Path(field_behavior_pb2.__file__).resolve().parents[2]
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--mypy_out={into}",
        f"--mypy_grpc_out={into}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = into / "opconnect"
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").write_text(
            '"""Generated from protos/ by tools/gen_protos.py."""\n'
        )


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [f"only in {cmp.left}: {n}" for n in cmp.left_only]
    found += [f"only in {cmp.right}: {n}" for n in cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    found += [f"differs: {a / n}" for n in mismatch + errors]
    for sub in cmp.common_dirs:
        found += differences(a / sub, b / sub)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check opconnect/ is in sync")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "opconnect"
        if check:
            found = differences(fresh, OUT) if OUT.exists() else [f"{OUT} is missing"]
            for line in found:
                print(line, file=sys.stderr)
            if found:
                print("generated code is out of sync: run `make gen`", file=sys.stderr)
                return 1
            print("generated code is in sync with protos/")
            return 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"generated {OUT.relative_to(ROOT)}/ from {PROTOS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
