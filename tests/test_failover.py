"""Scale-out and failures: engines killed or drained mid-call, a scheduler killed, a tracker
restarted, ATLAS stamps across the mesh. Engines and schedulers run as real processes where a
SIGKILL is the point."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors
import pytest
from meshkit import start_mesh, stop_mesh, wait_for_engines

from autellix.engine.factory import BackendSpec
from autellix.proto import ProgramTable
from autellix.services.client import CallStream, Client
from autellix.services.engine.config import EngineConfig
from autellix.services.engine.service import EngineService
from autellix.services.nats_config import NatsConfig
from autellix.services.tracker.config import TrackerConfig
from autellix.services.tracker.service import TrackerService

CLI = [sys.executable, "-m", "autellix.services.cli"]
GENERATED = 50_000  # the sim backend's generated token ids encode their position: GENERATED + pos % 1000


def expected_tokens(prompt_tokens: int, n: int) -> list[int]:
    return [GENERATED + (prompt_tokens + i) % 1000 for i in range(n)]


@contextmanager
def processes(*commands: list[str], env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    full_env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning", **(env or {}))
    procs = [subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL) for cmd in commands]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def engine_cmd(url: str, root: str, engine_id: str, time_scale: float) -> list[str]:
    return [
        *CLI, "engine", "--nats", url, "--root", root, "--backend", "sim",
        "--engine-id", engine_id, "--sim-time-scale", str(time_scale),
    ]  # fmt: skip


async def collect(stream: CallStream) -> tuple[CallStream, str]:
    text = "".join([piece async for piece in stream])
    return stream, text


async def test_sigkilled_engine_calls_resume_elsewhere(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=0, heartbeat_s=0.2)
    env = {"AUTELLIX_HEARTBEAT_S": "0.2"}
    cmds = [engine_cmd(nats_url, root, f"k{i}", time_scale=4.0) for i in range(3)]
    try:
        with processes(*cmds, env=env) as procs:
            await wait_for_engines(mesh.scheduler, 3, timeout_s=30)
            client = await Client.connect(nats_url, root=root, timeout_s=60, ack_timeout_s=3)
            try:
                streams = [
                    client.program(f"prog{i}").stream(f"call number {i} " + "word " * (i % 5), max_tokens=60)
                    for i in range(24)
                ]
                tasks = [asyncio.create_task(collect(s)) for s in streams]
                await asyncio.sleep(0.8)  # every engine is mid-way through calls
                procs[0].send_signal(signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
            finally:
                await client.close()
        resumed = 0
        for stream, text in results:
            r = stream.result
            assert r is not None and r.output_tokens == 60 and r.finish_reason == "length"
            # one continuous stream: every position once, none missing, none repeated
            assert stream.token_ids == expected_tokens(r.prompt_tokens, 60)
            assert text == " tok" * 60 == r.text
            assert r.engine_id != "k0"
            resumed += stream.attempt > 0
        assert resumed > 0, "no call was on the killed engine"
    finally:
        await stop_mesh(mesh)


async def test_draining_engine_hands_back_its_calls(nats_url: str, root: str) -> None:
    spec = BackendSpec(name="sim", sim_time_scale=4.0)
    mesh = await start_mesh(nats_url, root, engines=1, backend=spec)
    other = EngineService(
        EngineConfig(nats=NatsConfig.at(nats_url, root), engine_id=f"late-{root}", backend=spec, heartbeat_s=0.2)
    )
    try:
        streams = [mesh.client.program(f"p{i}").stream(f"hand back {i}", max_tokens=80) for i in range(4)]
        tasks = [asyncio.create_task(collect(s)) for s in streams]
        await asyncio.sleep(0.5)
        await other.start()
        first = mesh.engines[0]
        object.__setattr__(first.config, "drain_timeout_s", 0.1)  # the drain runs out at once
        await first.stop()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        for stream, _ in results:
            r = stream.result
            assert r is not None and r.output_tokens == 80
            assert stream.token_ids == expected_tokens(r.prompt_tokens, 80)
            assert r.engine_id == other.engine_id and stream.attempt == 1
    finally:
        await other.stop()
        await stop_mesh(mesh)


async def test_second_scheduler_takes_over_when_the_first_is_killed(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=2, backend=BackendSpec(name="sim", sim_time_scale=0.5))
    await mesh.scheduler.stop()  # only the scheduler processes below take submissions
    sched = [*CLI, "scheduler", "--nats", nats_url, "--root", root]
    try:
        with processes(sched, sched) as procs:
            await asyncio.sleep(1.5)  # both subscribed and have seen heartbeats
            client = await Client.connect(nats_url, root=root, timeout_s=60, ack_timeout_s=1.0)
            try:
                tasks = [
                    asyncio.create_task(collect(client.program(f"s{i}").stream(f"q {i}", max_tokens=20)))
                    for i in range(40)
                ]
                procs[0].send_signal(signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
                for stream, _ in results:
                    r = stream.result
                    assert r is not None and r.output_tokens == 20
                    assert stream.token_ids == expected_tokens(r.prompt_tokens, 20)
                after = await client.program("later").call("after the kill", max_tokens=5)
                assert after.output_tokens == 5
            finally:
                await client.close()
    finally:
        await stop_mesh(mesh)


async def test_restarted_tracker_keeps_every_programs_service(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=2)
    try:
        for i in range(6):
            p = mesh.client.program(f"keep{i}")
            for _ in range(i % 3 + 1):
                await p.call("some work", max_tokens=10)
        await asyncio.sleep(0.2)  # the last completions reach the tracker
        before = {r.program_id: r for r in (await mesh.client.table()).programs}
        assert len(before) == 6
        await mesh.tracker.stop()
        mesh.tracker = TrackerService(TrackerConfig(nats=NatsConfig.at(nats_url, root)))
        await mesh.tracker.start()
        after = {r.program_id: r for r in (await table_when_ready(mesh.client)).programs}
        assert after.keys() == before.keys()
        for pid, row in before.items():
            assert after[pid].service_s == pytest.approx(row.service_s)
            assert after[pid].calls_completed == row.calls_completed
        # and it goes on accounting from there
        await mesh.client.program("keep0").call("more", max_tokens=4)
        deadline = time.monotonic() + 5
        while (e := mesh.tracker.table.get("keep0")) is None or e.account.calls_completed < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert e.account.service_s > before["keep0"].service_s
    finally:
        await stop_mesh(mesh)


async def test_completions_while_the_tracker_is_down_are_counted_once(nats_url: str, root: str) -> None:
    """The tracker crashes (no drain, no final flush) while calls run, and a new one starts after
    more of them completed: the durable JetStream consumer hands it every completion it missed, and
    none is counted twice. Each program's service equals the sum its calls' finals report."""
    mesh = await start_mesh(nats_url, root, engines=2, backend=BackendSpec(name="sim", sim_time_scale=0.2))
    finals: dict[str, list[float]] = {}

    async def program(i: int) -> None:
        p = mesh.client.program(f"down{i}")  # not ended: its row stays for the check
        for j in range(4):
            r = await p.call(f"work {j}", max_tokens=24)
            finals.setdefault(p.program_id, []).append(r.final.service_s)
            await asyncio.sleep(0.05)

    try:
        work = asyncio.gather(*(program(i) for i in range(6)))
        await asyncio.sleep(0.3)
        crashed = mesh.tracker  # a crash: the connection drops, nothing is flushed or drained
        for task in (crashed._gc_task, crashed._flush_task):
            if task is not None:
                task.cancel()
        assert crashed._nc is not None
        await crashed._nc.close()
        await asyncio.sleep(1.0)  # completions published meanwhile wait in the stream
        mesh.tracker = TrackerService(TrackerConfig(nats=NatsConfig.at(nats_url, root)))
        await mesh.tracker.start()
        await asyncio.wait_for(work, 60)
        deadline = time.monotonic() + 30  # an event the crashed tracker held is redelivered after ack_wait
        while True:
            rows = {r.program_id: r for r in mesh.tracker.table.summaries()}
            if all(pid in rows and rows[pid].calls_completed >= 4 for pid in finals):
                break
            assert time.monotonic() < deadline, {pid: rows.get(pid) for pid in finals}
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything still redelivered would land now
        for pid, services in finals.items():
            row = mesh.tracker.table.summaries()
            (mine,) = [r for r in row if r.program_id == pid]
            assert mine.calls_completed == 4, pid
            assert mine.service_s == pytest.approx(sum(services), rel=1e-4, abs=1e-6), pid
    finally:
        await stop_mesh(mesh)


async def test_atlas_stamps_follow_the_critical_path(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, policy="atlas", backend=BackendSpec(name="sim", sim_time_scale=1.0))
    core = mesh.scheduler.core

    async def known(call_ids: list[str]) -> None:
        deadline = time.monotonic() + 5
        while not all(c in core.programs.get("dag", _Empty).call_path_s for c in call_ids):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    try:
        p = mesh.client.program("dag")
        a = await p.call("root", max_tokens=8, parents=[])
        await known([a.call_id])
        b, c = await asyncio.gather(
            p.call("left", max_tokens=30, parents=[a.call_id]), p.call("right", max_tokens=5, parents=[a.call_id])
        )
        await known([b.call_id, c.call_id])
        d = await p.call("join", max_tokens=4, parents=[b.call_id, c.call_id])
        s = {r.call_id: r.final.service_s for r in (a, b, c)}
        assert a.final.priority == 0.0
        assert b.final.priority == pytest.approx(s[a.call_id]) == c.final.priority
        critical = s[a.call_id] + max(s[b.call_id], s[c.call_id])
        assert d.final.priority == pytest.approx(critical)
        assert d.final.priority < sum(s.values())  # not PLAS: the parallel branch is not counted
    finally:
        await stop_mesh(mesh)


async def table_when_ready(client: Client) -> ProgramTable:
    """The broker may take a moment to route requests to a tracker that just subscribed."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await client.table()
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class _Empty:
    call_path_s: dict[str, float] = {}  # noqa: RUF012
