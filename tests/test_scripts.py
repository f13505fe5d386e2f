"""Every adamerge import in scripts/ resolves (most are inside main(), where only a run of the script would reach them):
a module moved in the library must not leave a benchmark or the demo broken."""

import ast
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def adamerge_imports(path: Path) -> list[ast.ImportFrom]:
    return [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("adamerge")
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_resolve(script):
    for node in adamerge_imports(script):
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(script), "exec"), {})
