"""Import hooks that keep ``import grace_plugin`` cheap: nothing heavy is imported until something asks for it.

* ``autoattack``: robustbench 1.1.1 does ``import autoattack`` and calls the fra31 API
  (``AutoAttack(model, norm, eps, version, log_path=...)``, ``run_standard_evaluation(x, y, bs=...)`` returning
  ``x_adv``). Its PyPI dependency ``pyautoattack`` 0.2.0 installs the module ``pyautoattack`` with a keyword-only API
  that takes ``batch_size`` and returns ``(x_adv, y_adv)``, so ``benchmark()`` fails with ``TypeError: ... 'log_path'``.
  ``install_autoattack_shim`` appends a finder to ``sys.meta_path`` that provides a small ``autoattack`` module
  translating the old signature to the new one, built (and pyautoattack imported) only when ``autoattack`` is
  imported. Being last on ``sys.meta_path``, it is asked only after every other finder failed: a real ``autoattack``
  that the user installed always wins.
* ``when_imported(name, callback)``: run ``callback()`` right after module ``name`` is imported (now, if it already
  is). ``import grace_plugin`` uses it to load its plugins once timm is imported (timm has no entry points of its
  own: https://github.com/huggingface/pytorch-image-models/issues/1694), instead of importing timm itself.

Import hooks: https://docs.python.org/3/reference/import.html#the-meta-path
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import types

__all__ = ["install_autoattack_shim", "when_imported"]


def _fill_shim(shim: types.ModuleType) -> None:
    import pyautoattack
    import pyautoattack.state as _state

    class AutoAttack(pyautoattack.AutoAttack):
        """fra31-signature front for ``pyautoattack.AutoAttack`` (what robustbench.eval.benchmark calls)."""

        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            custom = list(attacks_to_run) if version == "custom" else None
            super().__init__(model, attacks=custom, device=device, eps=eps, norm=norm, seed=seed, version=version)
            self.verbose = verbose
            self.log_path = log_path

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
            x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

    shim.__doc__ = "grace_plugin shim: fra31 `autoattack` API over pyautoattack"
    shim.AutoAttack = AutoAttack
    shim.state = _state
    shim.__grace_shim__ = True
    sys.modules["autoattack.state"] = _state  # `from autoattack.state import EvaluationState` (robustbench.eval)


class _AutoattackShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides ``autoattack`` from pyautoattack when no other finder has a real one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "autoattack" or importlib.util.find_spec("pyautoattack") is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        _fill_shim(module)


def install_autoattack_shim() -> None:
    """Append the ``autoattack`` finder to ``sys.meta_path`` (once); imports nothing."""
    if not any(isinstance(f, _AutoattackShimFinder) for f in sys.meta_path):
        sys.meta_path.append(_AutoattackShimFinder())


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds watched modules through the other finders and runs callbacks after they
    executed."""

    def __init__(self):
        self.callbacks: dict[str, list] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        callbacks = self.callbacks.pop(fullname)
        exec_module = loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            for cb in callbacks:
                cb()

        loader.exec_module = exec_then_call  # this spec's own loader instance (importlib makes one per find)
        return spec


_POST_IMPORT = _PostImportFinder()


def when_imported(name: str, callback) -> None:
    """Call ``callback()`` once module ``name`` is imported: now if it already is, else right after its import."""
    if name in sys.modules:
        callback()
        return
    if _POST_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _POST_IMPORT)
    _POST_IMPORT.callbacks.setdefault(name, []).append(callback)


def changed_files(dist_name: str) -> list[str]:
    """Files of an installed distribution whose bytes differ from the sha256 its RECORD lists (or that are missing).

    Needed because torchattacks 3.5.1's wheel bundles an older copy of the ``robustbench`` package (its RECORD lists
    ``robustbench/utils.py`` etc.). Installed after robustbench 1.1.1, it silently replaces robustbench's files with
    code that lacks the timm hook of ``robustbench.utils.load_model`` and differs in ``robustbench.eval``; which copy
    wins depends on the installer's order. See https://peps.python.org/pep-0376/#record for the RECORD format.
    """
    import base64
    import hashlib
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return []
    bad = []
    for f in dist.files or ():
        if f.hash is None:
            continue
        path = f.locate()
        try:
            data = path.read_bytes()
        except OSError:
            bad.append(str(f))
            continue
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, data).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            bad.append(str(f))
    return bad


@functools.cache  # files do not change under a running process: hash them once (a failure is not cached)
def check_robustbench_install() -> None:
    """Refuse to run RobustBench code that is not robustbench's own (see :func:`changed_files`)."""
    from .errors import BrokenInstall

    bad = [f for f in changed_files("robustbench") if f.endswith(".py")]
    if bad:
        raise BrokenInstall(
            f"robustbench's installed files differ from its wheel ({', '.join(sorted(bad)[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): torchattacks 3.5.1 bundles an older robustbench copy that overwrote "
            "them; repair with `python -m pip install --force-reinstall --no-deps robustbench==1.1.1`")
