"""The `autellix` command line: up, tracker, scheduler, engine, call, demo, sim."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats.errors
import uvloop

from autellix.engine.factory import BACKENDS, DEFAULT_TIER_SCALE, RETENTIONS
from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.variants import SERVING_POLICIES
from autellix.proto import DEFAULT_ROOT

from .auth import redact_url
from .logs import configure_logging
from .nats_conn import DEFAULT_NATS_URL

POLICIES = SERVING_POLICIES
BALANCERS = BALANCER_NAMES


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(coro)


# -- shared flags -------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, nats_default: str | None = DEFAULT_NATS_URL) -> None:
    p.add_argument("--nats", default=None, help=f"NATS URL (env AUTELLIX_NATS; default {nats_default})")
    p.add_argument(
        "--creds",
        default=None,
        metavar="FILE",
        help="credentials file (one line: nats://user:password@host:port), used instead of --nats "
        "(env AUTELLIX_NATS_CREDS; default: the file `autellix up` wrote, if there is one)",
    )
    p.add_argument("--root", default=None, help=f"subject root (env AUTELLIX_ROOT; default {DEFAULT_ROOT})")
    p.add_argument("--log-level", default=None, help="debug|info|warning|error (env AUTELLIX_LOG_LEVEL; default info)")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default=None, help="model backend (env AUTELLIX_BACKEND; default hf)")
    p.add_argument("--model", default=None, help="local Hugging Face model dir (env AUTELLIX_MODEL; default SmolLM2)")
    p.add_argument("--max-batch", type=int, default=None, help="running calls per engine (env AUTELLIX_MAX_BATCH)")
    p.add_argument("--kv-tokens", type=int, default=None, help="KV tokens per engine (env AUTELLIX_KV_TOKENS)")
    p.add_argument(
        "--retention",
        choices=RETENTIONS,
        default=None,
        help="engine: eviction order of retained contexts, lru or program (contained, ended programs', then LRU) "
        "(env AUTELLIX_RETENTION; default program)",
    )
    p.add_argument(
        "--kv-tier-tokens",
        type=int,
        default=None,
        help=f"engine: CPU tier for evicted contexts of live programs, in tokens; 0 = none "
        f"(env AUTELLIX_KV_TIER_TOKENS; default {DEFAULT_TIER_SCALE} x --kv-tokens)",
    )
    p.add_argument("--device", default=None, help="hf backend: cpu or cuda[:N] (env AUTELLIX_DEVICE; default cpu)")
    p.add_argument("--threads", type=int, default=None, help="hf backend: torch threads (env AUTELLIX_THREADS)")
    p.add_argument(
        "--schedule-every",
        type=int,
        default=None,
        help="engine: a scheduling point (preemption) every N steps (env AUTELLIX_SCHEDULE_EVERY; default 4)",
    )
    p.add_argument(
        "--preempt-mode",
        choices=("auto", "swap", "recompute"),
        default=None,
        help="engine: how a displaced call gives up its KV (env AUTELLIX_PREEMPT_MODE; default auto)",
    )
    p.add_argument(
        "--sim-time-scale",
        type=float,
        default=None,
        help="sim backend: factor on modelled step times, 0 = instant (env AUTELLIX_SIM_TIME_SCALE; default 1)",
    )


def _add_metrics_port(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics here, 0 = any free port (env AUTELLIX_METRICS_PORT; default off)",
    )


def _metrics_port(cfg: Any, args: argparse.Namespace) -> Any:
    port = getattr(args, "metrics_port", None)
    return replace(cfg, metrics_port=port) if port is not None else cfg


def _env_url(args: argparse.Namespace, client: bool = False) -> str:
    """The URL to connect with (:func:`autellix.services.auth.resolve_url`: --creds, --nats, the
    environment, and for clients the credentials `autellix up` wrote on this machine)."""
    from .auth import resolve_url

    try:
        return resolve_url(args.nats, getattr(args, "creds", None), client=client)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"autellix: {exc}") from None


def _env_root(args: argparse.Namespace) -> str:
    return args.root or os.environ.get("AUTELLIX_ROOT", DEFAULT_ROOT)


def _tracker_config(args: argparse.Namespace, url: str):  # type: ignore[no-untyped-def]
    from .tracker.config import TrackerConfig

    cfg = TrackerConfig.from_env()
    cfg = replace(cfg, nats_url=url, root=_env_root(args))
    if getattr(args, "program_ttl", None) is not None:
        cfg = replace(cfg, idle_ttl_s=args.program_ttl)
    if getattr(args, "shards", None) is not None:
        cfg = replace(cfg, shards=args.shards)
    if getattr(args, "shard_index", None) is not None:
        cfg = replace(cfg, shard_index=args.shard_index)
    return _metrics_port(cfg, args)


def _scheduler_config(args: argparse.Namespace, url: str):  # type: ignore[no-untyped-def]
    from .scheduler.config import SchedulerConfig

    cfg = SchedulerConfig.from_env()
    cfg = replace(cfg, nats_url=url, root=_env_root(args))
    if getattr(args, "policy", None):
        cfg = replace(cfg, policy=args.policy)
    if getattr(args, "max_tokens_ceiling", None) is not None:
        cfg = replace(cfg, max_tokens_ceiling=args.max_tokens_ceiling)
    if getattr(args, "balancer", None):
        cfg = replace(cfg, balancer=args.balancer)
    if getattr(args, "door", None) is not None:
        cfg = replace(cfg, door=args.door)
    if getattr(args, "door_high_water", None) is not None:
        cfg = replace(cfg, door_high_water=args.door_high_water)
    if getattr(args, "door_max_waiting", None) is not None:
        cfg = replace(cfg, door_max_waiting=args.door_max_waiting)
    return _metrics_port(cfg, args)


def _add_door_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--door",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scheduler: new programs wait while the engines' working set does not fit their KV (env AUTELLIX_DOOR)",
    )
    p.add_argument(
        "--door-high-water",
        type=float,
        default=None,
        help="scheduler: admit while the working set stays under this fraction of KV (env AUTELLIX_DOOR_HIGH_WATER)",
    )
    p.add_argument(
        "--door-max-waiting",
        type=int,
        default=None,
        help="scheduler: programs that may wait at the door (env AUTELLIX_DOOR_MAX_WAITING; default 1000)",
    )


def _engine_config(args: argparse.Namespace, url: str, engine_id: str | None = None):  # type: ignore[no-untyped-def]
    from .engine.config import EngineConfig

    cfg = EngineConfig.from_env()
    spec = cfg.backend
    if args.backend:
        spec = replace(spec, name=args.backend)
    if args.model:
        spec = replace(spec, model=args.model)
    if args.max_batch is not None:
        spec = replace(spec, max_batch=args.max_batch)
    if args.kv_tokens is not None:
        spec = replace(spec, kv_capacity_tokens=args.kv_tokens)
    if getattr(args, "retention", None) is not None:
        spec = replace(spec, retention=args.retention)
    if getattr(args, "kv_tier_tokens", None) is not None:
        spec = replace(spec, kv_tier_tokens=args.kv_tier_tokens)
    if args.sim_time_scale is not None:
        spec = replace(spec, sim_time_scale=args.sim_time_scale)
    if args.threads is not None:
        spec = replace(spec, threads=args.threads)
    if args.device is not None:
        spec = replace(spec, device=args.device)
    cfg = replace(cfg, nats_url=url, root=_env_root(args), backend=spec)
    if getattr(args, "policy", None):
        cfg = replace(cfg, policy=args.policy)
    if args.schedule_every is not None:
        cfg = replace(cfg, schedule_every=args.schedule_every)
    if args.preempt_mode is not None:
        cfg = replace(cfg, preempt_mode=args.preempt_mode)
    if engine_id or getattr(args, "engine_id", None):
        cfg = replace(cfg, engine_id=engine_id or args.engine_id)
    return _metrics_port(cfg, args)


def _gateway_config(args: argparse.Namespace, url: str, host: str | None = None, port: int | None = None):  # type: ignore[no-untyped-def]
    from .gateway.config import GatewayConfig

    cfg = GatewayConfig.from_env()
    cfg = replace(cfg, nats_url=url, root=_env_root(args))
    if host is not None:
        cfg = replace(cfg, host=host)
    if port is not None:
        cfg = replace(cfg, port=port)
    return cfg


# -- one service --------------------------------------------------------------------------------
def cmd_service(args: argparse.Namespace) -> int:
    from .lifecycle import run_until_signal

    url = _env_url(args)
    service: Any
    if args.command == "tracker":
        from .tracker.service import TrackerService

        service = TrackerService(_tracker_config(args, url))
    elif args.command == "scheduler":
        from .scheduler.service import SchedulerService

        service = SchedulerService(_scheduler_config(args, url))
    elif args.command == "gateway":
        from .gateway.service import GatewayService

        service = GatewayService(_gateway_config(args, url, args.host, args.port))
    else:
        from .engine.service import EngineService

        service = EngineService(_engine_config(args, url))

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
    from autellix.proto import PROGRAM_SLOTS, Subjects

    from .auth import default_credentials_path, make_identities, read_credentials, server_config, write_credentials
    from .embedded_nats import EmbeddedNats, EmbeddedNatsCluster, NatsServerError
    from .engine.service import EngineService
    from .gateway.service import GatewayService
    from .lifecycle import abandon, install_signal_handlers, stop_stages, wait_for_stop
    from .scheduler.service import SchedulerService
    from .tracker.service import TrackerService

    if args.engines < 1:
        print("autellix up: --engines must be at least 1", file=sys.stderr)
        return 2
    if args.cluster < 1:
        print("autellix up: --cluster must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.trackers <= PROGRAM_SLOTS:
        print(f"autellix up: --trackers must be within 1 .. {PROGRAM_SLOTS}", file=sys.stderr)
        return 2
    broker: EmbeddedNats | EmbeddedNatsCluster | None = None
    url = args.nats or (read_credentials(args.creds) if args.creds else None)
    urls: dict[str, str] = {}  # per role, with auth on
    creds_path: Path | None = None
    if url is None:
        identities = {} if args.no_auth else make_identities()
        config = server_config(identities, Subjects(_env_root(args))) if identities else ""
        if args.cluster > 1:  # every node on a free port; services get every node's URL
            broker = EmbeddedNatsCluster(args.cluster, host=args.host, config=config)
        else:
            broker = EmbeddedNats(host=args.host, port=args.port, config=config)
        try:
            url = broker.start()
            urls = {role: ident.url(url) for role, ident in identities.items()}
            if urls:
                creds_path = write_credentials(Path(args.creds_out or default_credentials_path()), urls["client"])
        except NatsServerError as exc:
            print(f"autellix up: could not start nats-server: {exc}", file=sys.stderr)
            if args.port:
                print(f"  (is port {args.port} taken? try --port 0 for a free one)", file=sys.stderr)
            return 1

    async def main() -> int:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        ports = _up_metrics_ports(args)
        tracker_config = replace(_tracker_config(args, urls.get("tracker", url)), metrics_port=ports(0))
        if args.cluster > 1:  # the process table and the completions on every node (at most 3)
            tracker_config = replace(tracker_config, kv_replicas=min(3, args.cluster))
        trackers = [
            TrackerService(
                replace(tracker_config, shards=args.trackers, shard_index=i, metrics_port=ports(0) if i == 0 else None)
            )
            for i in range(args.trackers)
        ]
        tracker = trackers[0]
        scheduler_cfg = replace(_scheduler_config(args, urls.get("scheduler", url)), metrics_port=ports(1))
        scheduler = SchedulerService(scheduler_cfg)
        engines = [
            EngineService(replace(_engine_config(args, urls.get("engine", url)), metrics_port=ports(2 + i)))
            for i in range(args.engines)
        ]
        # --demo runs the demo with the Python client and exits: no HTTP ports to claim
        serve_http = not (args.no_gateway or args.demo)
        gateway_cfg = _gateway_config(args, urls.get("gateway", url), args.host, args.gateway_port)
        gateway = GatewayService(gateway_cfg) if serve_http else None
        started: list[Any] = []
        try:
            # the gateway before the engines: it hears their first heartbeats, so /v1/models is full at once
            for service in [*trackers, scheduler, *([gateway] if gateway else []), *engines]:
                starting = asyncio.create_task(service.start())
                waiter = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if starting not in done:
                    await abandon(starting)
                    return 130
                try:
                    starting.result()
                except OSError as exc:  # a port taken
                    print(f"autellix up: the {service.name} could not start: {exc}", file=sys.stderr)
                    print("  (try --gateway-port 0 / --metrics-port 0 for free ports)", file=sys.stderr)
                    return 1
                started.append(service)
            models = sorted({f"{e.backend.name}: {e.backend.model_name}" for e in engines if e.backend})
            http = f" | OpenAI API {gateway.url}/v1" if gateway else ""
            scraped = [s.metrics.endpoint.port for s in [tracker, scheduler, *engines]]
            if all(scraped):
                http += f" | metrics on ports {','.join(str(p) for p in scraped)}"
            auth = f" (auth on: client credentials in {creds_path})" if creds_path else ""
            print(
                f"autellix is up: NATS {redact_url(url)}{auth} | {_trackers(len(trackers))}, "
                f"scheduler ({scheduler.config.policy}), "
                f"{len(engines)} engine(s) [{', '.join(models)}]{http} | root {tracker.config.root} | Ctrl-C to stop",
                flush=True,
            )
            if args.demo:
                from .client import Client
                from .demo import run_demo

                async with await Client.connect(urls.get("client", url), root=tracker.config.root) as client:
                    await run_demo(client)
                return 0
            failed = await wait_for_stop(stop, started)
            return 1 if failed else 0
        finally:
            # the gateway stops taking requests first; engines drain in parallel: one drain timeout for the mesh
            stages = [[gateway], [scheduler], engines, trackers]
            await stop_stages([[s for s in stage if s is not None and s in started] for stage in stages])

    try:
        return _run(main())
    finally:
        if broker is not None:
            broker.stop()


# -- client commands ----------------------------------------------------------------------------
async def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import Client

    url = _env_url(args, client=True)
    try:
        return await asyncio.wait_for(Client.connect(url, root=_env_root(args), timeout_s=args.timeout), 10)
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
    written = init_deployment(directory, Subjects(_env_root(args)), host=args.host)
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
    _add_common(up, nats_default="an embedded nats-server")
    _add_engine_flags(up)
    up.add_argument("--engines", type=int, default=1, help="number of engines (default 1)")
    up.add_argument("--trackers", type=int, default=1, help="tracker shards, each owning a part of the programs (1)")
    up.add_argument("--policy", choices=POLICIES, default=None, help="scheduling policy (env AUTELLIX_POLICY; plas)")
    up.add_argument("--balancer", choices=BALANCERS, default=None, help="engine choice (env AUTELLIX_BALANCER)")
    _add_door_flags(up)
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

    tracker = sub.add_parser("tracker", help="run the program-tracker service")
    _add_common(tracker)
    tracker.add_argument("--program-ttl", type=float, default=None, help="forget idle programs after S seconds")
    tracker.add_argument(
        "--shards", type=int, default=None, help="trackers sharing the programs (env AUTELLIX_TRACKER_SHARDS; 1)"
    )
    tracker.add_argument(
        "--shard-index", type=int, default=None, help="this tracker's shard, 0 .. shards-1 (env AUTELLIX_TRACKER_SHARD)"
    )
    _add_metrics_port(tracker)
    tracker.set_defaults(func=cmd_service)

    scheduler = sub.add_parser("scheduler", help="run a scheduler service")
    _add_common(scheduler)
    scheduler.add_argument("--policy", choices=POLICIES, default=None, help="env AUTELLIX_POLICY; default plas")
    scheduler.add_argument("--balancer", choices=BALANCERS, default=None, help="env AUTELLIX_BALANCER; locality")
    scheduler.add_argument("--max-tokens-ceiling", type=int, default=None, help="env AUTELLIX_MAX_TOKENS_CEILING")
    _add_metrics_port(scheduler)
    _add_door_flags(scheduler)
    scheduler.set_defaults(func=cmd_service)

    engine = sub.add_parser("engine", help="run an engine service")
    _add_common(engine)
    _add_engine_flags(engine)
    engine.add_argument("--engine-id", default=None, help="env AUTELLIX_ENGINE_ID; default engine-<random>")
    engine.add_argument("--policy", choices=POLICIES, default=None, help="local queues (env AUTELLIX_POLICY; plas)")
    _add_metrics_port(engine)
    engine.set_defaults(func=cmd_service)

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    _add_common(gateway)
    gateway.add_argument("--host", default=None, help="listen address (env AUTELLIX_GATEWAY_HOST; default 0.0.0.0)")
    gateway.add_argument("--port", type=int, default=None, help="HTTP port (env AUTELLIX_GATEWAY_PORT; default 8000)")
    gateway.set_defaults(func=cmd_service)

    call = sub.add_parser("call", help="send one call and stream the answer")
    _add_common(call)
    call.add_argument("prompt")
    call.add_argument("--max-tokens", type=int, default=128)
    call.add_argument("--temperature", type=float, default=0.0)
    call.add_argument("--system", default=None, help="a system message before the prompt")
    call.add_argument("--raw", action="store_true", help="send the prompt as raw text, not through the chat template")
    call.add_argument("--program-id", default=None, help="join an existing program (default: a new one)")
    call.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each message")
    call.set_defaults(func=cmd_call)

    demo = sub.add_parser("demo", help="run a small agent program against the mesh")
    _add_common(demo)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each message")
    demo.set_defaults(func=cmd_demo)

    auth = sub.add_parser("auth", help="credentials for an authenticated deployment")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    init = auth_sub.add_parser("init", help="write nats-auth.conf and one <role>.creds per role into a directory")
    init.add_argument("directory", help="where to write them (files are created readable by their owner only)")
    init.add_argument("--root", default=None, help=f"subject root (env AUTELLIX_ROOT; default {DEFAULT_ROOT})")
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
