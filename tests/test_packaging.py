"""The package as users get it: every module in the wheel, one import name, ``python -m autellix``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("proto", "services", "engine", "policy", "sim", "bench")


def _can_build_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the ``wheel`` package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_every_module_is_in_the_wheel(tmp_path: Path) -> None:
    isolation = ["--no-build-isolation"] if _can_build_offline() else []  # else pip fetches setuptools
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(tmp_path), str(REPO)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("autellix-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"autellix/__init__.py", "autellix/__main__.py"}
    for sub in SUBPACKAGES:
        for path in (REPO / sub).rglob("*.py"):
            if "__pycache__" not in path.parts:
                expected.add(f"autellix/{sub}/{path.relative_to(REPO / sub).as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_a_folder_imported_top_level_is_refused(sub: str) -> None:
    """From the repository root ``import services`` would make a second copy of autellix.services."""
    out = subprocess.run([sys.executable, "-c", f"import {sub}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"import autellix.{sub}, not {sub}" in out.stderr


def test_the_symlinks_make_autellix_an_ordinary_package() -> None:
    for sub in SUBPACKAGES:
        link = REPO / "autellix" / sub
        assert link.is_symlink() and link.resolve() == (REPO / sub).resolve(), f"autellix/{sub} -> ../{sub}"


def test_python_dash_m_autellix_is_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "autellix", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: autellix" in out.stdout
