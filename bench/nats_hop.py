"""One NATS hop between two processes, as the services make it (nats-py on uvloop): the floor under the
mesh's added TTFT, which crosses three such hops (client → scheduler → engine → client).

    python -m autellix.bench.nats_hop [--messages 300] [--gap-s 0.02]

A nats-server of its own; a subscriber process; this process publishes ``--messages`` messages, one every
``--gap-s`` seconds (so each finds both processes idle, as a call's hops do), each carrying its send time;
the subscriber's callback takes the delay. Prints p50 / p90 / mean in ms (the first 20 are warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

SUBJECT = "hop.bench"
WARM_UP = 20


async def _subscriber(url: str, messages: int) -> None:
    nc = NATS()
    await nc.connect(url)
    delays: list[float] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        delays.append(time.time() - float(msg.data))
        if len(delays) >= messages:
            done.set()

    await nc.subscribe(SUBJECT, cb=on_msg)
    await nc.flush()
    print("ready", flush=True)
    await done.wait()
    kept = sorted(delays[WARM_UP:])
    summary = {
        "p50_ms": kept[len(kept) // 2] * 1000,
        "p90_ms": kept[int(len(kept) * 0.9)] * 1000,
        "mean_ms": statistics.fmean(kept) * 1000,
    }
    print(json.dumps(summary), flush=True)
    await nc.close()


async def _publisher(url: str, messages: int, gap_s: float) -> None:
    nc = NATS()
    await nc.connect(url)
    for _ in range(messages):
        await nc.publish(SUBJECT, repr(time.time()).encode())
        await asyncio.sleep(gap_s)
    await nc.flush()
    await nc.close()


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--gap-s", type=float, default=0.02)
    p.add_argument("--subscriber", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    total = args.messages + WARM_UP
    if args.subscriber:
        uvloop.run(_subscriber(args.subscriber, total))
        return 0
    from autellix.services.embedded_nats import EmbeddedNats

    with EmbeddedNats(port=0) as broker:
        sub = subprocess.Popen(
            [sys.executable, "-m", "autellix.bench.nats_hop", "--messages", str(args.messages), "--subscriber",
             broker.url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("the subscriber did not start")
        uvloop.run(_publisher(broker.url, total, args.gap_s))
        print(sub.stdout.readline().strip())
        sub.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
