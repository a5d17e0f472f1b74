"""The `autellix` command line: up, tracker, scheduler, engine, call, demo, sim."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import uvloop

from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.variants import SERVING_POLICIES

from .auth import redact_url
from .engine.config import EngineConfig
from .gateway.config import GatewayConfig
from .logs import configure_logging
from .nats_config import NatsConfig
from .scheduler.config import SchedulerConfig
from .settings import add_flags, from_env_and_flags, parse_url_list
from .tracker.config import TrackerConfig

C = TypeVar("C")

POLICIES = SERVING_POLICIES
BALANCERS = BALANCER_NAMES


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(coro)


# -- shared flags -------------------------------------------------------------------------------
#: each service's config class; its settings table makes its flags (autellix.services.settings)
SERVICE_CONFIGS: dict[str, type] = {
    "tracker": TrackerConfig,
    "scheduler": SchedulerConfig,
    "engine": EngineConfig,
    "gateway": GatewayConfig,
}
#: flags of `up` that are its own, not a service's: its broker's address, the gateway's port, the
#: metrics ports of all services, its tracker shards (--trackers); and each engine gets its own id
UP_OWN_FLAGS = ("--nats", "--creds", "--host", "--port", "--metrics-port", "--engine-id", "--shards", "--shard-index")
NATS_FLAGS_BUT_ROOT = tuple(s.flag for s in NatsConfig.SETTINGS if s.flag and s.flag != "--root")


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=None, help="debug|info|warning|error (env AUTELLIX_LOG_LEVEL; default info)")


def _config(cls: type[C], args: argparse.Namespace, skip: Sequence[str] = ()) -> C:
    """Defaults, then the environment, then the flags given; one line and exit 2 on a bad value."""
    try:
        return from_env_and_flags(cls, args, skip)
    except ValueError as exc:
        raise SystemExit(f"autellix: {exc}") from None


def _server_url(nats: NatsConfig, client: bool = False) -> str:
    """The URL to connect with; one line and exit 1 on an unreadable credentials file."""
    try:
        return nats.server_url(client=client)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"autellix: {exc}") from None


# -- one service --------------------------------------------------------------------------------
def cmd_service(args: argparse.Namespace) -> int:
    from .lifecycle import run_until_signal

    config: Any = _config(SERVICE_CONFIGS[args.command], args)
    _server_url(config.nats)  # a bad credentials file: one line now, not a failed start
    service: Any
    if args.command == "tracker":
        from .tracker.service import TrackerService

        service = TrackerService(config)
    elif args.command == "scheduler":
        from .scheduler.service import SchedulerService

        service = SchedulerService(config)
    elif args.command == "gateway":
        from .gateway.service import GatewayService

        service = GatewayService(config)
    else:
        from .engine.service import EngineService

        service = EngineService(config)

    async def main() -> int:
        return await run_until_signal([service])

    status = _run(main())
    if status == 1:
        # the service failed: exit now, even if a stuck worker thread (a hung model step) would
        # keep the interpreter from exiting at all
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


# -- everything on one machine ------------------------------------------------------------------
def _up_metrics_ports(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Metrics ports for `up`: tracker, scheduler, engines on consecutive ports from --metrics-port
    (0: each any free port), on --host; none with --no-metrics."""
    os.environ["AUTELLIX_METRICS_HOST"] = args.host

    def port(i: int) -> int | None:
        if args.no_metrics or args.demo:
            return None
        return 0 if args.metrics_port == 0 else args.metrics_port + i

    return port


def _trackers(n: int) -> str:
    return "tracker" if n == 1 else f"{n} tracker shards"


