"""What the OpenAI-compatible gateway costs: time to first token through it vs through the Python client
over NATS, and the streaming load one gateway process carries before its added latency doubles.

    python -m autellix.bench.gateway_costs --json bench/out/gateway_costs.json [--only ttft,load]

Topology (as deployed): ``autellix up --no-gateway`` (embedded nats-server, tracker, scheduler, one ``sim``
engine, policy ``fcfs`` so no probe is reordered behind another program) and ``autellix gateway`` as a
separate process; this process is the client.

- **ttft**: one call at a time, alternating the two paths in one run: a streaming chat call through the
  gateway over HTTP/1.1 keep-alive (a minimal client: the OpenAI SDK's own parsing would be counted
  as gateway time), and the same call through :class:`autellix.services.client.Client` over NATS.
  256-word prompt, 4 tokens, the ``sim`` engine at time scale 1 (a modelled prefill of ~17 ms).
  TTFT = request sent -> first text received. Added = gateway - NATS, at p50 and p99.
- **load**: the engine at time scale 0 (steps cost no modelled time), a separate load-generator process
  sending streaming chat calls (8 tokens) to the gateway as a Poisson process at each rate, while this
  process probes TTFT through both paths as above. The gateway's added latency at a rate = probe p50
  through the gateway - probe p50 over NATS; the capacity is the highest rate whose added latency stays
  under twice the unloaded one *and* whose load the mesh kept up with (completed >= 95% of offered,
  nothing piling up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import uvloop

PROMPT = " ".join(["www"] * 256)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99), "mean": statistics.fmean(values)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a minimal streaming HTTP/1.1 client ---------------------------------------------------------
class Http:
    """One keep-alive connection; ``stream`` sends a chat call and reads its SSE to ``[DONE]``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: bytes, session: str) -> tuple[float, float]:
        """(seconds to the first SSE event, seconds to the end of the response)."""
        try:
            return await self._stream(body, session)
        except ConnectionError:  # uvicorn closes a keep-alive connection idle for 5 s: reconnect once
            self.close()
            self.writer = None
            return await self._stream(body, session)

    async def _stream(self, body: bytes, session: str) -> tuple[float, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Session-ID: {session}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        t0 = time.perf_counter()
        self.writer.write(head + body)
        buf = b""
        first = 0.0
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            buf += data
            if not first and b"data: " in buf:
                first = time.perf_counter() - t0
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(buf[:300].decode(errors="replace"))
            if buf.endswith(b"0\r\n\r\n") and b"data: [DONE]" in buf:
                return first, time.perf_counter() - t0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _body(max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "any",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
    ).encode()


# -- processes ------------------------------------------------------------------------------------
class Mesh:
    """``autellix up --no-gateway`` and ``autellix gateway`` as separate processes."""

    def __init__(self, sim_time_scale: float) -> None:
        self.scale = sim_time_scale
        self.procs: list[subprocess.Popen[str]] = []
        self.nats_url = ""
        self.http_port = 0

    def __enter__(self) -> Mesh:
        env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
        cli = [sys.executable, "-m", "autellix.services.cli"]
        flags = ["--port", "0", "--policy", "fcfs", "--no-gateway", "--no-metrics", "--max-batch", "256", "--no-auth"]
        up = subprocess.Popen(
            [*cli, "up", "--backend", "sim", "--sim-time-scale", str(self.scale), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.procs.append(up)
        assert up.stdout is not None
        line = up.stdout.readline()
        match = re.search(r"NATS (nats://\S+)", line)
        if match is None:
            raise RuntimeError(f"autellix up did not start: {line!r}")
        self.nats_url = match.group(1)
        self.http_port = _free_port()
        self.procs.append(
            subprocess.Popen(
                [*cli, "gateway", "--nats", self.nats_url, "--host", "127.0.0.1", "--port", str(self.http_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                text=True,
            )
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _ready(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await reader.read()
            writer.close()
            if reply.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway never became ready")
        await asyncio.sleep(0.1)


class Probe:
    """Alternating TTFT probes through the gateway and over NATS."""

    def __init__(self, nats_url: str, http_port: int) -> None:
        self.nats_url = nats_url
        self.http = Http(http_port)
        self.client: Any = None

    async def __aenter__(self) -> Probe:
        from autellix.services.client import Client

        self.client = await Client.connect(self.nats_url, timeout_s=60)
        self.program = self.client.program("probe-direct")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.http.close()
        await self.client.close()

    async def gateway(self) -> float:
        ttft, _ = await self.http.stream(_body(4), "probe-gateway")
        return ttft

    async def nats(self) -> float:
        stream = self.program.stream([{"role": "user", "content": PROMPT}], max_tokens=4)
        t0 = time.perf_counter()
        ttft = 0.0
        async for _ in stream:
            if not ttft:
                ttft = time.perf_counter() - t0
        return ttft

    async def run(self, n: int, gap_s: float = 0.0) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"gateway": [], "nats": []}
        for i in range(n):
            order = [("gateway", self.gateway), ("nats", self.nats)]
            if i % 2:
                order.reverse()
            for name, probe in order:
                out[name].append(await probe())
                if gap_s:
                    await asyncio.sleep(gap_s)
        return out


def _added(samples: dict[str, list[float]]) -> dict[str, Any]:
    g, n = _summary(samples["gateway"]), _summary(samples["nats"])
    return {
        "gateway_ttft_s": g,
        "nats_ttft_s": n,
        "added_p50_s": g["p50"] - n["p50"],
        "added_p99_s": g["p99"] - n["p99"],
    }


async def bench_ttft(n: int) -> dict[str, Any]:
    with Mesh(sim_time_scale=1.0) as mesh:
        await _ready(mesh.http_port)
        async with Probe(mesh.nats_url, mesh.http_port) as probe:
            await probe.run(20)  # warm-up: connections, caches, JIT-free but allocator-warm
            return _added(await probe.run(n))


# -- load -----------------------------------------------------------------------------------------
async def loadgen(port: int, rate: float, duration_s: float, seed: int) -> dict[str, Any]:
    """Poisson streaming calls at ``rate``/s for ``duration_s``; one keep-alive connection per call
    in flight (reused). Runs in its own process, so it does not slow the probes' event loop."""
    rng = random.Random(seed)
    idle: list[Http] = []
    done: list[float] = []
    failed = 0
    offered = 0
    inflight: set[asyncio.Task[None]] = set()
    body = _body(8)

    async def one(i: int) -> None:
        nonlocal failed
        conn = idle.pop() if idle else Http(port)
        try:
            _, total = await conn.stream(body, f"load-{i % 64}")
            done.append(total)
            idle.append(conn)
        except (OSError, RuntimeError, ConnectionError):
            failed += 1
            conn.close()

    start = time.perf_counter()
    next_at = start
    while (now := time.perf_counter()) - start < duration_s:
        if now < next_at:
            await asyncio.sleep(next_at - now)
            continue
        task = asyncio.create_task(one(offered))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        offered += 1
        next_at += rng.expovariate(rate)
    left = len(inflight)
    completed = len(done)
    if inflight:
        await asyncio.wait(list(inflight), timeout=10)
    for conn in idle:
        conn.close()
    return {
        "offered": offered,
        "completed_in_window": completed,
        "inflight_at_end": left,
        "failed": failed,
        "e2e_s": _summary(done),
    }


async def bench_load(rates: list[float], duration_s: float, probes: int) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    with Mesh(sim_time_scale=0.0) as mesh:
        await _ready(mesh.http_port)
        async with Probe(mesh.nats_url, mesh.http_port) as probe:
            await probe.run(20)
            for rate in rates:
                gen = None
                if rate > 0:
                    gen = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "autellix.bench.gateway_costs", "--loadgen",
                        f"{mesh.http_port},{rate},{duration_s}", stdout=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    await asyncio.sleep(1.0)  # let the load reach its steady state
                samples = await probe.run(probes, gap_s=0.01)
                level: dict[str, Any] = {"rate": rate, **_added(samples)}
                if gen is not None:
                    out, _ = await gen.communicate()
                    stats = json.loads(out.decode().strip().splitlines()[-1])
                    level["load"] = stats
                    level["kept_up"] = (
                        stats["failed"] == 0
                        and stats["completed_in_window"] >= 0.95 * stats["offered"] - stats["inflight_at_end"]
                        and stats["inflight_at_end"] <= max(8, rate * 0.5)
                    )
                else:
                    level["kept_up"] = True
                levels.append(level)
                print(
                    f"  rate {rate:6.0f}/s: added p50 {level['added_p50_s'] * 1000:6.2f} ms, "
                    f"kept up {level['kept_up']}",
                    file=sys.stderr,
                    flush=True,
                )
    base = levels[0]["added_p50_s"]
    carried = [lv["rate"] for lv in levels if lv["kept_up"] and lv["added_p50_s"] <= 2 * max(base, 1e-4)]
    return {"levels": levels, "unloaded_added_p50_s": base, "capacity_rate": max(carried) if carried else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default="ttft,load")
    parser.add_argument("--ttft-calls", type=int, default=300)
    parser.add_argument("--rates", default="0,25,50,100,200,400")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per rate")
    parser.add_argument("--probes", type=int, default=40, help="probe pairs per rate")
    parser.add_argument("--json", default=None)
    parser.add_argument("--loadgen", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        port, rate, duration = args.loadgen.split(",")
        stats = uvloop.run(loadgen(int(port), float(rate), float(duration), seed=int(float(rate))))
        print(json.dumps(stats), flush=True)
        return 0
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m autellix.bench.gateway_costs " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    only = set(args.only.split(","))
    if "ttft" in only:
        report["ttft"] = uvloop.run(bench_ttft(args.ttft_calls))
        t = report["ttft"]
        gw, direct = t["gateway_ttft_s"]["p50"] * 1000, t["nats_ttft_s"]["p50"] * 1000
        print(
            f"ttft: gateway p50 {gw:.2f} ms, nats p50 {direct:.2f} ms, "
            f"added p50 {t['added_p50_s'] * 1000:.2f} ms, p99 {t['added_p99_s'] * 1000:.2f} ms",
            file=sys.stderr,
        )
    if "load" in only:
        rates = [float(r) for r in args.rates.split(",")]
        report["load"] = uvloop.run(bench_load(rates, args.duration, args.probes))
    text = json.dumps(report, indent=2)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
