"""What the mesh costs, measured: scheduler stamping rate, TTFT added by the mesh, tokens/s one engine
streams through NATS, CPU per call in each service.

    python -m autellix.bench.mesh_costs --json bench/out/mesh_costs.json [--only stamps,ttft,stream,cpu]

- **stamps**: one scheduler's calls per second, and its CPU per call (user + system CPU of this
  process over the path, per call: steadier than a rate on a shared machine), three ways:
  (a) :class:`SchedulerCore` alone (parse, stamp, route) on pre-encoded submissions; (b) the
  service's own submit path (``SchedulerService._on_submit``: core, then the stamped call and the
  dispatched event published to a real nats-server; the engine sends ``accepted``); (c) end to end
  through NATS: a client connection publishes submissions, the scheduler service takes them from its
  subscription, and a third connection counts the stamped calls arriving on the engines' subjects
  (this process's CPU then includes those two connections). Four engines are made live with
  synthetic heartbeats; the tracker has published figures for every program; the per-tenant bounds
  are off (no call completes here, so the calls in flight grow to N).
- **ttft**: one call at a time (256-token prompt), the ``sim`` backend at ``time_scale`` 1 (a modelled
  prefill of ~17 ms): in process (the prompt's tokenisation and ``EngineCore.step``, the engine
  service's own loop minus NATS), then through the mesh (client -> scheduler -> engine -> client over a real
  nats-server, streamed) two ways: every service in this process on one event loop (as
  ``autellix bench`` runs them), and tracker, scheduler and engine as separate ``autellix``
  processes (as deployed). Added = mesh - in-process, at p50 and p99.
- **stream**: ``autellix up --backend sim --sim-time-scale 0`` as a separate process (one engine,
  steps cost no modelled time), this process streaming N concurrent calls of M tokens; tokens/s as
  received by the clients.
- **cpu**: ``autellix tracker``, ``autellix scheduler`` and ``autellix engine --backend sim
  --sim-time-scale 0`` as separate processes on one nats-server; CPU time (user + system) of each
  process, and of nats-server, over K streamed calls, divided by K.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, TokenEvent
from autellix.engine.sim_backend import SimBackend
from autellix.proto import CallRequest, EngineHeartbeat, ProgramService, Subjects, encode
from autellix.services.embedded_nats import EmbeddedNats
from autellix.services.local_mesh import spawn_service, stop_process
from autellix.services.nats_config import NatsConfig

PROMPT_WORDS = 256


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99), "mean": statistics.fmean(values)}


def _prompt() -> str:
    return " ".join(["www"] * PROMPT_WORDS)


# -- stamps -------------------------------------------------------------------------------------
@dataclass
class _Msg:
    data: bytes
    reply: str = ""
    subject: str = ""


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _heartbeat(engine_id: str) -> EngineHeartbeat:
    return EngineHeartbeat(
        engine_id=engine_id, backend="sim", model="sim", state="up", running=0, waiting=0, swapped=0,
        kv_tokens_used=0, kv_tokens_free=400_000, kv_tokens_queued=0, swap_pool_used_bytes=0,
        max_context=131_072, interval_s=3600.0, sent_at=time.time(),
    )


def _submissions(n: int, programs: int, reply: str) -> list[bytes]:
    text = _prompt()
    return [
        encode(
            CallRequest(
                program_id=f"p{i % programs}", call_id=f"c{i}", prompt=text, max_tokens=64, parents=[],
                reply_to=reply, ack=True,
            )
        )
        for i in range(n)
    ]


async def measure_stamps(url: str, n: int, policy: str) -> dict[str, Any]:
    from nats.aio.client import Client as NATS

    from autellix.services.scheduler.config import SchedulerConfig
    from autellix.services.scheduler.core import SchedulerCore
    from autellix.services.scheduler.service import SchedulerService

    programs = 500
    out: dict[str, Any] = {"calls": n, "policy": policy, "engines": 4, "programs": programs}

    def prime(core: SchedulerCore) -> None:
        now = time.time()
        for e in range(4):
            core.on_heartbeat(_heartbeat(f"e{e}"), now)
        for p in range(programs):
            core.on_program_service(
                ProgramService(
                    program_id=f"p{p}", program_service_s=p * 0.01, critical_path_s=p * 0.005, calls_completed=3
                )
            )

    def config(root: str) -> SchedulerConfig:  # no per-tenant bounds: nothing completes here
        return SchedulerConfig(
            nats=NatsConfig.at(url, root), policy=policy, max_calls_per_tenant=0, max_tokens_per_tenant=0
        )

    # (a) the core alone
    core = SchedulerCore(policy=policy)
    prime(core)
    data = _submissions(n, programs, "_INBOX.x")
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for d in data:
        req = core.parse(d, "")
        stamped = core.stamp(req, req.reply_to, time.time())
        engine = core.route(stamped, time.time())
        assert engine is not None
        core.on_routed(stamped, engine)
        encode(stamped)
    out["core_calls_per_s"] = n / (time.perf_counter() - t0)
    out["core_cpu_us_per_call"] = (_cpu_s() - cpu0) / n * 1e6

    # (b) the service's submit path, publishing to a real nats-server
    root = f"mc{uuid.uuid4().hex[:6]}"
    service = SchedulerService(config(root))
    await service.start()
    try:
        prime(service.core)
        submit = service.subjects.call_submit
        cpu0, t0 = _cpu_s(), time.perf_counter()
        for d in data:
            await service._on_submit(_Msg(d, "", submit))  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        assert service._nc is not None
        await service._nc.flush()
        out["service_path_calls_per_s"] = n / (time.perf_counter() - t0)
        out["service_path_cpu_us_per_call"] = (_cpu_s() - cpu0) / n * 1e6
        out["service_path_routed"] = sum(map(len, service.core.routed.values()))
    finally:
        await service.stop()

    # (c) end to end through NATS: submissions in on the subject, stamped calls out to the engines
    root = f"mc{uuid.uuid4().hex[:6]}"
    subjects = Subjects(root)
    service = SchedulerService(config(root))
    await service.start()
    pub, sink = NATS(), NATS()
    await pub.connect(url, pending_size=256 * 1024 * 1024)
    await sink.connect(url)
    try:
        prime(service.core)
        got = 0
        done = asyncio.Event()

        async def count(_msg: Any) -> None:
            nonlocal got
            got += 1
            if got >= n:
                done.set()

        await sink.subscribe(f"{root}.engine.*.calls", cb=count)
        await sink.flush()
        data = _submissions(n, programs, "_INBOX.void")
        cpu0, t0 = _cpu_s(), time.perf_counter()
        for i, d in enumerate(data):
            await pub.publish(subjects.call_submit, d)
            if i % 500 == 499:
                await asyncio.sleep(0)
        await pub.flush()
        await asyncio.wait_for(done.wait(), timeout=120)
        out["through_nats_calls_per_s"] = n / (time.perf_counter() - t0)
        out["through_nats_cpu_us_per_call"] = (_cpu_s() - cpu0) / n * 1e6
    finally:
        await pub.close()
        await sink.close()
        await service.stop()
    return out


# -- ttft ---------------------------------------------------------------------------------------
def ttft_in_process(n: int, time_scale: float) -> list[float]:
    backend = SimBackend(time_scale=time_scale)
    core = EngineCore(backend, CoreConfig(max_batch=256, max_batched_tokens=8192, kv_capacity_tokens=400_000))
    prompt = _prompt()
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        ids = backend.encode_prompt(prompt)  # as the engine service does on each call it accepts
        core.add(CoreCall(f"c{i}", f"p{i}", ids, 2, ignore_eos=True), time.time())
        first = None
        while not core.idle:
            outcome = core.step(time.time)
            assert outcome is not None
            for ev in outcome.events:
                if first is None and isinstance(ev, TokenEvent):
                    first = time.perf_counter() - t0
        assert first is not None
        out.append(first)
    return out


async def ttft_through_mesh(url: str, n: int, time_scale: float) -> list[float]:
    from autellix.bench.live import start_local_mesh
    from autellix.services.client import Client

    mesh = await start_local_mesh(url, "plas", 1, time_scale, pace=False)
    client = await Client.connect(url, root=mesh.root)
    out = []
    try:
        for _ in range(n):
            async with client.program() as p:  # a new program each time: no prefix-cache hits
                r = await p.call(prompt=_prompt(), max_tokens=2, ignore_eos=True, parents=[])
                out.append(r.ttft_s)
    finally:
        await client.close()
        await mesh.stop()
    return out


async def ttft_through_processes(url: str, n: int, time_scale: float, pythonpath: str = "") -> list[float]:
    """As :func:`ttft_through_mesh`, with tracker, scheduler and engine as separate processes (run
    from the package copy at ``pythonpath`` when given)."""
    from autellix.services.client import Client

    root = f"ttft{uuid.uuid4().hex[:6]}"
    procs = _process_mesh(url, root, time_scale, pythonpath)
    out = []
    try:
        client = await Client.connect(url, root=root, timeout_s=60)
        try:
            for i in range(n + 20):  # the first 20 warm up (imports, first heartbeat, lazy paths)
                async with client.program() as p:
                    r = await p.call(prompt=_prompt(), max_tokens=2, ignore_eos=True, parents=[])
                    if i >= 20:
                        out.append(r.ttft_s)
        finally:
            await client.close()
    finally:
        for proc in procs.values():
            stop_process(proc)
    return out


async def measure_ttft(url: str, n: int, rounds: int, baseline: str) -> dict[str, Any]:
    """``rounds`` rounds, each: in process, the one-process mesh, the process mesh (and the process
    mesh from ``baseline``, a package copy, when given), ``n`` calls each; the figures pool the rounds."""
    runs: dict[str, list[list[float]]] = {}

    def take(kind: str, values: list[float]) -> None:
        runs.setdefault(kind, []).append(values)
        p50 = _pct(values, 50) * 1000
        print(time.strftime("%H:%M:%S"), kind, f"p50 {p50:.2f} ms", f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    for _ in range(rounds):
        take("in_process", ttft_in_process(n, 1.0))
        take("mesh_one_process", await ttft_through_mesh(url, n, 1.0))
        if baseline:
            take("mesh_processes_baseline", await ttft_through_processes(url, n, 1.0, baseline))
        take("mesh_processes", await ttft_through_processes(url, n, 1.0))
    out: dict[str, Any] = {"time_scale": 1.0, "prompt_tokens": PROMPT_WORDS, "rounds": rounds, "baseline": baseline}
    local = _summary([v for r in runs["in_process"] for v in r])
    out["in_process_s"] = local
    for kind, per_round in runs.items():
        if kind == "in_process":
            continue
        pooled = _summary([v for r in per_round for v in r])
        name = kind.removeprefix("mesh_")
        out[f"mesh_{name}_s"] = pooled
        out[f"added_{name}_p50_ms"] = (pooled["p50"] - local["p50"]) * 1000
        out[f"added_{name}_p99_ms"] = (pooled["p99"] - local["p99"]) * 1000
        # each round against its own in-process run: the spread says how much the machine moved
        out[f"added_{name}_p50_ms_by_round"] = [
            (_pct(r, 50) - _pct(base, 50)) * 1000 for r, base in zip(per_round, runs["in_process"], strict=True)
        ]
    return out


# -- subprocess helpers ---------------------------------------------------------------------------
def _autellix(*args: str) -> subprocess.Popen[str]:
    full_env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
    return subprocess.Popen(
        [sys.executable, "-m", "autellix.services", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=full_env,
    )


def _process_mesh(url: str, root: str, time_scale: float, pythonpath: str = "") -> dict[str, subprocess.Popen[str]]:
    """Tracker, scheduler and one ``sim`` engine as separate ``autellix`` processes on ``url``/``root``
    (``pythonpath``: from that package copy instead of the installed one)."""
    nats = NatsConfig.at(url, root)
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    return {
        "tracker": spawn_service("tracker", nats, env=env),
        "scheduler": spawn_service("scheduler", nats, env=env),
        "engine": spawn_service("engine", nats, "--backend", "sim", "--sim-time-scale", f"{time_scale:g}",
                                "--max-batch", "256", "--kv-tokens", "400000", env=env),
    }


async def _drive(url: str, root: str, calls: int, concurrency: int, max_tokens: int) -> tuple[int, float]:
    """``calls`` streamed calls, ``concurrency`` at a time; returns (tokens received, wall seconds)."""
    from autellix.services.client import Client

    client = await Client.connect(url, root=root, timeout_s=120)
    tokens = 0
    queue = iter(range(calls))

    async def worker() -> None:
        nonlocal tokens
        async with client.program() as p:
            for _ in queue:
                async with p.stream(prompt=_prompt(), max_tokens=max_tokens, ignore_eos=True, parents=[]) as s:
                    async for _text in s:
                        pass
                    tokens += len(s.token_ids)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall = time.perf_counter() - t0
        await client.close()
    return tokens, wall


async def measure_stream(concurrency: int, max_tokens: int, calls: int) -> dict[str, Any]:
    proc = _autellix("up", "--backend", "sim", "--sim-time-scale", "0", "--port", "0", "--engines", "1",
                     "--max-batch", "256", "--kv-tokens", "400000")
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if "NATS " not in line:
            raise RuntimeError(f"autellix up did not start: {line!r}")
        url = line.split("NATS ", 1)[1].split()[0]
        tokens, wall = await _drive(url, "autellix", calls, concurrency, max_tokens)
    finally:
        stop_process(proc)
    return {"concurrency": concurrency, "max_tokens": max_tokens, "calls": calls, "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall}


async def measure_cpu(calls: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    import psutil

    with EmbeddedNats(port=0) as broker:
        root = f"cpu{uuid.uuid4().hex[:6]}"
        procs = _process_mesh(broker.url, root, 0.0)
        try:
            await asyncio.sleep(3.0)  # imports and subscriptions
            await _drive(broker.url, root, 20, 4, max_tokens)  # warm up (first heartbeat, lazy paths)
            handles = {k: psutil.Process(p.pid) for k, p in procs.items()}
            assert broker._proc is not None
            handles["nats-server"] = psutil.Process(broker._proc.pid)
            me = psutil.Process()

            def cpu(h: Any) -> float:
                t = h.cpu_times()
                return float(t.user + t.system)

            before = {k: cpu(h) for k, h in handles.items()}
            me_before = cpu(me)
            tokens, wall = await _drive(broker.url, root, calls, concurrency, max_tokens)
            after = {k: cpu(h) for k, h in handles.items()}
            me_after = cpu(me)
        finally:
            for p in procs.values():
                stop_process(p)
    per_call = {k: (after[k] - before[k]) / calls * 1000 for k in after}
    per_call["client (bench process)"] = (me_after - me_before) / calls * 1000
    return {"calls": calls, "concurrency": concurrency, "max_tokens": max_tokens, "tokens": tokens, "wall_s": wall,
            "cpu_ms_per_call": per_call}


# -- main -------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(","))
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, no GPU",
        "date": args.date or time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m autellix.bench.mesh_costs", *sys.argv[1:]]),
    }
    if "stamps" in only or "ttft" in only:
        with EmbeddedNats(port=0) as broker:
            if "stamps" in only:
                out["stamps"] = {
                    pol: await measure_stamps(broker.url, args.stamp_calls, pol) for pol in ("plas", "atlas")
                }
                print(json.dumps(out["stamps"], indent=1), file=sys.stderr)
            if "ttft" in only:
                out["ttft"] = await measure_ttft(broker.url, args.ttft_calls, args.rounds, args.baseline)
                print(json.dumps(out["ttft"], indent=1), file=sys.stderr)
    if "stream" in only:
        out["stream"] = [await measure_stream(c, args.stream_tokens, c * 2) for c in (16, 64)]
        print(json.dumps(out["stream"], indent=1), file=sys.stderr)
    if "cpu" in only:
        out["cpu"] = await measure_cpu(args.cpu_calls, 16, 32)
        print(json.dumps(out["cpu"], indent=1), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--only", default="stamps,ttft,stream,cpu")
    p.add_argument("--stamp-calls", type=int, default=20_000)
    p.add_argument("--ttft-calls", type=int, default=300)
    p.add_argument("--stream-tokens", type=int, default=1000)
    p.add_argument("--cpu-calls", type=int, default=1000)
    p.add_argument("--date", default=None)
    p.add_argument("--rounds", type=int, default=1, help="ttft: rounds of every variant in turn, pooled")
    p.add_argument(
        "--baseline", default="",
        help="ttft: also run the process mesh from this package copy (`git archive` of an earlier commit), interleaved",
    )
    args = p.parse_args(argv)
    args.json = os.path.abspath(args.json)
    if args.baseline:
        # services start with ``python -m``, which puts the working directory first on the path: from
        # a checkout, its package would win over the baseline's PYTHONPATH (and the installed one)
        args.baseline = os.path.abspath(args.baseline)
        os.chdir("/")
    from autellix.services.logs import configure_logging

    configure_logging("warning", json=True)
    import uvloop

    out = uvloop.run(main_async(args))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
