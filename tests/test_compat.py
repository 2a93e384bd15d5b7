"""The installed-files check that guards against torchattacks' bundled robustbench copy."""
import base64
import hashlib
import sys

import pytest

from grace_plugin._compat import changed_files, check_robustbench_install
from grace_plugin.errors import BrokenInstall, GraceError


def _record_line(rel: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A distribution 'gracefakepkg' 1.0 with two recorded files, importable from tmp_path."""
    files = {"gracefakepkg/__init__.py": b"X = 1\n", "gracefakepkg/utils.py": b"def f():\n    return 2\n"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    info = tmp_path / "gracefakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gracefakepkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("\n".join([_record_line(r, d) for r, d in files.items()]
                                           + ["gracefakepkg-1.0.dist-info/RECORD,,"]) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_changed_files_matches_record(fake_dist):
    assert changed_files("gracefakepkg") == []
    (fake_dist / "gracefakepkg/utils.py").write_bytes(b"def f():\n    return 3\n")  # what a clobbering wheel does
    assert changed_files("gracefakepkg") == ["gracefakepkg/utils.py"]
    (fake_dist / "gracefakepkg/__init__.py").unlink()
    assert sorted(changed_files("gracefakepkg")) == ["gracefakepkg/__init__.py", "gracefakepkg/utils.py"]


def test_changed_files_of_absent_distribution_is_empty():
    assert changed_files("no-such-distribution-grace") == []


def test_installed_robustbench_is_robustbench_own():
    """torchattacks 3.5.1 bundles an older robustbench package; if it was installed last, this fails with the fix."""
    check_robustbench_install()
    import robustbench.utils

    assert "timm.is_model" in open(robustbench.utils.__file__).read()


def test_broken_install_is_a_user_facing_error():
    assert issubclass(BrokenInstall, GraceError) and issubclass(BrokenInstall, ImportError)
    assert "gracefakepkg" not in sys.modules
