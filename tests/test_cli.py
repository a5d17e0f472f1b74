"""`autellix up` as a user runs it: a subprocess that prints a readiness line and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

AUTELLIX = [sys.executable, "-m", "autellix.services.cli"]
#: no HTTP ports at all (the defaults, 8000 and 9100.., may be taken on a shared machine)
QUIET = ["--no-gateway", "--no-metrics"]


def _children(pid: int) -> list[int]:
    """Every descendant of pid, from /proc (Linux)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found + [d for c in found for d in _children(c)]


def _start_up(*extra: str) -> tuple[subprocess.Popen[str], str, str, list[int]]:
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [*AUTELLIX, "up", "--backend", "sim", "--port", "0", "--gateway-port", "0", "--metrics-port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"NATS (nats://\S+)", line)
    http = re.search(r"OpenAI API (http://\S+/v1)", line)
    metrics = re.search(r"metrics on ports ([\d,]+)", line)
    if match is None or http is None or metrics is None:
        proc.kill()
        raise AssertionError(f"no readiness line; got {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")
    return proc, match.group(1), http.group(1), [int(p) for p in metrics.group(1).split(",")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_and_stops_cleanly(sig: signal.Signals) -> None:
    proc, url, api, metrics = _start_up("--engines", "2")
    try:
        children = _children(proc.pid)
        assert children, "the embedded nats-server should be a child process"
        call = subprocess.run(
            [*AUTELLIX, "call", "hello mesh", "--nats", url, "--max-tokens", "4"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "tok tok tok tok"
        assert "4 tokens" in call.stderr
        with urllib.request.urlopen(f"{api}/models", timeout=30) as reply:
            model = json.load(reply)["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        request = urllib.request.Request(
            f"{api}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert json.load(reply)["choices"][0]["message"]["content"] == " tok tok"
        assert len(set(metrics)) == 4  # tracker, scheduler, two engines
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics[-1]}/metrics", timeout=30) as reply:
            assert "autellix:generation_tokens_total" in reply.read().decode()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [c for c in children if Path(f"/proc/{c}").exists()], "a child process outlived autellix up"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_demo_runs_and_exits() -> None:
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
    done = subprocess.run(
        [*AUTELLIX, "up", "--backend", "sim", "--port", "0", "--demo", "--sim-time-scale", "0", *QUIET],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "autellix is up" in done.stdout and "OpenAI API" not in done.stdout
    assert "[3 fan-out: its food]" in done.stdout
    assert "program latency" in done.stdout


def test_call_without_a_mesh_says_so() -> None:
    done = subprocess.run(
        [*AUTELLIX, "call", "hi", "--nats", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "cannot reach NATS" in done.stderr and "Traceback" not in done.stderr


def test_bad_flags_exit_2() -> None:
    done = subprocess.run([*AUTELLIX, "up", "--engines", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--engines" in done.stderr
