"""The generated code in meshproxy/_proto is exactly what scripts/gen_protos.py makes from protos/."""

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _files(base: pathlib.Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_the_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    committed = ROOT / "meshproxy" / "_proto"
    assert _files(tmp_path) == _files(committed), "run `make protos`"
    differ = [f for f in _files(tmp_path) if not filecmp.cmp(tmp_path / f, committed / f, shallow=False)]
    assert differ == [], f"stale generated files {differ}: run `make protos`"
