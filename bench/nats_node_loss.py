"""One node of a three-node NATS cluster killed under load: calls lost, recovery, service kept.

Each round starts a fresh three-node cluster (routes, JetStream, the tracker's bucket and the
completions stream at 3 replicas), a tracker, a scheduler and two ``sim`` engines in this process,
connected to every node's URL (each picks one and fails over), and ``--programs`` programs making
``--calls`` sequential streamed calls each. ``--kill-after`` seconds in, one node is SIGKILLed (node
``round % 3``, so every node goes once in three rounds). Per round:

- **lost**: calls that ended with an error or no final (the client resubmits on its own reconnect;
  engines send call endings again on theirs);
- **recovery**: for every call in flight at the kill, the time from the kill to its final; the
  figure the target is about is its p99 over all rounds;
- **service kept**: each program's attained service at the tracker against the sum of what the
  engines reported for every attempt of its calls (a call can run a second attempt across the kill);
- **rejoin**: the killed node started again on its ports and store, the time until its JetStream
  serves the tracker's bucket.

    python -m autellix.bench.nats_node_loss --rounds 6 --json bench/out/nats_node_loss.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from autellix.engine.core import CoreConfig
from autellix.engine.factory import BackendSpec
from autellix.proto import CallCompleted
from autellix.services.client import CallFailed, Client
from autellix.services.embedded_nats import EmbeddedNatsCluster
from autellix.services.engine.config import EngineConfig
from autellix.services.engine.service import EngineService
from autellix.services.local_mesh import LocalMesh
from autellix.services.logs import configure_logging
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.tracker.config import TrackerConfig
from autellix.sim.cli_kit import write_json


@dataclass
class Round:
    index: int
    killed_node: int
    calls: int = 0
    lost: int = 0
    second_attempts: int = 0
    recovery_s: list[float] = field(default_factory=list)
    service_gap_s: float = 0.0
    rejoin_s: float | None = None
    wall_s: float = 0.0


async def one_round(index: int, programs: int, calls: int, kill_after_s: float, max_tokens: int) -> Round:
    out = Round(index, killed_node=index % 3)
    root = f"loss{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with EmbeddedNatsCluster(3) as cluster:
        nc_for = NatsConfig.at(cluster.url, root)
        mesh = LocalMesh.of(
            tracker=TrackerConfig(nats=nc_for, kv_replicas=3),
            scheduler=SchedulerConfig(nats=nc_for),
            engines=[
                EngineConfig(
                    nats=nc_for, engine_id=f"e{i}-{root}", backend=BackendSpec(name="sim", sim_time_scale=1.0),
                    heartbeat_s=0.2, core=CoreConfig(),
                )
                for i in range(2)
            ],
        )  # fmt: skip
        await mesh.start()
        reported = record_completions(mesh.engines)
        client = await Client.connect(cluster.url, root=root, timeout_s=60)
        spans: list[tuple[float, float]] = []
        killed_at = 0.0

        async def program(i: int) -> None:
            p = client.program(f"{root}-p{i}")
            for j in range(calls):
                t0 = time.monotonic()
                try:
                    await p.call(f"step {j} of program {i}", max_tokens=max_tokens)
                except CallFailed:
                    out.lost += 1
                    continue
                spans.append((t0, time.monotonic()))

        try:
            work = asyncio.gather(*(program(i) for i in range(programs)))
            await asyncio.sleep(kill_after_s)
            killed_at = time.monotonic()
            cluster.nodes[out.killed_node].kill()
            await asyncio.wait_for(work, 300)
            out.calls = programs * calls
            out.recovery_s = [end - killed_at for start, end in spans if start < killed_at < end]
            out.second_attempts = len(reported) - len(spans)
            deadline = time.monotonic() + 20
            while True:  # the tracker applies the stream's last events
                rows = {r.program_id: r for r in mesh.tracker.table.summaries()}
                gap = 0.0
                for i in range(programs):
                    pid = f"{root}-p{i}"
                    ran = sum(s for (prog, _, _), s in reported.items() if prog == pid)
                    gap = max(gap, abs(ran - rows[pid].service_s) if pid in rows else ran)
                if gap < 1e-6 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            out.service_gap_s = gap
            restarted = time.monotonic()
            cluster.nodes[out.killed_node].start()
            probe = await nats.connect(cluster.nodes[out.killed_node].url)
            try:
                for _ in range(240):
                    try:
                        kv = await probe.jetstream().key_value(mesh.tracker.store.bucket)
                        await kv.keys()
                        out.rejoin_s = time.monotonic() - restarted
                        break
                    except Exception:  # still catching up
                        await asyncio.sleep(0.25)
            finally:
                await probe.close()
        finally:
            await client.close()
            await mesh.stop()
    out.wall_s = time.monotonic() - started
    return out


def record_completions(engines: Sequence[EngineService]) -> dict[tuple[str, str, int], float]:
    """What every engine reports, whatever reaches the tracker: (program, call, attempt) -> service
    seconds, filled as the engines' outboxes send their completed events (engines already started)."""
    reported: dict[tuple[str, str, int], float] = {}
    for engine in engines:
        outbox = engine._outbox
        assert outbox is not None, "record_completions needs started engines"
        send = outbox.send

        async def record(event: CallCompleted, send: Callable[[CallCompleted], Awaitable[None]] = send) -> None:
            reported[(event.program_id, event.call_id, event.attempt or 0)] = event.service_s
            await send(event)

        outbox.send = record  # type: ignore[method-assign]
    return reported


def _seconds(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f} s"


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[Round] = []
    for i in range(args.rounds):
        r = await one_round(i, args.programs, args.calls, args.kill_after, args.max_tokens)
        rounds.append(r)
        print(
            f"round {i + 1}/{args.rounds}: node {r.killed_node} killed; {r.lost} of {r.calls} calls lost; "
            f"{len(r.recovery_s)} in flight, recovered p50 {percentile(r.recovery_s, 0.5):.2f} s, "
            f"max {max(r.recovery_s, default=float('nan')):.2f} s; {r.second_attempts} second attempts; "
            f"service gap {r.service_gap_s:.2g} s; rejoined in {_seconds(r.rejoin_s)} ({r.wall_s:.0f} s)",
            file=sys.stderr,
        )
    recovery = [x for r in rounds for x in r.recovery_s]
    return {
        "rounds": [r.__dict__ for r in rounds],
        "calls": sum(r.calls for r in rounds),
        "lost": sum(r.lost for r in rounds),
        "in_flight_at_kill": len(recovery),
        "recovery_s": {
            "p50": percentile(recovery, 0.5),
            "p99": percentile(recovery, 0.99),
            "max": max(recovery, default=float("nan")),
            "mean": statistics.fmean(recovery) if recovery else float("nan"),
        },
        "max_service_gap_s": max(r.service_gap_s for r in rounds),
        "rejoin_s": [r.rejoin_s for r in rounds],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--programs", type=int, default=8)
    p.add_argument("--calls", type=int, default=8, help="sequential calls per program")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--kill-after", type=float, default=1.0, help="seconds into the load")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    configure_logging("error")
    report = asyncio.run(main_async(args))
    print(
        f"{report['lost']} of {report['calls']} calls lost; {report['in_flight_at_kill']} in flight at the kills; "
        f"recovery p50 {report['recovery_s']['p50']:.2f} s, p99 {report['recovery_s']['p99']:.2f} s; "
        f"largest service gap {report['max_service_gap_s']:.2g} s",
        file=sys.stderr,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)


if __name__ == "__main__":
    main()
