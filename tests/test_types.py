"""pyright (basic mode) over the package as it is installed: imports resolve, no type errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pyright_basic_is_clean() -> None:
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent)) or shutil.which("pyright")
    assert pyright, "pyright is a test dependency: pip install -e '.[test]'"
    done = subprocess.run(
        [pyright, "--pythonpath", sys.executable, "-p", str(REPO / "pyrightconfig.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 errors" in done.stdout.splitlines()[-1]
