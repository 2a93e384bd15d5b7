"""grace-plugin core library: data, models, recipes, trainer, checkpoints.

``import grace_plugin`` is cheap (no torch, timm or pyautoattack; tests/test_layering.py) and installs two import
hooks (``_compat``): ``import robustbench`` then works with PyPI's pyautoattack (an ``autoattack`` module built when
first imported), and once timm is imported the plugins other distributions declare under the entry-point group
``grace_plugin.plugins`` are loaded. This distribution declares ``registry.grace_models`` there (pyproject.toml), so
with grace-plugin installed the registered GRACE timm names are visible to ``timm.create_model`` after
``import grace_plugin`` too, while this package imports nothing above it (the name ``registry`` appears only in
packaging metadata).
"""
from ._compat import install_autoattack_shim, when_imported
from .version import __version__

__all__ = ["__version__", "install_autoattack_shim", "load_plugins"]

PLUGIN_GROUP = "grace_plugin.plugins"


def load_plugins() -> list[str]:
    """Import every ``grace_plugin.plugins`` entry point (``GRACE_NO_PLUGINS=1`` skips); failures only warn."""
    import os
    import warnings
    from importlib.metadata import entry_points

    if os.environ.get("GRACE_NO_PLUGINS"):
        return []
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as e:  # a broken plugin must not break `import grace_plugin`
            warnings.warn(f"grace_plugin: plugin {ep.name} ({ep.value}) failed to load: {e}", stacklevel=2)
    return loaded


install_autoattack_shim()
when_imported("timm", load_plugins)