def cmd_up(args: argparse.Namespace) -> int:
    from autellix.proto import PROGRAM_SLOTS

    from .auth import default_credentials_path, read_credentials
    from .embedded_nats import NatsServerError
    from .lifecycle import install_signal_handlers, wait_for_stop
    from .local_mesh import LocalBroker, LocalMesh

    if args.engines < 1:
        print("autellix up: --engines must be at least 1", file=sys.stderr)
        return 2
    if args.cluster < 1:
        print("autellix up: --cluster must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.trackers <= PROGRAM_SLOTS:
        print(f"autellix up: --trackers must be within 1 .. {PROGRAM_SLOTS}", file=sys.stderr)
        return 2
    nats_config = _config(NatsConfig, args)
    root = nats_config.root
    broker: LocalBroker | None = None
    url = ",".join(args.nats) if args.nats else (read_credentials(args.creds) if args.creds else None)
    creds_path: Path | None = None
    if url is None:  # a cluster: every node on a free port; services get every node's URL
        broker = LocalBroker(nodes=args.cluster, host=args.host, port=args.port, auth=not args.no_auth, root=root)
        try:
            url = broker.start()
            creds_path = broker.write_client_credentials(Path(args.creds_out or default_credentials_path()))
        except NatsServerError as exc:
            print(f"autellix up: could not start nats-server: {exc}", file=sys.stderr)
            if args.port:
                print(f"  (is port {args.port} taken? try --port 0 for a free one)", file=sys.stderr)
            return 1

    def nats_for(role: str) -> NatsConfig:
        """Our own broker: the role's identity, no TLS; another: its URL, with the TLS settings given."""
        if broker is not None:
            return broker.nats_for(role)
        return replace(nats_config, urls=parse_url_list(url), creds=None)

    def config(cls: type[C], role: str, **fields: Any) -> C:
        """The role's config from the environment and the flags, on this mesh's broker."""
        cfg: Any = _config(cls, args, UP_OWN_FLAGS)
        return replace(cfg, nats=nats_for(role), **fields)  # type: ignore[no-any-return]

    async def main() -> int:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        ports = _up_metrics_ports(args)
        # the process table and the completions on every node of a cluster (at most 3)
        replicas = {"kv_replicas": min(3, args.cluster)} if args.cluster > 1 else {}
        # --demo runs the demo with the Python client and exits: no HTTP ports to claim
        serve_http = not (args.no_gateway or args.demo)
        mesh = LocalMesh.of(
            tracker=config(TrackerConfig, "tracker", metrics_port=ports(0), **replicas),
            tracker_shards=args.trackers,
            scheduler=config(SchedulerConfig, "scheduler", metrics_port=ports(1)),
            engines=[config(EngineConfig, "engine", metrics_port=ports(2 + i)) for i in range(args.engines)],
            gateway=config(GatewayConfig, "gateway", host=args.host, port=args.gateway_port) if serve_http else None,
        )
        try:
            try:
                if not await mesh.start(stop, engines_within_s=None):
                    return 130
            except OSError as exc:  # a port taken
                print(f"autellix up: the {mesh.not_started()[0].name} could not start: {exc}", file=sys.stderr)
                print("  (try --gateway-port 0 / --metrics-port 0 for free ports)", file=sys.stderr)
                return 1
            engines, gateway = mesh.engines, mesh.gateway
            models = sorted({f"{e.backend.name}: {e.backend.model_name}" for e in engines if e.backend})
            http = f" | OpenAI API {gateway.url}/v1" if gateway else ""
            scraped = [s.metrics.endpoint.port for s in [mesh.tracker, mesh.scheduler, *engines]]
            if all(scraped):
                http += f" | metrics on ports {','.join(str(p) for p in scraped)}"
            auth = f" (auth on: client credentials in {creds_path})" if creds_path else ""
            print(
                f"autellix is up: NATS {redact_url(url)}{auth} | {_trackers(len(mesh.trackers))}, "
                f"scheduler ({mesh.scheduler.config.policy}), "
                f"{len(engines)} engine(s) [{', '.join(models)}]{http} | root {root} | Ctrl-C to stop",
                flush=True,
            )
            if args.demo:
                from .client import Client
                from .demo import run_demo

                client_url = broker.url_for("client") if broker is not None else url
                async with await Client.connect(client_url, root=root) as client:
                    await run_demo(client)
                return 0
            failed = await wait_for_stop(stop, mesh.started)
            return 1 if failed else 0
        finally:
            # the gateway stops taking requests first; engines drain in parallel: one drain timeout for the mesh
            await mesh.stop()

    try:
        return _run(main())
    finally:
        if broker is not None:
            broker.stop()


# -- client commands ----------------------------------------------------------------------------
async def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import Client

    nats_config = _config(NatsConfig, args)
    url = _server_url(nats_config, client=True)
    try:
        return await asyncio.wait_for(Client.connect(nats=nats_config, timeout_s=args.timeout), 10)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise SystemExit(
            f"cannot reach NATS at {redact_url(url)} ({exc or type(exc).__name__}): is `autellix up` running? "
            "(with auth on, pass the credentials file it names: --creds FILE)"
        ) from None


def cmd_call(args: argparse.Namespace) -> int:
    from .client import CallFailed

    async def main() -> int:
        client = await _client(args)
        try:
            program = client.program(args.program_id)
            messages = [] if args.raw else [{"role": "user", "content": args.prompt}]
            if args.system and not args.raw:
                messages.insert(0, {"role": "system", "content": args.system})
            stream = program.stream(
                messages or None,
                prompt=args.prompt if args.raw else None,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
            )
            try:
                async for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except CallFailed as exc:
                print(f"\nerror ({exc.code}): {exc.message}", file=sys.stderr)
                return 1
            r = stream.result
            assert r is not None
            print()
            print(
                f"[{r.output_tokens} tokens, {r.finish_reason}, ttft {r.ttft_s * 1000:.0f} ms, "
                f"{r.latency_s:.2f} s, engine {r.engine_id}]",
                file=sys.stderr,
            )
            if args.program_id is None:
                await program.end()
            return 0
        finally:
            await client.close()

    return _run(main())


def cmd_demo(args: argparse.Namespace) -> int:
    from .client import CallFailed
    from .demo import run_demo

    async def main() -> int:
        client = await _client(args)
        try:
            await run_demo(client, max_tokens=args.max_tokens)
            return 0
        except CallFailed as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return 1
        finally:
            await client.close()

    return _run(main())


def cmd_auth_init(args: argparse.Namespace) -> int:
    from autellix.proto import Subjects

    from .auth import init_deployment

    directory = Path(args.directory)
    if args.keep and (directory / "nats-auth.conf").is_file():
        print(f"kept the credentials already in {directory}")
        return 0
    written = init_deployment(directory, Subjects(_config(NatsConfig, args).root), host=args.host)
    for what, path in written.items():
        print(f"{what:9} {path}")
    print(
        f"include {written['server']} in nats-server's configuration; give each service its <role>.creds "
        "(--creds or AUTELLIX_NATS_CREDS), and clients client.creds"
    )
    return 0


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autellix", description="Program-level scheduling for LLM agents over NATS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start NATS, tracker, scheduler and engines on this machine")
    up.add_argument("--nats", type=parse_url_list, default=None,
                    help="use the NATS server(s) at this URL (list) instead of an embedded nats-server")
    up.add_argument("--creds", default=None, metavar="FILE",
                    help="use the NATS server named in this credentials file instead of an embedded nats-server")
    # every service's own settings (the scheduler's and the engines' --policy is one flag)
    add_flags(up, [NatsConfig, *SERVICE_CONFIGS.values()], skip=UP_OWN_FLAGS)
    _add_log_level(up)
    up.add_argument("--engines", type=int, default=1, help="number of engines (default 1)")
    up.add_argument("--trackers", type=int, default=1, help="tracker shards, each owning a part of the programs (1)")
    up.add_argument("--host", default="127.0.0.1", help="embedded NATS: listen address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=4222, help="embedded NATS: port, 0 = any free port (default 4222)")
    up.add_argument("--demo", action="store_true", help="run the demo program once ready, then stop")
    up.add_argument("--gateway-port", type=int, default=8000, help="OpenAI API port on --host, 0 = any free (8000)")
    up.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI-compatible gateway")
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="Prometheus metrics: tracker on this port, scheduler +1, engines +2.. (0 = any free; default 9100)",
    )
    up.add_argument("--no-metrics", action="store_true", help="no metrics endpoints (the gateway's /metrics stays)")
    up.add_argument(
        "--cluster",
        type=int,
        default=1,
        metavar="N",
        help="embedded NATS as an N-node cluster (routes, JetStream, the tracker's data on min(3, N) replicas; "
        "every node on a free port) instead of one server (default 1)",
    )
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="embedded NATS without identities or permissions (local experiments only; default: auth on)",
    )
    up.add_argument(
        "--creds-out",
        default=None,
        metavar="FILE",
        help="where to write the client's credentials (default $AUTELLIX_CACHE/credentials/client.creds)",
    )
    up.set_defaults(func=cmd_up)

    helps = {
        "tracker": "run the program-tracker service",
        "scheduler": "run a scheduler service",
        "engine": "run an engine service",
        "gateway": "run the OpenAI-compatible HTTP gateway",
    }
    for name, cls in SERVICE_CONFIGS.items():
        service = sub.add_parser(name, help=helps[name])
        add_flags(service, [cls])
        _add_log_level(service)
        service.set_defaults(func=cmd_service)

    call = sub.add_parser("call", help="send one call and stream the answer")
    add_flags(call, [NatsConfig])
    _add_log_level(call)
    call.add_argument("prompt")
    call.add_argument("--max-tokens", type=int, default=128)
    call.add_argument("--temperature", type=float, default=0.0)
    call.add_argument("--system", default=None, help="a system message before the prompt")
    call.add_argument("--raw", action="store_true", help="send the prompt as raw text, not through the chat template")
    call.add_argument("--program-id", default=None, help="join an existing program (default: a new one)")
    call.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each message")
    call.set_defaults(func=cmd_call)

    demo = sub.add_parser("demo", help="run a small agent program against the mesh")
    add_flags(demo, [NatsConfig])
    _add_log_level(demo)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each message")
    demo.set_defaults(func=cmd_demo)

    auth = sub.add_parser("auth", help="credentials for an authenticated deployment")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    init = auth_sub.add_parser("init", help="write nats-auth.conf and one <role>.creds per role into a directory")
    init.add_argument("directory", help="where to write them (files are created readable by their owner only)")
    add_flags(init, [NatsConfig], skip=NATS_FLAGS_BUT_ROOT)
    init.add_argument("--host", default="nats:4222", help="the broker's host:port in the .creds URLs")
    init.add_argument(
        "--keep", action="store_true", help="write nothing when the directory already holds a nats-auth.conf"
    )
    init.set_defaults(func=cmd_auth_init)

    from autellix.bench.cli import register as register_bench
    from autellix.sim.cli import register as register_sim

    register_sim(sub)
    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(getattr(args, "log_level", None))
    except ValueError as exc:
        print(f"autellix: {exc}", file=sys.stderr)
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
