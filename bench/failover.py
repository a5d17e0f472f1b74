"""Time from an engine's death (SIGKILL) to its calls resuming on another engine.

Starts an embedded nats-server, a tracker and a scheduler in this process and N `sim` engines as
separate processes; keeps a load of streaming calls going, kills one engine at a time with SIGKILL,
and measures, for every call that was on it, the time from the kill to the first token of its
resumed attempt as the client sees it. Detection takes up to ``3 x heartbeat`` (the scheduler's
liveness rule), so the heartbeat interval is a parameter.

    python -m autellix.bench.failover --engines 4 --kills 5 --heartbeat 0.5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
import uuid

from autellix.services.client import CallStream, Client
from autellix.services.embedded_nats import EmbeddedNats
from autellix.services.lifecycle import stop_all
from autellix.services.local_mesh import spawn_service, stop_process
from autellix.services.logs import configure_logging
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.scheduler.service import SchedulerService
from autellix.services.tracker.config import TrackerConfig
from autellix.services.tracker.service import TrackerService
from autellix.sim.cli_kit import write_json


def _engine(url: str, root: str, engine_id: str, heartbeat: float, scale: float) -> subprocess.Popen[str]:
    flags = ["--backend", "sim", "--engine-id", engine_id, "--sim-time-scale", str(scale)]
    return spawn_service("engine", NatsConfig.at(url, root), *flags, env={"AUTELLIX_HEARTBEAT_S": str(heartbeat)})


async def _watch(stream: CallStream, resumed_at: dict[str, float]) -> None:
    async for _ in stream:
        if stream.attempt > 0 and stream.call_id not in resumed_at:
            resumed_at[stream.call_id] = time.perf_counter()


async def run(engines: int, kills: int, heartbeat: float, calls: int, scale: float) -> dict[str, object]:
    root = f"failover{uuid.uuid4().hex[:8]}"
    with EmbeddedNats(port=0) as broker:
        url = broker.url
        tracker = TrackerService(TrackerConfig(nats=NatsConfig.at(url, root)))
        scheduler = SchedulerService(SchedulerConfig(nats=NatsConfig.at(url, root)))
        await tracker.start()
        await scheduler.start()
        procs = {f"e{i}": _engine(url, root, f"e{i}", heartbeat, scale) for i in range(engines)}
        client = await Client.connect(url, root=root, timeout_s=120)
        delays: list[float] = []
        try:
            await scheduler.wait_for_engines(engines, 60)
            for k in range(kills):
                resumed_at: dict[str, float] = {}
                streams = [
                    client.program(f"k{k}p{i}").stream(f"kill {k} call {i}", max_tokens=400) for i in range(calls)
                ]
                tasks = [asyncio.create_task(_watch(s, resumed_at)) for s in streams]
                await asyncio.sleep(1.0)
                victim = next(iter(procs))
                on_victim = [s.call_id for s in streams if s.result is None and s.token_ids and s.attempt == 0]
                procs[victim].send_signal(signal.SIGKILL)
                killed_at = time.perf_counter()
                procs[victim].wait()
                del procs[victim]
                await asyncio.gather(*tasks)
                moved = [resumed_at[c] - killed_at for c in on_victim if c in resumed_at]
                delays += moved
                print(f"kill {k + 1}/{kills}: {len(moved)} calls resumed", file=sys.stderr)
                new_id = f"r{k}"
                procs[new_id] = _engine(url, root, new_id, heartbeat, scale)  # keep the engine count
                await scheduler.wait_for_engines(engines, 60)
        finally:
            await client.close()
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                stop_process(p)
            await stop_all([scheduler, tracker])
    delays.sort()
    return {
        "engines": engines,
        "kills": kills,
        "heartbeat_s": heartbeat,
        "calls_resumed": len(delays),
        "resume_p50_s": statistics.median(delays) if delays else None,
        "resume_p99_s": delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else None,
        "resume_max_s": delays[-1] if delays else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=1.0, help="engine heartbeat interval (s)")
    parser.add_argument("--calls", type=int, default=24, help="concurrent calls during each kill")
    parser.add_argument("--sim-time-scale", type=float, default=2.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    configure_logging("error")
    result = asyncio.run(run(args.engines, args.kills, args.heartbeat, args.calls, args.sim_time_scale))
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
