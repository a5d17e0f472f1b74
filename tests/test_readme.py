"""The README's Python examples run, as written, against a mesh (sim backend)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest
from meshkit import start_gateway, start_mesh, stop_mesh

from autellix.engine.factory import BackendSpec
from autellix.proto import Subjects
from autellix.services.auth import make_identities, server_config, write_credentials
from autellix.services.embedded_nats import EmbeddedNats

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first_block is not None
    lines = [ln for ln in first_block.group(1).splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 2
    assert "autellix up --demo" in lines[0] and "pytest" in lines[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "README.md" in ci  # CI runs the README's own test command


@pytest.mark.parametrize("marker", ["from autellix.services.client import Client", "import asyncio, json, os, nats"])
async def test_readme_example_runs(marker: str, tmp_path: Path) -> None:
    """Each example runs as written against an authenticated broker (as `autellix up` starts it), with
    only the credentials file's location changed: it finds the client's credentials, uses its own
    user's subjects and inboxes, and gets an answer."""
    (source,) = [b for b in python_blocks() if marker in b]
    identities = make_identities()
    creds = tmp_path / "client.creds"
    # the examples use the default subject root; this test's own broker owns it
    with EmbeddedNats(port=0, config=server_config(identities, Subjects("autellix"))) as server:
        write_credentials(creds, identities["client"].url(server.url))
        source = source.replace('os.path.expanduser("~/.cache/autellix/credentials/client.creds")', repr(str(creds)))
        urls = {role: ident.url(server.url) for role, ident in identities.items()}
        mesh = await start_mesh(
            server.url, "autellix", backend=BackendSpec(name="sim", sim_time_scale=0.01), role_urls=urls
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTELLIX_NATS")}
        env["AUTELLIX_NATS_CREDS"] = str(creds)  # what Client.connect() finds without arguments
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert "tok" in out.decode()
        finally:
            await stop_mesh(mesh)


async def test_readme_openai_example_runs(nats_url: str, root: str) -> None:
    """The first example: the official `openai` SDK against the gateway, two calls as one program."""
    pytest.importorskip("openai")
    (source,) = [b for b in python_blocks() if "from openai import OpenAI" in b]
    mesh = await start_mesh(nats_url, root, backend=BackendSpec(name="sim", sim_time_scale=0.01))
    gateway = await start_gateway(mesh)
    seen: list[str] = []
    nc = mesh.client.nc

    async def on_dispatched(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(msg.data.decode())

    await nc.subscribe(f"{root}.events.call.dispatched.*", cb=on_dispatched)  # every program slot
    await nc.flush()
    try:
        source = source.replace("http://127.0.0.1:8000", gateway.url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().count("tok") == 64  # two answers of 32 tokens
        assert len(seen) == 2 and all('"program_id":"trip-agent-1"' in s for s in seen)
        # X-Session-Final on the second call ended the program
        assert mesh.tracker.table.get("trip-agent-1") is None
    finally:
        await gateway.stop()
        await stop_mesh(mesh)
