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


_RUNTIME = r"""
import importlib, json, os, pkgutil, sys
from pathlib import Path
os.environ["GRACE_WEIGHTS_DIR"] = sys.argv[1]  # holds a card.json that fails loudly if it is ever read
out = {}
import grace_plugin
out["import grace_plugin"] = sorted({m.split(".")[0] for m in sys.modules})
os.environ["GRACE_NO_PLUGINS"] = "1"  # below: what each package imports itself, not what its plugins do
for pkg in ("grace_plugin", "registry", "eval_suites"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name not in ("grace_plugin.cli", "grace_plugin.__main__"):
            importlib.import_module(info.name)
    out[pkg] = sorted({m.split(".")[0] for m in sys.modules})
import registry.grace_models as gm
out["scanned"] = gm._SCANNED
print(json.dumps(out))
"""


def test_runtime_imports_follow_the_layers(tmp_path):
    """In a fresh interpreter: ``import grace_plugin`` loads no heavy dependency and no layer above it; then every
    module of each package, lowest layer first, loads nothing from a layer above (sys.modules, not only the import
    statements); and no model card is read before a name is resolved."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "w" / "bad").mkdir(parents=True)
    (tmp_path / "w" / "bad" / "card.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if k != "GRACE_NO_PLUGINS"}
    res = subprocess.run([sys.executable, "-c", _RUNTIME, str(tmp_path / "w")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "skipped" not in res.stderr  # the bad card was never scanned
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    heavy = {"torch", "timm", "open_clip", "pyautoattack", "autoattack", "robustbench", "torchattacks", "registry",
             "eval_suites"}
    assert not heavy & set(loaded["import grace_plugin"]), loaded["import grace_plugin"]
    for package, forbidden in FORBIDDEN.items():
        assert not forbidden & set(loaded[package]), (package, forbidden & set(loaded[package]))
    # the evaluation attacks and RobustBench load when an attack runs, not when the packages are imported
    assert not {"pyautoattack", "autoattack", "robustbench"} & set(loaded["eval_suites"]), loaded["eval_suites"]
    assert loaded["scanned"] is False
