"""grace-plugin core library: data, models, recipes, trainer, checkpoints.

``import grace_plugin`` also makes ``import robustbench`` work with PyPI's pyautoattack (see ``_compat``).
"""
from ._compat import install_autoattack_shim

install_autoattack_shim()

from .version import __version__  # noqa: E402

__all__ = ["__version__", "install_autoattack_shim"]
