"""Imports follow the data flow: grace_app -> eval_suites -> registry -> grace_plugin, never back (the application,
``grace_app``, imports the library and the library never imports it); inside each package they follow its layers
(``LAYERS``), with no cycle anywhere; no file or function outgrows a reader."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("grace_plugin", "registry", "eval_suites")
FORBIDDEN = {"grace_plugin": {"registry", "eval_suites", "grace_app"}, "registry": {"eval_suites", "grace_app"},
             "eval_suites": {"grace_app"}, "grace_app": set()}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def upward_imports(root: Path, package: str) -> list[str]:
    """Every ``import`` (at any depth of the code) in ``root/package`` of a package above it."""
    return [f"{path.relative_to(root)} imports {m}" for path in sorted((root / package).rglob("*.py"))
            for m in _imports(path) if m in FORBIDDEN[package]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    assert upward_imports(ROOT, package) == []


def test_upward_import_check_sees_one(tmp_path):
    """The check is able to fail: a library module that imports the application, even inside a function, is named."""
    (tmp_path / "eval_suites").mkdir()
    (tmp_path / "eval_suites" / "x.py").write_text("def f():\n    from grace_app.cli import main\n")
    (tmp_path / "eval_suites" / "y.py").write_text("import registry\n")
    assert upward_imports(tmp_path, "eval_suites") == [f"{Path('eval_suites/x.py')} imports grace_app"]


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
        if info.name not in ("grace_app.cli", "grace_app.__main__"):
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
             "eval_suites", "grace_app"}
    assert not heavy & set(loaded["import grace_plugin"]), loaded["import grace_plugin"]
    for package in LIBRARY:
        forbidden = FORBIDDEN[package]
        assert not forbidden & set(loaded[package]), (package, forbidden & set(loaded[package]))
    # the evaluation attacks and RobustBench load when an attack runs, not when the packages are imported
    assert not {"pyautoattack", "autoattack", "robustbench"} & set(loaded["eval_suites"]), loaded["eval_suites"]
    assert loaded["scanned"] is False


# ---------------------------------------------------------------------------------------- layers inside the packages
# A module may import modules of its own layer and of the layers below, never above. A module is named by its
# package and its first component below it (``grace_plugin.data.loader`` -> ``data``).
LAYERS = {
    "grace_plugin": [
        # foundation: errors, the validation layer (config), runtime (device, process group), tensor files, maths
        {"", "errors", "version", "paths", "registries", "_compat", "config", "runtime", "tensor_io", "rng",
         "losses", "curvature", "perturbation", "weightspace", "optim", "progress", "preemption", "gradsync"},
        {"models", "data"},
        {"vqa", "tasks"},  # the VQA task: its metric, formats, models (on models and data)
        {"recipes"},
        {"robust_validation", "runfolder", "checkpoint"},
        {"trainer"},
        {"finetune"},
    ],
    # "": the package's face
    "registry": [{"naming", "weights"}, {"grace_models"}, {"resolve", "publish", "vqa_entries", ""}],
    "eval_suites": [{"", "attacks", "catalogue", "context", "distributed", "engine", "evaluate", "geometry", "imagenet",
                     "leaderboard", "plot", "report", "shardsets", "shift", "suites", "vqa", "vqa_summary",
                     "vqa_analysis", "attention_ratio"}],
    # the application: the testbed, the experiments run on it, the command line on top
    "grace_app": [{"", "testbed"}, {"studies"}, {"parser"}, {"cli", "__main__"}],
}


def _module_graph(root: Path = ROOT, packages=tuple(FORBIDDEN)) -> dict[str, set[str]]:
    """Every module of the three packages -> the modules of the three packages it imports, at any depth of the
    code (an import inside a function is an arrow too)."""
    mods = {}
    for pkg in packages:
        for p in (root / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):  # a module's own package is imported with it
                    graph[m].add(t)
    return graph


def _layer(module: str) -> tuple[str, int]:
    pkg, _, rest = module.partition(".")
    key = rest.split(".")[0]
    for i, layer in enumerate(LAYERS[pkg]):
        if key in layer:
            return pkg, i
    raise AssertionError(f"{module}: in no layer of tests/test_layering.py LAYERS; add it where it belongs")


def test_no_import_cycles():
    graph = _module_graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], cycles


def test_cycle_check_sees_a_cycle(tmp_path):
    """The graph builder reads imports inside functions: a two-module loop written that way is found."""
    (tmp_path / "grace_plugin").mkdir()
    (tmp_path / "grace_plugin" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "grace_plugin" / "b.py").write_text("from grace_plugin.a import f\n")
    graph = _module_graph(tmp_path, ("grace_plugin",))
    assert graph["grace_plugin.a"] == {"grace_plugin.b"} and graph["grace_plugin.b"] == {"grace_plugin.a"}


def test_imports_follow_the_layers_inside_each_package():
    bad = []
    for m, targets in sorted(_module_graph().items()):
        pkg, level = _layer(m)
        for t in sorted(targets):
            tpkg, tlevel = _layer(t)
            if tpkg == pkg and tlevel > level:
                bad.append(f"{m} (layer {level}) imports {t} (layer {tlevel})")
    assert not bad, bad


def test_evaluation_does_not_import_the_trainer():
    """Evaluation takes its device and process group from grace_plugin.runtime; only experiments train."""
    graph = _module_graph()
    bad = [m for m, t in graph.items() if m.startswith("eval_suites") and "grace_plugin.trainer" in t]
    assert not bad, bad


FILE_CAP = {"grace_plugin": 500, "registry": 500, "eval_suites": 500, "grace_app": 600}


def test_files_and_functions_stay_readable():
    """No file over its package's cap (FILE_CAP); no function over 100 lines except the CLI's argument parser."""
    long_files, long_funcs = [], []
    for pkg, cap in FILE_CAP.items():
        for p in (ROOT / pkg).rglob("*.py"):
            text = p.read_text()
            if len(text.splitlines()) > cap:
                long_files.append(str(p.relative_to(ROOT)))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > \
                        100 and (p.name, node.name) != ("parser.py", "build_parser"):
                    long_funcs.append(f"{p.relative_to(ROOT)}:{node.name}")
    assert long_files == [] and long_funcs == [], (long_files, long_funcs)
