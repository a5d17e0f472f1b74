"""An authenticated broker with one identity per role: the mesh works, and every spoofing attempt a
client could make is refused by nats-server itself."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
from meshkit import Mesh, start_mesh, stop_mesh
from nats.aio.client import Client as NATS

from autellix.engine.factory import BackendSpec
from autellix.proto import CallAbort, Subjects, encode
from autellix.services.auth import (
    Identity,
    inbox_prefix,
    make_identities,
    read_credentials,
    redact_url,
    server_config,
    url_user,
    with_credentials,
    write_credentials,
)
from autellix.services.client import Client
from autellix.services.embedded_nats import EmbeddedNats

ROOT = "authmesh"


@pytest.fixture(scope="module")
def identities() -> dict[str, Identity]:
    return make_identities()


@pytest.fixture(scope="module")
def auth_server(identities: dict[str, Identity]) -> Iterator[str]:
    with EmbeddedNats(port=0, config=server_config(identities, Subjects(ROOT))) as server:
        yield server.url


def role_urls(identities: dict[str, Identity], url: str) -> dict[str, str]:
    return {role: ident.url(url) for role, ident in identities.items()}


async def connect_as(url: str) -> tuple[NATS, list[str]]:
    """A raw nats-py connection; permission errors the server sends are collected."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        url, error_cb=on_error, inbox_prefix=inbox_prefix(url_user(url)), allow_reconnect=False, connect_timeout=5
    )
    return nc, errors


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for ``condition`` (the server's error reports arrive asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the condition"
        await asyncio.sleep(0.02)


@pytest.fixture
async def auth_mesh(identities: dict[str, Identity], auth_server: str) -> AsyncIterator[Mesh]:
    m = await start_mesh(auth_server, ROOT, role_urls=role_urls(identities, auth_server))
    try:
        yield m
    finally:
        await stop_mesh(m)


async def test_the_mesh_answers_calls_under_auth(auth_mesh: Mesh) -> None:
    assert auth_mesh.tracker.store.enabled, "the tracker reaches its JetStream bucket as the tracker identity"
    async with auth_mesh.client.program() as p:
        result = await p.call("hello there", max_tokens=4)
    assert result.finish_reason == "length" and result.output_tokens == 4
    table = await auth_mesh.client.table()  # request/reply to the tracker works too
    assert isinstance(table.programs, list)


async def test_no_connection_without_credentials(auth_server: str, identities: dict[str, Identity]) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(auth_server, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    wrong = with_credentials(auth_server, "client", "not-the-password")
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(wrong, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)


async def _delivered(watcher: NATS, subject: str, publisher: NATS, payload: bytes, wait_s: float = 0.5) -> bool:
    """Whether a message ``publisher`` sends on ``subject`` reaches a subscriber allowed to read it."""
    got = asyncio.Event()

    async def cb(_: object) -> None:
        got.set()

    sub = await watcher.subscribe(subject, cb=cb)
    await watcher.flush()
    await publisher.publish(subject, payload)
    await publisher.flush()
    try:
        await asyncio.wait_for(got.wait(), wait_s)
        return True
    except TimeoutError:
        return False
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(
    ("subject", "watcher_role", "payload", "what"),
    [
        ("events.call.completed", "tracker", {"call_id": "x", "program_id": "victim", "service_s": 1e3}, "fake event"),
        ("tracker.service", "scheduler", {"program_id": "me", "service_s": 0.0}, "fake priority update"),
        ("engine.e1.calls", "engine", {"call_id": "x", "program_id": "me", "priority": -1e9}, "call to an engine"),
        ("engine.heartbeat", "scheduler", {"engine_id": "fake", "backend": "sim", "model": "m"}, "fake engine"),
        ("events.call.dispatched", "tracker", {"call_id": "x", "program_id": "victim"}, "fake dispatch"),
        ("events.call.completed.7", "tracker", {"call_id": "x", "program_id": "victim", "service_s": 1e3}, "slotted"),
        ("events.call.dispatched.7", "tracker", {"call_id": "x", "program_id": "victim"}, "fake slotted dispatch"),
        ("call.handback", "scheduler", {"call_id": "x", "program_id": "me"}, "fake hand-back"),
    ],
)
async def test_a_client_cannot_spoof_mesh_messages(
    auth_server: str,
    identities: dict[str, Identity],
    subject: str,
    watcher_role: str,
    payload: dict[str, object],
    what: str,
) -> None:
    urls = role_urls(identities, auth_server)
    client, errors = await connect_as(urls["client"])
    watcher, _ = await connect_as(urls[watcher_role])
    full = f"{ROOT}.{subject}"
    try:
        assert not await _delivered(watcher, full, client, json.dumps(payload).encode()), f"{what} got through"
        await until(lambda: any("permissions violation" in e for e in errors))
    finally:
        await client.close()
        await watcher.close()


async def test_the_roles_that_own_a_subject_can_publish_it(auth_server: str, identities: dict[str, Identity]) -> None:
    """The refusals above are permissions, not a broken subject: the owning role gets through."""
    urls = role_urls(identities, auth_server)
    engine, errors = await connect_as(urls["engine"])
    tracker, _ = await connect_as(urls["tracker"])
    try:
        # heartbeats: no JetStream stream captures them, so this is the permission alone
        assert await _delivered(tracker, f"{ROOT}.engine.heartbeat", engine, b"{}", wait_s=10.0)
        assert not errors
    finally:
        await engine.close()
        await tracker.close()


async def test_a_client_reads_neither_the_mesh_nor_other_inboxes(
    auth_server: str, identities: dict[str, Identity]
) -> None:
    urls = role_urls(identities, auth_server)
    client, errors = await connect_as(urls["client"])
    engine, _ = await connect_as(urls["engine"])
    seen: list[str] = []

    async def cb(msg: object) -> None:
        seen.append(getattr(msg, "subject", ""))

    try:
        for pattern in (f"{ROOT}.>", "_INBOX.>", "_I.gateway.>", ">"):
            await client.subscribe(pattern, cb=cb)
        await client.flush()
        await asyncio.sleep(0.2)
        await engine.publish(f"{ROOT}.engine.heartbeat", b"{}")
        await engine.publish(f"_I.gateway.{uuid.uuid4().hex}", b"someone else's tokens")
        await engine.flush()
        await asyncio.sleep(0.3)
        assert seen == []
        await until(lambda: sum("permissions violation" in e for e in errors) >= 4)
    finally:
        await client.close()
        await engine.close()


def test_credentials_files_and_redaction(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = with_credentials("nats://127.0.0.1:4222", "client", "s3cret")
    path = write_credentials(tmp_path / "client.creds", url)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_credentials(path) == url
    assert "s3cret" not in redact_url(url) and url_user(url) == "client"
    (tmp_path / "bad").write_text("hello")
    with pytest.raises(ValueError, match="credentials file"):
        read_credentials(tmp_path / "bad")


def test_no_log_line_shows_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    from autellix.services.logs import configure_logging, get_logger

    configure_logging("info", json=True)
    try:
        get_logger("tracker").info("starting", config={"nats_url": "nats://tracker:hunter2@127.0.0.1:4222"})
        line = capsys.readouterr().err
        assert "hunter2" not in line and "tracker:***@127.0.0.1" in line
    finally:
        configure_logging("warning", json=True)


# -- ownership: with two client identities, neither can touch the other's calls or programs --------
@pytest.fixture(scope="module")
def two_clients() -> dict[str, Identity]:
    return make_identities(clients=("alice", "bob"))


@pytest.fixture(scope="module")
def two_client_server(two_clients: dict[str, Identity]) -> Iterator[str]:
    with EmbeddedNats(port=0, config=server_config(two_clients, Subjects(ROOT))) as server:
        yield server.url


@pytest.fixture
async def two_client_mesh(two_clients: dict[str, Identity], two_client_server: str) -> AsyncIterator[Mesh]:
    urls = role_urls(two_clients, two_client_server)
    urls["client"] = urls["alice"]
    m = await start_mesh(two_client_server, ROOT, role_urls=urls, backend=BackendSpec(name="sim", sim_time_scale=1.0))
    try:
        yield m
    finally:
        await stop_mesh(m)


async def test_only_the_owner_aborts_a_call_or_ends_a_program(
    two_client_mesh: Mesh, two_clients: dict[str, Identity], two_client_server: str
) -> None:
    alice = two_client_mesh.client
    assert alice.user == "alice"
    bob = await Client.connect(two_clients["bob"].url(two_client_server), root=ROOT, timeout_s=60)
    try:
        program = alice.program("alices-program")
        call_id = "alices-long-call"
        task = asyncio.create_task(program.call("a long answer please", max_tokens=400, call_id=call_id))
        await until(lambda: any(call_id in e._inflight for e in two_client_mesh.engines))
        await bob.nc.publish(bob.abort_subject, encode(CallAbort(call_id=call_id)))  # bob's abort: refused
        refused = await bob.end_program("alices-program")
        assert refused.ok is False and refused.code == "not_owner"
        await asyncio.sleep(0.3)
        assert not task.done(), "bob's abort must not end alice's call"
        await alice.nc.publish(alice.abort_subject, encode(CallAbort(call_id=call_id)))  # alice's own: honoured
        result = await asyncio.wait_for(task, 30)
        assert result.finish_reason == "abort"
        assert (await alice.end_program("alices-program")).ok is True
    finally:
        await bob.close()


async def test_a_caller_cannot_point_its_stream_at_another_inbox(
    two_client_mesh: Mesh, two_clients: dict[str, Identity], two_client_server: str
) -> None:
    alice = two_client_mesh.client
    bob, _ = await connect_as(two_clients["bob"].url(two_client_server))
    seen: list[bytes] = []

    async def cb(msg: object) -> None:
        seen.append(getattr(msg, "data", b""))

    try:
        await bob.subscribe("_I.bob.victim", cb=cb)
        await bob.flush()
        inbox = alice.nc.new_inbox()
        sub = await alice.nc.subscribe(inbox)
        request = {"program_id": "p", "prompt": "hi", "max_tokens": 2, "reply_to": "_I.bob.victim"}
        await alice.nc.publish(alice.submit_subject, json.dumps(request).encode(), reply=inbox)
        error = json.loads((await sub.next_msg(timeout=10)).data)
        assert error["type"] == "error" and error["code"] == "bad_field" and "inboxes" in error["message"]
        await asyncio.sleep(0.3)
        assert seen == []
    finally:
        await bob.close()


async def test_a_caller_cannot_submit_in_another_users_name(
    two_client_server: str, two_clients: dict[str, Identity]
) -> None:
    urls = role_urls(two_clients, two_client_server)
    bob, errors = await connect_as(urls["bob"])
    scheduler, _ = await connect_as(urls["scheduler"])
    try:
        assert not await _delivered(scheduler, f"{ROOT}.call.submit.alice", bob, b"{}")
        await until(lambda: any("permissions violation" in e for e in errors))
    finally:
        await bob.close()
        await scheduler.close()
