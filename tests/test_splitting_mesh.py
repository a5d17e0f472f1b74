"""Program-id splitting through a real authenticated mesh (issue 11): on a busy engine, a client
that opens a new program for every call gets no better queue wait than a client whose calls stay
in long programs. The schedulers account service per tenant (each client identity is one) and
stamp a tenant's new program at its recent service (policy/tenant_account.py); the pure-core
version of this is in tests/test_policy_tenant.py."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import pytest
from meshkit import start_mesh, stop_mesh

from autellix.engine.factory import BackendSpec
from autellix.proto import Subjects
from autellix.services.auth import Identity, make_identities, server_config
from autellix.services.client import Client
from autellix.services.embedded_nats import EmbeddedNats

ROOT = "splitmesh"
LANES = 4  # concurrent sequences of calls per client
CALLS = 8  # calls in each sequence


@pytest.fixture(scope="module")
def identities() -> dict[str, Identity]:
    return make_identities(clients=("honest", "splitter"))


@pytest.fixture(scope="module")
def server(identities: dict[str, Identity]) -> Iterator[str]:
    with EmbeddedNats(port=0, config=server_config(identities, Subjects(ROOT))) as s:
        yield s.url


async def _lane(client: Client, lane: int, split: bool) -> list[float]:
    """``CALLS`` calls one after another: in one program, or each in a program of its own."""
    waits = []
    program = client.program(f"{client.user}-lane{lane}")
    for i in range(CALLS):
        p = client.program(f"{client.user}-lane{lane}-call{i}") if split else program
        r = await p.call(f"step {i} of lane {lane}", max_tokens=32)
        waits.append(r.final.queue_wait_s)
    return waits


async def test_one_program_per_call_waits_no_less_than_one_long_program(
    identities: dict[str, Identity], server: str
) -> None:
    urls = {role: ident.url(server) for role, ident in identities.items()}
    urls["client"] = urls["honest"]
    # one engine running two calls at a time: eight lanes keep it busy, so calls queue by priority
    spec = BackendSpec(name="sim", sim_time_scale=2.0, max_batch=2)
    mesh = await start_mesh(server, ROOT, role_urls=urls, backend=spec, policy="plas")
    splitter = await Client.connect(urls["splitter"], root=ROOT, timeout_s=60)
    try:
        honest = mesh.client
        assert (honest.user, splitter.user) == ("honest", "splitter")
        lanes = [_lane(honest, i, split=False) for i in range(LANES)]
        lanes += [_lane(splitter, i, split=True) for i in range(LANES)]
        results = await asyncio.wait_for(asyncio.gather(*lanes), 120)
        honest_waits = [w for r in results[:LANES] for w in r]
        split_waits = [w for r in results[LANES:] for w in r]
        honest_median, split_median = statistics.median(honest_waits), statistics.median(split_waits)
        print(
            f"\nsplitting through the mesh: median queue wait {split_median * 1e3:.0f} ms one program per call,"
            f" {honest_median * 1e3:.0f} ms in long programs (ratio {split_median / max(honest_median, 1e-9):.2f})"
        )
        assert honest_median > 0.02, "the engine must be busy enough for calls to queue"
        # without tenant accounting the splitter's fresh programs always ranked first (21x less wait)
        assert split_median >= 0.8 * honest_median
    finally:
        await splitter.close()
        await stop_mesh(mesh)
