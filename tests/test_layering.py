"""Imports follow the data flow: eval_suites -> registry -> grace_plugin, never back (the CLI is exempt)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"grace_plugin": {"registry", "eval_suites"}, "registry": {"eval_suites"}, "eval_suites": set()}
EXEMPT = {ROOT / "grace_plugin" / "cli.py", ROOT / "grace_plugin" / "__main__.py"}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path in EXEMPT:
            continue
        bad += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path) if m in FORBIDDEN[package]]
    assert not bad, bad


def test_registry_is_ours():
    """`registry` is a generic top-level name: make sure the one imported is this distribution's."""
    import registry

    assert Path(registry.__file__).resolve().parent.name == "registry"
    assert hasattr(registry, "load_model")
