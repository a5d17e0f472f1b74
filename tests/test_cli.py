"""`autellix up` as a user runs it: a subprocess that prints a readiness line and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from meshkit import gateway_chat

AUTELLIX = [sys.executable, "-m", "autellix.services.cli"]
#: no HTTP ports at all (the defaults, 8000 and 9100.., may be taken on a shared machine)
QUIET = ["--no-gateway", "--no-metrics"]
FREE_PORTS = ["--gateway-port", "0", "--metrics-port", "0"]


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
        [*AUTELLIX, "up", "--backend", "sim", "--port", "0", "--no-auth", *FREE_PORTS, *extra],
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


def _chat(api: str) -> None:
    """One OpenAI chat call through the gateway `autellix up` started."""
    reply = gateway_chat(api[: -len("/v1")], 2, timeout_s=10)
    assert reply["choices"][0]["message"]["content"] == " tok tok"


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
        _chat(api)
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


def test_up_runs_authenticated_by_default(tmp_path: Path) -> None:
    """Auth is on unless --no-auth: the readiness line names the client's credentials file, a call
    with it is answered, and a connection without it is refused with a hint."""
    creds = tmp_path / "client.creds"
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="info")
    proc = subprocess.Popen(
        [*AUTELLIX, "up", "--backend", "sim", "--port", "0", "--creds-out", str(creds), *FREE_PORTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"client credentials in {creds}" in line, line
        url = re.search(r"NATS (nats://\S+)", line)
        assert url is not None and "@" not in url.group(1)
        assert creds.stat().st_mode & 0o777 == 0o600
        call = subprocess.run(
            [*AUTELLIX, "call", "hello mesh", "--creds", str(creds), "--max-tokens", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "tok tok tok"
        api = re.search(r"OpenAI API (http://\S+/v1)", line)
        assert api is not None  # the gateway connects with its own identity (role "gateway")
        _chat(api.group(1))
        refused = subprocess.run(
            [*AUTELLIX, "call", "hi", "--nats", url.group(1)], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "--creds" in refused.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        password = creds.read_text().split(":")[2].split("@")[0]
        assert proc.stderr is not None and password not in proc.stderr.read(), "a log line shows the password"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_auth_init_writes_private_credentials(tmp_path: Path) -> None:
    done = subprocess.run([*AUTELLIX, "auth", "init", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ["nats-auth.conf", "client.creds", "gateway.creds", "scheduler.creds", "engine.creds", "tracker.creds"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    assert (tmp_path / "engine.creds").read_text().startswith("nats://engine:")


def test_up_demo_runs_and_exits(tmp_path: Path) -> None:
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
    creds = ["--creds-out", str(tmp_path / "client.creds")]
    done = subprocess.run(
        [*AUTELLIX, "up", "--backend", "sim", "--port", "0", "--demo", "--sim-time-scale", "0", *QUIET, *creds],
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
