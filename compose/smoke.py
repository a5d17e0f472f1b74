"""The compose stack on a real Docker engine, step by step, each step timed (issue: deployment).

    python compose/smoke.py                 # uses the autellix:local image (build it first, see below)
    python compose/smoke.py --build         # builds it too (a local base image where no registry answers)
    python compose/smoke.py --json out.json

Steps: ``up`` (NATS, tracker, scheduler, one CPU engine on SmolLM2) until a call from the host is
answered; ``--scale engine=4`` until four engines heartbeat and calls land on more than one;
``docker kill`` of an engine while calls run on it, and every call still ends with a final (resumed
elsewhere); ``down``, which drains. Prints one line per step and a summary; exits non-zero on a
failed step. Needs a Docker engine, docker compose (v2 plugin or docker-compose 1.29) and this
package installed on the host (the host is the client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROJECT = "autellix-smoke"
#: the broker as the host reaches it (compose publishes 4222)
HOST_BROKER = "127.0.0.1:4222"


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


def build_image() -> None:
    """Build autellix:local: the public base where a registry answers, else a local stand-in."""
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


async def call(client: Any, prompt: str, max_tokens: int = 24) -> Any:
    async with client.program() as p:
        return await p.call(prompt, max_tokens=max_tokens)


def host_url(role: str) -> str:
    """A role's credentials from the stack's secrets volume (auth-init wrote them), pointed at the
    broker's published port: the mesh is authenticated, as `autellix up`'s is."""
    done = compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "auth-init", f"/secrets/{role}.creds")
    return done.stdout.strip().replace("@nats:4222", f"@{HOST_BROKER}")


async def engines_seen(url: str, seconds: float) -> set[str]:
    import nats

    seen: set[str] = set()
    nc = await nats.connect(url)  # as the gateway: a role that may read heartbeats

    async def cb(msg: Any) -> None:
        hb = json.loads(msg.data)
        if hb.get("state") == "up":
            seen.add(hb["engine_id"])

    await nc.subscribe("autellix.engine.heartbeat", cb=cb)
    await asyncio.sleep(seconds)
    await nc.close()
    return seen


async def connect_client(url: str) -> Any:
    from autellix.services.client import Client

    deadline = time.monotonic() + 180
    while True:
        try:
            return await Client.connect(url, timeout_s=300)
        except Exception:  # the broker is still starting
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)


def engine_containers() -> list[str]:
    out = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={PROJECT}",
            "--filter",
            "label=com.docker.compose.service=engine",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


async def run(report: dict[str, Any]) -> None:
    size = await asyncio.to_thread(
        subprocess.run,
        ["docker", "image", "inspect", "autellix:local", "--format", "{{.Size}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    report["image_bytes"] = int(size.stdout.strip())
    print(f"image autellix:local: {report['image_bytes'] / 2**30:.2f} GiB", flush=True)

    # 1. up -> the first answered call from the host
    t0 = time.monotonic()
    compose("up", "-d")
    client = await connect_client(host_url("client"))
    while True:
        try:
            first = await call(client, "What is the capital of France?")
            break
        except Exception as exc:  # no engine yet: the scheduler answers no_engine
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"no answer within 300 s of up: {exc}") from exc
            await asyncio.sleep(1)
    report["up_to_first_answer_s"] = round(time.monotonic() - t0, 1)
    report["first_answer"] = first.text
    print(f"up -> first answer: {report['up_to_first_answer_s']} s: {first.text!r}", flush=True)

    # 2. four engines, and calls spread over them
    t1 = time.monotonic()
    compose("up", "-d", "--scale", "engine=4", "--no-recreate")
    watcher = host_url("gateway")
    while len(await engines_seen(watcher, 2.0)) < 4:
        if time.monotonic() - t1 > 300:
            raise RuntimeError("four engines did not heartbeat within 300 s")
    results = await asyncio.gather(*(call(client, f"Count to {i}.", 16) for i in range(12)))
    used = {r.engine_id for r in results}
    report["scale_to_4_s"] = round(time.monotonic() - t1, 1)
    report["engines_used_by_12_calls"] = len(used)
    print(f"scale to 4: {report['scale_to_4_s']} s; 12 calls used {len(used)} engines", flush=True)
    if len(used) < 2:
        raise RuntimeError("the new engines took no work")

    # 3. kill an engine under load: every call still ends with a final
    calls = [asyncio.create_task(call(client, f"Write a long story about the number {i}.", 96)) for i in range(8)]
    await asyncio.sleep(4)
    victim = engine_containers()[0]
    await asyncio.to_thread(subprocess.run, ["docker", "kill", victim], check=True, capture_output=True)
    t2 = time.monotonic()
    done = await asyncio.gather(*calls, return_exceptions=True)
    failed = [d for d in done if isinstance(d, BaseException)]
    report["kill_calls"] = len(calls)
    report["kill_calls_failed"] = len(failed)
    report["kill_calls_resumed"] = sum(1 for d in done if not isinstance(d, BaseException) and d.final.attempt > 0)
    report["kill_to_all_finished_s"] = round(time.monotonic() - t2, 1)
    print(
        f"docker kill {victim[:12]}: {len(calls) - len(failed)}/{len(calls)} calls finished "
        f"({report['kill_calls_resumed']} resumed elsewhere), {len(failed)} failed",
        flush=True,
    )
    await client.close()
    if failed:
        raise RuntimeError(f"calls lost to the kill: {failed[:3]}")

    # 4. down drains
    t3 = time.monotonic()
    compose("down", timeout=300)
    report["down_s"] = round(time.monotonic() - t3, 1)
    print(f"down: {report['down_s']} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build autellix:local first")
    parser.add_argument("--json", metavar="OUT.json", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="leave the stack running on failure")
    args = parser.parse_args()
    if args.build:
        build_image()
    report: dict[str, Any] = {"ok": False}
    try:
        asyncio.run(run(report))
        report["ok"] = True
    except Exception as exc:  # reported, and the exit code says so
        report["error"] = str(exc)
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        if not (args.keep and not report["ok"]):
            compose("down", "-v", check=False, timeout=300)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
