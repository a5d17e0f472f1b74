"""The compose stack on a real Docker engine (compose/smoke.py): up and a call from the host, the
gateway, the broker's refusals, health, scale, kill, stop (drain) and down.

Opt-in (AUTELLIX_COMPOSE_TESTS=1), and skipped with the reason where no Docker daemon answers (or one
hangs) or the autellix:local image has not been built (building it takes minutes); see
bench/RESULTS.md section 7 for the recorded runs. Without the opt-in it skips before touching Docker,
so the default run neither needs a daemon nor waits on one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _docker_ready() -> str | None:
    """Why the live compose test cannot run here, or None when it can."""
    if os.environ.get("AUTELLIX_COMPOSE_TESTS") != "1":
        return "opt-in: set AUTELLIX_COMPOSE_TESTS=1 (it publishes port 4222 and takes minutes)"
    if shutil.which("docker") is None:
        return "no docker CLI on this machine"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
            return "no Docker daemon answers (start dockerd to run the compose stack)"
        if subprocess.run(["docker", "image", "inspect", "autellix:local"], capture_output=True, timeout=30).returncode:
            return "the autellix:local image is not built (python compose/smoke.py --build)"
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer within 30 s"
    return None


@pytest.mark.compose
@pytest.mark.timeout(1800)
def test_compose_stack_up_scale_kill_down(tmp_path: Path) -> None:
    why = _docker_ready()
    if why:
        pytest.skip(why)
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "compose" / "smoke.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads(out.read_text())
    assert done.returncode == 0 and report["ok"], done.stdout[-3000:] + done.stderr[-3000:]
    assert "Paris" in report["first_answer"]
    assert report["gateway_completion_tokens"] > 0
    assert report["auth"]["anonymous"] == "refused" and all(report["auth"]["client_refused"].values())
    assert report["engines_used_by_12_calls"] >= 2
    assert report["kill_calls_failed"] == 0 and report["kill_calls_resumed"] >= 1
    assert report["stop_calls_finished"] == "3/3"
    assert set(report["stop_exit_codes"].values()) == {0}
