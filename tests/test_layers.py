"""The README's import direction, read from the code: app.py → ui → pipelines → guidance, shapes; training above
pipelines; nothing below ui/ imports Gradio. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it must never import
FORBIDDEN = {
    "guidance": {"app", "ui", "pipelines", "training", "shapes", "benchmarks", "gradio"},
    "shapes": {"app", "ui", "pipelines", "training", "guidance", "benchmarks", "gradio"},
    "pipelines": {"app", "ui", "training", "benchmarks", "gradio"},
    "training": {"app", "ui", "benchmarks", "gradio"},
    "ui": {"app", "training", "benchmarks"},
}


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (relative imports resolve inside its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    wrong = {str(f.relative_to(ROOT)): sorted(imported(f) & FORBIDDEN[package]) for f in files}
    assert not {f: w for f, w in wrong.items() if w}, f"{package}/ imports what sits above it"


def test_the_guidance_methods_import_torch_only():
    import sys

    allowed = {"torch", "guidance", "__future__"} | set(sys.stdlib_module_names)
    extra = {str(f.relative_to(ROOT)): sorted(imported(f) - allowed) for f in (ROOT / "guidance").rglob("*.py")}
    assert not {f: e for f, e in extra.items() if e}, extra
