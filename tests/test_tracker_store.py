"""The tracker's key-value writes: many puts at once, each outcome its own."""

from __future__ import annotations

import nats
import nats.errors
import nats.js.errors
from eventkit import completed

from autellix.policy.program_account import ProgramAccount
from autellix.services.tracker.kv_writer import KvWriter
from autellix.services.tracker.process_table import ProgramEntry, to_record


async def test_puts_land_and_a_refused_one_fails_alone(nats_url: str, root: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket=f"w_{root}", history=1, max_value_size=1000)
        writer = KvWriter(nc, f"w_{root}")
        items = [(f"k{i}", f"v{i}".encode()) for i in range(300)]
        items.insert(7, ("big", b"x" * 5000))  # over the bucket's value size: refused by JetStream
        outcomes = await writer.put_many(items)
        assert isinstance(outcomes[7], nats.js.errors.APIError)
        assert [o for i, o in enumerate(outcomes) if i != 7] == [None] * 300
        assert (await kv.get("k299")).value == b"v299"
        with_no_bucket = KvWriter(nc, f"none_{root}")
        (missing,) = await with_no_bucket.put_many([("k", b"v")], timeout_s=2.0)
        assert isinstance(missing, nats.errors.NoRespondersError | nats.errors.TimeoutError)
        await js.delete_key_value(f"w_{root}")
    finally:
        await nc.close()


def test_a_long_programs_record_keeps_its_newest_paths() -> None:
    account = ProgramAccount("p")
    for i in range(5000):
        account.complete(f"c{i}", None, 0.001)
    entry = ProgramEntry(account=account, first_seen_at=0.0, last_activity_at=0.0)
    entry.active_calls = {f"a{i}": float(i) for i in range(600)}
    record = to_record(entry)
    paths = list(record.call_path_s)
    assert paths[0] == "c4488" and paths[-1] == "c4999"
    assert record.active_calls[0] == "a88" and len(record.active_since) == 512


def test_a_dispatch_trailing_its_completion_leaves_no_active_call() -> None:
    from autellix.proto import CallDispatched
    from autellix.services.tracker.process_table import ProcessTable

    table = ProcessTable()
    done = completed("p", "c1", 0.5, engine_id="e")
    table.on_completed(done, 1.0)
    table.on_dispatched(CallDispatched(call_id="c1", program_id="p", engine_id="e", priority=0.0), 1.1)
    entry = table.get("p")
    assert entry is not None and not entry.active_calls and entry.account.calls_completed == 1
    table.on_dispatched(CallDispatched(call_id="c2", program_id="p", engine_id="e", priority=0.0), 1.2)
    assert list(entry.active_calls) == ["c2"]
