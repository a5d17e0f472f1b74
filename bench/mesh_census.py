"""Messages and bytes per call on each subject, counted on the wire.

    python -m autellix.bench.mesh_census --programs 50 --calls 4 --max-tokens 32

A mesh as deployed by default (tracker with its table in JetStream, scheduler, ``--engines`` sim
engines, all in this process) on a fresh nats-server, and a wiretap connection subscribed to every
subject (``>``): every message published during the run is counted once, by subject family, with its
payload bytes. Replies to inboxes are told apart by their payload (stream chunks, finals, ``accepted``,
JetStream acknowledgements, the tracker's deliveries from the completions stream). What the wiretap
counts are publishes: a subject with several subscribers is delivered once to each (the fan-out,
which docs/scaling.md counts per role).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

#: the NATS protocol's framing of one delivered message (``MSG <subject> <sid> [reply] <size>\r\n`` and
#: the trailing ``\r\n``), beyond subject and payload: an estimate for wire bytes
FRAMING_BYTES = 20


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(subject: str, data: bytes, root: str) -> str:
    if subject.startswith(root + "."):
        rest = subject[len(root) + 1 :]
        if rest.startswith("call.submit"):
            return "call.submit (client -> scheduler)"
        if rest.startswith("engine.") and rest.endswith(".calls"):
            return "engine.<id>.calls (stamped call)"
        if rest.startswith("events.call.dispatched"):
            return "events.call.dispatched.<slot>"
        if rest.startswith("events.call.completed"):
            return "events.call.completed.<slot>"
        if rest == "tracker.service":
            return "tracker.service (program figures)"
        if rest == "engine.heartbeat":
            return "engine.heartbeat"
        if rest.startswith("program.end"):
            return "program.end (request)"
        return rest
    if subject.startswith("$KV."):
        return "$KV put (process table record)"
    if subject.startswith("$JS.ACK."):
        return "$JS.ACK (tracker acknowledges an event)"
    if subject.startswith("$JS.API."):
        return "$JS.API (management)"
    head = data[:200]
    if b'"type":"chunk"' in head:
        return "reply: chunk (tokens)"
    if b'"type":"final"' in head:
        return "reply: final"
    if b'"type":"accepted"' in head:
        return "reply: accepted"
    if head.startswith(b'{"stream":'):
        return "reply: JetStream PubAck"
    if b'"finish_reason"' in head and b'"service_s"' in head:
        return "delivery: completed event to the tracker"
    if b'"ok":' in head:
        return "reply: program end"
    return "other reply"


async def census(args: argparse.Namespace) -> dict[str, Any]:
    from nats.aio.client import Client as NATS

    from autellix.engine.factory import BackendSpec
    from autellix.services.client import Client
    from autellix.services.embedded_nats import EmbeddedNats
    from autellix.services.engine.config import EngineConfig
    from autellix.services.engine.service import EngineService
    from autellix.services.lifecycle import stop_all
    from autellix.services.nats_config import NatsConfig
    from autellix.services.scheduler.config import SchedulerConfig
    from autellix.services.scheduler.service import SchedulerService
    from autellix.services.tracker.config import TrackerConfig
    from autellix.services.tracker.service import TrackerService

    server = EmbeddedNats(port=0)
    url = server.start()
    root = f"census{uuid.uuid4().hex[:6]}"
    tracker = TrackerService(TrackerConfig(nats=NatsConfig.at(url, root)))
    scheduler = SchedulerService(SchedulerConfig(nats=NatsConfig.at(url, root)))
    engines = [
        EngineService(
            EngineConfig(
                nats=NatsConfig.at(url, root),
                engine_id=f"engine-{i}",
                heartbeat_s=args.heartbeat_s,
                backend=BackendSpec(name="sim", sim_time_scale=args.time_scale),
            )
        )
        for i in range(args.engines)
    ]
    services = [tracker, scheduler, *engines]
    counts: Counter[str] = Counter()
    payload: Counter[str] = Counter()
    wire: Counter[str] = Counter()
    tap = NATS()
    await tap.connect(url)

    async def on_any(msg: Any) -> None:
        f = family(msg.subject, msg.data, root)
        counts[f] += 1
        payload[f] += len(msg.data)
        wire[f] += len(msg.data) + len(msg.subject) + len(msg.reply or "") + FRAMING_BYTES

    try:
        for service in services:
            await service.start()
        await scheduler.wait_for_engines(args.engines, 10)
        await asyncio.sleep(0.5)
        if not args.no_tap:
            await tap.subscribe(">", cb=on_any, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await tap.flush()
        assert server._proc is not None
        nats_cpu0, mesh_cpu0 = _cpu_seconds(server._proc.pid), time.process_time()
        t0 = time.monotonic()
        tokens = 0
        async with await Client.connect(url, root=root, timeout_s=120) as client:

            async def program(i: int) -> int:
                p = client.program(f"census-{i}")
                got = 0
                history = "hello " * args.prompt_words
                for _ in range(args.calls):
                    result = await p.call(history, max_tokens=args.max_tokens, ignore_eos=True)
                    got += result.output_tokens
                    history += result.text
                await p.end()
                return got

            tokens = sum(await asyncio.gather(*(program(i) for i in range(args.programs))))
        await asyncio.sleep(1.0)  # the last records written, the last acknowledgements sent
        await tap.flush()
        elapsed = time.monotonic() - t0
        nats_cpu, mesh_cpu = _cpu_seconds(server._proc.pid) - nats_cpu0, time.process_time() - mesh_cpu0
    finally:
        await tap.close()
        await stop_all(services)
        server.stop()
    calls = args.programs * args.calls
    if not counts:
        counts["(no wiretap)"] = 0
    rows = {
        f: {
            "messages": counts[f],
            "per_call": round(counts[f] / calls, 3),
            "payload_bytes_per_msg": round(payload[f] / max(1, counts[f]), 1),
            "wire_bytes_per_call": round(wire[f] / calls, 1),
        }
        for f in sorted(counts, key=lambda f: -counts[f])
    }
    chunks = counts["reply: chunk (tokens)"]
    out = {
        "programs": args.programs,
        "calls": calls,
        "tokens": tokens,
        "elapsed_s": round(elapsed, 2),
        "engines": args.engines,
        "heartbeat_s": args.heartbeat_s,
        "max_tokens": args.max_tokens,
        "messages_per_call": round(sum(counts.values()) / calls, 2),
        "wire_bytes_per_call": round(sum(wire.values()) / calls, 1),
        "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
        "chunk_wire_bytes_per_token": round(wire["reply: chunk (tokens)"] / tokens, 1) if tokens else None,
        "nats_cpu_s": round(nats_cpu, 3),
        "this_process_cpu_s": round(mesh_cpu, 3),
        "subjects": rows,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg": os.getloadavg(),
    }
    print(f"{'subject family':48} {'per call':>9} {'payload B/msg':>14} {'wire B/call':>12}")
    for f, r in rows.items():
        print(f"{f:48} {r['per_call']:>9} {r['payload_bytes_per_msg']:>14} {r['wire_bytes_per_call']:>12}")
    print(
        f"{calls} calls, {tokens} tokens: {out['messages_per_call']} messages and {out['wire_bytes_per_call']:.0f}"
        f" wire bytes per call; {out['tokens_per_chunk']} tokens per chunk,"
        f" {out['chunk_wire_bytes_per_token']} wire bytes per streamed token; nats-server CPU {nats_cpu:.2f} s,"
        f" this process (every service, the client, the wiretap) {mesh_cpu:.2f} s"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=50)
    p.add_argument("--calls", type=int, default=4, help="calls per program, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--time-scale", type=float, default=0.2, help="sim backend: modelled time x this")
    p.add_argument("--no-tap", action="store_true", help="no wiretap: only the CPU figures (the tap adds deliveries)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from autellix.services.logs import configure_logging

    configure_logging("warning")
    out = uvloop.run(census(args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
