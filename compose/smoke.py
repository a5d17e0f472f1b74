"""The compose stack on a real Docker engine, step by step, each step timed (issues 11 and 13).

    python compose/smoke.py                 # uses the autellix:local image (build it first, see below)
    python compose/smoke.py --build         # builds it too (a local base image where no registry answers)
    python compose/smoke.py --json out.json

Steps, each printed on one line with its time:

1. ``up``: auth-init, NATS, tracker, scheduler, gateway and one CPU engine on SmolLM2, until
   ``autellix call --creds client.creds`` from the host is answered (the README's commands: the
   client's credentials read from the ``secrets`` volume, pointed at the published port);
2. ``gateway``: an OpenAI chat call to the published gateway from the host;
3. ``auth``: the broker refuses a connection without credentials, and refuses the client identity a
   heartbeat (only engines may send one) and a subscription to every subject (least privilege);
4. ``healthy``: every service's health check passes;
5. ``--scale engine=4``: four engines heartbeat, and twelve calls land on more than one;
6. ``docker kill`` of the engine running the most calls while eight run: every call ends with a final
   (resumed elsewhere);
7. ``stop`` while calls run: the engines drain them (every call ends with a final) and every service
   exits 0; then ``down``.

Prints a summary (JSON) and exits non-zero on a failed step. Needs a Docker engine, docker compose
(the v2 plugin or docker-compose 1.29) and this package installed on the host (the host is the client).
With no image registry reachable the broker runs from the autellix image (compose.local.yaml, the
default here); AUTELLIX_COMPOSE_LOCAL=0 runs compose.yaml alone (the official nats image).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROJECT = "autellix-smoke"
#: the broker and the gateway as the host reaches them (compose publishes them on loopback)
HOST_BROKER = "127.0.0.1:4222"
GATEWAY = "http://127.0.0.1:8000"
ROOT = "autellix"
SERVICES = ("nats", "tracker", "scheduler", "engine", "gateway")


def compose_cmd() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("no docker compose: install the compose v2 plugin or docker-compose")


def compose(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    files = ["-f", str(HERE / "compose.yaml")]
    if os.environ.get("AUTELLIX_COMPOSE_LOCAL", "1") == "1":
        files += ["-f", str(HERE / "compose.local.yaml")]
    cmd = [*compose_cmd(), "-p", PROJECT, *files, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=120).stdout


def docker_logs(cid: str) -> str:
    """A container's log, stdout and stderr together (services log to stderr)."""
    done = subprocess.run(["docker", "logs", cid], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return done.stdout.decode(errors="replace")


def build_image() -> float:
    """Build autellix:local: the public base where a registry answers, else a local stand-in. Seconds."""
    t0 = time.monotonic()
    base = subprocess.run(["docker", "pull", "python:3.11.13-slim-bookworm"], capture_output=True, timeout=300)
    args = ["docker", "build", "--network", "host", "-t", "autellix:local"]
    server = None
    if base.returncode != 0:
        subprocess.run([str(HERE / "make-local-base.sh")], check=True)
        args += ["--build-arg", "BASE_IMAGE=autellix-local/python:3.11-bookworm"]
        wheels = os.environ.get("AUTELLIX_WHEELS", "/opt/wheels")
        if Path(wheels).is_dir():  # the CPU torch wheel where this machine keeps it, over loopback
            server = subprocess.Popen(
                [sys.executable, "-m", "http.server", "8765", "--bind", "127.0.0.1", "-d", wheels],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            args += ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
            args += ["--build-arg", "PIP_FIND_LINKS=http://127.0.0.1:8765/"]
    try:
        subprocess.run([*args, str(REPO)], check=True)
    finally:
        if server is not None:
            server.terminate()
    return time.monotonic() - t0


# -- what the steps use ---------------------------------------------------------------------------
def containers(service: str | None = None, all_: bool = False) -> list[str]:
    args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"]
    if service:
        args += ["--filter", f"label=com.docker.compose.service={service}"]
    return docker(*args, *(["-a"] if all_ else [])).split()


def inspect(cid: str, template: str) -> str:
    return docker("inspect", "-f", template, cid).strip()


def host_url(role: str) -> str:
    """A role's credentials from the stack's secrets volume (auth-init wrote them), pointed at the
    broker's published port: the mesh is authenticated, as `autellix up`'s is."""
    done = compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "auth-init", f"/secrets/{role}.creds")
    return done.stdout.strip().replace("@nats:4222", f"@{HOST_BROKER}")


def write_creds(path: Path, role: str) -> None:
    """What compose/README.md ("Credentials") tells a user to do: the role's file, owner-only."""
    path.write_text(host_url(role) + "\n")
    path.chmod(0o600)


def autellix_cli() -> list[str]:
    beside = Path(sys.executable).parent / "autellix"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "autellix.services"]


