"""Control-plane capacity: what one tracker and one scheduler process hold, over a real nats-server.

    python -m autellix.bench.control_plane --service tracker --programs 10000 --rates 2000,5000,10000,15000
    python -m autellix.bench.control_plane --service scheduler --engines 64 --rates 5000,10000,20000

Four kinds of process, as deployed: a nats-server (JetStream on), the service under test (``autellix
tracker`` or ``autellix scheduler``, pinned to one core with ``taskset`` where it exists), a load
generator (this module with ``--role load``, its own process) and this process, which steers the load
over a control subject, counts what the service produced and reads the service's CPU time from /proc.

- **tracker**: the load sends, per call, a call-dispatched event (as a scheduler does) and a
  call-completed event with its ``Nats-Msg-Id`` header (as an engine does), over ``--programs`` live
  programs in turn, plus heartbeats of ``--engines`` engines; this process counts the tracker's
  program-service updates (one per completed call). ``--persist`` keeps the table in JetStream as
  deployed by default (completions through the durable consumer, records in the key-value bucket);
  without it the table is in memory and completions arrive by a plain subscription.
- **scheduler**: the load sends submissions (256-word prompts, ``ack`` on, as the Python client sends
  them) for ``--programs`` programs whose figures it published first, plus heartbeats of ``--engines``
  engines; this process counts the stamped calls on the engines' subjects and, as the engines and the
  tracker would, answers each with a call-completed event and a program-service update (the
  scheduler's whole per-call input, not only the submission).

Each rate runs ``--step-s`` seconds. A rate counts as held only when the service kept up: every call
produced its output, and at the end of the step the output lagged the input by at most
``--max-lag-s`` of load (no backlog growth). The report gives, per rate, the achieved rate, the lag,
and the service's CPU seconds per call and its utilisation (CPU seconds per wall second: near 1.0
means the core is saturated). ``--baseline DIR`` runs the service from another copy of the package
(``git archive`` of an earlier commit into DIR) at every rate too, interleaved, for a before/after in
one run; ``--profile FILE`` records the service with py-spy (if installed) for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from autellix.proto import (
    CallCompleted,
    CallDispatched,
    CallRequest,
    EngineHeartbeat,
    ProgramService,
    Subjects,
    encode,
)
from autellix.proto.messages import completed_message_id

PROMPT = " ".join(["www"] * 256)
#: the load generator's control subject (under the run's root)
CONTROL = "bench.control"
PROGRESS = "bench.progress"


def _log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- the load generator (its own process) -------------------------------------------------------
class _Plan(msgspec.Struct):
    url: str
    root: str
    service: str
    programs: int
    engines: int
    heartbeat_s: float
    #: events under the program's slot (False: the unslotted subjects, for a baseline older than slots)
    slotted: bool = True


class _Step(msgspec.Struct):
    kind: str  # "prime" | "rate" | "stop"
    rate: float = 0.0
    seconds: float = 0.0
    tag: str = ""


def _heartbeat(engine_id: str, interval_s: float) -> EngineHeartbeat:
    return EngineHeartbeat(
        engine_id=engine_id,
        backend="sim",
        model="sim",
        state="up",
        kv_tokens_free=400_000,
        kv_tokens_capacity=400_000,
        max_context=131_072,
        interval_s=interval_s,
        sent_at=time.time(),
    )


class _Load:
    """Publishes one service's input at a steady rate, in 5 ms ticks."""

    def __init__(self, plan: _Plan) -> None:
        from nats.aio.client import Client as NATS

        self.plan = plan
        self.subjects = Subjects(plan.root)
        self.nc = NATS()
        self.sent = 0
        self.pids = [f"prog-{i}" for i in range(plan.programs)]
        self.engine_ids = [f"eng-{i}" for i in range(plan.engines)]

    async def run(self) -> None:
        await self.nc.connect(self.plan.url, pending_size=64 * 1024 * 1024, max_reconnect_attempts=-1)
        beats = asyncio.create_task(self._beat())
        done = asyncio.Event()

        async def on_control(msg: Any) -> None:
            step = msgspec.json.decode(msg.data, type=_Step)
            if step.kind == "stop":
                done.set()
                await msg.respond(b"{}")
                return
            t0 = time.time()
            sent0 = self.sent
            if step.kind == "prime":
                await self._prime()
            else:
                await self._rate(step.rate, step.seconds, step.tag)
            await self.nc.flush()
            reply = {"sent": self.sent - sent0, "t0": t0, "t1": time.time()}
            await msg.respond(json.dumps(reply).encode())

        await self.nc.subscribe(f"{self.plan.root}.{CONTROL}", cb=on_control)
        await self.nc.flush()
        await done.wait()
        beats.cancel()
        await self.nc.drain()

    async def _beat(self) -> None:
        while True:
            for eid in self.engine_ids:
                await self.nc.publish(self.subjects.engine_heartbeat, encode(_heartbeat(eid, self.plan.heartbeat_s)))
            await asyncio.sleep(self.plan.heartbeat_s)

    async def _prime(self) -> None:
        """Make every program live in the service: a completed call each (tracker), or the tracker's
        figures for each (scheduler)."""
        for i, pid in enumerate(self.pids):
            if self.plan.service == "tracker":
                await self._call(pid, f"prime-{i}", self.engine_ids[i % len(self.engine_ids)])
            else:
                update = ProgramService(
                    program_id=pid, service_s=0.01 * (i % 500), critical_path_s=0.005 * (i % 500), calls_completed=3
                )
                await self.nc.publish(self.subjects.program_service, encode(update))
            if i % 2000 == 1999:
                await self.nc.flush()

    async def _call(self, pid: str, call_id: str, engine_id: str) -> None:
        now = time.time()
        s = self.subjects
        if self.plan.service == "tracker":
            dispatched = CallDispatched(
                call_id=call_id, program_id=pid, engine_id=engine_id, priority=0.0, dispatched_at=now
            )
            slotted = self.plan.slotted
            await self.nc.publish(s.call_dispatched_for(pid) if slotted else s.call_dispatched, encode(dispatched))
            completed = CallCompleted(
                call_id=call_id,
                program_id=pid,
                engine_id=engine_id,
                service_s=0.05,
                queue_wait_s=0.001,
                prompt_tokens=300,
                output_tokens=60,
                finish_reason="stop",
                completed_at=now,
            )
            await self.nc.publish(
                s.call_completed_for(pid) if slotted else s.call_completed,
                encode(completed),
                headers={"Nats-Msg-Id": completed_message_id(completed)},
            )
        else:
            request = CallRequest(
                program_id=pid,
                call_id=call_id,
                prompt=PROMPT,
                max_tokens=64,
                reply_to="_INBOX.bench.void",
                ack=True,
                submitted_at=now,
            )
            await self.nc.publish(s.call_submit, encode(request))
        self.sent += 1

    async def _rate(self, rate: float, seconds: float, tag: str) -> None:
        start = time.perf_counter()
        n = 0
        total = int(rate * seconds)
        next_progress = start
        while n < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * rate) + 1)
            while n < due:
                i = n
                await self._call(self.pids[i % len(self.pids)], f"{tag}-{i}", self.engine_ids[i % len(self.engine_ids)])
                n += 1
            if now >= next_progress:
                await self.nc.publish(f"{self.plan.root}.{PROGRESS}", json.dumps({"sent": n}).encode())
                next_progress = now + 0.25
            await asyncio.sleep(0.005)


