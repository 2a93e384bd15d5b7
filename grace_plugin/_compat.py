"""Make RobustBench importable and runnable with the AutoAttack that PyPI actually ships.

robustbench 1.1.1 does ``import autoattack`` and calls the fra31 API
(``AutoAttack(model, norm, eps, version, log_path=...)``, ``run_standard_evaluation(x, y, bs=...)`` returning
``x_adv``). Its PyPI dependency ``pyautoattack`` 0.2.0 installs the module ``pyautoattack`` with a keyword-only API
that takes ``batch_size`` and returns ``(x_adv, y_adv)`` (ecosystem.md B1/B2). ``install_autoattack_shim`` registers
a small ``autoattack`` module translating the old signature to the new one; it is installed by
``import grace_plugin`` and never replaces a real ``autoattack`` that the user installed themselves.
"""
from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["install_autoattack_shim"]


def _make_shim() -> types.ModuleType:
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

    shim = types.ModuleType("autoattack")
    shim.__doc__ = "grace_plugin shim: fra31 `autoattack` API over pyautoattack"
    shim.AutoAttack = AutoAttack
    shim.state = _state
    shim.__grace_shim__ = True
    return shim


def install_autoattack_shim() -> bool:
    """Register the ``autoattack`` shim; return True if the shim (not a real package) provides ``autoattack``."""
    existing = sys.modules.get("autoattack")
    if existing is not None:
        return bool(getattr(existing, "__grace_shim__", False))
    if importlib.util.find_spec("autoattack") is not None:  # a real fra31 install wins
        return False
    if importlib.util.find_spec("pyautoattack") is None:
        return False
    shim = _make_shim()
    sys.modules["autoattack"] = shim
    sys.modules["autoattack.state"] = shim.state
    return True


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


def check_robustbench_install() -> None:
    """Refuse to run RobustBench code that is not robustbench's own (see :func:`changed_files`)."""
    from .errors import BrokenInstall

    bad = [f for f in changed_files("robustbench") if f.endswith(".py")]
    if bad:
        raise BrokenInstall(
            f"robustbench's installed files differ from its wheel ({', '.join(sorted(bad)[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): torchattacks 3.5.1 bundles an older robustbench copy that overwrote "
            "them; repair with `python -m pip install --force-reinstall --no-deps robustbench==1.1.1`")