async def call(client: Any, prompt: str, max_tokens: int = 24) -> Any:
    async with client.program() as p:
        return await p.call(prompt, max_tokens=max_tokens)


async def heartbeats(url: str, seconds: float) -> dict[str, int]:
    """The engines heard heartbeating ``up`` within ``seconds``, with the calls each is running."""
    import nats

    from autellix.services.auth import inbox_prefix, url_user

    seen: dict[str, int] = {}
    nc = await nats.connect(url, inbox_prefix=inbox_prefix(url_user(url)))  # as the gateway: may read them

    async def cb(msg: Any) -> None:
        hb = json.loads(msg.data)
        if hb.get("state") == "up":
            seen[hb["engine_id"]] = int(hb.get("running", 0))

    await nc.subscribe(f"{ROOT}.engine.heartbeat", cb=cb)
    await asyncio.sleep(seconds)
    await nc.close()
    return seen


async def until(what: str, timeout_s: float, probe: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``probe()`` is true, or raise after ``timeout_s``."""
    t0 = time.monotonic()
    while not await probe():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(1)
    return time.monotonic() - t0


def engine_id_of(cid: str) -> str | None:
    found = re.search(r'"engine_id": "(engine-[0-9a-f]+)"', docker_logs(cid))
    return found[1] if found else None


def log_time(cid: str, event: str) -> float | None:
    """The wall-clock time (epoch s) of the first log line of ``event`` in a container's log."""
    for line in docker_logs(cid).splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()
    return None


def gateway_chat(max_tokens: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"{GATEWAY}/v1/models", timeout=30) as reply:
        model = json.load(reply)["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": max_tokens}
    request = urllib.request.Request(
        f"{GATEWAY}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


# -- the steps ------------------------------------------------------------------------------------
async def step_up(report: dict[str, Any], creds: Path) -> None:
    t0_wall, t0 = time.time(), time.monotonic()
    await asyncio.to_thread(compose, "up", "-d")
    report["up_returned_s"] = round(time.monotonic() - t0, 1)
    await asyncio.to_thread(write_creds, creds, "client")
    cmd = [*autellix_cli(), "call", "--creds", str(creds), "--max-tokens", "24", "What is the capital of France?"]
    while True:
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and done.stdout.strip():
            break
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"`autellix call` not answered within 300 s of up: {done.stderr[-1500:]}")
        await asyncio.sleep(1)
    report["up_to_first_answer_s"] = round(time.monotonic() - t0, 1)
    report["first_answer"] = done.stdout.strip()
    engine = containers("engine")[0]
    started = datetime.fromisoformat(inspect(engine, "{{.State.StartedAt}}")[:26] + "+00:00").timestamp()
    ready = log_time(engine, "ready")
    report["engine_container_started_s"] = round(started - t0_wall, 1)
    report["engine_ready_s"] = round(ready - t0_wall, 1) if ready else None
    print(
        f"up -> `autellix call` answered from the host: {report['up_to_first_answer_s']} s "
        f"(up -d returned {report['up_returned_s']} s, engine container started "
        f"{report['engine_container_started_s']} s, engine ready {report['engine_ready_s']} s): "
        f"{report['first_answer']!r}",
        flush=True,
    )


async def step_gateway(report: dict[str, Any]) -> None:
    t0 = time.monotonic()
    reply = await asyncio.to_thread(gateway_chat, 8)
    report["gateway_s"] = round(time.monotonic() - t0, 1)
    report["gateway_completion_tokens"] = reply["usage"]["completion_tokens"]
    report["gateway_answer"] = reply["choices"][0]["message"]["content"]
    print(f"gateway chat call from the host: {report['gateway_s']} s: {report['gateway_answer']!r}", flush=True)
    if not reply["usage"]["completion_tokens"]:
        raise RuntimeError(f"the gateway answered no tokens: {reply}")


async def step_auth(report: dict[str, Any], client_url: str) -> None:
    import nats

    from autellix.services.auth import inbox_prefix

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    try:
        nc = await nats.connect(
            f"nats://{HOST_BROKER}", allow_reconnect=False, max_reconnect_attempts=0, error_cb=on_error
        )
        await nc.close()
        anonymous = "accepted"
    except Exception:
        anonymous = "refused"
    errors.clear()

    nc = await nats.connect(client_url, error_cb=on_error, inbox_prefix=inbox_prefix("client"), allow_reconnect=False)
    try:
        await nc.publish(f"{ROOT}.engine.heartbeat", b'{"engine_id": "engine-fake", "state": "up"}')
        await nc.subscribe(f"{ROOT}.>")
        await nc.subscribe("_INBOX.>")
        await nc.flush()
        await asyncio.sleep(1)
    finally:
        await nc.close()
    refused = {  # nats-server: 'Permissions Violation for Publish to "<subject>"' (nats-py may lower-case it)
        "heartbeat": any("violation for publish" in e and "engine.heartbeat" in e for e in errors),
        "subscribe_all": any("violation for subscription" in e and f'"{ROOT}.>"' in e for e in errors),
        "others_inboxes": any("violation for subscription" in e and '"_inbox.>"' in e for e in errors),
    }
    report["auth"] = {"anonymous": anonymous, "client_refused": refused}
    print(f"auth: anonymous connection {anonymous}; the client identity refused {refused}", flush=True)
    if anonymous != "refused" or not all(refused.values()):
        raise RuntimeError(f"the broker allowed what it must refuse: {report['auth']}; errors {errors}")


async def step_healthy(report: dict[str, Any]) -> None:
    def states() -> dict[str, str]:
        return {cid[:12]: inspect(cid, "{{if .State.Health}}{{.State.Health.Status}}{{end}}") for cid in containers()}

    async def all_healthy() -> bool:
        return all(s == "healthy" for s in (await asyncio.to_thread(states)).values())

    report["all_healthy_after_s"] = round(await until("every container healthy", 180, all_healthy), 1)
    print(f"every container healthy ({len(states())}) {report['all_healthy_after_s']} s later", flush=True)


async def step_scale(report: dict[str, Any], client: Any, watcher: str) -> None:
    t1 = time.monotonic()
    await asyncio.to_thread(compose, "up", "-d", "--scale", "engine=4", "--no-recreate")

    async def four() -> bool:
        return len(await heartbeats(watcher, 2.0)) >= 4

    await until("four engines heartbeating", 300, four)
    results = await asyncio.gather(*(call(client, f"Count to {i}.", 16) for i in range(12)))
    used = {r.engine_id for r in results}
    report["scale_to_4_s"] = round(time.monotonic() - t1, 1)
    report["engines_used_by_12_calls"] = len(used)
    print(f"scale to 4: {report['scale_to_4_s']} s; 12 calls used {len(used)} engines", flush=True)
    if len(used) < 2:
        raise RuntimeError("the new engines took no work")


async def step_kill(report: dict[str, Any], client: Any, watcher: str) -> None:
    calls = [asyncio.create_task(call(client, f"Write a long story about the number {i}.", 96)) for i in range(8)]
    running: dict[str, int] = {}

    async def running_all() -> bool:
        running.update(await heartbeats(watcher, 1.5))
        return sum(running.values()) >= len(calls)

    await until("the eight calls running", 120, running_all)
    by_engine = {engine_id_of(cid): cid for cid in containers("engine")}
    engine_id = max((e for e in running if e in by_engine), key=lambda e: running[e])
    victim = by_engine[engine_id]
    await asyncio.to_thread(docker, "kill", victim)
    t2 = time.monotonic()
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 300)
    failed = [d for d in done if isinstance(d, BaseException)]
    report["kill_engine_running_calls"] = running[engine_id]
    report["kill_calls"] = len(calls)
    report["kill_calls_failed"] = len(failed)
    report["kill_calls_resumed"] = sum(1 for d in done if not isinstance(d, BaseException) and d.final.attempt > 0)
    report["kill_to_all_finished_s"] = round(time.monotonic() - t2, 1)
    report["killed_container"] = victim
    print(
        f"docker kill {victim[:12]} ({engine_id}, running {running[engine_id]} calls): "
        f"{len(calls) - len(failed)}/{len(calls)} calls finished ({report['kill_calls_resumed']} resumed elsewhere), "
        f"{len(failed)} failed",
        flush=True,
    )
    if failed:
        raise RuntimeError(f"calls lost to the kill: {failed[:3]}")
    if not report["kill_calls_resumed"]:
        raise RuntimeError("no call was resumed: the kill hit no work")


