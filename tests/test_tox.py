"""tox.ini's environments: every ``eval-*`` command line expands (tox's ``{env:NAME:default}`` and ``{posargs}``
substitutions) to a ``grace eval`` invocation that the CLI's own parser accepts, with suites the suite registry
knows; the test environments run the marker split and ruff. New eval environments are covered without editing this
file (they are read from tox.ini)."""
import configparser
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"GRACE_MODEL": "runs/grace", "GRACE_DATA": "/data", "GRACE_IMAGENET": "/imagenet"}
_ENV_REF = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*))?\}")


def _tox() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(ROOT / "tox.ini")
    return cp


def _expand(text: str, env: dict, posargs: str = "") -> str:
    """tox's substitutions, innermost first: ``{env:NAME}``, ``{env:NAME:default}`` (nested), ``{posargs}``."""
    while True:
        new = _ENV_REF.sub(lambda m: env.get(m.group(1), m.group(2) if m.group(2) is not None else ""), text)
        if new == text:
            break
        text = new
    return text.replace("{posargs}", posargs)


def _eval_envs() -> list[tuple[str, str]]:
    out = []
    for section in _tox().sections():
        m = re.fullmatch(r"testenv:eval-\{(.+)\}", section)
        if m:
            out += [(section, f.strip()) for f in m.group(1).split(",")]
    return out


def _argv(section: str, factor: str, posargs: str, monkeypatch) -> list[str]:
    """The argument list ``grace eval`` receives from the tox env ``eval-<factor>``."""
    import os
    import sys

    import grace_app.cli as cli

    cp = _tox()
    env = dict(ENV)
    for line in cp[section].get("set_env", "").splitlines():  # the env's own defaults (e.g. GRACE_OOD)
        if "=" in line and not line.strip().startswith("{"):
            k, v = line.split("=", 1)
            env[k.strip()] = _expand(v.strip(), env)
    lines = [ln.strip()[len(factor) + 1:].strip() for ln in cp[section]["commands"].splitlines()
             if ln.strip().startswith(f"{factor}:")]
    assert len(lines) == 1, f"eval-{factor}: expected one command line, found {len(lines)}"
    words = shlex.split(_expand(lines[0], env, posargs))
    if words[0] == "grace":
        return words[1:]
    assert words[:2] == ["python", "-c"], words[:2]  # an inline program that calls grace_app.cli.main
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv=None: seen.append(list(argv)) or 0)
    monkeypatch.setattr(sys, "argv", ["-c", *words[3:]])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as ex:
        exec(compile(words[2], f"tox eval-{factor}", "exec"), {"__name__": "__main__"})
    assert ex.value.code == 0 and len(seen) == 1
    assert os.environ["GRACE_MODEL"] == ENV["GRACE_MODEL"]
    return seen[0]


@pytest.mark.parametrize("section,factor", _eval_envs())
def test_tox_eval_env_is_a_valid_grace_eval(section, factor, monkeypatch):
    from eval_suites.engine import expand_shorthands, parse_suite
    from grace_app.cli import _parser

    argv = _argv(section, factor, "--n-adv 7 --seed 3", monkeypatch)
    a = _parser().parse_args(argv)
    assert a.command == "eval" and a.model == ENV["GRACE_MODEL"]
    assert a.n_adv == 7 and a.seed == 3  # {posargs} reach the command
    assert a.out == f"eval/{factor}"
    names, _ = expand_shorthands(a.data, a.ood, a.attack, a.suite)  # what `grace eval` runs (its one engine)
    assert names, f"eval-{factor} runs no suite"
    for s in names:
        parse_suite(s)  # raises on a suite the registry does not know
    ood = ["ood:" + n for n in "imagenet-v2 imagenet-sketch imagenet-r imagenet-a".split()]
    expected = {"id": ["id"], "ood": ["id", *ood], "adv": ["id", "adv:apgd-ce"], "robustbench": ["robustbench"],
                "all": ["id", *ood, "adv:apgd-ce", "shift", "geometry"]}
    if factor in expected:
        assert names == expected[factor]
    if any(s != "robustbench" for s in names):
        assert a.data == f"{ENV['GRACE_DATA']}/id"
    else:
        assert a.imagenet_dir == ENV["GRACE_IMAGENET"]


def test_tox_test_envs_split_by_marker_and_lint():
    cp = _tox()
    default = cp["testenv"]["commands"]
    assert '-m "not slow and not gpu"' in default or "-m 'not slow and not gpu'" in default
    assert '-m "slow or gpu"' in cp["testenv:slow"]["commands"]
    assert "ruff check" in cp["testenv:lint"]["commands"]
    assert {"py", "lint"} <= {e.strip() for e in cp["tox"]["env_list"].replace(",", "\n").split()}
    ci = (ROOT / ".ci" / "run").read_text()
    assert "lint" in ci and "ruff" in (ROOT / "pyproject.toml").read_text()