def load_main(plan_json: str) -> None:
    import uvloop

    uvloop.run(_Load(msgspec.json.decode(plan_json, type=_Plan)).run())


# -- the service under test ----------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Service:
    kind: str
    url: str
    root: str
    persist: bool
    pythonpath: str = ""
    cpu: int | None = None
    profile: str = ""
    shards: int = 1
    shard_index: int = 0
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            AUTELLIX_NATS=self.url,
            AUTELLIX_ROOT=self.root,
            AUTELLIX_LOG_LEVEL="warning",
            AUTELLIX_TRACKER_PERSIST="1" if self.persist else "0",
            AUTELLIX_TRACKER_SHARDS=str(self.shards),
            AUTELLIX_TRACKER_SHARD=str(self.shard_index),
        )
        env.update(self.env)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        cmd = [sys.executable, "-c", "import sys; from autellix.services.cli import main; sys.exit(main())", self.kind]
        if self.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.profile and Path(spy).exists():
            cmd = [
                spy,
                "record",
                "-r",
                "200",
                "-f",
                "raw" if self.profile.endswith(".txt") else "flamegraph",
                "-o",
                self.profile,
                "--",
                *cmd,
            ]
        # from a neutral directory: ``python -c`` puts the working directory first on the path, so a
        # baseline's PYTHONPATH would lose to the checkout the bench runs from
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, cwd=self.pythonpath or "/")

    @property
    def pid(self) -> int:
        """The Python process (under py-spy or taskset, its child or itself)."""
        assert self.proc is not None
        if not self.profile:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        kids = children.read_text().split() if children.exists() else []
        return int(kids[0]) if kids else self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.profile:
            os.kill(self.pid, 15)
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- this process: steer, count, report ------------------------------------------------------------
class _Counter:
    """Counts the service's output; for the scheduler, answers each stamped call as engine and tracker."""

    class _Stamped(msgspec.Struct):
        call_id: str
        program_id: str

    def __init__(self, nc: Any, subjects: Subjects, service: str, feedback: bool, slotted: bool = True) -> None:
        self.nc = nc
        self.slotted = slotted
        self.subjects = subjects
        self.service = service
        self.feedback = feedback
        self.got = 0
        self.load_sent = 0
        self._decoder = msgspec.json.Decoder(self._Stamped)

    async def start(self) -> None:
        s = self.subjects
        if self.service == "tracker":
            await self.nc.subscribe(
                s.program_service, cb=self._on_output, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        else:
            await self.nc.subscribe(
                f"{s.root}.engine.*.calls", cb=self._on_stamped, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        await self.nc.subscribe(f"{s.root}.{PROGRESS}", cb=self._on_progress)
        await self.nc.flush()

    async def _on_output(self, _msg: Any) -> None:
        self.got += 1

    async def _on_progress(self, msg: Any) -> None:
        self.load_sent = json.loads(msg.data)["sent"]

    async def _on_stamped(self, msg: Any) -> None:
        self.got += 1
        if not self.feedback:
            return
        call = self._decoder.decode(msg.data)
        engine_id = msg.subject.split(".")[-2]
        completed = CallCompleted(
            call_id=call.call_id,
            program_id=call.program_id,
            engine_id=engine_id,
            service_s=0.05,
            queue_wait_s=0.001,
            prompt_tokens=300,
            output_tokens=60,
            finish_reason="stop",
            completed_at=time.time(),
        )
        s = self.subjects
        await self.nc.publish(
            s.call_completed_for(call.program_id) if self.slotted else s.call_completed, encode(completed)
        )
        update = ProgramService(program_id=call.program_id, service_s=0.05, calls_completed=1, call_id=call.call_id)
        await self.nc.publish(self.subjects.program_service, encode(update))


async def _wait_ready(nc: Any, subjects: Subjects, service: str, counter: _Counter, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service == "tracker":
            try:
                await nc.request(subjects.tracker_table, b"", timeout=1.0)
                return
            except Exception:
                await asyncio.sleep(0.2)
        else:
            before = counter.got
            probe = CallRequest(program_id="probe", prompt="hi", max_tokens=1, reply_to="_INBOX.bench.void")
            await nc.publish(subjects.call_submit, encode(probe))
            await nc.flush()
            await asyncio.sleep(0.5)
            if counter.got > before:
                return
    raise TimeoutError(f"the {service} did not become ready within {timeout_s:g} s")


def _spawn_load(plan: _Plan) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "autellix.bench.control_plane", "--role", "load", "--plan"]
    return subprocess.Popen([*cmd, msgspec.json.encode(plan).decode()], stdin=subprocess.DEVNULL)


async def _run_one(
    args: argparse.Namespace, url: str, label: str, pythonpath: str, rates: list[float], shards: int = 1
) -> dict[str, Any]:
    """Start a service and a load generator on a fresh root; run every rate; return the results."""
    from nats.aio.client import Client as NATS

    root = f"cp{uuid.uuid4().hex[:8]}"
    subjects = Subjects(root)
    profile = f"{args.profile}.{label}.{'txt' if args.profile_raw else 'svg'}" if args.profile else ""
    shards = shards if args.service == "tracker" else 1
    # without completed events nothing leaves the scheduler's per-tenant bounds: they would refuse all
    # but the first 4,096 calls
    unbounded = {"AUTELLIX_MAX_CALLS_PER_TENANT": "0", "AUTELLIX_MAX_TOKENS_PER_TENANT": "0"}
    env = unbounded if args.service == "scheduler" and args.no_feedback else {}
    services = [
        _Service(
            args.service,
            url,
            root,
            args.persist,
            pythonpath,
            cpu=args.cpu,
            profile=profile if i == 0 else "",
            shards=shards,
            shard_index=i,
            env=env,
        )
        for i in range(shards)
    ]
    plan = _Plan(
        url=url,
        root=root,
        service=args.service,
        programs=args.programs,
        engines=args.engines,
        heartbeat_s=args.heartbeat_s,
        slotted=not pythonpath,
    )
    load = _spawn_load(plan)
    nc = NATS()
    await nc.connect(url, pending_size=64 * 1024 * 1024)
    feedback = args.service == "scheduler" and not args.no_feedback
    counter = _Counter(nc, subjects, args.service, feedback=feedback, slotted=not pythonpath)
    await counter.start()
    for service in services:
        service.start()
    out: dict[str, Any] = {"label": label, "shards": shards, "steps": []}
    try:
        await _wait_ready(nc, subjects, args.service, counter)
        if shards > 1:
            await asyncio.sleep(2.0)  # the other shards (the priming below waits for all of them)
        control = f"{root}.{CONTROL}"
        for _ in range(100):  # the load process subscribes a moment after it starts
            try:
                await nc.request(control, msgspec.json.encode(_Step(kind="rate", rate=1, seconds=0.001)), timeout=1)
                break
            except Exception:
                await asyncio.sleep(0.2)
        await asyncio.sleep(max(1.0, 2 * args.heartbeat_s))  # every engine heartbeated
        # prime the live programs, and wait until the service has taken them all in
        t0 = time.monotonic()
        got0 = counter.got
        await nc.request(control, msgspec.json.encode(_Step(kind="prime")), timeout=600)
        if args.service == "tracker":
            while counter.got - got0 < args.programs and time.monotonic() - t0 < 300:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(1.0)
        _log(f"[{label}] primed {args.programs} programs in {time.monotonic() - t0:.1f} s")
        for rate in rates:
            step = await _step(nc, control, counter, services, rate, args, label, load.pid)
            out["steps"].append(step)
            if not step["kept_up"] and args.stop_at_first_miss:
                break
            await asyncio.sleep(args.rest_s)
    finally:
        try:
            await nc.request(f"{root}.{CONTROL}", msgspec.json.encode(_Step(kind="stop")), timeout=5)
        except Exception:
            load.kill()
        load.wait(timeout=10)
        for service in services:
            service.stop()
        await nc.close()
    return out


def _others(load_pid: int) -> dict[str, int]:
    """The other processes whose CPU a step reports: nats-server (when started here), the load, this."""
    out = {"load": load_pid, "bench": os.getpid()}
    for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
        if "nats-server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
            out["nats"] = int(child)
    return out


async def _step(
    nc: Any,
    control: str,
    counter: _Counter,
    services: list[_Service],
    rate: float,
    args: argparse.Namespace,
    label: str,
    load_pid: int,
) -> dict[str, Any]:
    got0 = counter.got
    others = _others(load_pid)
    others0 = {k: _cpu_seconds(p) for k, p in others.items()}
    cpu0 = [_cpu_seconds(service.pid) for service in services]
    w0 = time.monotonic()
    counter.load_sent = 0
    tag = uuid.uuid4().hex[:6]
    request = nc.request(
        control,
        msgspec.json.encode(_Step(kind="rate", rate=rate, seconds=args.step_s, tag=tag)),
        timeout=args.step_s * 4 + 60,
    )
    task = asyncio.ensure_future(request)
    lags = []
    while not task.done():
        await asyncio.sleep(0.5)
        lags.append(counter.load_sent - (counter.got - got0))
    reply = json.loads(task.result().data)
    sent = reply["sent"]
    send_wall = reply["t1"] - reply["t0"]
    end_lag = sent - (counter.got - got0)
    send_end = time.monotonic()
    # what is still owed arrives now if the service kept up; a backlog drains for a while
    drain_deadline = time.monotonic() + args.drain_s
    while counter.got - got0 < sent and time.monotonic() < drain_deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    produced = counter.got - got0
    per_service = [_cpu_seconds(service.pid) - c0 for service, c0 in zip(services, cpu0, strict=True)]
    cpu_s = sum(per_service)
    w1 = time.monotonic()
    others_util = {k: round((_cpu_seconds(p) - others0[k]) / (w1 - w0), 2) for k, p in others.items()}
    offered = sent / send_wall if send_wall > 0 else 0.0
    kept = produced >= sent and end_lag <= max(50, args.max_lag_s * rate) and offered >= 0.95 * rate
    step = {
        "rate": rate,
        "sent": sent,
        "offered_per_s": round(offered, 1),
        "produced": produced,
        "end_lag_calls": end_lag,
        "end_lag_s": round(end_lag / rate, 3),
        "max_lag_calls": max(lags or [0]),
        "drain_s": round(w1 - send_end, 2),
        "kept_up": kept,
        "achieved_per_s": round(offered, 1) if kept else None,
        "cpu_s": round(cpu_s, 3),
        "cpu_ms_per_call": round(1000 * cpu_s / max(1, produced), 4),
        "calls_per_cpu_s": round(produced / cpu_s, 1) if cpu_s > 0 else None,
        "utilisation": round(cpu_s / (w1 - w0), 3),
        "utilisation_per_process": [round(c / (w1 - w0), 3) for c in per_service],
        "others_utilisation": others_util,
        "load_avg": os.getloadavg()[0],
    }
    _log(
        f"[{label}] rate {rate:>7.0f}/s: offered {offered:>8.0f}/s, produced {produced}/{sent}, "
        f"lag at end {end_lag} ({step['end_lag_s']} s), {step['calls_per_cpu_s']} calls/CPU-s, "
        f"CPU {step['cpu_ms_per_call']} ms/call, "
        f"utilisation {step['utilisation']:.2f} (others {others_util}) -> {'kept up' if kept else 'DID NOT keep up'}"
    )
    return step


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    from autellix.services.embedded_nats import EmbeddedNats

    rates = [float(r) for r in args.rates.split(",")]
    server = EmbeddedNats(port=0)
    url = args.nats or server.start()
    result: dict[str, Any] = {
        "service": args.service,
        "programs": args.programs,
        "engines": args.engines,
        "heartbeat_s": args.heartbeat_s,
        "shards": args.shards,
        "persist": args.persist,
        "feedback": not args.no_feedback,
        "step_s": args.step_s,
        "rates": rates,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_start": os.getloadavg(),
        "runs": [],
    }
    try:
        counts = [int(n) for n in args.shards.split(",")]
        variants = [("after" if len(counts) == 1 else f"{n} shard(s)", "", n) for n in counts]
        if args.baseline:
            variants = [("before", args.baseline, counts[0]), *variants]
        for _round in range(args.rounds):
            for label, path, n in variants:
                _log(
                    f"== {args.service} [{label}] round {_round + 1}: {args.programs} programs, {args.engines} engines"
                )
                result["runs"].append(await _run_one(args, url, label, path, rates, n))
    finally:
        if not args.nats:
            server.stop()
    result["load_avg_end"] = os.getloadavg()
    result["summary"] = _summarise(result["runs"], rates)
    return result


def _summarise(runs: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    """Per variant: each rate's rounds held, median CPU ms per call; the highest rate held in every
    round; calls per CPU second at the highest rate run (what one saturated core would do)."""
    out: dict[str, Any] = {}
    for label in sorted({r["label"] for r in runs}):
        mine = [r for r in runs if r["label"] == label]
        per_rate = {}
        for rate in rates:
            steps = [st for r in mine for st in r["steps"] if st["rate"] == rate]
            if not steps:
                continue
            cpu = statistics.median(st["cpu_ms_per_call"] for st in steps)
            per_rate[rate] = {"held": sum(st["kept_up"] for st in steps), "rounds": len(steps), "cpu_ms_per_call": cpu}
        held = [rate for rate, v in per_rate.items() if v["held"] == v["rounds"]]
        top = max(per_rate) if per_rate else 0
        out[label] = {
            "per_rate": per_rate,
            "highest_held_every_round": max(held) if held else None,
            "calls_per_cpu_s_at_top_rate": round(1000 / per_rate[top]["cpu_ms_per_call"]) if per_rate else None,
        }
        line = ", ".join(
            f"{r:.0f}/s {v['held']}/{v['rounds']} held {v['cpu_ms_per_call']:.4f} ms" for r, v in per_rate.items()
        )
        _log(f"{label}: {line}; highest held every round {out[label]['highest_held_every_round']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("bench", "load"), default="bench")
    p.add_argument("--plan", default="", help=argparse.SUPPRESS)
    p.add_argument("--service", choices=("tracker", "scheduler"), default="tracker")
    p.add_argument("--programs", type=int, default=10_000, help="live programs (default 10000)")
    p.add_argument("--engines", type=int, default=4, help="engines heartbeating (default 4)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="their heartbeat interval (default 1 s)")
    p.add_argument("--rates", default="2000,5000,10000,15000,20000", help="calls/s, comma-separated, in order")
    p.add_argument("--step-s", type=float, default=8.0, help="seconds at each rate (default 8)")
    p.add_argument("--rest-s", type=float, default=1.0, help="pause between rates")
    p.add_argument("--drain-s", type=float, default=3.0, help="wait this long for owed output after a step")
    p.add_argument("--max-lag-s", type=float, default=0.25, help="lag (in seconds of load) still counted as kept up")
    p.add_argument("--no-feedback", action="store_true", help="scheduler: no completed events or service updates")
    p.add_argument(
        "--shards", default="1", help="tracker: shard processes; a list (1,2) compares them, interleaved (default 1)"
    )
    p.add_argument("--persist", action="store_true", help="tracker: JetStream table and durable completions")
    p.add_argument("--cpu", type=int, default=-1, help="pin the service to this core with taskset (-1: no pin)")
    p.add_argument("--baseline", default="", help="also run the service from this package copy (before/after)")
    p.add_argument("--rounds", type=int, default=1, help="repeat (interleaving before/after) this many times")
    p.add_argument("--stop-at-first-miss", action="store_true", help="stop a run at the first rate not held")
    p.add_argument("--profile", default="", help="py-spy flame graph of the service to FILE.<label>.svg")
    p.add_argument("--profile-raw", action="store_true", help="collapsed stacks (FILE.<label>.txt), not an SVG")
    p.add_argument("--nats", default="", help="use this nats-server instead of starting one")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.role == "load":
        load_main(args.plan)
        return 0
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    if args.cpu is not None and args.cpu < 0:
        args.cpu = None
    import uvloop

    result = uvloop.run(orchestrate(args))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