async def step_stop(report: dict[str, Any], client: Any, watcher: str) -> None:
    calls = [asyncio.create_task(call(client, f"Describe the colour {c}.", 48)) for c in ("red", "green", "blue")]

    async def running_all() -> bool:
        return sum((await heartbeats(watcher, 1.0)).values()) >= len(calls)

    await until("the calls running before stop", 120, running_all)
    t3 = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(compose, "stop", timeout=300))
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
    await client.close()  # before the broker goes (compose stops it last)
    await stopping
    report["stop_s"] = round(time.monotonic() - t3, 1)
    finished = [d for d in done if not isinstance(d, BaseException)]
    report["stop_calls_finished"] = f"{len(finished)}/{len(calls)}"
    killed = report.get("killed_container", "")
    exits = {
        inspect(cid, "{{.Name}}").lstrip("/"): int(inspect(cid, "{{.State.ExitCode}}"))
        for cid in containers(all_=True)
        if cid != killed
    }
    report["stop_exit_codes"] = exits
    print(
        f"stop with {len(calls)} calls running: {len(finished)}/{len(calls)} finished; {report['stop_s']} s; "
        f"exit codes {sorted(set(exits.values()))}",
        flush=True,
    )
    if len(finished) < len(calls):
        raise RuntimeError(f"calls lost to the drain: {[d for d in done if isinstance(d, BaseException)][:3]}")
    if any(exits.values()):
        raise RuntimeError(f"services exited non-zero on stop: {exits}")
    t4 = time.monotonic()
    await asyncio.to_thread(compose, "down", timeout=300)
    report["down_s"] = round(time.monotonic() - t4, 1)
    print(f"down: {report['down_s']} s", flush=True)


async def run(report: dict[str, Any]) -> None:
    from autellix.services.client import Client

    report["image_bytes"] = int(docker("image", "inspect", "autellix:local", "--format", "{{.Size}}").strip())
    print(f"image autellix:local: {report['image_bytes'] / 2**30:.2f} GiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        await step_up(report, Path(tmp) / "client.creds")
    client_url = host_url("client")
    await step_gateway(report)
    await step_auth(report, client_url)
    await step_healthy(report)
    watcher = host_url("gateway")
    client = await Client.connect(client_url, timeout_s=300)
    try:
        await step_scale(report, client, watcher)
        await step_kill(report, client, watcher)
        await step_stop(report, client, watcher)
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build autellix:local first")
    parser.add_argument("--json", metavar="OUT.json", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="leave the stack running on failure")
    args = parser.parse_args()
    report: dict[str, Any] = {"ok": False}
    if args.build:
        report["build_s"] = round(build_image(), 1)
    try:
        asyncio.run(run(report))
        report["ok"] = True
    except Exception as exc:  # reported, and the exit code says so
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {report['error']}", file=sys.stderr, flush=True)
    finally:
        if not (args.keep and not report["ok"]):
            compose("down", "-v", check=False, timeout=300)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
