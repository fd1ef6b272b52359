"""Generate meshproxy/_proto from protos/ (the one way generated code is made).

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: meshproxy/_proto)
"""

import pathlib
import re
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "meshproxy._proto"


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    _make_packages(out)
    _absolute_imports(out)


def _make_packages(out: pathlib.Path) -> None:
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")


def _absolute_imports(out: pathlib.Path) -> None:
    """protoc writes `from meshproxy.v1 import x`; our code lives under meshproxy._proto."""
    pattern = re.compile(r"^from (meshproxy\.v1|inference)( import )", re.M)
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = pattern.sub(rf"from {PACKAGE}.\1\2", text)
        if fixed != text:
            path.write_text(fixed)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "meshproxy" / "_proto")
