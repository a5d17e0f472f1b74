"""A three-node NATS cluster: the mesh runs across it and survives the loss of a node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from meshkit import start_mesh, stop_mesh

from autellix.bench.nats_node_loss import record_completions
from autellix.engine.factory import BackendSpec
from autellix.services.embedded_nats import EmbeddedNatsCluster


async def test_a_node_dies_under_load_and_nothing_is_lost() -> None:
    """Calls run across a 3-node cluster (tracker data on 3 replicas); one node is SIGKILLed
    mid-load: every call still ends with its final, every program's service equals what its
    calls' finals report, and the node rejoins when started again.

    A call can run twice across the kill (its caller lost replies and resubmitted while the first
    attempt still ran): the program's service is then every attempt's, as the engines reported them."""
    with EmbeddedNatsCluster(3) as cluster:
        mesh = await start_mesh(
            cluster.url, "clu", engines=2, backend=BackendSpec(name="sim", sim_time_scale=1.0), kv_replicas=3
        )
        finals: dict[str, list[float]] = {}
        reported = record_completions(mesh.engines)  # (program, call, attempt) -> engine time
        latencies: list[float] = []
        finished_at: list[float] = []

        async def program(i: int) -> None:
            p = mesh.client.program(f"clu{i}")
            for j in range(8):
                r = await p.call(f"step {j}", max_tokens=48)
                finals.setdefault(p.program_id, []).append(r.final.service_s)
                latencies.append(r.latency_s)
                finished_at.append(time.monotonic())

        try:
            assert mesh.tracker.store.enabled and mesh.tracker.store.replicas == 3
            work = asyncio.gather(*(program(i) for i in range(6)))
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            cluster.nodes[0].kill()
            await asyncio.wait_for(work, 120)  # a lost call would raise CallFailed or time out here
            recovery_s = time.monotonic() - killed_at
            assert sum(len(v) for v in finals.values()) == 48
            after_kill = sum(t > killed_at for t in finished_at)
            assert after_kill >= 12, "the kill must land while calls run"
            deadline = time.monotonic() + 20
            while True:
                rows = {r.program_id: r for r in mesh.tracker.table.summaries()}
                done = [pid for pid in finals if pid in rows and rows[pid].calls_completed >= 8]
                if len(done) == len(finals):
                    break
                assert time.monotonic() < deadline, {pid: rows.get(pid) for pid in finals}
                await asyncio.sleep(0.1)
            for pid, services in finals.items():
                assert rows[pid].calls_completed == 8, pid
                ran = sum(s for (program, _, _), s in reported.items() if program == pid)
                assert rows[pid].service_s == pytest.approx(ran, rel=1e-4, abs=1e-6), pid
                assert rows[pid].service_s >= sum(services) - 1e-6, pid
            resubmitted = len(reported) - 48
            print(
                f"\ncluster: node killed with {48 - after_kill} of 48 calls done; the rest finished "
                f"{recovery_s:.2f} s later ({resubmitted} calls ran a second attempt); "
                f"call latency p50 {sorted(latencies)[24]:.2f} s, max {max(latencies):.2f} s"
            )
            # the node rejoins: JetStream answers through it again
            cluster.nodes[0].start()
            nc = await nats.connect(cluster.nodes[0].url)
            rejoined = False
            try:
                for _ in range(120):
                    try:
                        kv = await nc.jetstream().key_value(mesh.tracker.store.bucket)
                        rejoined = len(await kv.keys()) >= len(finals)
                        break
                    except Exception:  # the rejoining node catches up first
                        await asyncio.sleep(0.25)
            finally:
                await nc.close()
            assert rejoined, "the restarted node did not serve the tracker's bucket"
        finally:
            await stop_mesh(mesh)


def test_up_cluster_runs_the_demo(tmp_path: Path) -> None:
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autellix",
            "up",
            "--cluster",
            "3",
            "--backend",
            "sim",
            "--sim-time-scale",
            "0",
            "--demo",
            "--creds-out",
            str(tmp_path / "client.creds"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("nats://") == 3, done.stdout  # the readiness line names every node
